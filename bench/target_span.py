"""tau with each target scored on at least K tokens: a target whose continuation is shorter
(a cloze answer of one or two tokens) is featurised with its scored span extended backwards
into the end of its prompt, so its gradient holds the passage's own next-token predictions
beside the answer's.

    python bench/target_span.py --min-tokens 16        # -> bench/out/target_span/<scores>/span16/
    python bench/tau_variants.py --tau bench/out/target_span/<scores>/span16 --variants soft1 ...

Why: scored into the task means, the development targets' own items are 0.17 nats better on
lambada_cloze and 0.25 on mixed_cloze than scored out of them, against 0.01-0.03 on the
tasks with longer continuations (docs/EVALUATION.md, "What the scores know about the items
they were given"): a one-token target's scores are about its answer word, which a new item
does not share. The evaluation is unchanged: models are still scored on the continuations.

Reads a store that `bench/selection_quality.py` filled. For each proxy m it featurises the
select-split targets with the changed spans (the gradient_shards' projection, proxy m's
checkpoint, as `target_gradients` does), forms S_m = phi_pool (K_m + lambda I)^-1 phi_t^T
(`dsdm.trak.scores`; the regularised inverse is cached beside the output, 512 MB a proxy,
so a second K costs only the targets), and writes tau = mean_m(S_m) x q [N, T] (float32)
with ``done.json``. It checks that proxy 0's features of the unchanged targets reproduce the
stored target features (before the walk), and that the columns of the targets whose span
did not move reproduce the stored tau (after it; ``done.json`` is written only then).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tau_per_proxy import proxy_scores  # noqa: E402
from bench.tau_variants import STORE, only_manifest, tables  # noqa: E402
from dsdm.artifacts import (  # noqa: E402
    load_features,
    load_proxy_checkpoint,
    load_tau,
    target_features,
)
from dsdm.datamodels import features_from_bytes, featurise_table  # noqa: E402
from dsdm.features import FeatureConfig  # noqa: E402
from dsdm.store import ArtifactStore  # noqa: E402


def with_min_span(targets: pa.Table, min_tokens: int) -> pa.Table:
    """``targets`` with each ``score_from`` moved back so that at least ``min_tokens`` tokens
    (or all but the first) are scored; longer continuations are left as they are."""
    n_tokens = targets.column("n_tokens").to_numpy().astype(np.int64)
    score_from = targets.column("score_from").to_numpy().astype(np.int64)
    moved = np.maximum(1, np.minimum(score_from, n_tokens - min_tokens))
    return targets.set_column(targets.schema.get_field_index("score_from"), "score_from",
                              pa.array(moved.astype(np.int32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--crawl", default="bench-5200")
    parser.add_argument("--min-tokens", type=int, required=True, help="K: the shortest scored span")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "target_span"))
    args = parser.parse_args()
    if args.min_tokens < 1:
        raise SystemExit("--min-tokens must be at least 1")
    torch.set_num_threads(2)
    root = Path(args.store)
    store = ArtifactStore(str(root))
    weights = only_manifest(root, "datamodel_weights", args.crawl)
    grads = only_manifest(root, "gradient_shards", args.crawl)
    stored_targets = only_manifest(root, "target_gradients", args.crawl)
    proxies = only_manifest(root, "proxy_checkpoints", args.crawl)
    grads_input = {"manifest": grads, "folder": f"gradient_shards/{args.crawl}/{grads['config_hash']}"}
    targets_folder = f"target_gradients/{args.crawl}/{stored_targets['config_hash']}"
    checkpoints = [f["path"] for f in proxies["files"] if f["kind"] == "checkpoint"]
    if len(checkpoints) != grads["summary"]["proxies"]:
        raise SystemExit(f"{len(checkpoints)} proxy checkpoints, {grads['summary']['proxies']} feature sets")
    table = tables(store, only_manifest(root, "target_tasks", args.crawl), "targets")
    table = table.filter(pc.equal(table.column("split"), "select"))
    changed = with_min_span(table, args.min_tokens)
    moved = int((changed.column("score_from").to_numpy() != table.column("score_from").to_numpy()).sum())
    config = FeatureConfig.model_validate(grads["config"])
    lambda_relative = weights["config"]["lambda_relative"]
    out_root = Path(args.out) / weights["config_hash"]
    out = out_root / f"span{args.min_tokens}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{moved} of {table.num_rows} targets get a longer scored span", flush=True)

    def featurise(m: int, targets: pa.Table) -> torch.Tensor:
        model = load_proxy_checkpoint(store, checkpoints[m])
        data, _ = featurise_table(model, targets, config, m, "target_span")
        return features_from_bytes(data, "target_span").phi

    stored = load_features(store, f"{targets_folder}/{target_features(0)}").phi
    again = featurise(0, table)
    error = float((again.double() - stored.double()).abs().max() / stored.double().abs().max())
    print(f"proxy 0, unchanged targets against the stored features: {error:.2e}", flush=True)
    if error > 1e-4:
        raise SystemExit("re-featurising the stored targets does not reproduce them; the "
                         "checkpoints or the projection differ from the store's")
    total, q_sum, seconds = None, None, {}
    for m in range(len(checkpoints)):
        started = time.time()
        s_m, q_m = proxy_scores(store, grads_input, {}, m, lambda_relative,
                                target_phi=featurise(m, changed),
                                inverse_cache=out_root / f"inverse-{m:02d}.pt")
        block, q = torch.from_numpy(s_m).double(), torch.from_numpy(q_m).double()
        total = block if total is None else total + block
        q_sum = q if q_sum is None else q_sum + q
        seconds[m] = round(time.time() - started, 1)
        print(f"[{time.strftime('%H:%M:%S')}] proxy {m}: {seconds[m]} s", flush=True)
    m_count = len(checkpoints)
    q_mean = q_sum / m_count if weights["config"].get("out_to_loss_weight", True) else torch.ones_like(q_sum)
    tau = (total / m_count * q_mean[:, None]).float().numpy()
    # the targets whose span did not move must give the stored tau's columns
    same = changed.column("score_from").to_numpy() == table.column("score_from").to_numpy()
    stored_tau = torch.cat([load_tau(store, f["path"]) for f in weights["files"]
                            if f["kind"] == "tau"]).numpy()
    tau_error = float(np.abs(tau[:, same] - stored_tau[:, same]).max() / np.abs(stored_tau).max())
    print(f"unmoved targets' columns against the stored tau: {tau_error:.2e}", flush=True)
    if tau_error > 1e-4:
        raise SystemExit("the unmoved targets' scores differ from the stored tau")
    np.save(out / "tau.npy", tau)
    (out / "done.json").write_text(json.dumps({
        "scores_id": weights["config_hash"], "min_tokens": args.min_tokens, "targets_moved": moved,
        "targets": table.num_rows, "stored_features_error": error, "stored_tau_error": tau_error, "seconds": seconds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
