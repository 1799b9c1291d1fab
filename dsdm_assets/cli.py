"""``dsdm``: the few operations Dagster's own CLI has no command for.

    dsdm add-crawl NAME [NAME ...]   register crawls as partitions (needs DAGSTER_HOME)
    dsdm crawls                      list registered crawls
    dsdm report CRAWL                what the lineage database holds for a crawl
    dsdm check-config FILE [--job J] check a run config's values before a run starts
    dsdm diff A B                    what changed between two selections (A, B: CRAWL,
                                     CRAWL:METHOD, or a selection_id)
    dsdm explain CRAWL EXAMPLE_ID    why DsDm ranks an example where it does: its score per
                                     task, the mixing weights, the targets it moves most
    dsdm rounds CRAWL --rounds N     selection_job N times; each round's proxies train on the
                                     previous round's DsDm selection plus a random rest
"""

import argparse
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from dsdm.lineage import LineageDB
    from dsdm.store import ArtifactStore

CRAWL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_crawl_name(name: str) -> str:
    """Crawl names become partition keys and path segments: no traversal, no odd characters."""
    if not CRAWL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid crawl name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsdm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-crawl", help="register crawl partitions")
    add.add_argument("names", nargs="+")
    commands.add_parser("crawls", help="list registered crawl partitions")
    report = commands.add_parser("report", help="summarise a crawl's rows in the lineage DB")
    report.add_argument("crawl")
    check = commands.add_parser("check-config", help="check a run config (YAML) for a job")
    check.add_argument("file")
    check.add_argument("--job", default="selection_job",
                       choices=("selection_job", "evaluation_job"))
    diff = commands.add_parser("diff", help="what changed between two selections")
    diff.add_argument("a", help="CRAWL (its latest DsDm selection), CRAWL:METHOD, or a selection_id")
    diff.add_argument("b")
    explain = commands.add_parser("explain", help="why DsDm ranks an example where it does")
    explain.add_argument("crawl")
    explain.add_argument("example_id")
    explain.add_argument("--selection", help="a DsDm selection_id of the crawl (default: its "
                         "latest DsDm selection)")
    rounds = commands.add_parser("rounds", help="select in rounds: each round's proxies train "
                                 "on the previous round's DsDm selection plus a random rest")
    rounds.add_argument("crawl")
    rounds.add_argument("--rounds", type=int, default=2, help="how many rounds (default 2)")
    rounds.add_argument("-c", "--config", help="run config YAML, as for `dagster job execute -c`")
    args = parser.parse_args(argv)
    if args.command == "rounds":
        return run_rounds(args.crawl, args.rounds, args.config)
    if args.command == "diff":
        return print_diff(args.a, args.b)
    if args.command == "explain":
        return print_explanation(args.crawl, args.example_id, args.selection)
    if args.command == "report":
        return print_report(args.crawl)
    if args.command == "check-config":
        return check_config_file(args.file, args.job)

    import dagster as dg

    from dsdm_assets.partitions import crawl_partitions

    instance = dg.DagsterInstance.get()
    if args.command == "add-crawl":
        try:
            names = [validate_crawl_name(n) for n in args.names]
        except ValueError as error:
            print(f"dsdm: {error}", file=sys.stderr)
            return 2
        known = set(instance.get_dynamic_partitions(crawl_partitions.name))
        new = [n for n in names if n not in known]
        if new:
            instance.add_dynamic_partitions(crawl_partitions.name, new)
        print(f"crawls added: {new or 'none'}; already registered: {sorted(set(names) - set(new)) or 'none'}")
    else:
        for name in instance.get_dynamic_partitions(crawl_partitions.name):
            print(name)
    return 0


def check_config_file(path: str, job_name: str) -> int:
    """Dagster's shape and type check of ``path`` for ``job_name``, then every value against
    its step's constraints; 0 when both pass, 2 with every problem printed otherwise."""
    import yaml

    from dsdm_assets.config import check_run_config
    from dsdm_assets.definitions import defs

    try:
        with open(path) as file:
            run_config = yaml.safe_load(file) or {}
        check_run_config(run_config, path, defs.resolve_job_def(job_name))
    except (OSError, yaml.YAMLError, ValueError) as error:
        print(f"dsdm: {error}", file=sys.stderr)
        return 2
    print(f"{path}: a valid run config for {job_name}")
    return 0


