"""Fixtures for the engine tests: real text from the demo crawl, byte-level token ids, and
tiny GPT-NeoX proxies.

Text is read with plain gzip + json and turned into byte ids (UTF-8 bytes 0..255, pad 256),
so these tests do not depend on the project's tokenizer.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from dsdm.proxy import ProxyConfig, TrainResult, build_proxy, train_proxy

DATA = Path(__file__).resolve().parents[2] / "data"
CRAWL = DATA / "crawls" / "demo"
TASKS = DATA / "tasks"
PAD = 256
VOCAB = 257


def _read_jsonl_gz(path: Path, limit: int | None) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in itertools.islice(fh, limit)]


@pytest.fixture(scope="session")
def docs_by_source() -> dict[str, list[dict]]:
    """Every document of the demo crawl (a few MB), grouped by its `source` field."""
    files = sorted(CRAWL.glob("*.jsonl.gz"))
    if not files:
        pytest.fail(f"no demo crawl at {CRAWL} (*.jsonl.gz); these tests need real text")
    groups: dict[str, list[dict]] = {}
    for path in files:
        for doc in _read_jsonl_gz(path, None):
            if len(doc["text"].encode("utf-8")) >= 64:
                groups.setdefault(doc["source"], []).append(doc)
    return dict(sorted(groups.items()))


@pytest.fixture(scope="session")
def demo_docs(docs_by_source: dict[str, list[dict]]) -> list[dict]:
    """400 documents of the demo crawl, interleaved across sources."""
    mixed = itertools.zip_longest(*docs_by_source.values())
    return [d for group in mixed for d in group if d is not None][:400]


@pytest.fixture(scope="session")
def task_rows() -> list[dict]:
    """Up to 64 prompt/continuation rows of the first target task file."""
    files = sorted(TASKS.glob("*.jsonl.gz"))
    if not files:
        pytest.fail(f"no target tasks at {TASKS} (*.jsonl.gz); these tests need real tasks")
    return _read_jsonl_gz(files[0], 64)


def byte_examples(texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [N, length] (bytes, right-padded with PAD) and loss_mask [N, length]
    (True on real tokens after the first)."""
    ids = torch.full((len(texts), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.bool)
    for i, text in enumerate(texts):
        raw = list(text.encode("utf-8"))[:length]
        ids[i, : len(raw)] = torch.tensor(raw, dtype=torch.long)
        mask[i, 1 : len(raw)] = True
    return ids, mask


def prompt_examples(rows: list[dict], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-style examples: prompt + continuation, only continuation bytes scored
    (the continuation is assumed shorter than `length`)."""
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        prompt = list(row["prompt"].encode("utf-8"))
        cont = list(row["continuation"].encode("utf-8"))
        raw = (prompt + cont)[-length:]  # a long prompt loses its head, never the answer
        start = max(1, len(raw) - len(cont))
        ids[i, : len(raw)] = torch.tensor(raw, dtype=torch.long)
        mask[i, start : len(raw)] = True
    return ids, mask


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    OpenMP threads that wait on a busy core make these tests 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ProxyConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    seq_len=64,
    lr=3e-3,
    warmup_steps=5,
    epochs=2,
    max_steps=40,
    batch_size=16,
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_config() -> ProxyConfig:
    """A 2-layer, 32-wide proxy over byte ids with 64-token context."""
    return TINY


@pytest.fixture(scope="session")
def tiny_train_data(demo_docs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Real text as [N, 64] byte ids and loss masks."""
    return byte_examples([d["text"] for d in demo_docs], TINY.seq_len)


@pytest.fixture(scope="session")
def trained_tiny(tiny_train_data: tuple[torch.Tensor, torch.Tensor]) -> TrainResult:
    """The tiny proxy after 40 AdamW steps on the demo text (a few seconds on a CPU)."""
    ids, mask = tiny_train_data
    return train_proxy(TINY, ids, mask)


@pytest.fixture(scope="session")
def encode_bytes():
    """`byte_examples` as a fixture (test modules do not import conftest)."""
    return byte_examples


@pytest.fixture(scope="session")
def encode_prompts():
    """`prompt_examples` as a fixture."""
    return prompt_examples


@pytest.fixture
def untrained_tiny() -> torch.nn.Module:
    """A freshly initialised tiny proxy (seed 0)."""
    return build_proxy(TINY)
