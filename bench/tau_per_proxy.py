"""Each proxy's own TRAK scores of the bench pool, kept apart instead of averaged, so that
`bench/tau_variants.py` can test aggregations that use the ensemble's spread (``seS``,
``psoftS``, ``medianS``) and how much of a selection two halves of the ensemble share
(``proxiesIJ..``).

    python bench/tau_per_proxy.py            # the store of bench/selection_quality.py

Reads the store's one datamodel_weights folder (or ``--datamodel``), its gradient_shards and
target_gradients, and writes under ``--out``/<scores_id>/:
- ``proxy-MM.npy``: S_m [N, T] float32, proxy m's Phi_m (Phi_m^T Phi_m + lambda_m I)^{-1} G_m^T,
  pool rows in corpus order, targets in the order of tau's columns;
- ``q-MM.npy``: proxy m's out-to-loss weights q_m [N];
- ``q.npy``: the ensemble's out-to-loss weight [N] (mean over proxies), or ones when the
  folder was scored without it;
- ``done.json``: the check that mean_m(S_m) * q reproduces the stored tau (largest
  difference relative to tau's largest entry), and what each proxy cost.
A proxy whose file exists is not recomputed (the run can be stopped and resumed). The stored
tau is the reference: a mismatch above float32 rounding stops the script.
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

from bench.tau_variants import STORE, only_manifest  # noqa: E402
from dsdm import trak  # noqa: E402
from dsdm.artifacts import feature_shard, load_features, load_tau, target_features  # noqa: E402
from dsdm.store import ArtifactStore  # noqa: E402


def proxy_scores(store: ArtifactStore, grads: dict, targets: dict, m: int,
                 lambda_relative: float, target_phi: torch.Tensor | None = None,
                 inverse_cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Proxy m's S_m [N, T] float32 and q_m [N], as `dsdm.datamodels.ensemble_scores` forms
    them before it averages over proxies: of the stored target features, or of
    ``target_phi`` [T, d] (`bench/target_span.py`'s). With ``inverse_cache`` (a file) the
    regularised kernel inverse is read from there, or computed once and written there."""
    folder, shards = grads["folder"], grads["manifest"]["summary"]["shards"]

    def shard(k: int):
        return load_features(store, f"{folder}/{feature_shard(m, k)}")

    if inverse_cache is not None and inverse_cache.exists():
        inverse = torch.load(inverse_cache)
    else:
        k_matrix = trak.kernel(shard(k).phi for k in range(shards))
        inverse = trak.regularised_inverse(k_matrix, trak.default_lambda(k_matrix, lambda_relative))
        if inverse_cache is not None:
            torch.save(inverse, inverse_cache.with_suffix(".tmp"))
            inverse_cache.with_suffix(".tmp").rename(inverse_cache)
    if target_phi is None:
        target_phi = load_features(store, f"{targets['folder']}/{target_features(m)}").phi
    blocks, q = [], []
    for k in range(shards):
        features = shard(k)
        (block,) = trak.scores([features.phi], inverse, target_phi)
        blocks.append(block.float().numpy())
        q.append(features.q.numpy())
    return np.concatenate(blocks), np.concatenate(q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--crawl", default="bench-5200")
    parser.add_argument("--datamodel", help="datamodel_weights folder (its config hash)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "tau_per_proxy"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.store)
    store = ArtifactStore(str(root))
    weights = only_manifest(root, "datamodel_weights", args.crawl, args.datamodel)
    inputs = {}
    for asset in ("gradient_shards", "target_gradients"):
        manifest = only_manifest(root, asset, args.crawl)
        inputs[asset] = {"manifest": manifest,
                         "folder": f"{asset}/{args.crawl}/{manifest['config_hash']}"}
    proxies = inputs["gradient_shards"]["manifest"]["summary"]["proxies"]
    out = Path(args.out) / weights["config_hash"]
    out.mkdir(parents=True, exist_ok=True)
    config = weights["config"]
    seconds = {}
    q_sum = None
    for m in range(proxies):
        path = out / f"proxy-{m:02d}.npy"
        q_path = out / f"q-{m:02d}.npy"
        if not (path.exists() and q_path.exists()):
            started = time.time()
            s_m, q_m = proxy_scores(store, inputs["gradient_shards"], inputs["target_gradients"], m,
                                    config["lambda_relative"])
            np.save(q_path, q_m)
            np.save(path.with_suffix(".tmp.npy"), s_m)
            path.with_suffix(".tmp.npy").rename(path)  # a present file is a finished proxy
            seconds[m] = round(time.time() - started, 1)
            print(f"[{time.strftime('%H:%M:%S')}] proxy {m}: {s_m.shape} in {seconds[m]} s", flush=True)
        q_m = np.load(q_path)
        q_sum = q_m.astype(np.float64) if q_sum is None else q_sum + q_m
    q = q_sum / proxies if config.get("out_to_loss_weight", True) else np.ones_like(q_sum)
    np.save(out / "q.npy", q)
    tau = torch.cat([load_tau(store, f["path"]) for f in weights["files"] if f["kind"] == "tau"]).double()
    mean = sum(np.load(out / f"proxy-{m:02d}.npy", mmap_mode="r").astype(np.float64) for m in range(proxies))
    rebuilt = mean / proxies * q[:, None]
    error = float(np.abs(rebuilt - tau.numpy()).max() / np.abs(tau.numpy()).max())
    print(f"mean_m(S_m) * q against the stored tau: largest difference {error:.2e} of tau's largest entry")
    if error > 1e-4:
        raise SystemExit(f"the per-proxy scores do not reproduce the stored tau (relative error {error:.2e})")
    (out / "done.json").write_text(json.dumps({"scores_id": weights["config_hash"], "proxies": proxies,
                                               "relative_error": error, "seconds": seconds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
