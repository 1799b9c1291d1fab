"""The committed demo crawl and target tasks: schema, coverage, size, splits, contamination.

Plain gzip + json on purpose: these checks must not depend on the ingest code they feed.
"""

import gzip
import json
from functools import cache
from pathlib import Path

import pytest

from dsdm.contamination import find_overlaps, ngrams, normalised_words

DATA = Path(__file__).resolve().parents[2] / "data"
CRAWL = DATA / "crawls" / "demo"
TASKS = DATA / "tasks"
MIXED_TASKS = ("mixed_cloze", "mixed_continuation")
TASK_NAMES = ("wiki_qa", "lambada_cloze", "tech_faq", *MIXED_TASKS, "spam_mail")
CRAWL_FIELDS = ("id", "text", "source", "url", "license")
TASK_FIELDS = ("id", "task", "split", "prompt", "continuation", "source", "origin")


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


@cache
def crawl_rows() -> tuple[dict, ...]:
    shards = sorted(CRAWL.glob("part-*.jsonl.gz"))
    assert shards, f"no shards in {CRAWL}"
    return tuple(row for shard in shards for row in _read(shard))


@cache
def task_rows(name: str) -> tuple[dict, ...]:
    return tuple(_read(TASKS / f"{name}.jsonl.gz"))


def test_crawl_schema_and_unique_ids() -> None:
    rows = crawl_rows()
    for row in rows:
        for field in CRAWL_FIELDS:
            assert isinstance(row.get(field), str) and row[field], (row.get("id"), field)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    assert (CRAWL / "_SUCCESS").exists()


def test_every_domain_is_present() -> None:
    counts: dict[str, int] = {}
    for row in crawl_rows():
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    assert len(counts) >= 8, counts
    assert all(n >= 100 for n in counts.values()), counts


def test_demo_is_small() -> None:
    files = [*CRAWL.glob("*.jsonl.gz"), *TASKS.glob("*.jsonl.gz")]
    assert sum(f.stat().st_size for f in files) <= 10 * 1024 * 1024
    assert max(len(row["text"]) for row in crawl_rows()) <= 2000


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_rows(name: str) -> None:
    rows = task_rows(name)
    for row in rows:
        for field in TASK_FIELDS:
            assert isinstance(row.get(field), str) and row[field], (row.get("id"), field)
        assert row["task"] == name
        assert row["continuation"].strip(), row["id"]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("select", "eval")}
    assert set(by_split) | {r["split"] for r in rows} == {"select", "eval"}
    assert by_split["select"] and by_split["eval"]
    for key in ("id", "origin"):
        select = {r[key] for r in by_split["select"]}
        assert select.isdisjoint(r[key] for r in by_split["eval"]), key


def test_no_target_text_in_pool() -> None:
    targets = [r["prompt"] + r["continuation"] for n in TASK_NAMES for r in task_rows(n)]
    overlaps = find_overlaps((row["text"] for row in crawl_rows()), targets)
    assert overlaps == []


def test_find_overlaps_catches_a_planted_copy() -> None:
    """A 20-word passage of real demo text, reformatted, is caught; 12 shared words are not."""
    rows = crawl_rows()
    pool_index, words = next(
        (i, normalised_words(r["text"])) for i, r in enumerate(rows)
        if r["source"] == "novels" and len(normalised_words(r["text"])) > 60
    )
    copied = " ".join(words[10:30]).upper().replace(" ", "  \n ")
    short = " ".join(words[10:22])
    targets = ["Question: an unrelated question?\nAnswer: no.", f"Clue: {copied}\nAnswer:", short]
    overlaps = find_overlaps((r["text"] for r in rows), targets)
    assert {o.target_index for o in overlaps} == {1}
    assert pool_index in {o.pool_index for o in overlaps if o.target_index == 1}
    assert len(ngrams(short)) == 0


def test_held_out_material_is_not_in_pool() -> None:
    held_out = ("novels/emma/", "novels/persuasion/", "python_docs/faq/", "perl_docs/perlfaq",
                "perl_docs/perltoc")
    assert not [row["id"] for row in crawl_rows() if row["id"].startswith(held_out)]
    pool_urls = {row["url"] for row in crawl_rows() if row["source"] == "wikipedia"}
    assert pool_urls.isdisjoint(row["origin"] for row in task_rows("wiki_qa"))


def _held_out_doc(row: dict) -> str:
    """The pool document a mixed-task item was cut from: ``<task>/<doc id>/r<run>s<sentence>``."""
    return row["id"].removeprefix(row["task"] + "/").rsplit("/", 1)[0]


@pytest.mark.parametrize("name", MIXED_TASKS)
def test_mixed_task_covers_several_sources(name: str) -> None:
    """Each split draws on at least five pool sources, none of them dominant."""
    pool_sources = {row["source"] for row in crawl_rows()}
    for split in ("select", "eval"):
        counts: dict[str, int] = {}
        for row in task_rows(name):
            if row["split"] == split:
                counts[row["source"]] = counts.get(row["source"], 0) + 1
        assert len(counts) >= 5, (split, counts)
        assert set(counts) <= pool_sources, counts
        assert max(counts.values()) <= 2 * min(counts.values()), (split, counts)


def test_mixed_task_shapes() -> None:
    """Cloze: a passage of 250-400 characters (with its final punctuation, which the item drops)
    ending in one word; continuation: a prompt of 150-300 characters and at most about 200 more."""
    for row in task_rows("mixed_cloze"):
        word = row["continuation"].removeprefix(" ")
        assert row["continuation"] == " " + word and word.isalpha() and len(word) >= 3, row["id"]
        assert 240 <= len(row["prompt"] + row["continuation"]) <= 400, row["id"]
    for row in task_rows("mixed_continuation"):
        assert row["continuation"].startswith(" ") and len(row["continuation"]) <= 201, row["id"]
        assert 150 <= len(row["prompt"]) <= 300, row["id"]


def test_mixed_held_out_documents_are_not_in_pool() -> None:
    """No document a mixed-task item comes from is in the crawl, by id or by origin, and a
    document is in the same split in both mixed tasks."""
    pool_ids = {row["id"].rpartition("#")[0] for row in crawl_rows()}
    pool_urls = {row["url"] for row in crawl_rows()}
    split_of: dict[str, str] = {}
    for name in MIXED_TASKS:
        for row in task_rows(name):
            doc = _held_out_doc(row)
            assert doc.startswith(row["source"] + "/"), row["id"]
            assert doc not in pool_ids, row["id"]
            assert row["origin"] not in pool_urls, row["id"]
            assert split_of.setdefault(doc, row["split"]) == row["split"], row["id"]


def test_spam_task_is_held_out_spam() -> None:
    """``spam_mail`` items are openings of spam messages that are not in the crawl (by id or
    origin): a subject line, 120-260 characters of body, and a continuation of at most ~200."""
    pool_ids = {row["id"].rpartition("#")[0] for row in crawl_rows()}
    pool_urls = {row["url"] for row in crawl_rows()}
    rows = task_rows("spam_mail")
    assert len(rows) >= 200
    for row in rows:
        message = row["id"].removeprefix("spam_mail/")
        assert row["source"] == "mail_spam" and message.startswith("mail_spam/spam-"), row["id"]
        assert message not in pool_ids and row["origin"] not in pool_urls, row["id"]
        subject, _, lead = row["prompt"].partition("\n")
        assert subject.startswith("Subject:") and 120 <= len(lead) <= 260, row["id"]
        assert len(row["continuation"]) <= 201 and len(row["continuation"].split()) >= 4
