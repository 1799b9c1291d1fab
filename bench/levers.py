"""What makes the datamodels predict: one estimator lever at a time, measured by LDS.

    python -m bench.levers prepare --docs 4800            # pool + targets of the bench crawl
    python -m bench.levers proxies --num 8                 # proxies (with checkpoints), cached
    python -m bench.levers lds-models --num 32             # models on random halves, cached
    python -m bench.levers features --proxies 8 --target-dim 4096 --sketch countsketch
    python -m bench.levers score --grid configs.json       # LDS + cross-task correlation
    python -m bench.levers mixing --variant '{...}'        # selection rules, by prediction
    python -m bench.levers mixture-runs --runs 24           # models on source mixtures
    python -m bench.levers mixture-fit --runs NAME         # the domain datamodel's choice

Everything works on the engine directly (no Dagster), in a folder under bench/out/levers/
(``--out``). Each stage caches its results under a name derived from its settings, so a
lever costs only what it changes: a new lambda re-solves the kernel, a new projection
re-featurises, a new proxy recipe retrains the proxies, and the LDS models (the measure) are
trained once for the pool. LDS models use a fixed recipe (the default proxy's) whatever the
proxy variant, so every variant is scored against the same measured losses.

The LDS is computed on the select split's targets (the datamodel's columns); the eval split
is never read here.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402
from dsdm.evaluation import example_losses  # noqa: E402
from dsdm.proxy import ProxyConfig, build_proxy, train_proxy  # noqa: E402

DEFAULT_TASKS = ("wiki_qa", "lambada_cloze", "tech_faq")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- the pool ------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> None:
    """Pool windows and target rows, tokenised as the pipeline does, saved as tensors."""
    from dsdm.ingest import ingest_crawl
    from dsdm.tokenization import TokenizerConfig, chunk_documents, to_tensors, train_bpe

    out = Path(args.out)
    crawl = out / "crawl"
    rows = []
    for path in sorted(Path(args.crawl).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows.extend(handle.readlines())
    if args.docs and args.docs < len(rows):
        step = len(rows) / args.docs
        rows = [rows[int(i * step)] for i in range(args.docs)]
    crawl.mkdir(parents=True, exist_ok=True)
    with gzip.open(crawl / "part-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(rows)
    docs = ingest_crawl(str(crawl)).documents
    if args.tokenizer:  # another pool's: losses stay in its units, so its random curve applies
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:
        tokenizer = train_bpe(docs["text"].to_list(), TokenizerConfig(vocab_size=args.vocab))
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    table, stats = chunk_documents(tokenizer, docs["doc_id"].to_list(), docs["text"].to_list(),
                                   docs["source"].to_list(), args.seq_len, min_tokens=16)
    ids, mask = to_tensors(table)
    n_tokens = torch.from_numpy(table.column("n_tokens").to_numpy().astype(np.int64))
    save_file({"input_ids": ids.to(torch.int32), "loss_mask": mask, "n_tokens": n_tokens},
              str(out / "pool.safetensors"))
    pl.DataFrame({"example_id": table.column("example_id").to_pylist(),
                  "doc_id": table.column("doc_id").to_pylist(),
                  "source": table.column("source").to_pylist()}).write_parquet(out / "pool.parquet")
    n_targets = write_targets(out, tokenizer, args.tasks, args.task_names, args.seq_len)
    sources = pl.read_parquet(out / "pool.parquet")["source"].value_counts().sort("source")
    log(f"pool: {table.num_rows} examples from {len(rows)} documents ({stats}); "
        f"sources {dict(sources.iter_rows())}; targets {n_targets}")


def write_targets(out: Path, tokenizer, tasks: str, task_names: list[str], seq_len: int) -> int:
    """The target rows of ``task_names`` (both splits), tokenised as the pipeline does."""
    from dsdm.tasks import read_tasks, tokenize_tasks
    from dsdm.tokenization import to_tensors

    targets, _ = tokenize_tasks(tokenizer, read_tasks(tasks, task_names), seq_len)
    pq.write_table(targets, out / "targets_table.parquet")
    t_ids, t_mask = to_tensors(targets)
    t_tokens = torch.from_numpy(targets.column("n_tokens").to_numpy().astype(np.int64))
    save_file({"input_ids": t_ids.to(torch.int32), "loss_mask": t_mask, "n_tokens": t_tokens},
              str(out / "targets.safetensors"))
    pl.DataFrame({"example_id": targets.column("example_id").to_pylist(),
                  "task": targets.column("task").to_pylist(),
                  "split": targets.column("split").to_pylist()}).write_parquet(out / "targets.parquet")
    return targets.num_rows


def retarget(args: argparse.Namespace) -> None:
    """Another target set on a prepared pool: the pool, tokenizer, proxies and pool features
    of ``--pool`` are linked (never copied or changed), the targets written anew. Score with
    ``"targets": "continuation"`` after ``target-features --tokens continuation``: the linked
    feature files hold the old targets' features."""
    from tokenizers import Tokenizer

    out, source = Path(args.out), Path(args.pool).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("crawl", "pool.safetensors", "pool.parquet", "tokenizer.json", "proxies"):
        if not (out / name).exists():
            (out / name).symlink_to(source / name)
    for feats in sorted((source / "features").iterdir()):
        dest = out / "features" / feats.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in feats.glob("*.safetensors"):  # pool features and their kernels' eigh caches
            if not (dest / f.name).exists():
                (dest / f.name).symlink_to(f)
        (dest / "config.json").write_text((feats / "config.json").read_text())
    seq_len = load_file(str(source / "pool.safetensors"))["input_ids"].shape[1]
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    n = write_targets(out, tokenizer, args.tasks, args.task_names, seq_len)
    log(f"{out}: the pool of {source}, {n} targets of {args.task_names}")


def dev_targets(example_ids: list[str], share: int = 5) -> np.ndarray:
    """[T] bool: the select-split targets held out as a development set (one in ``share`` by
    a hash of the id): a variant scored with ``"dev": true`` leaves them out of its task
    scores, and every evaluation model reports its loss on them, so levers can be compared
    on items the selection never saw without reading the eval split."""
    return np.array([int(hashlib.sha256(f"dev/{i}".encode()).hexdigest()[:8], 16) % share == 0
                     for i in example_ids])


def with_dev_split(targets: pa.Table, dev: np.ndarray) -> pa.Table:
    """The target table with the select rows that ``dev`` [select rows] marks relabelled
    ``dev``, so `target_losses(..., split="dev")` scores the development targets alone."""
    splits = np.asarray(targets.column("split").to_pylist(), dtype=object)
    splits[np.flatnonzero(splits == "select")[dev]] = "dev"
    return targets.set_column(targets.schema.get_field_index("split"), "split",
                              pa.array(splits.tolist()))


