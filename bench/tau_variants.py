"""Selection levers that change only how the stored tau becomes task scores, measured with
the bench's evaluation models and without re-scoring anything.

    python bench/tau_variants.py --variants soft0 soft1 standardised rank_mean   # whole pool
    python bench/tau_variants.py --quotas bench/results/levers/bench-5200/mixture-fit.json
    python bench/tau_variants.py --variants soft0 soft0.5 soft1 soft2 --quotas ... --dev
    python bench/tau_variants.py --lds --variants soft0 soft0.5 soft1 soft2   # no training
    python bench/tau_variants.py --per-proxy bench/out/tau_per_proxy --variants se1 psoft1 ...

Reads a store that `bench/selection_quality.py` filled (``--store``): the pool, the target
tasks, one datamodel_weights folder (its tau shards) and the evaluation models' recipe (or,
with ``--recipe``, the recipe of an earlier summary, for a store without evaluations). Each
variant turns tau [N, T] into task scores its own way: ``softS`` soft-thresholds each target
column at S sd of its values over the pool (`dsdm.trak.soft_threshold`; ``soft0`` is the raw
tau, ``soft1`` the pipeline's default), ``standardised`` standardises each column over the pool (every
target one vote), ``rank_mean`` replaces each column by its pool ranks, ``hardS`` zeroes the
entries within S sd and keeps the rest as they are, ``madS`` soft-thresholds at S robust sd
(1.4826 x the column's median absolute deviation), ``lowrankK`` keeps tau's projection onto
its top K singular directions over targets. Four use each proxy's own scores (``--per-proxy``,
written by `bench/tau_per_proxy.py`): ``seS`` soft-thresholds each entry at S times its
standard error over the proxies, ``psoftS`` soft-thresholds each proxy's columns at S sd before
the ensemble mean, ``medianS`` takes the median over proxies instead of the mean (then S sd
per column), ``proxiesIJ..`` the mean of the named proxies alone (``--overlaps-only`` prints how
much, say, two disjoint halves' selections share, and trains nothing). An aggregation may be
followed by selection rules: ``+groupsK`` splits each task's targets into K groups by their columns of tau
(`target_groups`), mixed like tasks; ``+doccapC`` ranks each document's examples after its
C best below all others (`document_cap`); ``+docmeanA`` moves each example's score a share A
of the way to its document's mean score; ``+sum`` mixes the tasks by the standardised sum
instead of ``max``; ``+trimP`` takes each task score as a mean without the candidate's P%
largest and P% smallest target effects (`trimmed_mean`); ``+targetsP`` scores only a seeded
P% of each task's origins (`origin_share`), ``+itemsP`` a seeded P% of its items;
``+centre`` subtracts each task score's pool mean before the mixing (under ``max`` a task's
zero is then its average example, not no effect); e.g. ``soft1+groups4``. ``uniform``
ignores tau: seeded random keys, so each source's quota is a uniform sample of it (the mix
alone). ``--tau DIR`` replaces the stored tau by another estimate of the same pool and
targets (`bench/target_span.py`'s). ``--fraction F --epochs E`` spends the same training
steps another way (``--fraction 0.1 --epochs 6``: half the examples, twice the passes); the
quotas keep their shares, scaled to the budget by `dsdm.mixture.allocate`, and the results'
names say ``topFxE``. For each it makes the DsDm selection as
`selected_subset` does (the task means, the standardised scores under `task_mixing: max`,
optionally each source's quota filled by that ranking, the top 20%), trains an evaluation model per seed with the bench's recipe, and
records its eval-split losses and its losses on the development targets (one in five select
targets, as `bench/levers.py` picks them). ``--dev`` leaves those targets out of the task
scores, so a lever can be decided on them without reading the eval split.

``--lds`` trains nothing: it measures each variant's linear datamodeling score (per target
and per task, `dsdm.evaluation.linear_datamodeling_score`) against the losses that the
store's ``datamodel_lds`` models measured (its ``lds_losses.parquet``), so a variant's
LDS costs seconds. With several models per subset (``seeds_per_subset``) it correlates with
their mean loss, reports the LDS against the mean of each subset's first k models for every
smaller k too, and the noise ceiling (`dsdm.evaluation.lds_ceiling`): the LDS an exact
estimate of the expected loss would reach against k models per subset.

Each model's result is a JSON file under ``--out``, named by the scores, the mixture fit's
file name, the split and the variant (kept: a rerun trains only what is missing, and refuses
a file trained with other quotas); the summary (per variant: loss mean and sd over seeds per task on both splits,
multipliers against the committed random curve, the overlap with s = 0) is printed and
written to ``--summary``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, portable  # noqa: E402
from bench.levers import dev_targets, with_dev_split  # noqa: E402
from dsdm.artifacts import TARGET_COLUMNS, load_lds_replicates, load_tau  # noqa: E402
from dsdm.datamodels import proxy_subsets  # noqa: E402
from dsdm.evaluation import (  # noqa: E402
    compute_multiplier,
    lds_ceiling,
    linear_datamodeling_score,
    target_losses,
    train_evaluation_model,
)
from dsdm.mixture import allocate, quota_scores  # noqa: E402
from dsdm.proxy import ProxyConfig  # noqa: E402
from dsdm.selection import combine_task_scores, select_top  # noqa: E402
from dsdm.store import ArtifactStore  # noqa: E402
from dsdm.trak import soft_threshold  # noqa: E402

STORE = REPO / "bench" / "out" / "selection_quality" / "bench-5200" / "store"
CURVE = REPO / "bench" / "results" / "selection_quality.json"
PATH_FLAGS = ("store", "quotas", "out", "summary", "recipe_from", "per_proxy", "tau")
#: the bench's selection share; results of any other are named by their shape
FRACTION = 0.2


#: the flag that names each asset's folder, in this script and in bench/mixture_dev.py
FOLDER_FLAGS = {"datamodel_weights": "--datamodel", "evaluations": "--evaluations",
                "datamodel_lds": "--lds-folder", "mixture_runs": "--mixture"}


def replacement_tau(folder: Path, scores_id: str) -> Path:
    """The tau.npy that ``--tau`` names, once its ``done.json`` says it was finished (and
    checked) for the store's scores ``scores_id``."""
    done = folder / "done.json"
    if not done.exists() or json.loads(done.read_text())["scores_id"] != scores_id:
        raise SystemExit(f"{folder} holds no finished tau of scores {scores_id} (no done.json "
                         "naming them); run bench/target_span.py to its end")
    return folder / "tau.npy"


