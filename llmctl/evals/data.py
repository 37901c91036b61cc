"""Finding benchmark data: a local `--data-dir`, or the Hugging Face Hub (cached by huggingface_hub).

Each benchmark is described once (`SOURCES`): its hub repo, the files that hold each split in the
hub's parquet/JSONL layout and in the original release's layout, and the fields of a hub-schema row.
`--data-dir` may be:
- a folder holding those files directly, or in a sub-folder named after the benchmark
  (`DIR/mmlu/test/abstract_algebra_test.csv`);
- a folder with one file of the split in the hub schema under any name (`DIR/test.jsonl`), found
  by its name mentioning the split and its first row having the benchmark's fields;
- that one file itself (`--data-dir arc/test.jsonl`, .jsonl/.json/.parquet/.csv).

    rows = load_split("hellaswag", "validation", data_dir=Path("benchdata"))   # list[dict]

Every row carries `_file` and `_line` (line of a JSONL/CSV file, row number of a parquet/JSON list),
so the task builders can say where a malformed row is. Offline without the files, `load_split` raises
an InputError naming every layout it tried and where to put the files.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import InputError


@dataclass(frozen=True)
class Source:
    """Where one benchmark's data lives. `splits` maps a split to glob patterns (relative to the
    benchmark folder), tried in order; `hub_patterns` limit what is downloaded."""

    folder: str
    repo: str
    splits: dict[str, tuple[str, ...]]
    hub_patterns: tuple[str, ...]
    files_hint: str
    fields: tuple[str, ...] = ()  # the keys of a hub-schema row (to recognise a file under any name)


SOURCES: dict[str, Source] = {
    "mmlu": Source(
        "mmlu",
        "cais/mmlu",
        {
            "test": ("test/*_test.csv", "all/test-*.parquet", "*/test-*.parquet"),
            "dev": ("dev/*_dev.csv", "all/dev-*.parquet", "*/dev-*.parquet"),
        },
        ("all/test-*.parquet", "all/dev-*.parquet"),
        "mmlu/test/{subject}_test.csv and mmlu/dev/{subject}_dev.csv (the original data.tar), "
        "or the hub's mmlu/all/{test,dev}-*.parquet",
        ("question", "choices", "answer"),
    ),
    "hellaswag": Source(
        "hellaswag",
        "Rowan/hellaswag",
        {"validation": ("hellaswag_val.jsonl", "**/validation-*.parquet", "**/validation*.jsonl")},
        ("*validation*",),
        "hellaswag/hellaswag_val.jsonl (the original release) or hellaswag/validation-*.parquet",
        ("ctx_a", "ctx_b", "activity_label", "endings", "label"),
    ),
    "arc_easy": Source(
        "arc",
        "allenai/ai2_arc",
        {"test": ("ARC-Easy/test-*.parquet", "ARC-Easy/ARC-Easy-Test.jsonl", "ARC-Easy-Test.jsonl")},
        ("ARC-Easy/test-*",),
        "arc/ARC-Easy/ARC-Easy-Test.jsonl (the original release) or arc/ARC-Easy/test-*.parquet",
        ("question", "choices", "answerKey"),
    ),
    "arc_challenge": Source(
        "arc",
        "allenai/ai2_arc",
        {
            "test": (
                "ARC-Challenge/test-*.parquet",
                "ARC-Challenge/ARC-Challenge-Test.jsonl",
                "ARC-Challenge-Test.jsonl",
            )
        },
        ("ARC-Challenge/test-*",),
        "arc/ARC-Challenge/ARC-Challenge-Test.jsonl (the original release) or arc/ARC-Challenge/test-*.parquet",
        ("question", "choices", "answerKey"),
    ),
    "piqa": Source(
        "piqa",
        "baber/piqa",
        {"validation": ("valid.jsonl", "**/validation-*.parquet", "**/validation*.jsonl")},
        ("*validation*",),
        "piqa/valid.jsonl + piqa/valid-labels.lst (the original release) or piqa/validation-*.parquet",
        ("goal", "sol1", "sol2", "label"),
    ),
    "winogrande": Source(
        "winogrande",
        "allenai/winogrande",
        {"validation": ("dev.jsonl", "winogrande_xl/validation-*.parquet", "**/validation-*.parquet")},
        ("winogrande_xl/validation-*",),
        "winogrande/dev.jsonl (the original release) or winogrande/winogrande_xl/validation-*.parquet",
        ("sentence", "option1", "option2", "answer"),
    ),
    "lambada": Source(
        "lambada",
        "EleutherAI/lambada_openai",
        {
            "test": (
                "lambada_test.jsonl",
                "**/lambada_test.jsonl",
                "**/lambada_test_en.jsonl",
                "**/test-*.parquet",
            )
        },
        ("*lambada_test.jsonl", "*lambada_test_en.jsonl", "default/test-*"),
        'lambada/lambada_test.jsonl (OpenAI\'s release, one {"text"} per line)',
        ("text",),
    ),
    "gsm8k": Source(
        "gsm8k",
        "openai/gsm8k",
        {"test": ("test.jsonl", "main/test-*.parquet"), "train": ("train.jsonl", "main/train-*.parquet")},
        ("main/test-*", "main/train-*"),
        "gsm8k/test.jsonl and gsm8k/train.jsonl (the original release) or gsm8k/main/{test,train}-*.parquet",
        ("question", "answer"),
    ),
}


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ANSWER_CELLS = ("A", "B", "C", "D", "0", "1", "2", "3")
SPLIT_NAMES = {"validation": ("validation", "val", "valid")}  # words a file name may use for a split


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (list), .parquet or .csv file, each with `_file` and `_line`.

    A CSV file whose first line names columns (it has a `question` or `answer` column and its last
    cell is no answer, A-D or 0-3) gives rows keyed by those names; a CSV without one (MMLU's
    original release) gives the cells as `_cells`."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise InputError(f"{path}:{n}: invalid JSON: {e.msg}") from None
                        if not isinstance(row, dict):
                            raise InputError(f"{path}:{n}: expected a JSON object per line, got {row!r:.60}")
                        rows.append({**row, "_file": str(path), "_line": n})
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise InputError(f"{path}: expected a JSON list of objects (one per row)")
            return [{**r, "_file": str(path), "_line": n} for n, r in enumerate(data, 1)]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path).to_pylist()
            return [{**r, "_file": str(path), "_line": n} for n, r in enumerate(table, 1)]
        if suffix == ".csv":
            return _read_csv(path)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    raise InputError(f"{path}: unsupported file type {suffix!r}", hint="use .jsonl, .json, .parquet or .csv")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        lines = [(reader.line_num, cells) for cells in reader if cells]
    if not lines:
        return []
    names = [c.strip().lower() for c in lines[0][1]]
    if ("question" in names or "answer" in names) and names[-1].upper() not in ANSWER_CELLS:
        if len(set(names)) != len(names):
            raise InputError(
                f"{path}:{lines[0][0]}: the header repeats a column name: {','.join(names)}",
                hint="name each column once",
            )
        rows = []
        for n, cells in lines[1:]:
            if len(cells) != len(names):
                raise InputError(
                    f"{path}:{n}: {len(cells)} cells, but the header ({path.name}:{lines[0][0]}) names "
                    f"{len(names)} columns: {','.join(names)}",
                    hint="every line needs one cell per header column; quote cells that contain commas",
                )
            rows.append({**dict(zip(names, cells, strict=True)), "_file": str(path), "_line": n})
        return rows
    return [{"_cells": cells, "_file": str(path), "_line": n} for n, cells in lines]


def _match(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _hub_folder(source: Source) -> Path | None:
    """The local snapshot of the benchmark's hub repo (downloaded unless offline); None if unavailable."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(
                source.repo,
                repo_type="dataset",
                allow_patterns=list(source.hub_patterns),
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def _hub_schema_file(folder: Path, split: str, fields: tuple[str, ...]) -> list[Path]:
    """Files directly in `folder` whose name mentions `split` and whose first row has `fields`."""
    found = []
    names = set(SPLIT_NAMES.get(split, (split,)))
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".parquet"):
            words = set(re.split(r"[^a-z]+", path.stem.lower()))
            if names & words and fields and _has_fields(path, fields):
                found.append(path)
    return found