class Data:
    """The prepared pool and targets (tensors + id tables)."""

    def __init__(self, out: Path) -> None:
        pool = load_file(str(out / "pool.safetensors"))
        self.ids = pool["input_ids"].long()
        self.mask = pool["loss_mask"]
        self.n_tokens = pool["n_tokens"]
        self.attention = torch.arange(self.ids.shape[1])[None, :] < self.n_tokens[:, None]
        self.pool = pl.read_parquet(out / "pool.parquet")
        targets = load_file(str(out / "targets.safetensors"))
        self.targets = pl.read_parquet(out / "targets.parquet")
        select = torch.from_numpy((self.targets["split"] == "select").to_numpy())
        self.t_ids = targets["input_ids"].long()[select]
        self.t_mask = targets["loss_mask"][select]
        self.t_attention = (torch.arange(self.t_ids.shape[1])[None, :]
                            < targets["n_tokens"][select][:, None])
        selected = self.targets.filter(pl.Series(select.numpy()))
        self.t_tasks = np.asarray(selected["task"].to_list())
        self.t_dev = dev_targets(selected["example_id"].to_list())
        from tokenizers import Tokenizer

        self.vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
        self.seq_len = self.ids.shape[1]

    @property
    def n(self) -> int:
        return self.ids.shape[0]


# --- trained models ------------------------------------------------------------------------


def recipe(args: argparse.Namespace, data: Data) -> ProxyConfig:
    return ProxyConfig(vocab_size=data.vocab, seq_len=data.seq_len, hidden_size=args.hidden,
                       num_layers=args.layers, num_heads=4, epochs=args.epochs)


def subsets(n: int, count: int, fraction: float, seed: int) -> list[np.ndarray]:
    from dsdm.datamodels import proxy_subsets

    return proxy_subsets(n, count, fraction, seed)


def proxy_settings(args: argparse.Namespace, data: Data) -> dict:
    """What names a proxy folder: the recipe, and for a later round the selection it follows."""
    settings = recipe(args, data).to_dict()
    if getattr(args, "train_fraction", 0.5) != 0.5:  # the default keeps earlier folder names
        settings["train_fraction"] = args.train_fraction
    if getattr(args, "previous", None):
        settings |= {"previous": args.previous, "previous_fraction": args.previous_fraction}
    return settings


def proxies(args: argparse.Namespace) -> None:
    """M proxies on seeded random subsets (as `proxy_checkpoints`; ``--train-fraction`` of the
    pool, a half by default), checkpoints along training;
    with --previous, a later round's: on that selection plus a random rest (`round_subsets`)."""
    from dsdm.datamodels import round_subsets

    out, data = Path(args.out), Data(Path(args.out))
    base = recipe(args, data)
    folder = out / "proxies" / digest(proxy_settings(args, data))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(base.to_dict(), indent=2))
    if args.previous:
        previous = selected_indices(out, data, args.previous, args.previous_fraction)
        plan = round_subsets(data.n, args.num, args.train_fraction, base.seed, previous)
        (folder / "previous.json").write_text(json.dumps(
            {"previous": args.previous, "fraction": args.previous_fraction,
             "selected": len(previous)}))
    else:
        plan = subsets(data.n, args.num, args.train_fraction, base.seed)
    for m, subset in enumerate(plan):
        done = folder / f"proxy-{m:02d}.json"
        if done.exists():
            continue
        config = base.model_copy(update={"seed": base.seed + m})
        total = config.epochs * -(-len(subset) // config.batch_size)
        steps = sorted({max(1, round(total * c / args.checkpoints)) for c in range(1, args.checkpoints + 1)})
        start = time.perf_counter()
        index = torch.from_numpy(subset)
        result = train_proxy(config, data.ids[index], data.mask[index], log_every=10_000,
                             checkpoint_steps=steps)
        for step, state in result.checkpoints.items():
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(folder / f"proxy-{m:02d}-step-{step:05d}.safetensors"))
        done.write_text(json.dumps({"steps": steps, "losses": result.losses[::10],
                                    "seconds": time.perf_counter() - start}))
        log(f"proxy {m}: {total} steps, loss {np.mean(result.losses[:20]):.3f} -> "
            f"{np.mean(result.losses[-20:]):.3f}, {time.perf_counter() - start:.0f}s")
    log(f"proxies in {folder}")


def lds_models(args: argparse.Namespace) -> None:
    """Models of a fixed recipe on seeded random halves; per-target select-split losses.

    Also `--repeats` extra models on subset 0 with other seeds: the training noise that
    bounds any per-target LDS.
    """
    out, data = Path(args.out), Data(Path(args.out))
    base = recipe(args, data)
    settings = {**base.to_dict(), "fraction": args.fraction}
    if args.fixed_seed:  # one seed for every subset: training noise common to all models
        settings["fixed_seed"] = True
    folder = out / "lds" / digest(settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(settings))
    plan = [(k, subset, 1000 if args.fixed_seed else 1000 + k) for k, subset in
            enumerate(subsets(data.n, args.num, args.fraction, 1000))]
    first = plan[0][1]
    plan += [(f"repeat-{r}", first, 5000 + r) for r in range(args.repeats)]
    for key, subset, seed in plan:
        name = folder / (f"model-{key:03d}.json" if isinstance(key, int) else f"{key}.json")
        if name.exists():
            continue
        start = time.perf_counter()
        index = torch.from_numpy(subset)
        result = train_proxy(base.model_copy(update={"seed": seed}), data.ids[index],
                             data.mask[index], log_every=10_000)
        sums, counts = example_losses(result.model, data.t_ids, data.t_mask)
        name.write_text(json.dumps({"seed": seed, "subset_seed": 1000, "losses":
                                    (sums / np.maximum(counts, 1)).tolist()}))
        log(f"LDS model {key}: {time.perf_counter() - start:.0f}s")
    log(f"LDS models in {folder}")


def source_table(data: Data) -> tuple[list[str], np.ndarray]:
    """The pool's sources (sorted) and their example counts [S]."""
    names, counts = np.unique(data.pool["source"].to_numpy(), return_counts=True)
    return names.tolist(), counts


