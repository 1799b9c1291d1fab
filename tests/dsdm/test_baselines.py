"""Baselines on real demo text: each favours what it should, and randomness is seeded."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dsdm.baselines import PoolData
from dsdm.baselines.classifier import ClassifierSelection
from dsdm.baselines.dsir import DsirSelection
from dsdm.baselines.ngrams import hashed_ngrams
from dsdm.baselines.random import RandomSelection, document_keys
from dsdm.baselines.semdedup import SemDedupSelection, proxy_embeddings
from dsdm.proxy import ProxyConfig, build_proxy
from dsdm.selection import document_ranking, select_documents, select_top

TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"
WINDOW = 80  # words per pool example: equal-length units, as the pipeline's token windows


@pytest.fixture(scope="module")
def pool(demo_rows) -> tuple[list[str], np.ndarray]:
    """The demo crawl cut into 80-word examples (texts, sources)."""
    texts, sources = [], []
    for row in demo_rows:
        words = row["text"].split()
        for start in range(0, len(words), WINDOW):
            if len(words[start : start + WINDOW]) >= WINDOW // 2:
                texts.append(" ".join(words[start : start + WINDOW]))
                sources.append(row["source"])
    return texts, np.array(sources)


def _select_texts(task: str) -> list[str]:
    with gzip.open(TASKS / f"{task}.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [r["prompt"] + r["continuation"] for r in rows if r["split"] == "select"]


def _share(sources: np.ndarray, scores: np.ndarray, source: str) -> float:
    top = select_top(scores, np.arange(len(scores)), fraction=0.2)
    return float(np.mean(sources[top] == source))


@pytest.mark.parametrize("method", [DsirSelection(), ClassifierSelection()], ids=["dsir", "classifier"])
@pytest.mark.parametrize(("task", "source"), [("wiki_qa", "wikipedia"), ("lambada_cloze", "novels")])
def test_text_similarity_methods_favour_the_target_domain(pool, method, task, source) -> None:
    texts, sources = pool
    scores = method.scores(PoolData(texts, _select_texts(task)))
    assert scores.shape == (len(texts),) and np.isfinite(scores).all()
    pool_share = float(np.mean(sources == source))
    assert _share(sources, scores, source) > 2 * pool_share


def test_dsir_weights_are_log_density_ratios_of_hashed_ngrams() -> None:
    target = ["the cat sat", "the cat ran"]
    texts = ["the cat sat", "a dog barked loudly", "the cat"]
    method = DsirSelection(num_buckets=4096, gumbel=False)
    log_w = method.log_importance_weights(PoolData(texts, target))
    pool_grams, target_grams = hashed_ngrams(texts, 4096), hashed_ngrams(target, 4096)
    ratio = method.log_ratio(target_grams, pool_grams)
    # by hand: text 2's n-grams are "the", "cat", "the cat"
    expected = sum(ratio[b] for b in pool_grams.bucket[pool_grams.text == 2])
    assert log_w[2] == pytest.approx(expected)
    assert log_w[0] > log_w[2] > log_w[1]  # target-like text first, unrelated text last
    assert len(pool_grams.bucket[pool_grams.text == 2]) == 3


def test_dsir_gumbel_topk_samples_in_proportion_to_the_weights() -> None:
    # Two kinds of text, importance ratio w_a / w_b = p; Gumbel top-1 picks a at rate p/(1+p).
    target = ["alpha beta"] * 3 + ["gamma delta"]
    texts = ["alpha beta", "gamma delta"]
    log_w = DsirSelection(gumbel=False, smoothing=1e-3).log_importance_weights(PoolData(texts, target))
    expected = 1 / (1 + np.exp(log_w[1] - log_w[0]))
    wins = np.mean([DsirSelection(smoothing=1e-3, seed=s).scores(PoolData(texts, target)).argmax() == 0
                    for s in range(2000)])
    assert abs(wins - expected) < 0.04


def test_random_selection_is_seeded_and_uniform(pool) -> None:
    texts, sources = pool
    data = PoolData(texts)
    first = RandomSelection(seed=3).scores(data)
    assert np.array_equal(first, RandomSelection(seed=3).scores(data))
    assert not np.array_equal(first, RandomSelection(seed=4).scores(data))
    # uniform: over many seeds every example is picked about fraction x seeds times
    n, picks = 200, np.zeros(200)
    for seed in range(500):
        picks[select_top(RandomSelection(seed=seed).scores(PoolData(texts[:n])), np.arange(n),
                         fraction=0.2)] += 1
    assert abs(picks.mean() - 100) < 1e-9 and picks.min() > 60 and picks.max() < 140
    # and the source mix of one 20% sample follows the pool's
    top = select_top(first, np.arange(len(texts)), fraction=0.2)
    for source, count in Counter(sources).items():
        assert abs(np.mean(sources[top] == source) - count / len(texts)) < 0.04


def test_random_documents_are_a_uniform_sample_of_documents() -> None:
    """One key per document: a document of 9 examples is drawn as often as one of 1."""
    doc_ids = np.repeat(np.array(["long", "a", "b", "c"]), [9, 1, 1, 1])
    keys = document_keys(doc_ids, 0)
    assert len(set(keys[:9])) == 1 and len(set(keys)) == 4
    assert np.array_equal(keys, document_keys(doc_ids, 0))
    tokens = np.ones(len(doc_ids), dtype=np.int64)
    wins = Counter()
    for seed in range(2000):
        ranking = document_ranking(document_keys(doc_ids, seed), doc_ids, tokens)
        wins[ranking.doc_ids[select_documents(ranking, 9)[0]]] += 1
    assert all(abs(wins[d] / 2000 - 0.25) < 0.04 for d in ("long", "a", "b", "c")), wins


def test_semdedup_removes_planted_near_duplicates(pool) -> None:
    texts, _ = pool
    rng = np.random.default_rng(0)
    originals = rng.choice(len(texts), 40, replace=False).tolist()
    # near-duplicates: the same window with one word changed
    planted = [texts[i].replace(" the ", " a ", 1) + " ." for i in originals]
    model = build_proxy(ProxyConfig(vocab_size=257, hidden_size=64, num_layers=1, num_heads=2,
                                    seq_len=256))
    all_texts = texts[:1500] + planted
    ids = torch.full((len(all_texts), 256), 256)
    mask = torch.zeros(len(all_texts), 256, dtype=torch.bool)
    for row, text in enumerate(all_texts):
        data = list(text.encode()[:256])
        ids[row, : len(data)] = torch.tensor(data)
        mask[row, : len(data)] = True
    embeddings = proxy_embeddings(model, ids, mask, batch_size=128)
    method = SemDedupSelection(threshold=0.995, clusters=8)
    keep = method.survivors(embeddings)
    in_range = [i for i in originals if i < 1500]
    # of each planted pair exactly one copy survives; unrelated windows survive
    pair_survivors = [keep[i] + keep[1500 + k] for k, i in enumerate(originals) if i < 1500]
    assert np.mean(np.array(pair_survivors) == 1) > 0.9
    others = np.setdiff1d(np.arange(1500), in_range)
    assert keep[others].mean() > 0.9
    scores = method.scores(PoolData(all_texts, embeddings=embeddings))
    assert (scores[~keep] < 0).all() and (scores[keep] >= 0).all()
