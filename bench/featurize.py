"""Cost and quality of gradient features: the factored fast path against the exact path,
against TRAK's reference library (`traker`) and against one plain training step.

    .venv/bin/pip install -e '.[bench]'                    # traker==0.3.2 (and py-spy)
    .venv/bin/python -m bench.featurize                    # demo proxy, d = 8192: ~6 min
    .venv/bin/python -m bench.featurize --model 7m --score-candidates 32 --score-targets 16

One run, one set of real examples: the demo crawl is ingested, a 4,096-token BPE is trained
on it (`dsdm.tokenization`), pool windows are the first full 128-token windows and targets the
first select-split rows of the three target tasks. A proxy of the chosen shape is trained for
`--train-steps` AdamW steps on the pool, so that gradients are those of a model that has
learnt something. Every path then runs in its own child process, so that its peak RSS
(ru_maxrss) is its own:

- fast:      `featurize(method="factored")`, the pipeline's default;
- exact:     `featurize(method="exact")`: torch.func per-example gradients, same projection;
- traker:    `TRAKer.featurize` as it ships on a CPU (all parameters, Gaussian projection
             regenerated in blocks of 100 columns per batch), on `--traker-batches` batches;
- traker_featurised: the same, restricted (`grad_wrt`) to the weights dsdm featurises; it
             featurises the scoring set and finishes with traker's own TRAK scores;
- train:     one plain training step per batch (forward, backward, AdamW) on the same examples;
- reference: full unprojected per-example gradients of the scoring set (not timed), the
             ground truth that the projections approximate.

Throughput is the fastest of `--repeats` runs (least disturbed by other processes on a shared
machine); `cpu_seconds` is the process CPU time of that run. The parent prints one JSON object:
setup, per-path results, ratios, and quality: correlation of projected inner products with the
exact (unprojected) ones, and Spearman correlations of each path's TRAK scores tau [C, T] with
the exact path's and with the unprojected reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Heavy imports (torch, dsdm) happen inside the roles: the parent stays small, and a child
# started from a large parent would inherit the parent's peak RSS through exec.

TRAIN_POOL = 2048
"""Pool windows the proxy trains on (the timed and scored windows are the first of them)."""
ROLES = ("fast", "exact", "traker", "traker_featurised", "train", "reference")
EXTRA_ROLES = ("profile",)
"""Run only when named in --roles: a torch.profiler table of the fast path."""


def _feature_config(args: argparse.Namespace, **overrides):
    """The FeatureConfig the command line describes (every path featurises the same weights)."""
    from dsdm.features import FeatureConfig

    return FeatureConfig(target_dim=args.dim, sketch=args.sketch, factor_dim=args.factor_dim,
                         include_lm_head=args.lm_head, include_embeddings=args.embeddings,
                         batch_size=args.batch_size, **overrides)


def _threads_and_load(args: argparse.Namespace):
    import torch
    from safetensors.torch import load_file

    from dsdm.proxy import ProxyConfig, build_proxy

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = load_file(work / "examples.safetensors")
    config = ProxyConfig.model_validate(json.loads((work / "proxy.json").read_text()))
    model = build_proxy(config)
    model.load_state_dict(load_file(work / "proxy.safetensors"))
    return data, model.eval()


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(work, n: int, repeats: int) -> dict:
    """Fastest of `repeats` calls of work() over n examples."""
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return {"examples": n, "seconds": round(best[0], 3), "cpu_seconds": round(best[1], 3),
            "examples_per_s": round(n / best[0], 3)}


def role_prepare(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    from bench.common import proxy_config, real_examples
    from dsdm.proxy import proxy_to_bytes, train_proxy

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    n_pool = max(args.examples, args.score_candidates, args.exact_examples, TRAIN_POOL)
    start = time.perf_counter()
    ex = real_examples(vocab_size=args.vocab, seq_len=args.seq_len, n_pool=n_pool,
                       n_targets=args.score_targets)
    save_file({"pool_ids": ex.pool_ids, "pool_mask": ex.pool_mask, "target_ids": ex.target_ids,
               "target_mask": ex.target_mask, "target_attention": ex.target_attention},
              work / "examples.safetensors")
    config = proxy_config(args.model, vocab_size=args.vocab, seq_len=args.seq_len,
                          batch_size=32).model_copy(update={"max_steps": args.train_steps})
    trained = train_proxy(config, ex.pool_ids, ex.pool_mask)
    (work / "proxy.safetensors").write_bytes(proxy_to_bytes(trained.model))
    (work / "proxy.json").write_text(json.dumps(config.to_dict()))
    return {"seconds": round(time.perf_counter() - start, 1),
            "params": sum(p.numel() for p in trained.model.parameters()),
            "train_loss_first_last": [round(trained.losses[0], 3), round(trained.losses[-1], 3)],
            "pool_windows": n_pool, "targets": len(ex.target_ids)}


def _scoring_set(data: dict, args: argparse.Namespace):
    c = args.score_candidates
    return (data["pool_ids"][:c], data["pool_mask"][:c],
            data["target_ids"], data["target_mask"], data["target_attention"])


def role_featurize(args: argparse.Namespace) -> dict:
    """fast (factored) or exact: timed on the pool, then features of the scoring set."""
    import numpy as np

    from bench.common import peak_rss_mb
    from dsdm.features import featurize

    data, model = _threads_and_load(args)
    n = args.examples if args.role == "fast" else args.exact_examples
    ids, mask = data["pool_ids"][:n], data["pool_mask"][:n]
    config = _feature_config(args, method="factored" if args.role == "fast" else "exact",
                             autocast_dtype="bfloat16" if args.bf16 else "float32")
    featurize(model, ids[: args.batch_size], mask[: args.batch_size], config)  # warm-up
    rss_before = _current_rss_mb()
    out = _timed(lambda: featurize(model, ids, mask, config), n, args.repeats)
    out.update(peak_rss_mb=round(peak_rss_mb(), 1), rss_before_mb=round(rss_before, 1))
    c_ids, c_mask, t_ids, t_mask, t_attn = _scoring_set(data, args)
    cand = featurize(model, c_ids, c_mask, config)
    targ = featurize(model, t_ids, t_mask, config, attention_mask=t_attn)
    np.savez(Path(args.work) / f"{args.role}.npz", phi=cand.phi.numpy(), q=cand.q.numpy(),
             target_phi=targ.phi.numpy())
    out["dim"] = int(cand.phi.shape[1])
    return out


def role_profile(args: argparse.Namespace) -> dict:
    """torch.profiler over the fast path: the operators that take its time, by input shape."""
    from torch.profiler import ProfilerActivity, profile

    from dsdm.features import featurize

    data, model = _threads_and_load(args)
    ids, mask = data["pool_ids"][: args.examples], data["pool_mask"][: args.examples]
    config = _feature_config(args)
    featurize(model, ids[: args.batch_size], mask[: args.batch_size], config)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        wall = time.perf_counter()
        featurize(model, ids, mask, config)
        wall = time.perf_counter() - wall
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    return {"seconds_profiled": round(wall, 3), "operators_cpu_seconds": round(total / 1e6, 3),
            "top_operators": [{"op": e.key, "shapes": str(e.input_shapes),
                               "self_cpu_percent": round(100 * e.self_cpu_time_total / total, 1)}
                              for e in top]}


def role_reference(args: argparse.Namespace) -> dict:
    """Gram matrix of the full (unprojected) per-example gradients of candidates + targets."""
    import numpy as np
    import torch

    from dsdm.features import ExactFeaturizer, layer_projections

    data, model = _threads_and_load(args)
    c_ids, c_mask, t_ids, t_mask, t_attn = _scoring_set(data, args)
    projs = layer_projections(model, _feature_config(args))
    full = ExactFeaturizer(projs, output="full", batch_size=args.batch_size)
    start = time.perf_counter()
    cand = full(model, c_ids, c_mask)
    targ = full(model, t_ids, t_mask, attention_mask=t_attn)
    g = torch.cat([cand.phi, targ.phi]).double()
    np.savez(Path(args.work) / "reference.npz", gram=(g @ g.T).numpy(), q=cand.q.numpy())
    return {"seconds": round(time.perf_counter() - start, 1), "full_dim": int(g.shape[1])}


def role_traker(args: argparse.Namespace) -> dict:
    """traker's TRAKer.featurize with its CPU projector; `traker_featurised` also scores."""
    import logging

    import numpy as np
    import torch
    from trak import TRAKer

    from bench.common import peak_rss_mb
    from bench.traker_output import CausalLMMargin, traker_batch
    from dsdm import trak
    from dsdm.features import featurised_layers

    data, model = _threads_and_load(args)
    restricted = args.role == "traker_featurised"
    layers = featurised_layers(model, include_lm_head=args.lm_head,
                               include_embeddings=args.embeddings)
    grad_wrt = [f"{n}.weight" for n in layers] if restricted else None
    c_ids, c_mask, t_ids, t_mask, t_attn = _scoring_set(data, args)
    if not restricted:
        n = args.traker_batches * args.batch_size
        c_ids, c_mask = data["pool_ids"][:n], data["pool_mask"][:n]
    c_attn = torch.ones_like(c_mask)
    bs = args.batch_size
    traker = TRAKer(model=model, task=CausalLMMargin(), train_set_size=len(c_ids),
                    save_dir=str(Path(args.work) / args.role), device="cpu", proj_dim=args.dim,
                    use_half_precision=False, grad_wrt=grad_wrt, logging_level=logging.WARNING)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    # Warm-up without a projection (that cost recurs on every batch anyway).
    traker.gradient_computer.compute_per_sample_grad(traker_batch(c_ids[:1], c_mask[:1],
                                                                  c_attn[:1]))
    rss_before = _current_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(c_ids), bs):
        traker.featurize(traker_batch(c_ids[s : s + bs], c_mask[s : s + bs],
                                      c_attn[s : s + bs]), num_samples=len(c_ids[s : s + bs]))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"examples": len(c_ids), "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
           "examples_per_s": round(len(c_ids) / wall, 4), "seconds_per_example":
           round(wall / len(c_ids), 3), "peak_rss_mb": round(peak_rss_mb(), 1),
           "rss_before_mb": round(rss_before, 1), "grad_dim": traker.num_params_for_grad}
    if not restricted:
        return out
    phi = np.array(traker.saver.current_store["grads"], dtype=np.float32)
    # The ridge dsdm uses (trak.default_lambda): LAMBDA_RELATIVE x the kernel's mean diagonal.
    mean_diagonal = float((phi.astype(np.float64) ** 2).sum()) / phi.shape[1]
    traker.score_computer.lambda_reg = trak.LAMBDA_RELATIVE * mean_diagonal
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0,
                                    num_targets=len(t_ids))
    for s in range(0, len(t_ids), bs):
        traker.score(traker_batch(t_ids[s : s + bs], t_mask[s : s + bs], t_attn[s : s + bs]),
                     num_samples=len(t_ids[s : s + bs]))
    target_phi = np.array(traker.saver.current_store["targets_grads"], dtype=np.float32)
    q = np.array(traker.saver.current_store["out_to_loss"], dtype=np.float32).ravel()
    tau = np.array(traker.finalize_scores("targets"), dtype=np.float64)
    np.savez(Path(args.work) / f"{args.role}.npz", phi=phi, q=q, target_phi=target_phi, tau=tau)
    return out


