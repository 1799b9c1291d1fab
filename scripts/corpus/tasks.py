"""Target tasks built from material that never enters the pool.

- ``wiki_qa``: Jeopardy-style clues from Wikipedia summaries of held-out topics;
- ``lambada_cloze``: last-word prediction on passages of the held-out *Persuasion* and *Emma*;
- ``tech_faq``: question/answer pairs from perlfaq1-9 and the Python FAQ;
- ``mixed_cloze``, ``mixed_continuation``: last-word cloze and next-sentence continuation on
  documents of six pool sources that are held out of the pool (see ``HeldOutDoc``);
- ``spam_mail``: the opening of held-out spam messages continued, a task to avoid (weight < 0).

Splits are assigned per origin group (Wikipedia page, novel chapter, FAQ page, held-out
document or mail thread) so related items never straddle ``select`` and ``eval``.
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


# --- mixed_cloze, mixed_continuation ---------------------------------------------------------
#
# Both tasks read held-out documents of several pool sources: a pool document's prose becomes
# "runs" of adjacent paragraphs (one string per paragraph, whitespace collapsed); a passage
# never spans two runs, so it never jumps over a code block, a quote or a list.


@dataclass(frozen=True)
class HeldOutDoc:
    """A pool document kept out of the pool; ``group`` is its split group (document or thread).

    ``shared`` are sentences that also occur elsewhere (boilerplate, quotes, near-copies):
    like markup, they end a run, so no passage contains them.
    """

    id: str
    source: str
    origin: str
    group: str
    runs: tuple[tuple[str, ...], ...]
    shared: frozenset[str] = frozenset()


CLOZE_CHARS = (250, 400)
PROMPT_CHARS = (150, 300)
CONTINUATION_CHARS = 200
MAX_ITEMS_PER_DOC = 12  # per task: a long speech or manual page would otherwise dominate

_COMPLETE = re.compile(r"[.!?][\"'”’)]*$")
# Abbreviations the sentence splitter takes for a sentence end ("on Sept. 11"): not a cloze word.
_ABBREVIATED_WORDS = "jan feb mar apr jun jul aug sep sept oct nov dec inc ltd corp dept gov univ"
_ABBREVIATED = frozenset(_ABBREVIATED_WORDS.split())
_MARKUP = re.compile(r"[`|\\{}\[\]<>=*#~^@]|::|://|www\.|\.\w+\(")


def clean_sentence(sentence: str) -> bool:
    """A sentence of running text: no markup, mostly letters and spaces, not a heading."""
    if _MARKUP.search(sentence) or sentence.isupper() or len(sentence.split()) < 2:
        return False
    return sum(c.isalpha() or c == " " for c in sentence) >= 0.85 * len(sentence)


def _runs(paragraphs: Iterable[str | None]) -> list[list[str]]:
    """Group paragraphs into runs; ``None`` or a paragraph that is not prose ends a run."""
    runs: list[list[str]] = [[]]
    for paragraph in paragraphs:
        text = " ".join(paragraph.split()) if paragraph else ""
        if len(text) >= 40 and text[:1].isupper() and _COMPLETE.search(text):
            runs[-1].append(text)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def plain_runs(text: str) -> list[list[str]]:
    """Blank-line separated paragraphs of plain prose (speeches, Wikipedia summaries)."""
    return _runs(_blocks(text))


def wikipedia_runs(text: str) -> list[list[str]]:
    """The summary of a pool Wikipedia document (title and description come first)."""
    return plain_runs(text.split("\n\n", 1)[1] if "\n\n" in text else "")


def recipe_runs(text: str) -> list[list[str]]:
    """A recipe's numbered steps, consecutive complete steps read as one paragraph."""
    _, found, procedure = text.partition("\nProcedure:\n")
    paragraphs: list[str | None] = []
    steps: list[str] = []
    for line in procedure.split("\n") if found else []:
        step = re.sub(r"^\d+\.\s*", "", line.strip())
        if step and _COMPLETE.search(step):
            steps.append(step)
        else:
            paragraphs += [" ".join(steps), None]
            steps = []
    return _runs([*paragraphs, " ".join(steps)])


_SIGNATURE = re.compile(r"^(--\s*|_{5,}.*|-{5,}.*|={5,}.*|\*{5,}.*)$")
_ATTRIBUTION = re.compile(r"(wrote|writes|said|says):\s*$", re.I | re.M)
_HEADER_LINE = re.compile(r"^[A-Za-z][\w-]*:\s")
_LIST_ITEM = re.compile(r"^\s*([-*+•o]|#\.|\d{1,3}[.)]|[a-zA-Z][.)])\s")


