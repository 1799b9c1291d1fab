"""Target tasks built from material that never enters the pool.

- ``wiki_qa``: Jeopardy-style clues from Wikipedia summaries of held-out topics;
- ``lambada_cloze``: last-word prediction on passages of the held-out *Persuasion* and *Emma*;
- ``tech_faq``: question/answer pairs from perlfaq1-9 and the Python FAQ.

Splits are assigned per origin group (Wikipedia page, novel chapter, FAQ page) so related
items never straddle ``select`` and ``eval``.
"""

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from corpus.reference import HELD_OUT_TOPICS, WikiEntry
from corpus.text import STOPWORDS, cut_sentences, render_pod_inline, render_rst_inline, sentences

MAX_PROMPT = 350
ANSWER_CHARS = 300


@dataclass(frozen=True)
class TaskItem:
    """One prompt/continuation pair; ``group`` keeps related items in one split."""

    id: str
    task: str
    prompt: str
    continuation: str
    source: str
    origin: str
    group: str
    split: str = ""

    def row(self) -> dict[str, str]:
        return {"id": self.id, "task": self.task, "split": self.split, "prompt": self.prompt,
                "continuation": self.continuation, "source": self.source, "origin": self.origin}


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def assign_splits(items: list[TaskItem]) -> list[TaskItem]:
    """Deal whole groups to the split with fewer items, separately for each source.

    Groups go largest first (ties in hash order), which keeps both splits about equal in
    size and in source mix even when groups are whole FAQ pages or novel chapters.
    """
    groups: dict[tuple[str, str], list[TaskItem]] = {}
    for item in items:
        groups.setdefault((item.source, item.group), []).append(item)
    sizes: dict[tuple[str, str], int] = {}
    out: list[TaskItem] = []
    order = sorted(groups, key=lambda k: (k[0], -len(groups[k]), stable_hash(k[1]), k[1]))
    for source, group in order:
        n_select, n_eval = sizes.get((source, "select"), 0), sizes.get((source, "eval"), 0)
        split = "select" if n_select <= n_eval else "eval"
        sizes[(source, split)] = sizes.get((source, split), 0) + len(groups[(source, group)])
        out.extend(replace(item, split=split) for item in groups[(source, group)])
    return out


def take(items: list[TaskItem], per_split: int | None) -> list[TaskItem]:
    """Up to ``per_split`` items of each split, chosen by hash of id, in id order."""
    chosen: list[TaskItem] = []
    for split in ("select", "eval"):
        pool = sorted((i for i in items if i.split == split), key=lambda i: (stable_hash(i.id), i.id))
        chosen.extend(pool[:per_split] if per_split is not None else pool)
    return sorted(chosen, key=lambda i: (i.split != "select", i.id))


# --- wiki_qa ---------------------------------------------------------------------------------

MASK = "___"


def _core_title(title: str) -> str:
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def mask_title(text: str, title: str) -> str:
    """Hide the title, its obvious variants and its capitalised words behind ``___``."""
    core = _core_title(title)
    variants = {title, core}
    if core.lower().startswith("the "):
        variants.add(core[4:])
    if "," in core:
        variants.add(core.split(",")[0])
    for variant in sorted(variants, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(variant)}(?:e?s)?(?!\w)", MASK, text, flags=re.I)
    for word in re.findall(r"[^\W_]+", core):
        if len(word) >= 4 and word[0].isupper() and word.lower() not in STOPWORDS:
            text = re.sub(rf"(?<!\w){re.escape(word)}(?:e?s)?(?!\w)", MASK, text, flags=re.I)
    return re.sub(rf"{MASK}(?:\W{{0,3}}{MASK})+", MASK, text)


def wiki_qa(entries: Iterable[WikiEntry]) -> list[TaskItem]:
    """Clue = masked description + extract (<= 350 chars), answer = the title."""
    items: list[TaskItem] = []
    for entry in entries:
        if entry.topic not in HELD_OUT_TOPICS or not entry.extract:
            continue
        answer = _core_title(entry.title)
        head = f"Category: {mask_title(entry.description, entry.title)}\n" if entry.description else ""
        budget = MAX_PROMPT - len(head) - len("Clue: \nAnswer:")
        extract = mask_title(entry.extract, entry.title)
        clue = cut_sentences(extract, budget, min_chars=60)
        if not clue:
            words = " ".join(extract.split())[: budget - 3].rsplit(" ", 1)[0]
            clue = words.rstrip(",;:") + "..."
        prompt = f"{head}Clue: {clue}\nAnswer:"
        visible = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prompt, flags=re.I)
        if visible or MASK not in prompt:
            continue
        key = entry.title.replace(" ", "_")
        items.append(TaskItem(f"wiki_qa/{key}", "wiki_qa", prompt, f" {answer}", "wikipedia",
                              entry.url, entry.url))
    return items


# --- lambada_cloze ---------------------------------------------------------------------------

_FINAL_WORD = re.compile(r"(?<=\s)([A-Za-z]+)[.!?]+[\"'”’)]*$")