def only_manifest(store: Path, asset: str, crawl: str, folder: str | None = None) -> dict:
    """The manifest of ``asset``'s one folder (or of ``folder``) for ``crawl``."""
    found = sorted((store / asset / crawl).glob(f"{folder or '*'}/manifest.json"))
    if len(found) != 1:
        options = {p.parent.name: json.loads(p.read_text())["config"] for p in found}
        raise SystemExit(f"{asset}: expected one folder, found {len(found)}: {options}; "
                         f"name one with {FOLDER_FLAGS.get(asset, 'a re-made store')}")
    return json.loads(found[0].read_text())


def tables(store: ArtifactStore, manifest: dict, kind: str) -> pa.Table:
    return pa.concat_tables([store.read_parquet(f["path"]) for f in manifest["files"]
                             if f["kind"] == kind])


class Pool:
    """The stored pool, targets, tau and recipe; `keep` makes a variant's selection."""

    def __init__(self, args: argparse.Namespace) -> None:
        root = Path(args.store)
        store = ArtifactStore(str(root))
        corpus_m = only_manifest(root, "tokenized_corpus", args.crawl)
        weights_m = only_manifest(root, "datamodel_weights", args.crawl, args.datamodel)
        self.scores_id = weights_m["config_hash"]
        if args.recipe_from:  # a store whose evaluations were never materialised
            self.recipe = json.loads(Path(args.recipe_from).read_text())["config"]["recipe"]
        else:
            self.recipe = only_manifest(root, "evaluations", args.crawl, args.evaluations)["config"]["model"]
        self.corpus = tables(store, corpus_m, "examples")
        self.targets = tables(store, only_manifest(root, "target_tasks", args.crawl), "targets")
        self.ids = np.array(self.corpus.column("example_id").to_pylist())
        self.sources = np.array(self.corpus.column("source").to_pylist())
        self.documents = np.array(self.corpus.column("doc_id").to_pylist())
        self.tau = torch.cat([load_tau(store, f["path"]) for f in weights_m["files"]
                              if f["kind"] == "tau"]).double()
        if args.tau:  # another estimate of the same pool and targets (bench/target_span.py)
            self.tau = torch.from_numpy(np.load(replacement_tau(Path(args.tau), self.scores_id))).double()
            self.scores_id = f"{self.scores_id}-{Path(args.tau).name}"
        columns = pq.read_table(root / weights_m["files"][0]["path"].rsplit("/", 1)[0] / TARGET_COLUMNS)
        self.tasks = np.array(columns["task"].to_pylist())
        self.target_ids = columns["example_id"].to_pylist()
        self._low_rank: dict[tuple, torch.Tensor] = {}
        self.per_proxy = Path(args.per_proxy) / self.scores_id if args.per_proxy else None
        self.dev = dev_targets(self.target_ids)
        if self.tau.shape != (len(self.ids), len(self.tasks)):
            raise SystemExit(f"tau is {tuple(self.tau.shape)}, pool x targets "
                             f"{(len(self.ids), len(self.tasks))}")
        if args.epochs:  # with --fraction, the same steps spent on fewer or more examples
            self.recipe = {**self.recipe, "epochs": args.epochs}
        self.fraction = args.fraction
        self.quotas = json.loads(Path(args.quotas).read_text())["quotas"] if args.quotas else None
        budget = math.floor(self.fraction * len(self.ids))
        if self.quotas is not None and sum(self.quotas.values()) != budget:  # the same mix, scaled
            names = sorted(self.quotas)
            available = np.array([int((self.sources == s).sum()) for s in names])
            counts = allocate(np.array([self.quotas[s] for s in names], float), budget, available)
            self.quotas = dict(zip(names, counts.tolist(), strict=True))
        select_rows = np.flatnonzero(np.asarray(self.targets.column("split").to_pylist()) == "select")
        if self.targets.column("example_id").take(pa.array(select_rows)).to_pylist() != \
                columns["example_id"].to_pylist():
            raise SystemExit("tau's target columns are not the select split's rows in order")
        self.dev_table = with_dev_split(self.targets, self.dev)

    def columns(self, variant: str, scored: np.ndarray | None = None) -> torch.Tensor:
        """tau [N, T] as the variant aggregates it (see the module docstring), made from the
        ``scored`` [T] columns only (None: all); the others are left as they are."""
        if variant == "standardised":
            return (self.tau - self.tau.mean(0)) / self.tau.std(0)
        if variant == "rank_mean":
            return self.tau.argsort(0).argsort(0).double()
        if variant.startswith("lowrank"):
            return self.low_rank(int(variant[7:]), scored)
        if variant.startswith("mad"):  # the spread as 1.4826 x the median absolute deviation
            deviation = (self.tau - self.tau.median(0).values).abs().median(0).values
            return soft_threshold(self.tau, float(variant[3:]) * 1.4826 * deviation)
        if variant.startswith("hard"):  # keep the effects beyond S sd unshrunk
            return self.tau * (self.tau.abs() > float(variant[4:]) * self.tau.std(0))
        if variant.startswith(("se", "psoft", "median", "proxies")):
            return self.ensemble_aggregate(variant)
        if not variant.startswith("soft"):
            raise SystemExit(f"unknown variant {variant!r}: softS, hardS, madS, lowrankK, seS, "
                             "psoftS, medianS, proxiesIJ.., standardised or rank_mean")
        threshold = float(variant[4:])
        return self.tau if threshold == 0 else soft_threshold(self.tau, threshold * self.tau.std(0))

    def ensemble_aggregate(self, variant: str) -> torch.Tensor:
        """tau [N, T] from the proxies' own scores tau_m = S_m * q (`bench/tau_per_proxy.py`),
        column block by column block: ``seS`` soft-thresholds each entry of their mean at S
        times its standard error over the M proxies (sd_m / sqrt(M)), ``psoftS`` soft-thresholds
        each proxy's columns at S sd before the mean, ``medianS`` takes the median over proxies
        and soft-thresholds its columns at S sd (S = 0: none). The hypothesis: the column-wide
        threshold treats every candidate's score as equally noisy, but the proxies disagree
        more on some candidates than on others. ``proxiesIJK..`` (digits) is the mean of those
        proxies alone, thresholded as the default (1 sd): two disjoint halves show how much
        of a selection is the ensemble's own noise."""
        if self.per_proxy is None or not (self.per_proxy / "done.json").exists():
            # done.json is written once the proxies' mean has reproduced this tau
            raise SystemExit(f"{variant!r} needs each proxy's scores of {self.scores_id}: run "
                             "bench/tau_per_proxy.py to its end and pass --per-proxy")
        kind = next(k for k in ("se", "psoft", "median", "proxies") if variant.startswith(k))
        proxies = sorted(self.per_proxy.glob("proxy-*.npy"))
        level = 1.0 if kind == "proxies" else float(variant[len(kind):])
        if kind == "proxies":
            chosen = [int(c) for c in variant[len(kind):]]
            if not chosen or max(chosen) >= len(proxies) or len(set(chosen)) != len(chosen):
                raise SystemExit(f"{variant!r}: name distinct proxies 0-{len(proxies) - 1}, e.g. proxies0123")
        stack = [np.load(path, mmap_mode="r") for path in proxies]
        q = torch.from_numpy(np.load(self.per_proxy / "q.npy"))[:, None]
        out = torch.empty_like(self.tau)
        for start in range(0, out.shape[1], 256):
            cols = slice(start, start + 256)
            block = torch.stack([torch.from_numpy(np.asarray(s[:, cols], np.float64)) for s in stack]) * q
            if kind == "se":  # `soft_threshold`'s formula with a threshold per entry
                error = block.std(0) / len(stack) ** 0.5
                x = block.mean(0)
                out[:, cols] = torch.sign(x) * torch.clamp(x.abs() - level * error, min=0)
            elif kind == "psoft":
                out[:, cols] = torch.stack([soft_threshold(b, level * b.std(0)) for b in block]).mean(0)
            elif kind == "median":  # numpy's: the mean of the middle two of an even count
                out[:, cols] = torch.from_numpy(np.median(block.numpy(), axis=0))
            else:
                out[:, cols] = block[chosen].mean(0)
        if kind in ("median", "proxies") and level:
            out = soft_threshold(out, level * out.std(0))
        return out

    def low_rank(self, rank: int, scored: np.ndarray | None) -> torch.Tensor:
        """The ``scored`` columns of tau projected onto their top ``rank`` right singular
        vectors (directions over targets): each target keeps only what it shares with the
        others. The projection never sees the other columns (the development targets)."""
        cols = torch.from_numpy(np.ones(len(self.tasks), bool) if scored is None else scored)
        key = (rank, cols.numpy().tobytes())
        if key not in self._low_rank:
            part = self.tau[:, cols]
            _, _, vh = torch.linalg.svd(part, full_matrices=False)
            v = vh[:rank].T  # [T_scored, rank]
            out = self.tau.clone()
            out[:, cols] = part @ v @ v.T
            self._low_rank[key] = out
        return self._low_rank[key]

    def keep(self, variant: str, dev: bool) -> np.ndarray:
        """[N] bool in corpus order (the order the training shards keep). ``variant`` is an
        aggregation, optionally followed by selection rules: ``+groupsK`` splits each task's
        targets into K groups (`target_groups`) mixed like tasks, ``+doccapC`` keeps at most
        C examples of a document before any of its others (`document_cap`), ``+docmeanA``
        moves each example's mixed score a share A of the way to its document's mean,
        ``+sum`` mixes the standardised task scores by their sum instead of `max`, ``+centre``
        subtracts each task score's pool mean first. ``uniform`` ignores tau: seeded random
        keys, so each source's quota is a uniform sample of it (the mix alone)."""
        aggregation, *rules = variant.split("+")
        if aggregation == "uniform":
            if rules:
                raise SystemExit(f"{variant!r}: 'uniform' takes no selection rules")
            combined = np.random.default_rng(0).random(len(self.ids))
            return self.top(combined)
        scored = ~self.dev if dev else np.ones(len(self.tasks), bool)
        tau = self.columns(aggregation, scored)
        groups = {t: (self.tasks == t) & scored for t in sorted(set(self.tasks))}
        cap, pull, mixing, trim, centre = None, 0.0, "max", 0.0, False
        for rule in rules:
            if rule.startswith("groups"):
                groups = {f"{t}/{i}": part for t, mask in groups.items()
                          for i, part in enumerate(target_groups(tau, mask, int(rule[6:])))}
                print(f"{variant}: targets per group " + ", ".join(
                    f"{name} {int(mask.sum())}" for name, mask in groups.items()), flush=True)
            elif rule.startswith("doccap"):
                cap = int(rule[6:])
            elif rule.startswith("docmean"):
                pull = float(rule[7:])
            elif rule == "sum":
                mixing = "sum"
            elif rule == "centre":
                centre = True
            elif rule.startswith("trim"):
                trim = float(rule[4:]) / 100
            elif rule.startswith(("targets", "items")):
                share = float(rule[7:] if rule.startswith("targets") else rule[5:]) / 100
                kept = origin_share(self.target_ids, share, by_item=rule.startswith("items"))
                groups = {name: mask & kept for name, mask in groups.items()}
                print(f"{variant}: scored targets per task " + ", ".join(
                    f"{name} {int(mask.sum())}" for name, mask in groups.items()), flush=True)
            else:
                raise SystemExit(f"unknown selection rule {rule!r} in {variant!r}: groupsK, "
                                 "doccapC, docmeanA, trimP, targetsP, itemsP, sum or centre")
        means = {name: trimmed_mean(tau[:, mask], trim).numpy() for name, mask in groups.items()}
        if centre:  # under `max`, zero is then a task's average example, not no effect
            means = {name: score - score.mean() for name, score in means.items()}
        combined = combine_task_scores(means, standardise=True, mixing=mixing)
        if pull:  # each example's score moved a share `pull` of the way to its document's mean
            _, document, count = np.unique(self.documents, return_inverse=True, return_counts=True)
            document_mean = np.bincount(document, weights=combined) / count
            combined = (1 - pull) * combined + pull * document_mean[document]
        if cap is not None:
            combined = document_cap(combined, self.documents, cap)
        return self.top(combined)

    def top(self, combined: np.ndarray) -> np.ndarray:
        """[N] bool: the top ``fraction`` of ``combined`` [N], each source's quota filled by
        its best when quotas are given."""
        if self.quotas is not None:
            combined = quota_scores(self.sources, combined, self.quotas)
        keep = np.zeros(len(self.ids), bool)
        keep[select_top(combined, self.ids, fraction=self.fraction)] = True
        return keep