def mail_runs(text: str) -> list[list[str]]:
    """The writer's own prose of a message: no quotes, headers, signature or list footer."""
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    lines: list[str] = []
    for line in body.split("\n"):
        if _SIGNATURE.match(line.strip()):
            break  # signature, list footer or a forwarded/included message
        lines.append(line)
    paragraphs: list[str | None] = []
    for block in _blocks("\n".join(lines)):
        rows = block.split("\n")
        own = all(
            not r.lstrip().startswith((">", "|", ":")) and not _HEADER_LINE.match(r.strip())
            and not r.startswith((" ", "\t")) and not _LIST_ITEM.match(r) for r in rows
        )
        paragraphs.append(block if own and not _ATTRIBUTION.search(block) else None)
    return _runs(paragraphs)


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::")
# Directives whose content is prose (API descriptions, admonitions); others hold code or tables.
_PROSE_DIRECTIVE_NAMES = """function method attribute data class exception note warning seealso
    deprecated versionchanged versionadded describe decorator classmethod staticmethod
    coroutinemethod coroutinefunction abstractmethod c:function c:type c:macro c:member c:var
    c:struct important attention caution tip hint topic sidebar impl-detail"""
_PROSE_DIRECTIVES = frozenset(_PROSE_DIRECTIVE_NAMES.split())


def _indent(block: str) -> int:
    return len(block) - len(block.lstrip(" "))


def rst_runs(text: str) -> list[list[str]]:
    """Prose paragraphs of a reST page (roles rendered), skipping literal blocks, directives'
    code or tables, headings, lists and comments."""
    paragraphs: list[str | None] = []
    literal_above: int | None = None  # blocks indented deeper than this are literal/code
    for block in _blocks(text):
        indent = _indent(block)
        if literal_above is not None and indent > literal_above:
            paragraphs.append(None)
            continue
        literal_above = None
        directive = _DIRECTIVE.match(block)
        first = block.lstrip()
        if directive:
            if directive.group(2).lower() not in _PROSE_DIRECTIVES:
                literal_above = indent
            paragraphs.append(None)
        elif block.rstrip().endswith("::"):
            literal_above = indent
            paragraphs.append(None)
        elif (first.startswith(("..", ":", ">>>", "(", "|"))
              or any(_UNDERLINE.match(line.strip()) or _LIST_ITEM.match(line)
                     for line in block.split("\n"))):
            paragraphs.append(None)
        else:
            paragraphs.append(render_rst_inline(" ".join(block.split())))
    return _runs(paragraphs)


PROSE_RUNS: dict[str, Callable[[str], list[list[str]]]] = {
    "sotu": plain_runs,
    "wikipedia": wikipedia_runs,
    "recipes": recipe_runs,
    "mail_ham": mail_runs,
    "kernel_docs": rst_runs,
    "python_docs": rst_runs,
}


def mail_thread(text: str) -> str:
    """A message's thread: its subject without reply/forward prefixes and list tags."""
    subject = text.split("\n", 1)[0].removeprefix("Subject:").strip().lower()
    previous = None
    while previous != subject:
        previous = subject
        subject = re.sub(r"^(re(\[\d+\])?|fwd?|aw)\s*:\s*|^\[[^\]]*\]\s*", "", subject).strip()
    return " ".join(subject.split())


def doc_sentences(doc: HeldOutDoc) -> list[str]:
    """The clean sentences of a held-out document, in order: what its passages are made of."""
    return [s for run in doc.runs for p in run for s in sentences(p) if clean_sentence(s)]


def _units(doc: HeldOutDoc) -> list[list[tuple[str, bool]]]:
    """A document's runs as sentences, flagged True where one starts a paragraph; a sentence
    that is not clean running text, or is shared, ends a run."""
    out: list[list[tuple[str, bool]]] = [[]]
    for run in doc.runs:
        for paragraph in run:
            for index, sentence in enumerate(sentences(paragraph)):
                if clean_sentence(sentence) and sentence not in doc.shared:
                    out[-1].append((sentence, index == 0))
                elif out[-1]:
                    out.append([])
        if out[-1]:
            out.append([])
    return [u for u in out if u]


def _span(units: list[tuple[str, bool]], start: int, end: int) -> str:
    """Sentences ``start`` .. ``end`` (inclusive), paragraphs separated by a newline."""
    text = units[start][0]
    for sentence, new_paragraph in units[start + 1 : end + 1]:
        text += ("\n" if new_paragraph else " ") + sentence
    return text


def _back(units: list[tuple[str, bool]], end: int, floor: int, limit: int) -> int:
    """The first sentence of the longest run ending at ``end`` (not before ``floor``)
    that fits in ``limit`` characters; ``end + 1`` if sentence ``end`` alone is too long."""
    start, length = end + 1, -1
    while start > floor:
        length += len(units[start - 1][0]) + 1
        if length > limit:
            break
        start -= 1
    return start


def _spread(items: list[TaskItem]) -> list[TaskItem]:
    """At most ``MAX_ITEMS_PER_DOC`` of one document's items, evenly spaced through it."""
    if len(items) <= MAX_ITEMS_PER_DOC:
        return items
    step = len(items) / MAX_ITEMS_PER_DOC
    return [items[int(k * step)] for k in range(MAX_ITEMS_PER_DOC)]