def _has_fields(path: Path, fields: tuple[str, ...]) -> bool:
    try:
        rows = read_rows(path) if path.suffix.lower() != ".parquet" else None
    except InputError:
        return False
    if rows is None:
        import pyarrow.parquet as pq

        return set(fields) <= set(pq.read_schema(path).names)
    return bool(rows) and set(fields) <= set(rows[0])


def split_files(task: str, split: str, data_dir: Path | None) -> list[Path]:
    """The files holding `split` of benchmark `task`: `data_dir` as one file, the release/hub
    layouts under it, a hub-schema file named after the split in it, or the hub; InputError if none."""
    source = SOURCES[task]
    patterns = source.splits[split]
    if data_dir is not None and data_dir.is_file():
        if data_dir.suffix.lower() not in DATA_SUFFIXES:
            raise InputError(
                f"--data-dir {data_dir}: not a data file ({', '.join(DATA_SUFFIXES)})",
                hint="pass the benchmark's folder or one .jsonl/.parquet file of its split",
            )
        if split == next(iter(source.splits)):  # the file is the evaluated split
            return [data_dir]
        data_dir = data_dir.parent  # few-shot examples come from another split: look beside it
    if data_dir is not None:
        if not data_dir.is_dir():
            raise InputError(f"--data-dir {data_dir}: no such file or folder")
        folders = [f for f in (data_dir / source.folder, data_dir) if f.is_dir()]
        for folder in folders:
            if found := _match(folder, patterns):
                return found
        for folder in folders:
            found = _hub_schema_file(folder, split, source.fields)
            if len(found) > 1:
                raise InputError(
                    f"{task} {split}: several files in {folder} could be it: {', '.join(p.name for p in found)}",
                    hint=f"pass the one to use: --data-dir {found[0]}",
                )
            if found:
                return found
    hub = _hub_folder(source)
    if hub is not None and (found := _match(hub, patterns)):
        return found
    tried = "; ".join(
        [
            *[f"{source.folder}/{p} or {p}" for p in patterns],
            f"one .jsonl/.json/.parquet file whose name has {split!r}, with fields {', '.join(source.fields)}",
            f"the hub ({source.repo})",
        ]
    )
    where = f"--data-dir {data_dir}" if data_dir is not None else "no --data-dir"
    raise InputError(
        f"no {task} {split} data ({where}); tried: {tried}",
        hint=f"put {source.files_hint} under a folder and pass --data-dir (or --data-dir FILE for one "
        f"file in the hub schema), or go online to download {source.repo}",
    )


def load_split(task: str, split: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """All rows of one split, in file order (files sorted by name)."""
    rows: list[dict[str, Any]] = []
    for path in split_files(task, split, data_dir):
        file_rows = read_rows(path)
        if task == "piqa" and path.name == "valid.jsonl":
            file_rows = _attach_piqa_labels(path, file_rows)
        rows.extend(file_rows)
    if not rows:
        raise InputError(f"no {task} {split} rows in {data_dir or SOURCES[task].repo}")
    return rows


def _attach_piqa_labels(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The original PIQA release keeps labels in a separate `valid-labels.lst`, one per line."""
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise InputError(f"{path}: no valid-labels.lst beside it", hint="copy both files of the PIQA release")
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise InputError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows in {path.name}")
    return [{**row, "label": int(label)} for row, label in zip(rows, labels, strict=True)]