def role_train(args: argparse.Namespace) -> dict:
    """One plain training step (forward, backward, AdamW) per batch of the same examples."""
    import torch

    from bench.common import peak_rss_mb
    from dsdm.proxy import causal_lm_loss

    data, model = _threads_and_load(args)
    ids, mask = data["pool_ids"][: args.examples], data["pool_mask"][: args.examples]
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def steps(n: int) -> None:
        for s in range(0, n, args.batch_size):
            batch, scored = ids[s : s + args.batch_size], mask[s : s + args.batch_size]
            loss = causal_lm_loss(model(input_ids=batch).logits, batch, scored)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()

    steps(args.batch_size)  # warm-up; also allocates AdamW's state
    rss_before = _current_rss_mb()
    out = _timed(lambda: steps(len(ids)), len(ids), args.repeats)
    out.update(peak_rss_mb=round(peak_rss_mb(), 1), rss_before_mb=round(rss_before, 1))
    return out


def quality(work: Path, dim: int) -> dict:
    """Inner-product and TRAK-score agreement of every path with the exact references."""
    import numpy as np
    import torch

    from bench.common import spearman
    from dsdm import trak

    def tau_of(phi: np.ndarray, target_phi: np.ndarray, q: np.ndarray) -> np.ndarray:
        phi_t = torch.from_numpy(phi)
        k_inv = trak.regularised_inverse(trak.kernel([phi_t]))
        (s,) = trak.scores([phi_t], k_inv, torch.from_numpy(target_phi))
        return trak.ensemble([s], [torch.from_numpy(q)]).numpy()

    def compare(a: np.ndarray, b: np.ndarray) -> dict:
        per_target = [spearman(a[:, j], b[:, j]) for j in range(a.shape[1])]
        return {"all_pairs": round(spearman(a, b), 4),
                "per_target_mean": round(float(np.mean(per_target)), 4),
                "per_target_min": round(float(np.min(per_target)), 4),
                "target_mean_score": round(spearman(a.mean(1), b.mean(1)), 4)}

    def gram_agreement(gram: np.ndarray, ref: np.ndarray) -> dict:
        iu = np.triu_indices(len(ref))
        off = np.triu_indices(len(ref), 1)
        norm, ref_norm = np.sqrt(np.diag(gram)), np.sqrt(np.diag(ref))
        cos, ref_cos = gram / np.outer(norm, norm), ref / np.outer(ref_norm, ref_norm)
        return {"pearson_inner_products": round(float(np.corrcoef(gram[iu], ref[iu])[0, 1]), 4),
                "pearson_off_diagonal": round(float(np.corrcoef(gram[off], ref[off])[0, 1]), 4),
                "pearson_cosines": round(float(np.corrcoef(cos[off], ref_cos[off])[0, 1]), 4)}

    paths = {p: dict(np.load(work / f"{p}.npz")) for p in ("fast", "exact", "traker_featurised")
             if (work / f"{p}.npz").exists()}
    taus = {p: tau_of(v["phi"], v["target_phi"], v["q"]) for p, v in paths.items()}
    if "traker_featurised" in paths:
        taus["traker_own_scores"] = paths["traker_featurised"]["tau"]
    out: dict = {}
    if "exact" in taus:
        out["tau_spearman_vs_exact"] = {p: compare(t, taus["exact"]) for p, t in taus.items()
                                        if p != "exact"}
    if (work / "reference.npz").exists():
        ref = np.load(work / "reference.npz")
        gram, q = ref["gram"], ref["q"]
        c = len(q)
        # TRAK without projection, in its dual form: Phi (Phi^T Phi + lam I)^-1 G^T =
        # (Phi Phi^T + lam I)^-1 Phi G^T; lam is what trak.default_lambda gives a d-dim
        # projection of these gradients in expectation (projections preserve norms).
        lam = trak.LAMBDA_RELATIVE * np.trace(gram[:c, :c]) / dim
        scores = np.linalg.solve(gram[:c, :c] + lam * np.eye(c), gram[:c, c:])
        reference_tau = scores * q[:, None]
        out["tau_spearman_vs_unprojected"] = {p: compare(t, reference_tau)
                                              for p, t in taus.items()}
        out["inner_products_vs_unprojected"] = {}
        for p, v in paths.items():
            feats = np.concatenate([v["phi"], v["target_phi"]]).astype(np.float64)
            out["inner_products_vs_unprojected"][p] = gram_agreement(feats @ feats.T, gram)
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="proxy shape: demo (1.4M) or 7m (7.6M)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    # FeatureConfig's defaults, written out (the parent imports nothing heavy, see above);
    # tests/test_bench_featurize.py checks that they agree
    p.add_argument("--dim", type=int, default=8192, help="target d of the projection")
    p.add_argument("--sketch", choices=("countsketch", "none"), default="countsketch",
                   help="second projection stage of fast and exact (FeatureConfig.sketch)")
    p.add_argument("--factor-dim", type=int, default=128,
                   help="largest per-side Kronecker factor before the sketch")
    p.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=False,
                   help="featurise the LM head (FeatureConfig.include_lm_head)")
    p.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="featurise the input embedding (FeatureConfig.include_embeddings)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=256, help="timed examples: fast and train")
    p.add_argument("--exact-examples", type=int, default=64, help="timed examples: exact")
    p.add_argument("--traker-batches", type=int, default=1,
                   help="timed batches of traker with all parameters")
    p.add_argument("--score-candidates", type=int, default=96,
                   help="pool windows C of the scoring set (kernel and scores)")
    p.add_argument("--score-targets", type=int, default=32,
                   help="select-split target rows T, round-robin over the three tasks")
    p.add_argument("--train-steps", type=int, default=60, help="AdamW steps of the proxy")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path; fastest kept")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per path (1: stable timings on a shared machine)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for fast and exact")
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--keep", help="folder to keep the proxy, examples and features in")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.role:
        runner = {"prepare": role_prepare, "fast": role_featurize, "exact": role_featurize,
                  "traker": role_traker, "traker_featurised": role_traker,
                  "train": role_train, "reference": role_reference,
                  "profile": role_profile}[args.role]
        print(json.dumps(runner(args)))
        return

    roles = [r for r in args.roles.split(",") if r]
    if unknown := sorted(set(roles) - set(ROLES) - set(EXTRA_ROLES)):
        raise SystemExit(f"unknown roles {unknown}; choose from {[*ROLES, *EXTRA_ROLES]}")
    load_before = os.getloadavg()[0]
    results: dict[str, dict] = {}
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="dsdm-bench-") as tmp:
        work = args.keep or tmp
        Path(work).mkdir(parents=True, exist_ok=True)
        for role in ["prepare", *roles]:
            cmd = [sys.executable, "-m", "bench.featurize", *sys.argv[1:], "--role", role,
                   "--work", work]
            print(f"running {role} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=repo)
            if done.returncode != 0:
                raise SystemExit(f"{role} failed:\n{done.stderr[-4000:]}")
            results[role] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({role: results[role]}), file=sys.stderr, flush=True)
        agreement = quality(Path(work), args.dim)

    import torch

    prepared = results.pop("prepare")
    report = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("role", "work")},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "traker": _version("traker"),
                    "load_average_1m_before_after": [round(load_before, 2),
                                                     round(os.getloadavg()[0], 2)]},
        "proxy": prepared,
        "results": results,
    }
    ratios = {}
    speed = {r: v["examples_per_s"] for r, v in results.items() if "examples_per_s" in v}
    # CPU-time rates too: on a shared machine a path's wall time includes waiting for a core.
    cpu_speed = {r: v["examples"] / v["cpu_seconds"] for r, v in results.items()
                 if v.get("cpu_seconds")}
    for other in ("traker", "traker_featurised", "exact"):
        if {"fast", other} <= set(speed):
            ratios[f"fast_over_{other}_throughput"] = _ratio(speed["fast"], speed[other])
            ratios[f"fast_over_{other}_cpu_throughput"] = _ratio(cpu_speed["fast"],
                                                                 cpu_speed[other])
    if {"fast", "train"} <= set(speed):
        ratios["fast_time_over_train_step_time"] = _ratio(speed["train"], speed["fast"])
        ratios["fast_cpu_time_over_train_step_cpu_time"] = _ratio(cpu_speed["train"],
                                                                  cpu_speed["fast"])
        fast, train = results["fast"], results["train"]
        ratios["fast_over_train_peak_rss"] = _ratio(fast["peak_rss_mb"], train["peak_rss_mb"])
        ratios["fast_over_train_peak_rss_above_start"] = _ratio(
            fast["peak_rss_mb"] - fast["rss_before_mb"],
            train["peak_rss_mb"] - train["rss_before_mb"])
    report["ratios"] = ratios
    report["quality"] = agreement
    print(json.dumps(report, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
