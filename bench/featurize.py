"""Cost of gradient features: factored (hooks) vs exact (torch.func) vs one training step.

    python bench/featurize.py                      # ~1-2 minutes on 2 CPU cores
    python bench/featurize.py --hidden 256 --layers 4 --examples 2048 --dim 8192 --device cuda

Same proxy (freshly initialised: cost does not depend on the weights), same examples (real
text from the demo crawl as byte ids), same d. "train" is one plain training step per batch
(forward, backward, AdamW step) over the same examples. Each path runs
in its own child process so that its peak RSS is its own; the parent prints one JSON object
with throughput (fastest of --repeats runs), peak RSS, the ratios between the paths, and how
far the factored phi is from the exact phi (they should agree to float tolerance). On a shared
machine, compare runs with --threads 1: idle OpenMP threads waiting on a busy core distort
timings more than anything measured here.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dsdm.features import FeatureConfig, featurize
from dsdm.proxy import ProxyConfig, build_proxy, causal_lm_loss

REPO = Path(__file__).resolve().parents[1]
PAD = 256


def real_text_examples(crawl: Path, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n byte-level examples of `length` tokens cut from a crawl's text (fully scored)."""
    files = sorted(crawl.glob("*.jsonl.gz"))
    if not files:
        raise SystemExit(f"no *.jsonl.gz crawl files under {crawl}")
    stream = bytearray()
    for path in itertools.cycle(files):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                stream += json.loads(line)["text"].encode("utf-8") + b"\n\n"
                if len(stream) >= n * length:
                    ids = torch.tensor(list(stream[: n * length]), dtype=torch.long)
                    mask = torch.ones(n, length, dtype=torch.bool)
                    mask[:, 0] = False
                    return ids.view(n, length), mask
    raise AssertionError("unreachable")


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch_size)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_role(args: argparse.Namespace) -> dict:
    """Run one path in this process and return its measurements."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids, mask = real_text_examples(Path(args.crawl), args.examples, args.seq_len)
    model = build_proxy(proxy_config(args)).to(device)
    config = FeatureConfig(method="factored" if args.role == "factored" else "exact",
                           target_dim=args.dim, batch_size=args.batch_size,
                           include_lm_head=args.lm_head,
                           autocast_dtype="bfloat16" if args.bf16 else "float32")
    warm = slice(0, args.batch_size)
    if args.role == "train":
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def work(sl: slice) -> None:
            for start in range(sl.start or 0, sl.stop or len(ids), args.batch_size):
                batch = ids[start : start + args.batch_size].to(device)
                scored = mask[start : start + args.batch_size].to(device)
                loss = causal_lm_loss(model(input_ids=batch).logits, batch, scored)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
    else:

        def work(sl: slice) -> None:
            feats = featurize(model, ids[sl], mask[sl], config, device=device)
            if sl.stop is None:
                np.save(Path(args.out_dir) / f"{args.role}.npy", feats.phi.numpy())

    work(warm)  # first call pays one-off costs (allocator, kernels): not measured
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mb()
    times = []
    for _ in range(args.repeats):  # the fastest repeat: least disturbed by other processes
        t0 = time.perf_counter()
        work(slice(0, None))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    out = {
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(ids) / seconds, 2),
        "tokens_per_s": round(ids.numel() / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_run_mb": round(rss_before, 1),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=257, help=">= 257 (byte ids)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=2048, help="target d of the projection")
    p.add_argument("--lm-head", action="store_true", help="also featurise the LM head")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--crawl", default=str(REPO / "data" / "crawls" / "demo"),
                   help="folder of *.jsonl.gz crawl files to cut examples from")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path; min is kept")
    p.add_argument("--roles", default="factored,exact,train")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print(json.dumps(run_role(args)))
        return

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in args.roles.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--role", role, "--out-dir", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{role} failed:\n{done.stderr[-4000:]}")
            results[role] = json.loads(done.stdout.strip().splitlines()[-1])
        agreement = None
        if {"factored", "exact"} <= set(results):
            fast, ref = (np.load(Path(tmp) / f"{r}.npy") for r in ("factored", "exact"))
            agreement = float(np.abs(fast - ref).max() / np.abs(ref).max())
    model = build_proxy(proxy_config(args))
    report = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("role", "out_dir")},
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
        "factored_vs_exact_max_rel_diff": agreement,
    }
    ratios = {}
    if {"factored", "exact"} <= set(results):
        ratios["factored_speedup_over_exact"] = round(
            results["factored"]["examples_per_s"] / results["exact"]["examples_per_s"], 2)
        ratios["exact_over_factored_peak_rss"] = round(
            results["exact"]["peak_rss_mb"] / results["factored"]["peak_rss_mb"], 2)
    if {"factored", "train"} <= set(results):
        ratios["factored_time_over_train_step_time"] = round(
            results["factored"]["seconds"] / results["train"]["seconds"], 2)
        ratios["factored_over_train_peak_rss"] = round(
            results["factored"]["peak_rss_mb"] / results["train"]["peak_rss_mb"], 2)
    report["ratios"] = ratios
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
