"""Long-form prose: State of the Union speeches and novels (Moby-Dick, four Austen novels).

*Persuasion* and *Emma* are read here too but never enter the pool: they are the
``lambada_cloze`` material (*Persuasion* alone yields only ~185 usable passages).
"""

import re

from corpus.archives import Archive
from corpus.rlazyload import read_lazyload
from corpus.text import Doc, unwrap

SOTU_ROOT = "package/data/"
MOBY_ROOT = "package/data/"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/"
HELD_OUT_NOVELS = ("emma", "persuasion")
AUSTEN_SLUGS = {
    "emma": "emma",
    "mansfieldpark": "mansfield_park",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
    "prideprejudice": "pride_and_prejudice",
    "sensesensibility": "sense_and_sensibility",
}
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[IVXLC]+)\.?\s*$", re.IGNORECASE)
_END_MARK = re.compile(r"^\s*(finis|the end)\s*$", re.IGNORECASE)


def sotu(archive: Archive) -> list[Doc]:
    """One document per address (each is a single line of text in the package)."""
    files = archive.read(
        lambda n: n.startswith(SOTU_ROOT) and bool(re.search(r"/\d{4}_\w+\.txt$", n))
    )
    return [
        Doc(f"sotu/{path.rsplit('/', 1)[-1].removesuffix('.txt')}",
            blob.decode("utf-8", errors="replace").strip(), "sotu", archive.url(path),
            "PDDL-1.0", split_long=True)
        for path, blob in files.items()
        if blob.strip()
    ]


def moby_dick(archive: Archive) -> list[Doc]:
    """Chapters, etymology, extracts and epilogue of Moby-Dick."""
    names = re.compile(r"/(chapter_\d+|etymology|extracts|epilogue)\.txt$")
    files = archive.read(lambda n: n.startswith(MOBY_ROOT) and bool(names.search(n)))
    return [
        Doc(f"novels/moby_dick/{path.rsplit('/', 1)[-1].removesuffix('.txt')}",
            blob.decode("utf-8", errors="replace").strip(), "novels", archive.url(path),
            "PDDL-1.0", split_long=True)
        for path, blob in files.items()
    ]


def austen_chapters(archive: Archive) -> dict[str, list[list[str]]]:
    """Each novel as chapters of unwrapped paragraphs (front matter and end marks dropped)."""
    files = archive.read(lambda n: n in {AUSTEN_DATA + "Rdata.rdb", AUSTEN_DATA + "Rdata.rdx"})
    novels = read_lazyload(files[AUSTEN_DATA + "Rdata.rdx"], files[AUSTEN_DATA + "Rdata.rdb"])
    out: dict[str, list[list[str]]] = {}
    for name in sorted(novels):
        chapters: list[list[str]] = []
        current: list[str] | None = None
        for line in [str(x or "") for x in novels[name]]:
            if _CHAPTER.match(line):
                current = []
                chapters.append(current)
            elif _END_MARK.match(line):
                current = None
            elif current is not None and not re.match(r"^\s*volume\s+[IVX]+\s*$", line, re.I):
                current.append(line)
        out[AUSTEN_SLUGS.get(name, name)] = [unwrap(c) for c in chapters]
    return out


def austen_url(archive: Archive, novel: str, chapter: int) -> str:
    return archive.url(f"{AUSTEN_DATA}Rdata.rdb") + f"#{novel}/chapter_{chapter}"


def austen(archive: Archive) -> list[Doc]:
    """One document per chapter of the four pool novels (*Persuasion*, *Emma* held out)."""
    docs: list[Doc] = []
    for novel, chapters in austen_chapters(archive).items():
        if novel in HELD_OUT_NOVELS:
            continue
        for number, paragraphs in enumerate(chapters, start=1):
            docs.append(Doc(f"novels/{novel}/chapter_{number}", "\n\n".join(paragraphs),
                            "novels", austen_url(archive, novel, number), "Public-Domain",
                            split_long=True))
    return docs
