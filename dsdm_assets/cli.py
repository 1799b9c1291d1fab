"""``dsdm``: the few operations Dagster's own CLI has no command for.

    dsdm add-crawl NAME [NAME ...]   register crawls as partitions (needs DAGSTER_HOME)
    dsdm crawls                      list registered crawls
    dsdm report CRAWL                what the lineage database holds for a crawl
    dsdm check-config FILE [--job J] check a run config's values before a run starts
"""

import argparse
import re
import sys

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())


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
