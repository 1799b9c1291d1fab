"""The source quotas fitted without the development targets: the last leak in deciding
levers on them (docs/EVALUATION.md, "The decisions on development targets").

    M="--mixture e62d5f920bc0cda2"    # the bench store's mixture_runs folder with 24 runs
    python bench/mixture_dev.py $M runs --first 0 --last 12 &    # two processes, one thread each
    python bench/mixture_dev.py $M runs --first 12 --last 24
    python bench/mixture_dev.py $M fit --result bench/results/mixture-fit-nodev.json
    python bench/mixture_dev.py $M fit --bootstrap 40 --result bench/results/mixture-fit-nodev-bagged.json
    python bench/tau_variants.py --datamodel 8a8e8b47b42c9f61 --evaluations 2f153b7455ea9abd \\
        --variants soft1 --dev --quotas bench/results/mixture-fit-nodev.json

The store's ``mixture_runs`` recorded each run's loss per task on the whole select split, so
a mixture fitted to them has seen the development targets (one select target in five,
`bench.levers.dev_targets`). ``runs`` trains each run's model again, exactly as the asset
did (its counts, subset and seed), and records its select-split loss per task three ways:
every select target (checked against the stored record), the select targets without the
development ones, and the development targets alone. ``fit`` fits the mixture to the losses
without the development targets, as `selected_subset` does (`dsdm.mixture.mixture_quotas`,
the ``mean`` objective), and writes a mixture-fit JSON whose quotas `bench/tau_variants.py
--quotas` takes; ``--bootstrap B`` bags it over B resamples of the runs. One JSON per run
under ``--out``: a rerun trains only what is missing.
The bench's records are committed: ``--out bench/results/mixture_dev fit`` refits from them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, portable  # noqa: E402
from bench.levers import dev_targets, with_dev_split  # noqa: E402
from bench.tau_variants import STORE, only_manifest, tables  # noqa: E402
from dsdm.evaluation import HELDOUT_TEXT, target_losses  # noqa: E402
from dsdm.mixture import allocate, mixture_plan, mixture_quotas, mixture_subset  # noqa: E402
from dsdm.proxy import ProxyConfig, train_proxy  # noqa: E402
from dsdm.store import ArtifactStore  # noqa: E402
from dsdm.tokenization import to_tensors  # noqa: E402

#: retrained select-split losses must reproduce the stored ones to this many nats
AGREEMENT = 0.02


class Runs:
    """The store's pool, targets and mixture runs (their settings and records)."""

    def __init__(self, args: argparse.Namespace) -> None:
        root = Path(args.store)
        self.store = ArtifactStore(str(root))
        self.manifest = only_manifest(root, "mixture_runs", args.crawl, args.mixture)
        self.config = self.manifest["config"]
        self.records = [json.loads((root / f["path"]).read_text())
                        for f in self.manifest["files"] if f["kind"] == "mixture_run"]
        self.records.sort(key=lambda r: r["run"])
        self.corpus = tables(self.store, only_manifest(root, "tokenized_corpus", args.crawl), "examples")
        self.targets = tables(self.store, only_manifest(root, "target_tasks", args.crawl), "targets")
        self.sources = np.asarray(self.corpus.column("source").to_pylist())
        self.names, self.available = np.unique(self.sources, return_counts=True)
        self.budget = round(self.config["fraction"] * len(self.sources))
        splits = np.asarray(self.targets.column("split").to_pylist())
        select_ids = np.asarray(self.targets.column("example_id").to_pylist())[splits == "select"]
        self.dev = dev_targets(select_ids.tolist())
        self.out = Path(args.out) / self.manifest["config_hash"]

    def path(self, r: int) -> Path:
        return self.out / f"run-{r:03d}.json"


def task_losses(model: torch.nn.Module, targets, split: str) -> dict[str, float]:
    """Loss per target task on ``split`` (the pooled held-out text left out)."""
    frame = target_losses(model, targets, split=split)
    return {t: v for t, v in zip(frame["task"], frame["loss"], strict=True) if t != HELDOUT_TEXT}


