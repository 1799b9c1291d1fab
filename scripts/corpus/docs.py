"""Technical documentation sources: Linux kernel docs, Python docs, Perl docs.

The reST/POD sources are kept as they are (markup included): that is what a crawl of
documentation looks like. The FAQ parts of the Python and Perl docs are target-task material
and never enter the pool.
"""

import re

from corpus.archives import Archive
from corpus.text import Doc

KERNEL_ROOT = "usr/share/doc/linux-doc-6.1/html/_sources/"
PYTHON_ROOT = "usr/share/doc/python3.11/html/_sources/"


def _decode(blob: bytes) -> str:
    return blob.decode("utf-8", errors="replace").replace("\r\n", "\n")


_SPDX = re.compile(r"^\.\. SPDX-License-Identifier:\s*(.+?)\s*$", re.MULTILINE)


def kernel_license(text: str) -> str:
    """The file's own SPDX tag (GFDL, GPL-2.0+, ...) when its head has one, else GPL-2.0-only."""
    match = _SPDX.search(text[:400])
    if match is None or "<" in match.group(1):
        return "GPL-2.0-only"
    tag = match.group(1).strip("()")
    return "GPL-2.0-only" if tag == "GPL-2.0" else tag


def kernel_docs(archive: Archive) -> list[Doc]:
    """Every reST source of the kernel documentation except ``translations/``."""
    files = archive.read(
        lambda n: n.startswith(KERNEL_ROOT)
        and n.endswith(".rst.txt")
        and not n.startswith(KERNEL_ROOT + "translations/")
    )
    texts = {path: _decode(blob) for path, blob in files.items() if blob.strip()}
    return [
        Doc(f"kernel_docs/{path[len(KERNEL_ROOT):-4]}", text, "kernel_docs",
            archive.url(path), kernel_license(text), split_long=True)
        for path, text in texts.items()
    ]


def is_python_faq(path: str) -> bool:
    return path.startswith(PYTHON_ROOT + "faq/")


def python_docs(archive: Archive) -> list[Doc]:
    """Every reST source of the Python 3.11 docs except the FAQ (held out for ``tech_faq``)."""
    files = archive.read(
        lambda n: n.startswith(PYTHON_ROOT) and n.endswith(".rst.txt") and not is_python_faq(n)
    )
    return [
        Doc(f"python_docs/{path[len(PYTHON_ROOT):-4]}", _decode(blob), "python_docs",
            archive.url(path), "PSF-2.0", split_long=True)
        for path, blob in files.items()
        if blob.strip()
    ]


def python_faq_files(archive: Archive) -> dict[str, str]:
    """The Python FAQ pages (target-task material), by path."""
    files = archive.read(lambda n: is_python_faq(n) and n.endswith(".rst.txt"))
    return {path: _decode(blob) for path, blob in files.items()}


def _pod_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".pod")


def is_perl_pod(path: str) -> bool:
    return path.startswith("usr/share/perl/") and "/pod/" in path and path.endswith(".pod")


def is_perl_faq(path: str) -> bool:
    """perlfaq*.pod are task material; perltoc.pod lists every FAQ question, so it goes too."""
    return _pod_name(path).startswith("perlfaq") or _pod_name(path) == "perltoc"


def perl_docs(archive: Archive) -> list[Doc]:
    """The core Perl manual pages (POD) minus the FAQ and the table of contents."""
    files = archive.read(lambda n: is_perl_pod(n) and not is_perl_faq(n))
    return [
        Doc(f"perl_docs/{_pod_name(path)}.pod", _decode(blob), "perl_docs",
            archive.url(path), "GPL-1.0-or-later OR Artistic-1.0-Perl", split_long=True)
        for path, blob in files.items()
        if blob.strip()
    ]


def perl_faq_files(archive: Archive) -> dict[str, str]:
    """perlfaq1.pod .. perlfaq9.pod (the index page perlfaq.pod has no answers)."""
    files = archive.read(
        lambda n: is_perl_pod(n) and _pod_name(n)[len("perlfaq"):].isdigit()
        and _pod_name(n).startswith("perlfaq")
    )
    return {path: _decode(blob) for path, blob in files.items()}
