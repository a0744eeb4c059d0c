"""Preflight of the text files a run reads: evaluation, calibration and domain texts, and lm-eval task files
with their data. Each is checked before any work, one line per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.errors import PreflightError

BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "bundled" / "text"


def text_files(names: list[str], what: str) -> list[Path]:
    """Resolve text files; ``bundled:NAME`` is a text shipped with quantmill."""
    paths = []
    for name in names:
        path = BUNDLED_TEXT / name.removeprefix("bundled:") if name.startswith("bundled:") else Path(name)
        if not path.is_file():
            raise PreflightError(f"{what} file {name!r} not found ({path.resolve()}); fix {what}")
        _check_text(path, name, what)
        paths.append(path.resolve())
    if not paths:
        raise PreflightError(f"{what} is empty; name at least one text file")
    return paths


LOCAL_DATASETS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read local data files


def check_tasks(names: list[str], gates: dict[str, dict[str, Any]]) -> list[Path]:
    """``validate.tasks``: lm-eval task files that run offline on local data files; the files to copy, YAML first.
    ``bundled:NAME`` is a task shipped with quantmill."""
    if not names:
        if any(g.get("min_task_recovery") is not None for g in gates.values()):
            raise PreflightError("a gate sets min_task_recovery but validate.tasks is empty; name a task, e.g. "
                                 "validate.tasks=[bundled:quantmill_cloze.yaml]")
        return []
    import importlib.util

    import yaml

    if importlib.util.find_spec("lm_eval") is None:
        raise PreflightError("validate.tasks needs lm-eval (lm-evaluation-harness); pip install 'quantmill[tasks]' "
                             "or drop validate.tasks")
    files, seen = [], {}
    for name in names:
        path = BUNDLED_TEXT / "tasks" / name.removeprefix("bundled:") if name.startswith("bundled:") else Path(name)
        if not path.is_file():
            raise PreflightError(f"validate.tasks file {name!r} not found ({path.resolve()}); fix validate.tasks")
        try:
            task = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            hint = ("it calls Python code (!function), which quantmill does not run; write the task in YAML over "
                    "a local data file" if "!function" in str(e) else f"it is not YAML ({str(e).splitlines()[0]})")
            raise PreflightError(f"validate.tasks file {name!r}: {hint}") from None
        if not isinstance(task, dict) or not task.get("task"):
            raise PreflightError(f"validate.tasks file {name!r} has no 'task:' name; it must be one lm-eval task")
        if task["task"] in seen:
            raise PreflightError(f"validate.tasks: task {task['task']!r} is defined by both {seen[task['task']]!r} "
                                 f"and {name!r}; keep one")
        seen[task["task"]] = name
        data = (task.get("dataset_kwargs") or {}).get("data_files")
        if task.get("dataset_path") not in LOCAL_DATASETS or not data:
            raise PreflightError(f"validate.tasks file {name!r}: task {task['task']!r} reads dataset_path "
                                 f"{task.get('dataset_path')!r}, not a local data file; set dataset_path: json (or "
                                 f"{', '.join(LOCAL_DATASETS[1:])}) and dataset_kwargs.data_files")
        data = data if isinstance(data, dict) else {"data": data}
        files.append(path.resolve())
        for split, listed in data.items():
            for entry in [listed] if isinstance(listed, str) else listed:
                data_path = path.parent / entry
                if not data_path.is_file():
                    raise PreflightError(f"validate.tasks file {name!r}: data file {entry!r} of split {split!r} not "
                                         f"found ({data_path.resolve()}); paths are relative to the task file")
                files.append(data_path.resolve())
    names_seen = [p.name for p in files]
    dup = next((n for n in names_seen if names_seen.count(n) > 1), None)
    if dup:
        raise PreflightError(f"validate.tasks: two files are named {dup!r}; the evaluation set keeps them side by "
                             f"side, so rename one")
    return files


def _check_text(path: Path, name: str, what: str) -> None:
    """A text file the steps will read: UTF-8, with some text in it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreflightError(f"{what} file {name!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}); give a UTF-8 text file") from None
    if "\x00" in text:
        raise PreflightError(f"{what} file {name!r} holds NUL bytes (binary data?); give a UTF-8 text file")
    if not text.strip():
        raise PreflightError(f"{what} file {name!r} is empty; give a text file with some paragraphs in it")