def run_rounds(crawl: str, rounds: int, config_path: str | None) -> int:
    """Run selection_job ``rounds`` times on ``crawl``. Round r + 1 sets
    ``proxy_checkpoints.config.previous_selection`` to round r's DsDm selection, so its
    proxies (and everything made from them) are new materialisations with lineage to that
    selection, while every asset whose inputs did not change is reused. Each run is tagged
    ``dsdm/round`` and ``dsdm/previous_selection``. 0 when every round succeeded."""
    import copy
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    import dagster as dg
    import yaml

    from dsdm_assets.config import check_run_config
    from dsdm_assets.definitions import defs
    from dsdm_assets.partitions import crawl_partitions

    try:
        if rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {rounds}")
        run_config = {}
        if config_path:
            with open(config_path) as file:
                run_config = yaml.safe_load(file) or {}
        check_run_config(run_config, config_path or "the default run config",
                         defs.resolve_job_def("selection_job"))
        instance = dg.DagsterInstance.get()
        if crawl not in instance.get_dynamic_partitions(crawl_partitions.name):
            raise ValueError(f"crawl {crawl!r} is not registered; run `dsdm add-crawl {crawl}`")
    except (OSError, yaml.YAMLError, ValueError) as error:
        print(f"dsdm: {error}", file=sys.stderr)
        return 2
    proxy_config = run_config.get("ops", {}).get("proxy_checkpoints", {}).get("config", {})
    previous = proxy_config.get("previous_selection", "")
    made: list[tuple[int, str, str]] = []
    dagster = str(Path(sys.executable).parent / "dagster")
    with tempfile.TemporaryDirectory(prefix="dsdm-rounds-") as folder:
        for number in range(1, rounds + 1):
            this = copy.deepcopy(run_config)
            if previous:
                ops = this.setdefault("ops", {})
                section = ops.setdefault("proxy_checkpoints", {}).setdefault("config", {})
                section["previous_selection"] = previous
            path = Path(folder) / f"round-{number}.yaml"
            path.write_text(yaml.safe_dump(this))
            before = _latest_selection(instance, crawl)
            print(f"dsdm rounds: round {number} of {rounds} on {crawl}: proxies on "
                  f"{'selection ' + previous + ' plus a random rest' if previous else 'random shares of the pool'}",
                  flush=True)
            tags = {"dagster/partition": crawl, "dsdm/round": str(number),
                    "dsdm/previous_selection": previous}
            done = subprocess.run([dagster, "job", "execute", "-m", "dsdm_assets.definitions",
                                   "-j", "selection_job", "-c", str(path),
                                   "--tags", json.dumps(tags)], check=False)
            latest = _latest_selection(instance, crawl)
            if done.returncode != 0 or latest is None or latest == before:
                print(f"dsdm: round {number} did not materialise selected_subset "
                      f"(exit status {done.returncode}); rounds 1-{number - 1} stand", file=sys.stderr)
                return done.returncode or 1
            made.append((number, latest[1], previous))
            previous = latest[1]
    print("\nround  selection          previous_selection")
    for number, selection, before_it in made:
        print(f"{number:>5}  {selection}   {before_it or '-'}")
    if len(made) > 1:
        print(f"\nwhat the last round changed: dsdm diff {made[-2][1]} {made[-1][1]}")
    return 0


def _latest_selection(instance, crawl: str) -> tuple[int, str] | None:
    """(storage id, selection_id) of the latest selected_subset materialisation of ``crawl``."""
    import dagster as dg

    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("selected_subset"), asset_partitions=[crawl]), limit=1).records
    if not records:
        return None
    return records[0].storage_id, records[0].asset_materialization.metadata["selection_id"].value


REPORT_QUERIES = {
    "artifacts (latest run per asset)": """
        SELECT asset, count(*) AS files, sum(row_count) AS rows, bool_or(reused) AS reused,
               any_value(run_id) AS run_id
        FROM artifacts a
        WHERE crawl = $crawl AND recorded_at = (
            SELECT max(recorded_at) FROM artifacts b WHERE b.asset = a.asset AND b.crawl = $crawl)
        GROUP BY asset ORDER BY min(recorded_at)""",
    "selections": """
        SELECT selection_id, method, count(*) AS examples, round(min(score), 6) AS min_score,
               any_value(run_id) AS run_id
        FROM selections WHERE crawl = $crawl GROUP BY ALL""",
    "selected examples per source (all selections)": """
        SELECT source, count(*) AS examples, round(count(*) / sum(count(*)) OVER (), 3) AS share
        FROM selections WHERE crawl = $crawl GROUP BY source ORDER BY examples DESC""",
    "quarantine": """
        SELECT reason, count(*) AS rows FROM quarantine WHERE crawl = $crawl
        GROUP BY reason ORDER BY rows DESC""",
}


