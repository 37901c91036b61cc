"""Finding benchmark data: a local `--data-dir`, or the Hugging Face Hub (cached by huggingface_hub).

Each benchmark is described once (`SOURCES`): its hub repo and the files that hold each split, in the
hub's parquet/JSONL layout and in the original release's layout. A data dir may hold the files
directly, or in a sub-folder named after the benchmark (`DIR/mmlu/test/abstract_algebra_test.csv`).

    rows = load_split("hellaswag", "validation", data_dir=Path("benchdata"))   # list[dict]

Offline without the files, `load_split` raises an InputError naming the files and where to put them.
"""

from __future__ import annotations

import csv
import json
import os
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
    ),
    "hellaswag": Source(
        "hellaswag",
        "Rowan/hellaswag",
        {"validation": ("hellaswag_val.jsonl", "**/validation-*.parquet", "**/validation*.jsonl")},
        ("*validation*",),
        "hellaswag/hellaswag_val.jsonl (the original release) or hellaswag/validation-*.parquet",
    ),
    "arc_easy": Source(
        "arc",
        "allenai/ai2_arc",
        {"test": ("ARC-Easy/test-*.parquet", "ARC-Easy/ARC-Easy-Test.jsonl", "ARC-Easy-Test.jsonl")},
        ("ARC-Easy/test-*",),
        "arc/ARC-Easy/ARC-Easy-Test.jsonl (the original release) or arc/ARC-Easy/test-*.parquet",
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
    ),
    "piqa": Source(
        "piqa",
        "baber/piqa",
        {"validation": ("valid.jsonl", "**/validation-*.parquet", "**/validation*.jsonl")},
        ("*validation*",),
        "piqa/valid.jsonl + piqa/valid-labels.lst (the original release) or piqa/validation-*.parquet",
    ),
    "winogrande": Source(
        "winogrande",
        "allenai/winogrande",
        {"validation": ("dev.jsonl", "winogrande_xl/validation-*.parquet", "**/validation-*.parquet")},
        ("winogrande_xl/validation-*",),
        "winogrande/dev.jsonl (the original release) or winogrande/winogrande_xl/validation-*.parquet",
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
    ),
    "gsm8k": Source(
        "gsm8k",
        "openai/gsm8k",
        {"test": ("test.jsonl", "main/test-*.parquet"), "train": ("train.jsonl", "main/train-*.parquet")},
        ("main/test-*", "main/train-*"),
        "gsm8k/test.jsonl and gsm8k/train.jsonl (the original release) or gsm8k/main/{test,train}-*.parquet",
    ),
}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (list), .parquet or MMLU-style header-less .csv file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise InputError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of rows")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return [{"_row": row, "_file": path.name} for row in csv.reader(f)]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    raise InputError(f"{path}: unsupported file type {suffix!r}", hint="use .jsonl, .parquet or .csv")


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


def split_files(task: str, split: str, data_dir: Path | None) -> list[Path]:
    """The files holding `split` of benchmark `task`, from data_dir or the hub; InputError if none."""
    source = SOURCES[task]
    patterns = source.splits[split]
    if data_dir is not None:
        if not data_dir.is_dir():
            raise InputError(f"--data-dir {data_dir}: not a folder")
        for folder in (data_dir / source.folder, data_dir):
            if folder.is_dir() and (found := _match(folder, patterns)):
                return found
    hub = _hub_folder(source)
    if hub is not None and (found := _match(hub, patterns)):
        return found
    where = f"{data_dir}/" if data_dir is not None else "DIR/"
    raise InputError(
        f"no {task} {split} data: not in {'--data-dir ' + str(data_dir) if data_dir else 'a --data-dir'} "
        f"and not downloadable from the hub ({source.repo})",
        hint=f"put {source.files_hint} under {where} and pass --data-dir, or go online to download {source.repo}",
    )


def load_split(task: str, split: str, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """All rows of one split, in file order (files sorted by name)."""
    rows: list[dict[str, Any]] = []
    for path in split_files(task, split, data_dir):
        file_rows = read_rows(path)
        if task == "piqa" and path.name == "valid.jsonl":
            file_rows = _attach_piqa_labels(path, file_rows)
        for row in file_rows:
            row.setdefault("_file", path.name)
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
