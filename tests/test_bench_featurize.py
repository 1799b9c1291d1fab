"""bench.featurize measures the pipeline's featuriser: its flags default to FeatureConfig's."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not part of the installed package
from bench.featurize import build_parser  # noqa: E402
from dsdm.features import FeatureConfig  # noqa: E402


def test_featurize_bench_defaults_are_the_pipelines():
    args, config = build_parser().parse_args([]), FeatureConfig()
    assert (args.dim, args.sketch, args.factor_dim, args.lm_head, args.embeddings,
            args.batch_size) == (config.target_dim, config.sketch, config.factor_dim,
                                 config.include_lm_head, config.include_embeddings,
                                 config.batch_size)