def origin_share(target_ids: list[str], share: float, by_item: bool = False) -> np.ndarray:
    """[T] bool: the targets of a seeded ``share`` of each task's origins (the document,
    chapter, article or FAQ file an item comes from, as its id names it; the select and eval
    splits are cut along the same lines), or with ``by_item`` a seeded ``share`` of the items
    themselves, every origin keeping some. The question it answers: how a task's loss
    depends on how many items describe it, and whether it is the items or their origins."""
    def origin(target_id: str) -> str:
        parts = target_id.split("/")
        return parts[1] if parts[0] in ("wiki_qa", "tech_faq") else "/".join(parts[:-1])

    keys = [f"item/{i}" if by_item else f"origin/{origin(i)}" for i in target_ids]
    return np.array([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % 10_000 < share * 10_000
                     for k in keys])


def trimmed_mean(block: torch.Tensor, share: float) -> torch.Tensor:
    """[N] each row's mean of ``block`` [N, T] without its ``share`` largest and ``share``
    smallest values (rounded down to whole targets; 0: the plain mean). The hypothesis it
    tests: a candidate's few largest entries are effects on single targets (the answer word
    of one cloze item) that a new item of the task will not share, while an effect spread
    over many targets is the task's. Scored into their task's mean, the development targets
    of the cloze tasks end 0.17-0.25 nats lower than scored out of it, so item-level effects
    are real; whether they transfer is the question (measured: they do, trimming is worse;
    docs/EVALUATION.md, "What the scores know about the items they were given")."""
    cut = int(share * block.shape[1])
    if cut == 0:
        return block.mean(1)
    return block.sort(1).values[:, cut:block.shape[1] - cut].mean(1)