def print_report(crawl: str) -> int:
    """Print the lineage tables' rows for ``crawl`` (the DB named by DSDM_LINEAGE_DB)."""
    from dsdm.lineage import LineageDB
    from resources import default_resources

    db = LineageDB(default_resources()["lineage"].database, read_only=True)
    print(f"lineage database: {db.path}")
    for title, sql in REPORT_QUERIES.items():
        with db.connect() as con:
            relation = con.sql(sql, params={"crawl": crawl})
            print(f"\n{title}:")
            relation.show(max_width=120)
    return 0


DIFF_QUERIES = {
    "examples and documents": """
        WITH a AS (SELECT * FROM selections WHERE selection_id = $a),
             b AS (SELECT * FROM selections WHERE selection_id = $b)
        SELECT 'examples' AS unit, (SELECT count(*) FROM a) AS in_a, (SELECT count(*) FROM b) AS in_b,
               (SELECT count(*) FROM a JOIN b USING (example_id)) AS shared,
               (SELECT count(*) FROM b ANTI JOIN a USING (example_id)) AS entering,
               (SELECT count(*) FROM a ANTI JOIN b USING (example_id)) AS leaving
        UNION ALL
        SELECT 'documents', (SELECT count(DISTINCT doc_id) FROM a), (SELECT count(DISTINCT doc_id) FROM b),
               (SELECT count(*) FROM (SELECT DISTINCT doc_id FROM a) JOIN (SELECT DISTINCT doc_id FROM b) USING (doc_id)),
               (SELECT count(*) FROM (SELECT DISTINCT doc_id FROM b) ANTI JOIN a USING (doc_id)),
               (SELECT count(*) FROM (SELECT DISTINCT doc_id FROM a) ANTI JOIN b USING (doc_id))""",
    "source shares (largest change first)": """
        WITH a AS (SELECT source, count(*) / sum(count(*)) OVER () AS share FROM selections
                   WHERE selection_id = $a GROUP BY source),
             b AS (SELECT source, count(*) / sum(count(*)) OVER () AS share FROM selections
                   WHERE selection_id = $b GROUP BY source)
        SELECT source, round(coalesce(a.share, 0), 4) AS share_a, round(coalesce(b.share, 0), 4) AS share_b,
               round(coalesce(b.share, 0) - coalesce(a.share, 0), 4) AS change
        FROM a FULL JOIN b USING (source) ORDER BY abs(change) DESC, source""",
    "score drift of the shared examples": """
        SELECT count(*) AS shared, round(avg(b.score - a.score), 6) AS mean_change,
               round(avg(abs(b.score - a.score)), 6) AS mean_abs_change,
               round(corr(a.score, b.score), 4) AS pearson, round(corr(a.rank, b.rank), 4) AS rank_corr
        FROM selections a JOIN selections b USING (example_id)
        WHERE a.selection_id = $a AND b.selection_id = $b""",
    "entering (best five in B)": """
        SELECT b.rank, b.example_id, b.source, round(b.score, 6) AS score FROM selections b
        WHERE b.selection_id = $b AND b.example_id NOT IN
            (SELECT example_id FROM selections WHERE selection_id = $a)
        ORDER BY b.rank LIMIT 5""",
    "leaving (best five in A)": """
        SELECT a.rank, a.example_id, a.source, round(a.score, 6) AS score FROM selections a
        WHERE a.selection_id = $a AND a.example_id NOT IN
            (SELECT example_id FROM selections WHERE selection_id = $b)
        ORDER BY a.rank LIMIT 5""",
}


def resolve_selection(db: "LineageDB", spec: str) -> dict:
    """A selection named as CRAWL (its latest DsDm selection), CRAWL:METHOD or a
    selection_id -> its crawl, method, unit and selection_id; ValueError naming the spec."""
    by_id = db.query("SELECT any_value(crawl) AS crawl, any_value(method) AS method, "
                     "any_value(unit) AS unit, selection_id FROM selections "
                     "WHERE selection_id = ? GROUP BY selection_id", [spec]).to_pylist()
    if by_id:
        return by_id[0]
    crawl, _, method = spec.partition(":")
    method = method or "dsdm"
    # the latest: the selection whose run recorded its artifacts last
    latest = db.query("""
        SELECT s.crawl, s.method, any_value(s.unit) AS unit, s.selection_id
        FROM selections s LEFT JOIN artifacts a ON a.run_id = s.run_id AND a.crawl = s.crawl
        WHERE s.crawl = ? AND s.method = ? GROUP BY ALL
        ORDER BY max(a.recorded_at) DESC NULLS LAST, s.selection_id LIMIT 1""",
                      [crawl, method]).to_pylist()
    if not latest:
        known = db.query("SELECT DISTINCT crawl || ':' || method AS s FROM selections ORDER BY s")
        raise ValueError(f"no selection for {spec!r} (crawl {crawl!r}, method {method!r}); "
                         f"selections in the database: {known.column('s').to_pylist() or 'none'}")
    return latest[0]


