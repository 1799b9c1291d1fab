"""Target task files: curated, so a bad row is an error naming the file, the row and the field."""

import gzip
import json
from pathlib import Path

import pytest

from dsdm.tasks import TaskFileError, read_tasks

DEMO_TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"


def _demo_rows(task: str) -> list[dict]:
    with gzip.open(DEMO_TASKS / f"{task}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _write(folder: Path, task: str, lines: list[str]) -> None:
    with gzip.open(folder / f"{task}.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


def test_the_demo_tasks_read_with_both_splits() -> None:
    frame = read_tasks(str(DEMO_TASKS), ["wiki_qa", "tech_faq"])
    assert set(frame["task"]) == {"wiki_qa", "tech_faq"}
    assert set(frame["split"]) == {"select", "eval"}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("continuation", " \t ", "missing or not a non-empty string|no visible characters"),
    ("continuation", " \u200b\u200d\ufeff ", "no visible characters"),
    ("prompt", "\u2060\u00ad", "no visible characters"),
])
def test_a_row_without_visible_text_names_file_row_and_field(tmp_path, field, value, reason) -> None:
    rows = _demo_rows("wiki_qa")
    rows[3] = {**rows[3], field: value}
    _write(tmp_path, "wiki_qa", [json.dumps(r) for r in rows])
    with pytest.raises(TaskFileError, match=rf"wiki_qa.jsonl.gz row 3: field '{field}' .*({reason})"):
        read_tasks(str(tmp_path), ["wiki_qa"])


def test_a_lone_surrogate_names_file_row_and_field(tmp_path) -> None:
    rows = [json.dumps(r) for r in _demo_rows("tech_faq")]
    # json.dumps escapes the surrogate as \\ud800, as a producer writing bad JSON would
    rows[5] = json.dumps({**json.loads(rows[5]), "prompt": "Question: \ud800?"})
    _write(tmp_path, "tech_faq", rows)
    with pytest.raises(TaskFileError, match=r"tech_faq.jsonl.gz row 5: field 'prompt' has a lone "
                                            r"surrogate"):
        read_tasks(str(tmp_path), ["tech_faq"])


@pytest.mark.parametrize("name", ["../tasks/wiki_qa", "/etc/passwd", "wiki_qa/..", "a/b", "", ".x"])
def test_a_task_name_is_a_name_not_a_path(tmp_path, name) -> None:
    (tmp_path / "tasks").mkdir()
    _write(tmp_path, "wiki_qa", [json.dumps(r) for r in _demo_rows("wiki_qa")])  # outside the root
    with pytest.raises(TaskFileError, match="is not a name"):
        read_tasks(str(tmp_path / "tasks"), [name])