def target_groups(tau: torch.Tensor, mask: np.ndarray, k: int, restarts: int = 8) -> list[np.ndarray]:
    """The targets that ``mask`` [T] marks, split into ``k`` groups by what they predict:
    spherical k-means (seeded, best of ``restarts``) on each target's column of ``tau`` [N, T]
    over the pool, centred and reduced to its top 32 principal directions. Returns k [T] bool
    masks, each a subset of ``mask``. The hypothesis it tests: a task whose items come from
    several kinds of text (the mixed tasks) has targets that want different examples, so as
    groups mixed by the ``max`` rule each kind would bring its own top examples instead of
    the task's average (measured: no; docs/EVALUATION.md, "Selection rules")."""
    rows = np.flatnonzero(mask)
    x = tau[:, rows].T  # [T_task, N]
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    z = (u[:, :32] * s[:32]).numpy()
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    best, best_fit = None, -np.inf
    for _ in range(restarts):
        centres = z[rng.choice(len(z), k, replace=False)]
        for _ in range(100):
            label = (z @ centres.T).argmax(1)
            moved = np.stack([z[label == c].sum(0) if (label == c).any() else centres[c]
                              for c in range(k)])
            moved /= np.linalg.norm(moved, axis=1, keepdims=True)
            if np.allclose(moved, centres):
                break
            centres = moved
        fit = float((z * centres[label]).sum())
        if fit > best_fit:
            best, best_fit = label, fit
    out = []
    for c in range(k):
        part = np.zeros_like(mask)
        part[rows[best == c]] = True
        out.append(part)
    return [part for part in out if part.any()]