def _word_forms(word: str) -> set[str]:
    """The word with and without a plural/possessive ending, lowercased."""
    word = word.lower()
    forms = {word, word + "s", word + "es"}
    if word.endswith("s"):
        forms.add(word[:-1])
    if word.endswith("es"):
        forms.add(word[:-2])
    return forms


def lambada_cloze(
    chapters: list[list[str]], origin_of: Callable[[int], str], novel: str
) -> list[TaskItem]:
    """Passages of 250-400 chars ending in a content word whose form occurs earlier in them.

    Each passage is the longest run of whole sentences (within one chapter) that ends at the
    target sentence and fits in 400 characters.
    """
    items: list[TaskItem] = []
    for number, paragraphs in enumerate(chapters, start=1):
        units = [(s, i == 0) for p in paragraphs for i, s in enumerate(sentences(p))]
        for end, (last, _) in enumerate(units):
            match = _FINAL_WORD.search(last)
            if match is None or len(match.group(1)) < 3 or match.group(1).lower() in STOPWORDS:
                continue
            passage, start = last, end
            while start > 0:
                joined = units[start - 1][0] + ("\n" if units[start][1] else " ") + passage
                if len(joined) > 400:
                    break
                passage, start = joined, start - 1
            if not 250 <= len(passage) <= 400:
                continue
            word = match.group(1)
            prompt = passage[: len(passage) - len(last) + match.start(1)].rstrip()
            if not _word_forms(word) & set(re.findall(r"[a-z]+", prompt.lower())):
                continue
            origin = origin_of(number)
            items.append(TaskItem(f"lambada_cloze/{novel}/chapter_{number}/s{end}",
                                  "lambada_cloze", prompt, f" {word}", novel, origin, origin))
    return items


# --- tech_faq --------------------------------------------------------------------------------


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks, keeping the indentation of their first line."""
    return [b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


def answer_lead(text: str) -> str:
    """About the first 300 chars of an answer, cut at a sentence boundary."""
    text = " ".join(text.split())
    lead = cut_sentences(text, ANSWER_CHARS, complete=True)
    if not lead:
        lead = cut_sentences(text, int(ANSWER_CHARS * 1.5), complete=True)
    return lead


def _faq_item(page: str, index: int, question: str, answer: list[str], source: str,
              origin: str, group: str) -> TaskItem | None:
    question = " ".join(question.split())
    lead = answer_lead(" ".join(answer))
    if len(lead) < 20 or not question:
        return None
    return TaskItem(f"tech_faq/{page}/q{index}", "tech_faq", f"Question: {question}\nAnswer:",
                    f" {lead}", source, origin, group)


def perl_faq(page: str, pod: str, origin: str) -> list[TaskItem]:
    """``=head2`` questions with their prose paragraphs up to the first code example."""
    items: list[TaskItem] = []
    section, question, answer, index, done = "", "", [], 0, False

    def flush() -> None:
        nonlocal index
        if question:
            item = _faq_item(page, index, question, answer, "perl_faq", f"{origin}#{section}", page)
            if item:
                items.append(item)
            index += 1

    for block in _blocks(pod):
        if block.startswith("=head1"):
            flush()
            question, answer, done = "", [], False
            section = block[len("=head1"):].strip()
        elif block.startswith("=head2"):
            flush()
            question, answer = render_pod_inline(block[len("=head2"):].strip()), []
            done = False
        elif not question or done or block.startswith("="):
            continue
        elif block[:1].isspace():
            done = bool(answer)  # the answer's lead ends where its first code example starts
        elif not re.match(r"^\(contributed by [^)]*\)$", block.strip(), flags=re.I):
            answer.append(render_pod_inline(block))
    flush()
    return items


_UNDERLINE = re.compile(r"^([=\-~^\"*+#])\1{2,}\s*$")


def python_faq(page: str, rst: str, origin: str) -> list[TaskItem]:
    """Questions are ``---``-underlined headings; sections are ``===``-underlined."""
    lines = rst.split("\n")
    items: list[TaskItem] = []
    section, question, index = "", "", 0
    body: list[str] = []

    def flush() -> None:
        nonlocal index
        if question:
            paragraphs = _rst_prose("\n".join(body))
            item = _faq_item(page, index, question, paragraphs, "python_faq",
                             f"{origin}#{section}", page)
            if item:
                items.append(item)
            index += 1

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        marker = _UNDERLINE.match(nxt)
        if line.strip() and not _UNDERLINE.match(line) and marker and len(nxt.strip()) >= 3:
            flush()
            title = render_rst_inline(line.strip())
            if marker.group(1) == "-":
                question, body = title, []
            else:
                section, question, body = title, "", []
            i += 2
            continue
        body.append(line)
        i += 1
    flush()
    return items


def _rst_prose(text: str) -> list[str]:
    """Ordinary paragraphs up to the first code example (directives and comments skipped)."""
    prose: list[str] = []
    for block in _blocks(text):
        if block[:1].isspace() and prose:
            break
        if block[:1].isspace() or block.startswith(".."):
            continue
        if _UNDERLINE.match(block.strip()):
            continue
        block = re.sub(r"::$", ":", block.rstrip())
        prose.append(render_rst_inline(block))
    return prose
