"""Tokenizer training, per-document chunking, prompt/continuation encoding, loss masks."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from dsdm.tokenization import (
    TokenizerConfig,
    chunk_documents,
    encode_prompt_continuation,
    example_shards,
    examples_table,
    load_pretrained,
    special_ids,
    to_tensors,
    tokenizer_from_bytes,
    tokenizer_to_bytes,
    train_bpe,
)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_rows: list[dict]):
    return train_bpe((r["text"] for r in demo_rows[:800]), TokenizerConfig(vocab_size=1024))


def test_bpe_learns_the_requested_vocabulary_and_round_trips(demo_tokenizer, demo_rows) -> None:
    assert demo_tokenizer.get_vocab_size() == 1024
    eos, pad = special_ids(demo_tokenizer)
    assert (eos, pad) == (0, 1)
    text = demo_rows[5]["text"]
    ids = demo_tokenizer.encode(text).ids
    assert demo_tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # BPE compresses real text well beyond bytes
    clone = tokenizer_from_bytes(tokenizer_to_bytes(demo_tokenizer))
    assert clone.encode(text).ids == ids


def test_chunks_never_span_documents_and_cover_them(demo_tokenizer, demo_rows) -> None:
    rows = demo_rows[:50]
    table, stats = chunk_documents(
        demo_tokenizer, [f"d{i}" for i in range(50)], [r["text"] for r in rows],
        [r["source"] for r in rows], seq_len=64, min_tokens=8,
    )
    _, pad = special_ids(demo_tokenizer)
    by_doc: dict[str, list[int]] = {}
    for row in table.to_pylist():
        assert len(row["input_ids"]) == 64
        assert all(t == pad for t in row["input_ids"][row["n_tokens"]:])
        assert row["example_id"] == f"{row['doc_id']}:{len(by_doc.get(row['doc_id'], []))}"
        by_doc.setdefault(row["doc_id"], []).append(row["n_tokens"])
    total = sum(len(demo_tokenizer.encode(r["text"]).ids) + 1 for r in rows)
    assert stats["tokens"] + stats["dropped_tokens"] == total
    assert stats["examples"] == table.num_rows
    for doc, lengths in by_doc.items():
        assert all(n == 64 for n in lengths[:-1]), doc


def test_streamed_shards_equal_chunking_everything_at_once(demo_tokenizer, demo_rows) -> None:
    rows = demo_rows[:300]
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(rows))],
                     "text": [r["text"] for r in rows], "source": [r["source"] for r in rows]})
    whole, stats = chunk_documents(demo_tokenizer, docs["doc_id"].to_pylist(),
                                   docs["text"].to_pylist(), docs["source"].to_pylist(),
                                   seq_len=64, min_tokens=8)
    totals: dict = {}
    shards = list(example_shards(demo_tokenizer, docs.to_batches(max_chunksize=37), 64, 8,
                                 shard_size=100, totals=totals))
    assert [s.num_rows for s in shards[:-1]] == [100] * (len(shards) - 1)
    assert 0 < shards[-1].num_rows <= 100 and len(shards) == -(-whole.num_rows // 100)
    for k, shard in enumerate(shards):  # the same rows, shard boundaries and bytes layout
        assert shard.equals(whole.slice(100 * k, 100).combine_chunks())
    per_source = totals.pop("per_source")
    assert totals == stats
    frame = whole.group_by("source").aggregate([("doc_id", "count_distinct"),
                                                ("doc_id", "count"), ("n_tokens", "sum")])
    expected = {r["source"]: {"documents": r["doc_id_count_distinct"],
                              "examples": r["doc_id_count"], "tokens": r["n_tokens_sum"]}
                for r in frame.to_pylist()}
    assert per_source == expected


def test_loss_mask_scores_only_real_tokens_after_score_from() -> None:
    table = examples_table(["a", "b"], ["a", "b"], ["s", "s"],
                           [[5, 6, 7, 1, 1], [5, 6, 7, 8, 9]], [3, 5], [1, 3])
    input_ids, mask = to_tensors(table)
    assert input_ids.dtype == torch.int64 and input_ids.shape == (2, 5)
    assert mask.tolist() == [[False, True, True, False, False], [False, False, False, True, True]]


def test_prompt_is_left_truncated_and_only_continuation_scored(demo_tokenizer) -> None:
    prompt = "Question: what does the kernel scheduler do with idle tasks? " * 5 + "\nAnswer:"
    padded, n_tokens, score_from, counts = encode_prompt_continuation(
        demo_tokenizer, [prompt, "Q: short?\nAnswer:"], [" it sleeps", " yes"], seq_len=32
    )
    assert counts == {"truncated_prompts": 1, "truncated_continuations": 0}
    assert n_tokens[0] == 32
    cont = demo_tokenizer.encode(" it sleeps").ids
    assert padded[0][score_from[0]:n_tokens[0]] == cont
    assert demo_tokenizer.decode(padded[1][score_from[1]:n_tokens[1]]) == " yes"
    long_answer = " the scheduler sleeps" * 20
    padded, n_tokens, score_from, counts = encode_prompt_continuation(
        demo_tokenizer, [prompt], [long_answer], seq_len=32)
    assert counts == {"truncated_prompts": 1, "truncated_continuations": 1}
    assert score_from[0] == 16 and n_tokens[0] == 32
    assert padded[0][16:] == demo_tokenizer.encode(long_answer).ids[:16]
    with pytest.raises(ValueError, match="empty prompt"):
        encode_prompt_continuation(demo_tokenizer, [""], [" yes"], seq_len=16)


def test_pretrained_tokenizer_loads_from_local_gpt2_style_files(tmp_path: Path, demo_tokenizer):
    model = json.loads(demo_tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    loaded = load_pretrained(str(tmp_path))
    text = "The scheduler runs idle tasks."
    assert loaded.encode(text).ids == demo_tokenizer.encode(text).ids
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        load_pretrained(str(tmp_path / "missing"))
