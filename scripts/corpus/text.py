"""Plain-text helpers shared by the source readers: documents, chunking, sentences, markup."""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Doc:
    """One pool document before sizing; ``split_long`` marks sources cut into several docs."""

    id: str
    text: str
    source: str
    url: str
    license: str
    split_long: bool = False


# A sentence ends at . ! or ? (optionally closed by quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


_ABBREVIATION_WORDS = "mr mrs ms dr st esq col capt gen lt rev hon jr sr vs etc eg ie no vol fig cf"
_ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())


def _is_abbreviation(text: str, period: int) -> bool:
    """True when the '.' at ``period`` closes an abbreviation or an initial ("J. D.")."""
    word = re.search(r"(\w+)\.$", text[max(0, period - 12) : period + 1])
    if word is None:
        return False
    token = word.group(1)
    return token.lower() in _ABBREVIATIONS or (len(token) == 1 and token.isupper())


def sentences(text: str) -> list[str]:
    """Sentence-ish pieces of one paragraph; joining them with spaces restores the text."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if text[match.start() - 1] == "." and _is_abbreviation(text, match.start() - 1):
            continue
        end = match.start() + len(match.group().rstrip())
        pieces.append(text[start:end])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _units(paragraph: str, max_chars: int) -> list[str]:
    """Split an oversized paragraph into sentences, then words, then hard cuts."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    units: list[str] = []
    for sentence in sentences(paragraph):
        if len(sentence) <= max_chars:
            units.append(sentence)
            continue
        line = ""
        for word in sentence.split():
            while len(word) > max_chars:
                units.append(word[:max_chars])
                word = word[max_chars:]
            if line and len(line) + 1 + len(word) > max_chars:
                units.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            units.append(line)
    return units


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Greedy packing of whole paragraphs (else sentences) into chunks of <= max_chars.

    Paragraphs stay separated by a blank line; pieces of one long paragraph by a space.
    """
    chunks: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        for index, unit in enumerate(_units(paragraph, max_chars)):
            joiner = " " if index else "\n\n"
            if current and len(current) + len(joiner) + len(unit) > max_chars:
                chunks.append(current)
                current = unit
            else:
                current = f"{current}{joiner}{unit}" if current else unit
    if current:
        chunks.append(current)
    return chunks


def cap_text(text: str, max_chars: int) -> str:
    """The first chunk: the text cut at a paragraph or sentence boundary."""
    chunks = chunk_text(text, max_chars)
    return chunks[0] if chunks else ""


_COMPLETE = re.compile(r"[.!?:][\"'”’)\]]*$")


def cut_sentences(text: str, max_chars: int, min_chars: int = 0, complete: bool = False) -> str:
    """Leading whole sentences of ``text`` within ``max_chars`` ('' if the first is longer).

    With ``complete``, a trailing fragment without closing punctuation is left out.
    """
    kept = ""
    for sentence in sentences(" ".join(text.split())):
        if complete and not _COMPLETE.search(sentence):
            break
        candidate = f"{kept} {sentence}" if kept else sentence
        if len(candidate) > max_chars:
            break
        kept = candidate
    return kept if len(kept) >= min_chars else ""


def unwrap(lines: list[str]) -> list[str]:
    """Hard-wrapped lines -> one string per paragraph (blank lines separate paragraphs)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r" {2,}", " ", " ".join(current)))
            current = []
    return paragraphs


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}
_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")


def _pod_code(match: re.Match[str]) -> str:
    code, inner = match.groups()
    if code == "E":
        return _POD_ESCAPES.get(inner, inner)
    if code in {"X", "Z"}:
        return ""
    if code == "L":
        inner = inner.split("|", 1)[0]
        return inner if "://" in inner else inner.replace('"', "").replace("/", ": ")
    return inner


def render_pod_inline(text: str) -> str:
    """POD formatting codes (C<..>, L<..|..>, E<gt>, C<< .. >>) -> their visible text."""
    text = re.sub(r"[A-Z]<{2,}\s+(.*?)\s+>{2,}", r"\1", text, flags=re.S)
    for _ in range(5):  # innermost codes first; nesting is shallow in practice
        rendered = _POD_CODE.sub(_pod_code, text)
        if rendered == text:
            break
        text = rendered
    return text


def render_rst_inline(text: str) -> str:
    """reST roles, literals, links and emphasis -> their visible text."""
    text = re.sub(r":[\w:.-]+:`~?([^`<]*?)\s*<[^>`]*>`", r"\1", text)
    text = re.sub(r":[\w:.-]+:`~([^`]*\.)?([^`.]+)`", r"\2", text)
    text = re.sub(r":[\w:.-]+:`!?([^`]*)`", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_?_?", r"\1", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S.*?)\*(?![\w*])", r"\1", text)
    return text


_STOPWORD_TEXT = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other ought our
    ours ourselves out over own same shall she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up upon very
    was we were what when where which while who whom why will with would you your yours
    yourself yourselves one two much many must may might said say says mr mrs miss sir"""
# Too common to make a last-word cloze item or to give away a title.
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