def print_diff(spec_a: str, spec_b: str) -> int:
    """Print what changed from selection A to selection B (see DIFF_QUERIES)."""
    import duckdb

    from dsdm.lineage import LineageDB
    from resources import default_resources

    path = default_resources()["lineage"].database
    try:
        LineageDB(path, read_only=True)  # exists?
        db = LineageDB(path)  # writable once: brings a file from an older version up to date
        a, b = resolve_selection(db, spec_a), resolve_selection(db, spec_b)
    except (FileNotFoundError, ValueError) as error:
        print(f"dsdm: {error}", file=sys.stderr)
        return 2
    for name, sel in (("A", a), ("B", b)):
        print(f"{name}: crawl {sel['crawl']}, method {sel['method']}, unit {sel['unit']}, "
              f"selection {sel['selection_id']}")
    for title, table in selection_diff(db, a["selection_id"], b["selection_id"]).items():
        print(f"\n{title}:")
        duckdb.from_arrow(table).show(max_width=120)
    return 0


def selection_diff(db: "LineageDB", selection_a: str, selection_b: str) -> dict[str, "pa.Table"]:
    """DIFF_QUERIES' answers for two selection ids, by title (the same SQL works in DuckDB)."""
    params = {"a": selection_a, "b": selection_b}
    with db.connect() as con:
        return {title: con.sql(sql, params=params).to_arrow_table()
                for title, sql in DIFF_QUERIES.items()}


EXPLAIN_PARTS = """
    SELECT task, round(weight, 4) AS weight, coefficient, task_score, part, counted
    FROM explanations WHERE selection_id = $selection AND example_id = $example
    ORDER BY abs(counted) DESC, abs(part) DESC, task"""

EXPLAIN_TARGETS = """
    SELECT effect, "rank", task, target_id, tau, prompt, continuation FROM explained_targets
    WHERE scores_id = $scores AND example_id = $example ORDER BY effect, "rank" """

#: where an example stands: its mixed score, pool rank (ties by example_id, as the selection)
#: and selection rank, from the explanations view and the selections table
EXAMPLE_STANDING = """
    WITH mixed AS (SELECT example_id, sum(counted) AS score FROM explanations
                   WHERE selection_id = $selection GROUP BY example_id),
         mine AS (SELECT score FROM mixed WHERE example_id = $example)
    SELECT (SELECT score FROM mine) AS score,
           (SELECT count(*) FROM mixed WHERE score > (SELECT score FROM mine)
               OR (score = (SELECT score FROM mine) AND example_id < $example)) + 1 AS pool_rank,
           (SELECT count(*) FROM mixed) AS pool,
           (SELECT "rank" FROM selections WHERE selection_id = $selection
               AND example_id = $example) AS selection_rank,
           (SELECT count(*) FROM selections WHERE selection_id = $selection) AS selected,
           (SELECT any_value(scores_id) FROM selection_weights
               WHERE selection_id = $selection) AS scores_id,
           (SELECT any_value(mixing) FROM selection_weights
               WHERE selection_id = $selection) AS mixing,
           (SELECT any_value(shard) FROM target_contributions c JOIN selection_weights w
               USING (crawl, scores_id) WHERE w.selection_id = $selection
               AND c.example_id = $example) AS shard"""