def document_cap(scores: np.ndarray, documents: np.ndarray, cap: int) -> np.ndarray:
    """[N] scores in which each document's examples after its ``cap`` best rank below every
    example within its document's cap (in their own order): a selection takes at most ``cap``
    examples of a document until no other candidate is left. The hypothesis it tests: the
    linear datamodel adds up examples' effects, but windows of one document overlap in
    content, so theirs may not add, and the budget would do more spread over more documents
    (measured: no; docs/EVALUATION.md, "Selection rules")."""
    order = np.lexsort((-scores, documents))  # by document, best first within each
    first = np.r_[True, documents[order][1:] != documents[order][:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    within = np.empty(len(order), int)
    within[order] = np.arange(len(order)) - start
    out = np.asarray(scores, float).copy()
    over = within >= cap
    if over.any() and (~over).any():
        out[over] = out[over] - (out[over].max() - out[~over].min()) - 1.0
    return out


def lds_of_variants(pool: Pool, args: argparse.Namespace) -> dict:
    """Per variant and task: LDS (mean over targets), its sd over targets, and task level,
    against the stored LDS models' measured losses."""
    root = Path(args.store)
    manifest = only_manifest(root, "datamodel_lds", args.crawl, args.lds_folder)
    losses_files = [f for f in manifest["files"] if f["kind"] == "lds_losses"]
    if not losses_files:
        raise SystemExit(f"datamodel_lds/{args.crawl}/{manifest['config_hash']} has no "
                         "lds_losses.parquet; re-materialise datamodel_lds (its models are reused)")
    config = manifest["config"]
    try:
        replicates = load_lds_replicates(ArtifactStore(str(root)), losses_files[0]["path"], pool.target_ids)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    if replicates.shape[1] != config["num_models"]:
        raise SystemExit(f"LDS losses of {replicates.shape[1]} subsets, the manifest names "
                         f"{config['num_models']}")
    subsets = proxy_subsets(len(pool.ids), config["num_models"], config["fraction"], config["seed"])
    seeds = len(replicates)
    out, ceiling = {}, {}
    for variant in args.variants:
        if "+" in variant:
            raise SystemExit(f"{variant!r}: selection rules leave tau's columns as they are; "
                             "--lds takes aggregations only")
        columns = pool.columns(variant).numpy()  # once per variant: a walk over all of tau
        for k in range(seeds, 0, -1):  # the mean of each subset's first k models
            name = variant if k == seeds else f"{variant} ({k} seed{'s' * (k > 1)})"
            table = linear_datamodeling_score(columns, subsets, replicates[:k].mean(0),
                                              pool.tasks.tolist())
            out[name] = {r["task"]: {m: round(r[m], 4) for m in ("lds", "lds_sd", "task_level")}
                         for r in table.to_dicts()}
            out[name]["mean"] = round(float(table["lds"].mean()), 4)
            print(f"{name:>22}: LDS {out[name]['mean']:.4f}  " + "  ".join(
                f"{t} {v['lds']:.3f}/{v['task_level']:+.2f}" for t, v in out[name].items() if t != "mean"),
                flush=True)
    for k in range(seeds, 0, -1) if seeds > 1 else ():
        # what training noise leaves of a perfect LDS with k models per subset (needs two)
        per_target = lds_ceiling(replicates, k)
        ceiling[k] = {t: round(float(per_target[pool.tasks == t].mean()), 4) for t in sorted(set(pool.tasks))}
        ceiling[k]["mean"] = round(float(np.mean(list(ceiling[k].values()))), 4)
        print(f"{'ceiling':>13} ({k} seed{'s' * (k > 1)}): {ceiling[k]['mean']:.4f}  " +
              "  ".join(f"{t} {v:.3f}" for t, v in ceiling[k].items() if t != "mean"), flush=True)
    return {"lds_folder": manifest["config_hash"], "subsets": config["num_models"],
            "seeds_per_subset": seeds, "variants": out, "noise_ceiling": ceiling}


def model_result(pool: Pool, keep: np.ndarray, seed: int) -> dict:
    started = time.time()
    model, curve = train_evaluation_model(ProxyConfig(**{**pool.recipe, "seed": seed}),
                                          pool.corpus.filter(pa.array(keep)))
    return {"losses": target_losses(model, pool.targets).to_dicts(),
            "dev_losses": target_losses(model, pool.dev_table, split="dev").to_dicts(),
            "steps": len(curve), "seconds": round(time.time() - started, 1)}


def summarise(results: dict[str, list[dict]]) -> dict:
    reference = json.loads(CURVE.read_text())
    mean = {(r["method"], r["task"]): r["mean"] for r in reference["loss"]}
    out = {}
    for name, runs in results.items():
        rows = {}
        for split in [s for s in ("losses", "dev_losses") if all(s in run for run in runs)]:
            for task in [r["task"] for r in runs[0][split]]:
                values = [next(r["loss"] for r in run[split] if r["task"] == task) for run in runs]
                row = {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4),
                       "per_seed": [round(v, 4) for v in values]}
                if split == "losses":  # the committed random curve: 1x, 2x, 4x
                    curve = [mean[(m, task)] for m in ("random", "random@2x", "random@4x")]
                    multiplier = compute_multiplier([1, 2, 4], curve, row["mean"])
                    row |= {"multiplier": round(multiplier.value, 2),
                            "extrapolated": multiplier.extrapolated}
                rows.setdefault(split, {})[task] = row
        out[name] = {"seeds": [r["seed"] for r in runs], "overlap_with_raw": runs[0]["overlap_with_raw"],
                     **rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--crawl", default="bench-5200")
    parser.add_argument("--datamodel", help="datamodel_weights folder (its config hash)")
    parser.add_argument("--evaluations", help="evaluations folder whose model recipe to use")
    parser.add_argument("--recipe", dest="recipe_from", help="a summary JSON of this script whose evaluation-model "
                        "recipe to use instead of the store's evaluations folder's")
    parser.add_argument("--variants", nargs="+", default=["soft0", "soft1"])
    parser.add_argument("--per-proxy", help="the folder of bench/tau_per_proxy.py (each proxy's scores), "
                        "for the seS, psoftS, medianS and proxiesIJ.. variants")
    parser.add_argument("--tau", help="a folder of bench/target_span.py: its tau replaces the "
                        "stored one (results are named by both)")
    parser.add_argument("--overlaps-only", action="store_true",
                        help="print the variants' selections' overlaps and train nothing")
    parser.add_argument("--quotas", help="a mixture-fit JSON with per-source quotas (none: the whole pool)")
    parser.add_argument("--dev", action="store_true", help="leave the development targets out of the scores")
    parser.add_argument("--fraction", type=float, default=FRACTION,
                        help="the share of the pool selected (quotas are scaled to it)")
    parser.add_argument("--epochs", type=int, help="passes over the selection (default: the "
                        "recipe's); --fraction 0.1 --epochs 6 trains the same steps on half the examples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "tau_variants"))
    parser.add_argument("--summary", help="write the summary JSON here too")
    parser.add_argument("--lds", action="store_true",
                        help="measure each variant's LDS against the stored LDS models; no training")
    parser.add_argument("--lds-folder", help="datamodel_lds folder (its config hash)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pool = Pool(args)
    if args.lds:
        flags = {k: portable(Path(v).resolve()) if k in PATH_FLAGS and v else v for k, v in vars(args).items()}
        summary = {"config": {**flags, "scores_id": pool.scores_id}, "lds": lds_of_variants(pool, args)}
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = pool.keep("soft0", args.dev)
    kept = {variant: pool.keep(variant, args.dev) for variant in args.variants}
    for variant, keep in kept.items():  # how far the selection spreads over documents
        _, per_document = np.unique(pool.documents[keep], return_counts=True)
        print(f"{variant}: {int(keep.sum())} examples of {len(per_document)} documents "
              f"(at most {per_document.max()} of one; the pool {len(np.unique(pool.documents))}); "
              "shares with " + ", ".join(f"{other} {int((keep & k).sum()) / int(keep.sum()):.3f}"
                                         for other, k in kept.items() if other != variant),
              flush=True)
    if args.overlaps_only:
        return
    results = {}
    mix = Path(args.quotas).stem if args.quotas else "pool"  # which quotas, in every name
    if args.fraction != FRACTION or args.epochs:  # another budget shape, in every name too
        mix += f"-top{args.fraction * 100:g}x{pool.recipe['epochs']}"
    for seed in args.seeds:  # every variant's seed 0 first: a cut-short run is still paired
        for variant, keep in kept.items():
            name = f"{mix}-{'dev' if args.dev else 'all'}-{variant}"
            path = out / f"{pool.scores_id}-{name}-seed{seed}.json"
            overlap = round(int((keep & raw).sum()) / int(raw.sum()), 3)
            if path.exists() and json.loads(path.read_text())["quotas"] != pool.quotas:
                raise SystemExit(f"{path} was trained with other quotas than {args.quotas}; "
                                 "rename one of the mixture-fit files")
            if not path.exists():
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: training "
                      f"(overlap with the raw tau's selection {overlap})", flush=True)
                result = {"variant": name, "quotas": pool.quotas,
                          "dev": args.dev, "seed": seed, "scores_id": pool.scores_id,
                          "overlap_with_raw": overlap, **model_result(pool, keep, seed)}
                path.write_text(json.dumps(result))
            results.setdefault(name, []).append(json.loads(path.read_text()))
    flags = {k: portable(Path(v).resolve()) if k in PATH_FLAGS and v else v for k, v in vars(args).items()}
    summary = {"config": {**flags, "recipe": pool.recipe}, "variants": summarise(results)}
    emit(summary, args.summary)


if __name__ == "__main__":
    main()