def mixture_runs(args: argparse.Namespace) -> None:
    """The domain datamodel's training data: models of the proxy recipe on R source mixtures
    (`dsdm.mixture.mixture_plan` around the pool's shares, ``--fraction`` of the pool each),
    with every task's select-split loss (the eval split is never read). Within each source a
    run samples uniformly, or with ``--within VARIANT`` keeps the source's best examples by
    that DsDm variant's scores: the mixture is then fitted to the way it is used."""
    from dsdm.evaluation import target_losses
    from dsdm.mixture import allocate, mixture_plan, mixture_subset, quota_keys

    out, data = Path(args.out), Data(Path(args.out))
    config = recipe(args, data)
    names, available = source_table(data)
    settings = {**config.to_dict(), "fraction": args.fraction, "runs_seed": args.seed,
                "concentration": args.concentration}
    if args.within:
        settings["within"] = json.loads(args.within)
        ranking = selection_scores(out, data, args.within, args.fraction)
    folder = out / "mixtures" / (args.name or digest(settings))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(settings, indent=2))
    budget = round(args.fraction * data.n)
    plan = mixture_plan(available / available.sum(), args.runs, args.concentration, args.seed)
    targets = pq.read_table(out / "targets_table.parquet")
    sources = data.pool["source"].to_numpy()
    for r, shares in enumerate(plan):
        name = folder / f"run-{r:03d}.json"
        if r < args.first or name.exists():
            continue
        start = time.perf_counter()
        counts = allocate(shares, budget, available)
        per_source = dict(zip(names, counts.tolist(), strict=True))
        # quota_keys gives the examples within their source's quota keys in [-1, 0)
        subset = (np.flatnonzero(quota_keys(sources, ranking, per_source) >= -1)
                  if args.within else mixture_subset(sources, per_source, args.seed * 1000 + r))
        result = train_proxy(config.model_copy(update={"seed": args.seed + r}),
                             data.ids[torch.from_numpy(subset)],
                             data.mask[torch.from_numpy(subset)], log_every=10_000)
        losses = target_losses(result.model, targets, split="select")
        name.write_text(json.dumps({
            "counts": per_source,
            "losses": dict(zip(losses["task"].to_list(), losses["loss"].to_list(), strict=True)),
            "seconds": round(time.perf_counter() - start, 1)}))
        log(f"mixture run {r}: {per_source} -> "
            f"{ {k: round(v, 3) for k, v in zip(losses['task'], losses['loss'], strict=True)} }")
    log(f"mixture runs in {folder}")