def print_explanation(crawl: str, example_id: str, selection: str | None = None) -> int:
    """Print why the DsDm selection ranks ``example_id`` where it does: EXAMPLE_STANDING, EXPLAIN_PARTS and
    EXPLAIN_TARGETS, plus the example's text from the store."""

    from dsdm.lineage import LineageDB
    from resources import default_resources

    resources = default_resources()
    path = resources["lineage"].database
    try:
        LineageDB(path, read_only=True)  # exists?
        db = LineageDB(path)  # writable once: brings a file from an older version up to date
        chosen = resolve_selection(db, selection or crawl)
        if chosen["crawl"] != crawl or chosen["method"] != "dsdm":
            raise ValueError(f"selection {chosen['selection_id']} is crawl {chosen['crawl']!r}, "
                             f"method {chosen['method']!r}; explain needs a DsDm selection of {crawl!r}")
        params = {"selection": chosen["selection_id"], "example": example_id}
        with db.connect() as con:
            standing = con.sql(EXAMPLE_STANDING, params=params).to_arrow_table().to_pylist()[0]
        if standing["scores_id"] is None:
            raise ValueError(f"selection {chosen['selection_id']} has no recorded mixing weights; "
                             "materialise selected_subset again to record them")
        if standing["score"] is None:
            some = db.query("SELECT example_id FROM explanations WHERE selection_id = ? "
                            "ORDER BY example_id LIMIT 3", [chosen["selection_id"]])
            raise ValueError(f"example {example_id!r} is not in crawl {crawl!r}'s pool (examples "
                             f"look like {some.column('example_id').to_pylist()})")
        example = example_text(resources["store"].get_store(), chosen, example_id, standing["shard"])
    except (FileNotFoundError, ValueError) as error:
        print(f"dsdm: {error}", file=sys.stderr)
        return 2
    print(f"example {example_id} (document {example['doc_id']}, source {example['source']}, "
          f"{example['n_tokens']} tokens):\n  {example['text'][:400]!r}")
    where = (f"selected, rank {standing['selection_rank']} of {standing['selected']}"
             if standing["selection_rank"] is not None else f"not selected ({standing['selected']} were)")
    print(f"\nselection {chosen['selection_id']} (crawl {crawl}, method dsdm, unit {chosen['unit']}): "
          f"{where}; mixed score {standing['score']:.6g}, pool rank {standing['pool_rank']} "
          f"of {standing['pool']}")
    with db.connect() as con:
        print("\nscore per task (the mixed score is the sum of the counted parts: "
              + ("the largest part of the tasks to select for, plus the parts of tasks to "
                 "avoid):" if standing["mixing"] == "max" else "every part):"))
        con.sql(EXPLAIN_PARTS, params=params).show(max_width=160)
        targets = con.sql(EXPLAIN_TARGETS, params={
            "scores": standing["scores_id"], "example": example_id}).to_arrow_table().to_pylist()
    for effect, title in (("helps", "targets it helps most (largest tau: predicted loss reduction)"),
                          ("hurts", "targets it hurts most (most negative tau)")):
        rows = [r for r in targets if r["effect"] == effect]
        print(f"\n{title}:" + ("" if rows else " none recorded"))
        for r in rows:
            print(f"  {r['rank']}. {r['task']}  {r['target_id']}  tau {r['tau']:+.6g}\n"
                  f"     {r['prompt'][-120:]!r} -> {r['continuation'][:80]!r}")
    return 0


def example_text(store: "ArtifactStore", selection: dict, example_id: str,
                 shard: int | None) -> dict:
    """doc_id, source, n_tokens and decoded text of a pool example, read from the corpus the
    selection was made from (found through its manifest's inputs, each checked against the
    sha256 recorded there); ``shard`` (if known) saves scanning the corpus."""
    import hashlib
    import json

    from dsdm.artifacts import MANIFEST, Upstream, asset_folder, load_tokenizer

    def manifest_of(asset: str, inputs: list[dict]) -> Upstream:
        for item in inputs:
            path = store.relpath(item["uri"])
            if path.startswith(f"{asset}/"):
                data = store.read_bytes(path)
                if hashlib.sha256(data).hexdigest() != item["sha256"]:
                    raise ValueError(f"{item['uri']} is not the {asset} manifest the selection "
                                     "recorded; re-materialise the selection")
                return Upstream(path, item["uri"], item["sha256"], json.loads(data))
        raise ValueError(f"the selection's manifest names no {asset} input")

    folder = asset_folder("selected_subset", selection["crawl"], selection["selection_id"])
    inputs = store.read_json(f"{folder}/{MANIFEST}")["inputs"]
    corpus, tok = manifest_of("tokenized_corpus", inputs), manifest_of("tokenizer", inputs)
    shards = corpus.files("examples")
    for f in [shards[shard]] if shard is not None else shards:
        reason = store.mismatch(f["path"], f["sha256"], f.get("size_bytes"))
        if reason:
            raise ValueError(f"{f['uri']}: {reason}; re-materialise tokenized_corpus")
        table = store.read_parquet(f["path"])
        rows = table.column("example_id").to_pylist()
        if example_id in rows:
            row = table.slice(rows.index(example_id), 1).to_pylist()[0]
            return {**row, "text": load_tokenizer(store, tok).decode(row["input_ids"][:row["n_tokens"]])}
    raise ValueError(f"example {example_id!r} is not in the corpus the selection was made from")


if __name__ == "__main__":
    sys.exit(main())
