"""Nothing the pipeline reads can execute code, and bad configuration fails before a run
starts with a message that names the key."""

import re
from pathlib import Path

import dagster as dg
import pytest

from dsdm_assets.datamodels import ProxyEnsembleConfig
from dsdm_assets.definitions import defs
from dsdm_assets.ingest import CorpusConfig, DocumentsConfig
from dsdm_assets.selection import SelectionConfig

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ["dsdm", "dsdm_assets", "resources", "sensors"]
# Deserialisers that can run code, and remote-code switches: none may appear in the product.
UNSAFE = re.compile(
    r"\bimport pickle\b|\bpickle\.loads?\b|\btorch\.load\(|\bjoblib\.load\b|"
    r"trust_remote_code\s*=\s*True|(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\((?!.*SafeLoader)|\bdill\b"
)


def test_no_unsafe_deserialisation_in_the_product() -> None:
    offenders = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_pattern_catches_what_it_is_for() -> None:
    for line in ("state = torch.load(path)", "import pickle", "obj = pickle.loads(b)",
                 "AutoModel.from_pretrained(p, trust_remote_code=True)"):
        assert UNSAFE.search(line), line


def test_unknown_keys_and_wrong_types_fail_before_the_run_starts() -> None:
    job = defs.resolve_job_def("selection_job")
    for run_config, expected in [
        ({"ops": {"tokenizer": {"config": {"vocab_sise": 4096}}}}, 'unexpected config entry "vocab_sise"'),
        ({"ops": {"tokenized_corpus": {"config": {"seq_len": "long"}}}}, "seq_len"),
        ({"ops": {"selected_subset": {"config": {"fraction": "a lot"}}}}, "fraction"),
    ]:
        with pytest.raises(dg.DagsterInvalidConfigError) as error:
            dg.validate_run_config(job, run_config)
        assert expected in str(error.value)


@pytest.mark.parametrize(
    ("config_class", "values", "expected"),
    [
        (SelectionConfig, {"fraction": 1.5}, "fraction"),
        (SelectionConfig, {"fraction": 0.1, "token_budget": 1000}, "either fraction or token_budget"),
        (ProxyEnsembleConfig, {"num_proxies": 0}, "num_proxies"),
        (DocumentsConfig, {"min_chars": 50, "max_chars": 10}, "exceeds max_chars"),
        (CorpusConfig, {"seq_len": 4}, "seq_len"),
    ],
)
def test_out_of_range_values_name_the_field(config_class, values: dict, expected: str) -> None:
    """Dagster builds these objects when the step starts; the message names the field."""
    with pytest.raises(ValueError, match=expected):
        config_class(**values)