def mixture_records(out: Path, data: Data, runs: str) -> tuple[dict, list[str], np.ndarray,
                                                                 list[str], np.ndarray, np.ndarray]:
    """The runs in ``mixtures/<runs>``: their settings, the pool's sources and counts [S], the
    target tasks (sorted), each run's realised shares [R, S] and select-split losses [R, T]."""
    folder = out / "mixtures" / runs
    settings = json.loads((folder / "config.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("run-*.json"))]
    names, available = source_table(data)
    tasks = sorted(set(data.t_tasks.tolist()))
    shares = np.array([[r["counts"][s] for s in names] for r in records], float)
    shares /= shares.sum(1, keepdims=True)
    losses = np.array([[r["losses"][t] for t in tasks] for r in records])
    return settings, names, available, tasks, shares, losses


def chosen_mixture(out: Path, data: Data, runs: str, fraction: float, top: int = 100,
                   objective: str = "mean") -> dict:
    """Fit the runs in ``mixtures/<runs>`` (`fit_linear_mixture`, the target tasks only) and
    choose a mixture for a ``fraction`` selection: shares, per-source quotas, and the fit."""
    from dsdm.mixture import mixture_quotas

    settings, names, available, tasks, shares, losses = mixture_records(out, data, runs)
    budget = round(fraction * data.n)
    quotas, model = mixture_quotas(shares, losses, available, budget,
                                   concentration=settings["concentration"], top=top,
                                   objective=objective)
    return {"runs": len(shares), "objective": objective, "tasks": tasks, "sources": names,
            "pool_shares": dict(zip(names, np.round(available / available.sum(), 4).tolist(), strict=True)),
            "chosen_shares": dict(zip(names, np.round(quotas / budget, 4).tolist(), strict=True)),
            "quotas": dict(zip(names, quotas.tolist(), strict=True)),
            "r2": dict(zip(tasks, np.round(model.r2, 3).tolist(), strict=True)),
            "r2_leave_one_out": dict(zip(tasks, np.round(model.r2_loo, 3).tolist(), strict=True)),
            "ridge": dict(zip(tasks, model.ridge.tolist(), strict=True)),
            "loss_sd_over_runs": dict(zip(tasks, np.round(model.scale, 4).tolist(), strict=True)),
            "predicted_change_in_sd": dict(zip(tasks, np.round(
                (model.predict(quotas / budget) - model.predict(available / available.sum()))
                / model.scale, 2).tolist(), strict=True)),
            "coef": {t: dict(zip(names, np.round(model.coef[:, i], 3).tolist(), strict=True))
                     for i, t in enumerate(tasks)}}


def own_quotas(out: Path, data: Data, runs: str, fraction: float) -> dict[str, dict[str, int]]:
    """Per target task, the per-source quotas of that task's own best mixture (the
    ``mean`` objective with all weight on it; the pool's mix where its fit predicts nothing)
    for a ``fraction`` selection."""
    from dsdm.mixture import mixture_quotas

    settings, names, available, tasks, shares, losses = mixture_records(out, data, runs)
    quotas = {}
    for t, task in enumerate(tasks):
        counts, model = mixture_quotas(shares, losses, available, round(fraction * data.n),
                                       concentration=settings["concentration"],
                                       weights=np.eye(len(tasks))[t])
        quotas[task] = dict(zip(names, counts.tolist(), strict=True))
        log(f"{task}: LOO R^2 {model.r2_loo[t]:.2f}, quotas {quotas[task]}")
    return quotas


def mixture_fit(args: argparse.Namespace) -> None:
    """Print (and with --result write) the domain datamodel's fit and chosen mixture."""
    out, data = Path(args.out), Data(Path(args.out))
    result = chosen_mixture(out, data, args.runs, args.fraction, args.top, args.objective)
    emit(result, args.result)


# --- features ------------------------------------------------------------------------------


def proxy_folder(args: argparse.Namespace, data: Data) -> Path:
    folder = Path(args.out) / "proxies" / digest(proxy_settings(args, data))
    if not folder.exists():
        raise SystemExit(f"no proxies for this recipe in {folder}; run `proxies` first")
    return folder


def checkpoint_files(folder: Path, m: int, which: str) -> list[Path]:
    """Proxy m's checkpoints: ``last``, ``all``, or the steps named, e.g. ``200,400``."""
    files = sorted(p for p in folder.glob(f"proxy-{m:02d}-step-*.safetensors")
                   if ".eigh-" not in p.name)
    if not files:
        raise SystemExit(f"proxy {m} has no checkpoints in {folder}")
    if which in ("last", "all"):
        return files if which == "all" else files[-1:]
    steps = {int(s) for s in which.split(",")}
    chosen = [p for p in files if int(p.stem.rsplit("-", 1)[1]) in steps]
    if len(chosen) != len(steps):
        raise SystemExit(f"proxy {m}: checkpoints {sorted(steps)} wanted, {folder} has "
                         f"{[p.stem for p in files]}")
    return chosen


def feature_config(args: argparse.Namespace):
    from dsdm.features import FeatureConfig

    return FeatureConfig(target_dim=args.target_dim, sketch=args.sketch,
                         factor_dim=args.factor_dim, include_lm_head=args.lm_head,
                         include_embeddings=args.embeddings, model_output=args.model_output,
                         batch_size=args.batch_size)


def features(args: argparse.Namespace) -> None:
    """phi and q of the pool and the select-split targets under each proxy checkpoint."""
    from dsdm.features import featurize

    out, data = Path(args.out), Data(Path(args.out))
    folder = proxy_folder(args, data)
    config = feature_config(args)
    base = json.loads((folder / "config.json").read_text())
    feats = out / "features" / f"{folder.name}-{digest(config.model_dump())}"
    feats.mkdir(parents=True, exist_ok=True)
    (feats / "config.json").write_text(json.dumps(config.model_dump(), indent=2))
    for m in range(args.proxies):
        for ckpt in checkpoint_files(folder, m, args.checkpoints):
            target = feats / ckpt.name
            if target.exists():
                continue
            model = proxy_model(base, m, ckpt)
            per_proxy = config.model_copy(update={"seed": config.seed + m})
            start = time.perf_counter()
            pool = featurize(model, data.ids, data.mask, per_proxy, attention_mask=data.attention)
            seconds = time.perf_counter() - start
            targ = featurize(model, data.t_ids, data.t_mask, per_proxy,
                             attention_mask=data.t_attention)
            save_file({"phi": pool.phi.contiguous(), "q": pool.q.contiguous(),
                       "target_phi": targ.phi.contiguous(), "target_q": targ.q.contiguous()},
                      str(target), metadata={"pool_seconds": f"{seconds:.1f}"})
            log(f"features {feats.name}/{ckpt.name}: {data.n / seconds:.0f} examples/s")
    log(f"features in {feats}")


def proxy_model(base: dict, m: int, checkpoint: Path) -> torch.nn.Module:
    """Proxy m of a proxies folder whose recipe is ``base``, at ``checkpoint``."""
    model = build_proxy(ProxyConfig.model_validate({**base, "seed": base["seed"] + m}))
    model.load_state_dict(load_file(str(checkpoint)), strict=True)
    return model


def target_features(args: argparse.Namespace) -> None:
    """Target features of an existing features folder with other target tokens scored:
    ``--tokens text`` scores every token of prompt + continuation (the task's text), not only
    the continuation. Written to ``<features>/targets-<tokens>/``; a variant selects them with
    ``"targets": "<tokens>"`` (the pool features and their kernels are shared)."""
    from dsdm.features import FeatureConfig, featurize

    out, data = Path(args.out), Data(Path(args.out))
    feats = out / "features" / args.features
    config = FeatureConfig.model_validate(json.loads((feats / "config.json").read_text()))
    folder = out / "proxies" / args.features.split("-")[0]
    base = json.loads((folder / "config.json").read_text())
    if args.tokens == "text":
        positions = torch.arange(data.t_ids.shape[1])[None, :]
        mask = data.t_attention & (positions >= 1)
    elif args.tokens == "continuation":  # as `features`, for targets set by `retarget`
        mask = data.t_mask
    else:
        raise SystemExit(f"unknown --tokens {args.tokens!r}")
    dest = feats / f"targets-{args.tokens}"
    dest.mkdir(exist_ok=True)
    for m in range(args.proxies):
        ckpt = checkpoint_files(folder, m, "last")[0]
        if (dest / ckpt.name).exists():
            continue
        model = proxy_model(base, m, ckpt)
        per_proxy = config.model_copy(update={"seed": config.seed + m})
        targ = featurize(model, data.t_ids, mask, per_proxy, attention_mask=data.t_attention)
        save_file({"target_phi": targ.phi.contiguous(), "target_q": targ.q.contiguous()},
                  str(dest / ckpt.name))
        log(f"target features {dest.name}/{ckpt.name}")


# --- scoring and LDS ---------------------------------------------------------------------


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman per column of a [K, T] and b [K, T] (ties are rare in float losses)."""
    ra = np.argsort(np.argsort(a, axis=0), axis=0).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=0), axis=0).astype(np.float64)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    return (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))


def measured_losses(args: argparse.Namespace, data: Data) -> tuple[np.ndarray, np.ndarray, dict]:
    """Subset indicator [K, N], measured select-target losses [K, T] and the seed-noise check."""
    lds = Path(args.out) / "lds"
    (folder,) = [f for f in lds.iterdir() if f.is_dir()] if args.lds is None else [lds / args.lds]
    files = sorted(folder.glob("model-*.json"))
    if not files:
        raise FileNotFoundError(f"no LDS models in {folder}")
    fraction = json.loads((folder / "config.json").read_text())["fraction"]
    subsets_ = subsets(data.n, len(files), fraction, 1000)
    indicator = np.zeros((len(files), data.n), dtype=np.float64)
    for k, subset in enumerate(subsets_):
        indicator[k, subset] = 1.0
    losses = np.array([json.loads(f.read_text())["losses"] for f in files])
    repeats = [json.loads(f.read_text())["losses"] for f in sorted(folder.glob("repeat-*.json"))]
    noise = {}
    if repeats:
        same = np.array([losses[0], *repeats])
        noise = {"seed_sd_per_target": float(same.std(0, ddof=1).mean()),
                 "subset_sd_per_target": float(losses.std(0, ddof=1).mean())}
    return indicator, losses, noise


class FeatureFile:
    """One proxy checkpoint's features, with its kernel's eigendecomposition cached on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors = load_file(str(path))

    def phi(self, norm: str) -> torch.Tensor:
        phi = self.tensors["phi"].double()
        if norm == "unit":
            phi = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return phi

    def eigh(self, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.path.with_suffix(f".eigh-{norm}.safetensors")
        if cache.exists():
            t = load_file(str(cache))
            return t["values"], t["vectors"]
        phi = self.phi(norm)
        values, vectors = torch.linalg.eigh(phi.T @ phi)
        save_file({"values": values.contiguous(), "vectors": vectors.contiguous()}, str(cache))
        return values, vectors


def variant_tau_parts(variant: dict, files: list[FeatureFile], indicator: np.ndarray,
                      data: Data) -> tuple[np.ndarray, np.ndarray]:
    """(predicted LDS sums [K, T], task-mean scores [N, tasks]) for one estimator variant.

    tau = mean_m(Phi_m K_m^-1 G_m^T) * mean_m(q_m); the subset sums are formed as
    (I diag(q) Phi_m) K_m^-1 G_m^T, so the [N, T] matrix is never built.
    """
    norm, lam_rel = variant.get("phi_norm", "none"), variant.get("lam", 0.01)
    q = torch.stack([f.tensors["q"].double() for f in files]).mean(0)
    if not variant.get("q", True):
        q = torch.ones_like(q)
    ind = torch.from_numpy(indicator) * q[None, :]
    task_names = sorted(set(data.t_tasks.tolist()))
    scored = ~data.t_dev if variant.get("dev") else np.ones(len(data.t_tasks), dtype=bool)
    onehot = torch.tensor(np.stack([(data.t_tasks == t) & scored for t in task_names], 1),
                          dtype=torch.float64)
    onehot /= onehot.sum(0, keepdim=True)
    sums, task_scores = 0.0, 0.0
    for f in files:
        g = f.tensors["target_phi"].double()
        if "targets" in variant:  # other target tokens (`target-features`)
            g = load_file(str(f.path.parent / f"targets-{variant['targets']}" / f.path.name))[
                "target_phi"].double()
        if g.shape[0] != len(data.t_tasks):
            raise SystemExit(f"{f.path}: target features of {g.shape[0]} targets, but this "
                             f"folder has {len(data.t_tasks)}; run target-features for them")
        if variant.get("common") == "subtract_mean":
            g = g - g.mean(0, keepdim=True)
        if variant.get("target_norm") == "unit":
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        phi = f.phi(norm)
        if lam_rel == "inf":  # no kernel: plain gradient inner products (LESS-style)
            weights = g.T
        else:
            values, vectors = f.eigh(norm)
            lam = float(lam_rel) * float(values.sum()) / len(values)
            weights = vectors @ ((vectors.T @ g.T) / (values.clamp_min(0) + lam)[:, None])
        sums = sums + (ind @ phi) @ weights / len(files)
        task_scores = task_scores + (phi @ (weights @ onehot)) / len(files)
    return sums.numpy(), (task_scores * q[:, None]).numpy()


def score(args: argparse.Namespace) -> None:
    """LDS (per target and task level) and cross-task correlation of each variant."""
    out, data = Path(args.out), Data(Path(args.out))
    try:
        indicator, losses, noise = measured_losses(args, data)
        log(f"{len(losses)} LDS models; training noise {noise}")
    except (FileNotFoundError, ValueError) as missing:  # scores (to select) without LDS
        log(f"no LDS ({missing}): task scores and cross-task correlation only")
        indicator, losses, noise = np.zeros((1, data.n)), None, {}
    variants = json.loads(Path(args.grid).read_text())
    results = []
    task_names = sorted(set(data.t_tasks.tolist()))
    for variant in variants:
        start = time.perf_counter()
        files = feature_files(out, variant)
        sums, task_scores = variant_tau_parts(variant, files, indicator, data)
        report, per_target = {}, np.full(data.t_tasks.size, np.nan)
        if losses is not None:
            predicted = -sums
            per_target = spearman_columns(predicted, losses)
            for name in task_names:
                cols = data.t_tasks == name
                level = spearman_columns(predicted[:, cols].mean(1, keepdims=True),
                                         losses[:, cols].mean(1, keepdims=True))[0]
                report[name] = {"lds": round(float(np.nanmean(per_target[cols])), 4),
                                "task_level": round(float(level), 4)}
        from bench.common import spearman

        corr = {f"{a}~{b}": round(spearman(task_scores[:, i], task_scores[:, j]), 3)
                for i, a in enumerate(task_names) for j, b in enumerate(task_names) if j > i}
        row = {"variant": variant, "files": len(files), "lds_mean": None if losses is None else round(float(np.nanmean(per_target)), 4),
               "per_task": report, "cross_task_spearman": corr,
               "seconds": round(time.perf_counter() - start, 1)}
        results.append(row)
        log(json.dumps(row))
        np.save(out / f"task_scores-{digest(variant)}.npy", task_scores)
    path = Path(args.result or out / f"score-{Path(args.grid).stem}.json")
    path.write_text(json.dumps({"noise": noise, "lds_models": 0 if losses is None else len(losses),
                                "results": results}, indent=2))
    log(f"wrote {path}")


def feature_files(out: Path, variant: dict) -> list[FeatureFile]:
    """The feature files a scored variant ensembles over: the last checkpoint of each of its
    first ``proxies`` proxies (every checkpoint with ``"checkpoints": "all"``, or the steps
    named, e.g. ``"200,400"``)."""
    feats = out / "features" / variant["features"]
    return [FeatureFile(p) for m in range(variant.get("proxies", 8))
            for p in checkpoint_files(feats, m, variant.get("checkpoints", "last"))]


def diagnose(args: argparse.Namespace) -> None:
    """Where a variant's task scores vary, and how much of it is signal: per task, the
    split-half reliability (Spearman between the scores of the first and second half of the
    ensemble), the share of the pool variance between sources and between documents, and the
    source shares of the task's own top ``--fraction``."""
    from bench.common import spearman

    out, data = Path(args.out), Data(Path(args.out))
    variant = json.loads(args.variant)
    files = feature_files(out, variant)
    names = sorted(set(data.t_tasks.tolist()))
    dummy = np.zeros((1, data.n))
    half = len(files) // 2
    _, first = variant_tau_parts(variant, files[:half], dummy, data)
    _, second = variant_tau_parts(variant, files[half:], dummy, data)
    _, whole = variant_tau_parts(variant, files, dummy, data)
    sources = data.pool["source"].to_numpy()
    docs = data.pool["doc_id"].to_numpy()
    k = int(args.fraction * data.n)

    def between_share(values: np.ndarray, groups: np.ndarray) -> float:
        frame = pl.DataFrame({"g": groups, "v": values})
        means = frame.with_columns(pl.col("v").mean().over("g").alias("m"))["m"].to_numpy()
        return float(((means - values.mean()) ** 2).sum() / ((values - values.mean()) ** 2).sum())

    result = {"variant": variant, "ensemble_halves": [half, len(files) - half], "tasks": {}}
    for i, name in enumerate(names):
        top = np.argsort(-whole[:, i], kind="stable")[:k]
        mix = dict(zip(*np.unique(sources[top], return_counts=True), strict=True))
        result["tasks"][name] = {
            "split_half_spearman": round(spearman(first[:, i], second[:, i]), 3),
            "between_sources": round(between_share(whole[:, i], sources), 3),
            "between_documents": round(between_share(whole[:, i], docs), 3),
            "top_source_share": {s: round(int(c) / k, 3) for s, c in
                                 sorted(mix.items(), key=lambda kv: -kv[1])}}
    emit(result, args.result)


# --- evaluation models ----------------------------------------------------------------------


def pool_texts(out: Path, data: Data) -> list[str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    rows = [r[:n] for r, n in zip(data.ids.tolist(), data.n_tokens.tolist(), strict=True)]
    return tokenizer.decode_batch(rows)


def selection_scores(out: Path, data: Data, method: str, fraction: float = 0.2) -> np.ndarray:
    """[N] scores of a method (larger = kept first): random keys, DSIR, or a DsDm variant
    (``fraction``: the share the selection keeps, which a variant's source quotas need)."""
    from dsdm.baselines.base import PoolData
    from dsdm.baselines.dsir import DsirSelection
    from dsdm.baselines.random import uniform_keys
    from dsdm.mixture import quota_keys
    from dsdm.selection import combine_task_scores

    if method == "random":
        return uniform_keys(data.n, 0)
    if method.startswith("sources:"):  # a hand-picked domain filter: the ceiling of domain choice
        wanted = method.removeprefix("sources:").split(",")
        return uniform_keys(data.n, 0) + np.isin(data.pool["source"].to_numpy(), wanted)
    if method == "dsir":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        table = pq.read_table(out / "targets_table.parquet")
        select = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "select"]
        rows = table.take(select)
        ids = [r[:n] for r, n in zip(rows.column("input_ids").to_pylist(),
                                     rows.column("n_tokens").to_pylist(), strict=True)]
        return DsirSelection().scores(PoolData(pool_texts(out, data), tokenizer.decode_batch(ids)))
    variant = json.loads(method)
    if variant.get("within") == "own":
        # each task's own best mix, filled by its own DsDm score; a round robin over the tasks
        # ("tasks": a subset of them, e.g. one task alone: its ceiling with its own mix)
        scoring = {k: v for k, v in variant.items() if k not in (
            "mixture", "within", "mixture_top", "mixing", "standardise", "tasks")}
        task_scores = np.load(out / f"task_scores-{digest(scoring)}.npy")
        per_task = own_quotas(out, data, variant["mixture"], fraction)  # sorted by task
        sources = data.pool["source"].to_numpy()
        return round_robin_keys(np.stack([
            quota_keys(sources, task_scores[:, i], quotas)
            for i, (task, quotas) in enumerate(per_task.items())
            if task in variant.get("tasks", per_task)], axis=1))
    if "mixture" in variant:  # source quotas from the domain datamodel, ranked within sources
        within = variant.get("within", "dsdm")
        dsdm_inner = json.dumps({k: v for k, v in variant.items()
                                 if k not in ("mixture", "within", "mixture_top",
                                              "mixture_objective", "blend")})
        if within == "random":
            inner = uniform_keys(data.n, 0)
        elif within == "dsir":  # the n-gram ranking within the same quotas: how good is DsDm's?
            inner = selection_scores(out, data, "dsir")
        else:
            inner = selection_scores(out, data, dsdm_inner)
            if "blend" in variant:  # pool percentile ranks: (1 - b) DsDm + b DSIR
                ranks = np.argsort(np.argsort(
                    np.stack([inner, selection_scores(out, data, "dsir")], 1),
                    axis=0, kind="stable"), axis=0, kind="stable") / data.n
                inner = ranks @ np.array([1 - variant["blend"], variant["blend"]])
        quotas = chosen_mixture(out, data, variant["mixture"], fraction,
                                top=variant.get("mixture_top", 100),
                                objective=variant.get("mixture_objective", "mean"))["quotas"]
        return quota_keys(data.pool["source"].to_numpy(), inner, quotas)
    # keys that change the selection, not the scores
    selection_only = ("standardise", "weights", "unit", "smooth", "temperature", "rule",
                      "mixing", "avoid_scale")
    scoring = {k: v for k, v in variant.items() if k not in selection_only}
    task_scores = np.load(out / f"task_scores-{digest(scoring)}.npy")
    names = sorted(set(data.t_tasks.tolist()))
    if variant.get("rule") == "round_robin":
        return round_robin_keys(task_scores)
    columns = {t: task_scores[:, i] for i, t in enumerate(names)}
    if variant.get("avoid_scale") == "sum":
        combined = max_at_the_sums_spread(columns, variant.get("weights"))
    else:
        combined = combine_task_scores(columns, variant.get("weights"),
                                       standardise=variant.get("standardise", True),
                                       mixing=variant.get("mixing", "sum"))
    for group, alpha in variant.get("smooth", {}).items():
        # shrink each example's score towards its document's (or source's) mean
        column = {"doc": "doc_id", "source": "source"}[group]
        means = pl.DataFrame({"g": data.pool[column], "v": combined}).select(
            pl.col("v").mean().over("g"))["v"].to_numpy()
        combined = (1 - alpha) * combined + alpha * means
    if "temperature" in variant:
        # sample without replacement with probability ~ exp(z / T) (Gumbel top-k) instead of
        # the top share: spreads the budget over more of the pool's well-scored examples
        z = combined / combined.std()
        gumbel = np.random.default_rng(0).gumbel(size=len(z))
        combined = z / variant["temperature"] + gumbel
    return combined


def max_at_the_sums_spread(columns: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The max rule with tasks to avoid, its positive part rescaled to the pool sd the
    standardised sum's positive part has, so an avoided task weighs against the targets as
    much as it does under the sum (the max of several tasks spreads less than their sum)."""
    from dsdm.selection import combine_task_scores, normalised_weights

    normalised = normalised_weights(columns, weights)
    positive = {t: w for t, w in normalised.items() if w > 0}
    negative = {t: w for t, w in normalised.items() if w < 0}
    best = combine_task_scores(columns, positive, standardise=True, mixing="max")
    total = combine_task_scores(columns, positive, standardise=True, mixing="sum")
    # both are normalised over the positive weights only; the avoided part keeps its share
    share = sum(positive.values())
    avoided = (combine_task_scores(columns, negative, standardise=True) * -sum(negative.values())
               if negative else 0.0)
    return share * best * (total.std() / best.std()) + avoided


def round_robin_keys(task_scores: np.ndarray) -> np.ndarray:
    """[N] keys (larger kept first) of a round robin over the tasks' rankings of [N, tasks]
    scores: an example's key is minus its best rank over the tasks."""
    ranks = np.argsort(np.argsort(-task_scores, axis=0, kind="stable"), axis=0, kind="stable")
    return -ranks.min(1).astype(np.float64)


def selected_indices(out: Path, data: Data, method: str, fraction: float) -> np.ndarray:
    """Sorted pool indices a method keeps at ``fraction`` of the pool (of its tokens for a
    variant with "unit": "document")."""
    from dsdm.selection import select

    unit = json.loads(method).get("unit", "example") if method.startswith("{") else "example"
    scores = selection_scores(out, data, method, fraction)
    return np.sort(select(scores, data.pool["example_id"].to_numpy(), data.n_tokens.numpy() - 1,
                          unit=unit, doc_ids=data.pool["doc_id"].to_numpy(),
                          fraction=fraction).order)


def pack_windows(data: Data, chosen: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows from the windows ``chosen`` (sorted pool indices): with k > 1 each run of
    k consecutive chosen windows is concatenated (padding dropped) into one row of k x the
    window length, so a selection of short windows trains a model of a longer context; a
    document's adjacent chosen windows stay in order. Returns ids and loss mask [rows, k x L]."""
    index = torch.from_numpy(chosen)
    if k == 1:
        return data.ids[index], data.mask[index]
    rows = -(-len(chosen) // k)
    ids = torch.zeros(rows, k * data.seq_len, dtype=data.ids.dtype)
    mask = torch.zeros(rows, k * data.seq_len, dtype=data.mask.dtype)
    for row in range(rows):
        at = 0
        for i in chosen[row * k:(row + 1) * k]:
            n = int(data.n_tokens[i])
            ids[row, at:at + n], mask[row, at:at + n] = data.ids[i, :n], data.mask[i, :n]
            at += n
    return ids, mask


def evaluate(args: argparse.Namespace) -> None:
    """Evaluation models (the bench's recipe) on each method's selection; eval-split losses."""
    from dsdm.evaluation import target_losses

    out, data = Path(args.out), Data(Path(args.out))
    targets = pq.read_table(out / "targets_table.parquet")
    dev_table = with_dev_split(targets, data.t_dev)
    config = ProxyConfig(vocab_size=data.vocab, seq_len=data.seq_len * args.pack,
                         hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                         epochs=args.epochs)
    folder = out / "evaluations" / digest({**config.to_dict(), "fraction": args.fraction})
    folder.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        multiples = args.multiples if method == "random" else [1.0]
        for multiple in multiples:
            chosen = selected_indices(out, data, method, args.fraction * multiple)
            ids, mask = pack_windows(data, chosen, args.pack)  # the same rows for every seed
            for seed in args.seeds:
                name = folder / f"{digest([method, multiple, seed])}.json"
                cached = json.loads(name.read_text()) if name.exists() else None
                if cached and ("dev_losses" in cached or not args.add_dev):
                    continue
                start = time.perf_counter()
                result = train_proxy(config.model_copy(update={"seed": seed}), ids, mask,
                                     log_every=10_000)
                losses, dev_losses = (
                    dict(zip(frame["task"].to_list(), frame["loss"].to_list(), strict=True))
                    for frame in (target_losses(result.model, targets),
                                  target_losses(result.model, dev_table, split="dev")))
                if cached:  # retrained for its dev losses: the model must be the one cached
                    drift = max(abs(cached["losses"][t] - v) for t, v in losses.items())
                    if drift > 1e-4:
                        raise SystemExit(f"{name}: retrained eval losses differ from the cached "
                                         f"ones by {drift:.2g}; the cache is not reproducible")
                sources = data.pool["source"].to_numpy()[chosen]
                mix = dict(zip(*np.unique(sources, return_counts=True), strict=True))
                name.write_text(json.dumps({
                    "method": method, "multiple": multiple, "seed": seed,
                    "losses": losses, "dev_losses": dev_losses,
                    "source_share": {k: round(int(v) / len(chosen), 4) for k, v in mix.items()},
                    "seconds": round(time.perf_counter() - start, 1)}))
                log(f"evaluated {method[:60]} x{multiple} seed {seed}: "
                    f"{ {k: round(v, 3) for k, v in losses.items()} }")


def mixing(args: argparse.Namespace) -> None:
    """Selection rules for several tasks, compared by the datamodel's own prediction: for a
    scored variant, each rule's selection (the evaluation's budget) and, per task, the mean
    standardised task score of the selected examples (the predicted gain, in pool sd), with
    each task's own top share as the ceiling. Rules: `sum` (the pipeline's standardised sum)
    and `round_robin` (each task's ranking in turn: the union of every task's top r)."""
    out, data = Path(args.out), Data(Path(args.out))
    variant = json.loads(args.variant)
    task_scores = np.load(out / f"task_scores-{digest(variant)}.npy")
    names = sorted(set(data.t_tasks.tolist()))
    z = task_scores / task_scores.std(0, keepdims=True)
    k = int(args.fraction * len(z))
    own = {t: np.argsort(-z[:, i], kind="stable")[:k] for i, t in enumerate(names)}
    rules = {"sum": np.argsort(-z.mean(1), kind="stable")[:k],
             "round_robin": np.argsort(-round_robin_keys(z), kind="stable")[:k]}
    result = {"variant": variant, "budget": k, "tasks": names, "rules": {}}
    for rule, chosen in rules.items():
        result["rules"][rule] = {
            "mean_z": {t: round(float(z[chosen, i].mean()), 3) for i, t in enumerate(names)},
            "overlap_with_sum": round(len(np.intersect1d(chosen, rules["sum"])) / k, 3)}
    result["own_top"] = {t: round(float(z[own[t], i].mean()), 3) for i, t in enumerate(names)}
    emit(result, args.result)


def report(args: argparse.Namespace) -> None:
    """Loss per method x task (mean, sd over seeds), multipliers against the random curve,
    the unigram reference and the selections' source shares; printed, and as JSON with
    --result."""
    from dsdm.evaluation import compute_multiplier

    out = Path(args.out)
    key = {"eval": "losses", "dev": "dev_losses"}[args.split]
    if args.split == "dev" and args.random_curve:
        raise SystemExit("--random-curve is an eval-split curve; with --split dev the curve is "
                         "this folder's random models that recorded dev losses")
    rows = [json.loads(f.read_text()) for f in sorted((out / "evaluations").glob("*/*.json"))]
    rows = [r for r in rows if key in r]  # models from before the dev set have no dev losses
    frame = pl.DataFrame([{"method": r["method"], "multiple": r["multiple"], "seed": r["seed"],
                           "task": t, "loss": v} for r in rows for t, v in r[key].items()])
    summary = frame.group_by("method", "multiple", "task").agg(
        pl.col("loss").mean().alias("mean"), pl.col("loss").std(ddof=0).alias("sd"),
        pl.len().alias("seeds")).sort("task", "method", "multiple")
    curve = summary.filter(pl.col("method") == "random").sort("multiple")
    if args.random_curve:  # the same pool's committed curve: evaluation models are deterministic
        committed = json.loads(Path(args.random_curve).read_text())["results"]
        curve = pl.DataFrame([{k: r[k] for k in ("multiple", "task", "mean")} for r in committed
                              if r["method"] == "random"]).sort("multiple")
    if args.methods:  # report only these (the curve above still uses every random model)
        summary = summary.filter(pl.col("method").is_in(args.methods))
        rows = [r for r in rows if r["method"] in args.methods]
    results = []
    for row in summary.iter_rows(named=True):
        points = curve.filter(pl.col("task") == row["task"])
        mult = (compute_multiplier(points["multiple"].to_list(), points["mean"].to_list(), row["mean"])
                if len(points) >= 2 else None)  # no random curve (yet) on this split
        results.append({**row, "mean": round(row["mean"], 4), "sd": round(row["sd"], 4),
                        "multiplier": mult and round(mult.value, 3),
                        "extrapolated": mult and mult.extrapolated})
    for (method,), group in pl.DataFrame(results).filter(pl.col("multiple") == 1.0).group_by("method"):
        print(method[:100])
        for r in group.sort("task").iter_rows(named=True):
            times = ("" if r["multiplier"] is None
                     else f" ({r['multiplier']:.2f}x{'*' if r['extrapolated'] else ''})")
            print(f"    {r['task']} {r['mean']:.3f}±{r['sd']:.3f}{times}")
    unigram = unigram_reference(out)
    print(f"unigram: pool entropy {unigram['pool_entropy']:.3f}; eval loss {unigram['loss']}")
    if args.result:
        shares = {}
        for r in rows:
            if r["multiple"] == 1.0:
                shares.setdefault(r["method"], r["source_share"])
        seconds = {f"{r['method'][:100]} x{r['multiple']} seed {r['seed']}": r["seconds"] for r in rows}
        Path(args.result).write_text(json.dumps({
            "results": results, "unigram": unigram, "source_share_1x": shares,
            "model_seconds": seconds, "random_curve": args.random_curve or "this folder's",
            **({"split": "dev"} if args.split == "dev" else {})},
            indent=1))
        print(f"wrote {args.result}")


def unigram_reference(out: Path) -> dict:
    """The pool's unigram entropy and the unigram model's eval-split loss per task: the
    floor every evaluation model must be well below (docs/EVALUATION.md)."""
    from dsdm.evaluation import unigram_entropy, unigram_log_probs, unigram_losses

    data = Data(out)
    pool = pa.table({"input_ids": data.ids.tolist(), "n_tokens": data.n_tokens.numpy(),
                     "score_from": np.ones(data.n, dtype=np.int64)})
    log_probs = unigram_log_probs(pool, data.vocab)
    losses = unigram_losses(log_probs, pq.read_table(out / "targets_table.parquet"))
    return {"pool_entropy": round(unigram_entropy(log_probs), 4),
            "loss": {t: round(v, 4) for t, v in zip(losses["task"], losses["loss"], strict=True)}}


def add_previous_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-fraction", type=float, default=0.5,
                        help="the share of the pool each proxy trains on (a larger pool at a "
                        "smaller share keeps the proxies' training steps)")
    parser.add_argument("--previous", help="a scored DsDm variant (JSON): proxies of the next "
                        "round, trained on its selection plus a random rest of the pool")
    parser.add_argument("--previous-fraction", type=float, default=0.2,
                        help="the share of the pool that selection keeps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "levers" / "bench-4800"))
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--crawl", default=str(REPO / ".dsdm" / "bench" / "crawls" / "bench"))
    p.add_argument("--tasks", default=str(REPO / ".dsdm" / "bench" / "tasks"))
    p.add_argument("--task-names", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--docs", type=int, default=4800)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of training one")
    p.set_defaults(func=prepare)
    for name, func in (("proxies", proxies), ("lds-models", lds_models)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--num", type=int, default=8)
        p.add_argument("--hidden", type=int, default=128)
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--epochs", type=int, default=1)
        if name == "proxies":
            add_previous_args(p)
        if name == "proxies":
            p.add_argument("--checkpoints", type=int, default=4)
        else:
            p.add_argument("--fraction", type=float, default=0.5)
            p.add_argument("--repeats", type=int, default=4)
            p.add_argument("--fixed-seed", action="store_true",
                           help="the same model seed for every subset")
    p = sub.add_parser("mixture-runs")
    p.set_defaults(func=mixture_runs)
    p.add_argument("--runs", type=int, default=24)
    p.add_argument("--concentration", type=float, default=10.0,
                   help="Dirichlet concentration around the pool's source shares")
    p.add_argument("--fraction", type=float, default=0.2, help="each run's share of the pool")
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--first", type=int, default=0,
                   help="skip runs before this one (to split the runs between processes)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="passes (the evaluation models' 3)")
    p.add_argument("--within", help="a scored DsDm variant (JSON): keep each source's best "
                   "examples by its scores instead of a uniform sample")
    p.add_argument("--name", help="folder name under mixtures/ (default: the settings' digest); "
                   "copy another folder's runs into it to extend them with more runs")
    p = sub.add_parser("mixture-fit")
    p.set_defaults(func=mixture_fit)
    p.add_argument("--runs", required=True, help="a mixtures folder name")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--objective", choices=("mean", "worst", "per_task"), default="mean",
                   help="the tasks' mean predicted change, the worst task's, or the mean "
                   "of each task's own best mix")
    p.add_argument("--result", help="also write the JSON here")
    p = sub.add_parser("features")
    p.set_defaults(func=features)
    p.add_argument("--proxies", type=int, default=8)
    p.add_argument("--checkpoints", default="last",
                   help="last, all, or the steps to featurise, e.g. 200,400")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--target-dim", type=int, default=4096)
    p.add_argument("--sketch", choices=("countsketch", "none"), default="countsketch")
    p.add_argument("--factor-dim", type=int, default=128)
    p.add_argument("--lm-head", action="store_true")
    p.add_argument("--embeddings", action="store_true")
    p.add_argument("--model-output", choices=("margin", "log_prob"), default="margin")
    add_previous_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p = sub.add_parser("target-features")
    p.set_defaults(func=target_features)
    p.add_argument("--features", required=True, help="a features folder name")
    p.add_argument("--proxies", type=int, default=8)
    p.add_argument("--tokens", choices=("text", "continuation"), default="text",
                   help="text: prompt + continuation; continuation: as `features`")
    p = sub.add_parser("retarget")
    p.set_defaults(func=retarget)
    p.add_argument("--pool", required=True, help="a prepared folder whose pool to use")
    p.add_argument("--tasks", default=str(REPO / ".dsdm" / "bench" / "tasks"))
    p.add_argument("--task-names", nargs="+", required=True)
    p = sub.add_parser("score")
    p.set_defaults(func=score)
    p.add_argument("--grid", required=True, help="JSON list of variants")
    p.add_argument("--lds", help="LDS model folder name (default: the only one)")
    p.add_argument("--result", help="output JSON (default: <out>/score-<grid>.json)")
    p = sub.add_parser("evaluate")
    p.set_defaults(func=evaluate)
    p.add_argument("--methods", nargs="+", required=True,
                   help="random, dsir, sources:A,B (uniform within those pool sources "
                   "first), or a DsDm variant as JSON (its scores from `score`)")
    p.add_argument("--multiples", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--hidden", type=int, default=160)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--add-dev", action="store_true",
                   help="retrain cached models that have no dev losses (trained before the dev "
                   "set existed) to add them; their eval losses must come out as cached")
    p.add_argument("--pack", type=int, default=1, help="train on k chosen windows concatenated "
                   "(a model of k x the window's context; the targets must be of that length)")
    p = sub.add_parser("mixing")
    p.set_defaults(func=mixing)
    p.add_argument("--variant", required=True, help="a scored DsDm variant as JSON")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--result", help="also write the JSON here")
    p = sub.add_parser("diagnose")
    p.set_defaults(func=diagnose)
    p.add_argument("--variant", required=True, help="a scored DsDm variant as JSON")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--result", help="also write the JSON here")
    p = sub.add_parser("report")
    p.set_defaults(func=report)
    p.add_argument("--result", help="also write the report as JSON here")
    p.add_argument("--methods", nargs="+", help="only these methods (as given to evaluate; "
                   "default: every method evaluated in this folder)")
    p.add_argument("--random-curve", help="an evaluation JSON of the same pool whose random "
                   "rows are the curve (instead of this folder's random models)")
    p.add_argument("--split", choices=("eval", "dev"), default="eval",
                   help="the losses reported: the eval split, or the development targets held "
                   "out of the select split (variants scored with \"dev\": true leave them out)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
