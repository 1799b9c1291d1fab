"""Mailing-list mail (SpamAssassin public corpus): ham and spam as two pool sources.

Each message keeps its subject and readable body text; headers, attachments and markup go.
Quoted replies, signatures and naturally repeated messages stay: that is real crawl noise.
"""

import email
import email.errors
import email.header
import email.message
import re
from html.parser import HTMLParser

from corpus.archives import Archive
from corpus.text import Doc

ROOT = "package/data/"
HAM_FOLDERS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
SPAM_FOLDERS = ("spam-1", "spam-2")
LICENSE = "PDDL-1.0"


class _TextOfHtml(HTMLParser):
    """Visible text of an HTML body, with line breaks at block elements."""

    _BLOCKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "td"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "style", "head", "title"}:
            self.hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style", "head", "title"}:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    try:
        parser.feed(html)
        parser.close()
    except AssertionError:  # the stdlib parser gives up on some broken markup
        pass
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v\u00a0]+", " ", text)
    return re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", re.sub(r" *\n *", "\n", text)).strip()


def _decode_part(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown or misspelt charset name
        return payload.decode("latin-1")


def _subject(message: email.message.Message) -> str:
    raw = message.get("Subject", "")
    try:
        subject = str(email.header.make_header(email.header.decode_header(str(raw))))
    except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError):
        subject = str(raw)
    return " ".join(subject.split())


def message_text(raw: bytes) -> str:
    """``Subject: ...`` plus the plain-text body (HTML bodies rendered to text)."""
    message = email.message_from_bytes(raw)
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        if part.is_multipart() or part.get_filename():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_decode_part(part))
        elif kind == "text/html":
            html.append(_decode_part(part))
    body = "\n\n".join(plain) if any(p.strip() for p in plain) else "\n\n".join(
        html_to_text(h) for h in html
    )
    body = body.replace("\r\n", "\n").replace("\r", "\n").strip()
    return f"Subject: {_subject(message)}\n\n{body}".strip()


def mail(archive: Archive) -> dict[str, list[Doc]]:
    """``{"mail_ham": [...], "mail_spam": [...]}`` from the five corpus folders."""
    files = archive.read(lambda n: n.startswith(ROOT) and n.endswith(".txt") and n.count("/") == 3)
    out: dict[str, list[Doc]] = {"mail_ham": [], "mail_spam": []}
    for path, blob in files.items():
        folder, name = path[len(ROOT):].split("/")
        source = "mail_ham" if folder in HAM_FOLDERS else "mail_spam" if folder in SPAM_FOLDERS else ""
        if not source:
            continue
        text = message_text(blob)
        if text:
            out[source].append(Doc(f"{source}/{folder}/{name.removesuffix('.txt')}", text,
                                   source, archive.url(path), LICENSE))
    return out