def mixed_cloze(docs: Iterable[HeldOutDoc]) -> list[TaskItem]:
    """Last-word cloze on 250-400 chars of whole sentences ending in a content word.

    Passages of one document do not overlap: each ends at the first sentence after the
    previous passage that ends in a usable word and has enough text before it.
    """
    low, high = CLOZE_CHARS
    items: list[TaskItem] = []
    for doc in docs:
        found: list[TaskItem] = []
        for r, units in enumerate(_units(doc)):
            floor = 0
            for end, (last, _) in enumerate(units):
                match = _FINAL_WORD.search(last)
                word = match.group(1) if match else ""
                if len(word) < 3 or word.lower() in STOPWORDS | _ABBREVIATED:
                    continue
                start = _back(units, end, floor, high)
                passage = _span(units, start, end) if start <= end else ""
                if not low <= len(passage) <= high:
                    continue
                prompt = passage[: len(passage) - len(last) + match.start(1)].rstrip()
                found.append(TaskItem(f"mixed_cloze/{doc.id}/r{r}s{end}", "mixed_cloze", prompt,
                                      f" {word}", doc.source, doc.origin, doc.group))
                floor = end + 1
        items += _spread(found)
    return items


def _cap_words(text: str, limit: int) -> str:
    """``text`` if it fits, else its leading whole words within ``limit`` characters."""
    if len(text) <= limit:
        return text
    return text[: limit + 1].rsplit(" ", 1)[0].rstrip(",;:-")


def mixed_continuation(docs: Iterable[HeldOutDoc]) -> list[TaskItem]:
    """Prompt: 150-300 chars of consecutive sentences; continuation: the next sentence of the
    same paragraph (cut to about 200 chars at a word boundary). Items do not overlap."""
    low, high = PROMPT_CHARS
    items: list[TaskItem] = []
    for doc in docs:
        found: list[TaskItem] = []
        for r, units in enumerate(_units(doc)):
            floor = 0
            for nxt in range(1, len(units)):
                sentence, new_paragraph = units[nxt]
                if (new_paragraph or nxt - 1 < floor or not _COMPLETE.search(sentence)
                        or not (sentence[:1].isupper() or sentence[:1] in "\"'“‘(")):
                    continue
                start = _back(units, nxt - 1, floor, high)
                prompt = _span(units, start, nxt - 1) if start < nxt else ""
                continuation = _cap_words(sentence, CONTINUATION_CHARS)
                if not low <= len(prompt) <= high or len(continuation.split()) < 4:
                    continue
                found.append(TaskItem(f"mixed_continuation/{doc.id}/r{r}s{nxt}",
                                      "mixed_continuation", prompt, f" {continuation}",
                                      doc.source, doc.origin, doc.group))
                floor = nxt + 1
        items += _spread(found)
    return items


def cap_per_source(items: list[TaskItem], cap: int) -> list[TaskItem]:
    """At most ``cap`` items of each source in each split, so that every source weighs about
    the same. The choice hashes the id with a prefix: with the plain hash, the items kept of a
    large source would be those ``take`` prefers, and it would crowd out the others."""
    by_key: dict[tuple[str, str], list[TaskItem]] = {}
    for item in items:
        by_key.setdefault((item.source, item.split), []).append(item)
    kept = {i.id for group in by_key.values()
            for i in sorted(group, key=lambda i: (stable_hash(f"cap/{i.id}"), i.id))[:cap]}
    return [i for i in items if i.id in kept]


# --- spam_mail ---------------------------------------------------------------------------------

SPAM_BODY_CHARS = (120, 260)  # of the prompt's body lead, after the subject line


def spam_mail(messages: Iterable[tuple[str, str, str, str]]) -> list[TaskItem]:
    """One item per distinct message opening: the subject line and 120-260 characters of the
    body (whitespace collapsed, whole words), continued by the next ~200 characters.

    ``messages`` are ``(id, text, url, group)`` of held-out spam, ``text`` as the pool stores a
    message (``Subject: ...``, a blank line, the body). Spam is formatting as much as words, but
    collapsing whitespace keeps what a model must predict about its wording, not its layout.
    Messages sent more than once (same opening) give one item; undecodable text none.
    """
    low, high = SPAM_BODY_CHARS
    items: list[TaskItem] = []
    seen: set[str] = set()
    for doc_id, text, url, group in messages:
        subject, _, body = text.partition("\n")
        words = " ".join(body.split())
        lead = _cap_words(words, high)
        rest = words[len(lead):]
        # prompt + continuation is the message's text (punctuation the cut left stays on it)
        continuation = rest[: len(rest) - len(rest.lstrip())] + _cap_words(rest.lstrip(),
                                                                         CONTINUATION_CHARS)
        prompt = f"{subject.strip()}\n{lead}"
        if (len(lead) < low or len(continuation.split()) < 4 or prompt in seen
                or "\ufffd" in prompt + continuation):  # a part that did not decode
            continue
        seen.add(prompt)
        items.append(TaskItem(f"spam_mail/{doc_id}", "spam_mail", prompt, continuation,
                              "mail_spam", url, group))
    return items