def train_runs(runs: Runs, first: int, last: int) -> None:
    """Retrain runs [first, last) that have no JSON yet and record their losses."""
    plan = mixture_plan(runs.available / runs.available.sum(), runs.config["runs"],
                        runs.config["concentration"], runs.config["seed"])
    input_ids, loss_mask = to_tensors(runs.corpus)
    marked = with_dev_split(runs.targets, runs.dev)  # select = the targets the fit may see
    base = ProxyConfig(**runs.config["model"])
    runs.out.mkdir(parents=True, exist_ok=True)
    for record in runs.records[first:last]:
        r = record["run"]
        if runs.path(r).exists():
            continue
        counts = dict(zip(runs.names.tolist(), allocate(plan[r], runs.budget, runs.available).tolist(),
                          strict=True))
        if counts != record["counts"]:
            raise SystemExit(f"run {r}: the plan gives {counts}, the store recorded {record['counts']}")
        start = time.perf_counter()
        index = torch.from_numpy(mixture_subset(runs.sources, counts, runs.config["seed"] * 1000 + r))
        model = train_proxy(base.model_copy(update={"seed": runs.config["seed"] + r}),
                            input_ids[index], loss_mask[index], log_every=10**9).model
        result = {"run": r, "counts": counts, "stored": record["losses"],
                  "select": task_losses(model, runs.targets, "select"),
                  "select_without_dev": task_losses(model, marked, "select"),
                  "dev": task_losses(model, marked, "dev"), "seconds": round(time.perf_counter() - start, 1)}
        gap = max(abs(result["select"][t] - v) for t, v in record["losses"].items())
        result["max_gap_to_stored"] = round(gap, 5)
        runs.path(r).write_text(json.dumps(result))
        print(f"[{time.strftime('%H:%M:%S')}] run {r}: {result['seconds']:.0f} s, gap to the "
              f"stored losses {gap:.4f} nats", flush=True)


def fit(runs: Runs, losses_key: str, bootstrap: int = 0, seed: int = 0) -> dict:
    """The chosen mixture from every run's ``losses_key`` losses (the ``mean`` objective).
    With ``bootstrap`` B > 0 the quotas are bagged: the allocation of the mean of the shares
    chosen by B fits, each to the runs resampled with replacement (the sd of those shares
    says how well 24 runs determine the mix)."""
    missing = [r["run"] for r in runs.records if not runs.path(r["run"]).exists()]
    if missing:
        raise SystemExit(f"runs {missing} are not retrained yet under {runs.out}")
    results = [json.loads(runs.path(r["run"]).read_text()) for r in runs.records]
    gaps = [r["max_gap_to_stored"] for r in results]
    if max(gaps) > AGREEMENT:
        raise SystemExit(f"retrained runs differ from the stored ones by up to {max(gaps):.4f} "
                         f"nats (allowed {AGREEMENT}); they are not the same runs")
    tasks = sorted(results[0][losses_key])
    shares = np.array([[r["counts"][s] for s in runs.names] for r in results], float)
    shares /= shares.sum(1, keepdims=True)
    losses = np.array([[r[losses_key][t] for t in tasks] for r in results])
    concentration = runs.config["concentration"]
    quotas, model = mixture_quotas(shares, losses, runs.available, runs.budget,
                                   concentration=concentration)
    names = runs.names.tolist()
    out = {"runs": len(results), "losses": losses_key, "tasks": tasks, "sources": names,
           "max_gap_to_stored": max(gaps),
           "r2_leave_one_out": dict(zip(tasks, np.round(model.r2_loo, 3).tolist(), strict=True))}
    if bootstrap:
        rng = np.random.default_rng(seed)
        chosen = np.array([mixture_quotas(shares[i], losses[i], runs.available, runs.budget,
                                          concentration=concentration)[0] / runs.budget
                           for i in rng.integers(0, len(results), (bootstrap, len(results)))])
        out |= {"bootstrap": bootstrap, "bootstrap_seed": seed,
                "unbagged_quotas": dict(zip(names, quotas.tolist(), strict=True)),
                "bootstrap_sd_of_shares": dict(zip(names, np.round(chosen.std(0), 4).tolist(), strict=True))}
        quotas = allocate(chosen.mean(0), runs.budget, runs.available)
    return out | {"chosen_shares": dict(zip(names, np.round(quotas / runs.budget, 4).tolist(), strict=True)),
                  "quotas": dict(zip(names, quotas.tolist(), strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--crawl", default="bench-5200")
    parser.add_argument("--mixture", help="mixture_runs folder (its config hash; default: the only one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "mixture_dev"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("runs", help="retrain the runs and record their losses")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--last", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("fit", help="fit the mixture without the development targets")
    p.add_argument("--result", help="write the fit here (a mixture-fit JSON for tau_variants --quotas)")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="bag the fit over this many resamples of the runs (0: one fit)")
    p.add_argument("--seed", type=int, default=0, help="the resamples' seed")
    args = parser.parse_args()
    runs = Runs(args)
    if args.command == "runs":
        torch.set_num_threads(args.threads)
        train_runs(runs, args.first, args.last)
        return
    without, every = fit(runs, "select_without_dev", args.bootstrap, args.seed), fit(runs, "select")
    summary = {"config": {"store": portable(Path(args.store).resolve()), "crawl": args.crawl,
                          "runs": runs.manifest["config_hash"], "dev_targets": int(runs.dev.sum())},
               **without, "with_dev_targets": {k: every[k] for k in ("quotas", "r2_leave_one_out")}}
    emit(summary, args.result)


if __name__ == "__main__":
    main()
