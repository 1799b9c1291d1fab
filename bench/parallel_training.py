"""Small models trained one after another at all threads, or side by side at one thread each.

    python -m bench.parallel_training                   # the bench's mixture-run model
    python -m bench.parallel_training --hidden 160 --layers 3 --steps 120   # evaluation model

`mixture_runs`, `evaluations` and `datamodel_lds` each train many small, independent models.
On a 2-core machine a 128 x 2 model keeps two threads only partly busy, so training two
models at once, one thread each, may finish a batch of them sooner. This measures it on one
machine in one run: ``--models`` trainings of ``--steps`` steps (batches of 32 x 128 tokens,
random token ids: the cost does not depend on the ids), first one after another with
``--threads`` torch threads, then ``--threads`` at a time in worker processes with one
thread each. Prints JSON: seconds of each way, and sequential / side by side (> 1: side by
side is faster).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_one(settings: dict, seed: int, threads: int) -> float:
    """Seconds to train one model of ``settings`` on random ids with ``threads`` threads."""
    import torch

    from dsdm.proxy import ProxyConfig, train_proxy

    torch.set_num_threads(threads)
    config = ProxyConfig(vocab_size=settings["vocab"], hidden_size=settings["hidden"],
                         num_layers=settings["layers"], seq_len=128, batch_size=32,
                         max_steps=settings["steps"], seed=seed)
    ids = torch.randint(0, settings["vocab"], (32 * settings["steps"], 128),
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    train_proxy(config, ids, log_every=10**9)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="the machine's cores")
    args = parser.parse_args()
    settings = {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                "steps": args.steps}

    # both ways in fresh worker processes, so neither pays for importing torch in the parent
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        pool.submit(train_one, {**settings, "steps": 2}, 0, args.threads).result()  # warm-up
        start = time.perf_counter()
        per_model = [pool.submit(train_one, settings, m, args.threads).result()
                     for m in range(args.models)]
        sequential = time.perf_counter() - start
    with ProcessPoolExecutor(args.threads, mp_context=spawn) as pool:
        list(pool.map(train_one, [{**settings, "steps": 2}] * args.threads, range(args.threads),
                      [1] * args.threads))  # warm-up: every worker has imported torch
        start = time.perf_counter()
        side = list(pool.map(train_one, [settings] * args.models, range(args.models),
                             [1] * args.models))
        side_by_side = time.perf_counter() - start
    print(json.dumps({
        "settings": {**settings, "models": args.models, "threads": args.threads},
        "sequential_s": round(sequential, 1),
        "sequential_per_model_s": [round(s, 1) for s in per_model],
        "side_by_side_s": round(side_by_side, 1),
        "side_by_side_per_model_s": [round(s, 1) for s in side],
        "sequential_over_side_by_side": round(sequential / side_by_side, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
