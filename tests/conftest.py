"""Shared fixtures: run the real `llmctl` in a subprocess; make small projects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# `python -m pytest` runs the suite on every core (pyproject's addopts: pytest-xdist's `-n auto`), one
# torch thread per worker: two workers of two threads each on two cores run torch several times slower.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
# The longest modules first, then the other slow ones, so that the workers start on them at once and
# the short tests fill in around them (`--dist load` hands tests out in this order).
LONGEST_FIRST = ("test_pipeline_tiny.py", "test_readme_tour.py")


def pytest_collection_modifyitems(config, items):
    slow = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST) + (name not in slow)

    items.sort(key=rank)  # stable: a module's own order is kept


@pytest.fixture(autouse=True)
def _one_torch_thread_per_worker():
    """Some modules set torch's threads when imported, which every worker does while collecting."""
    if XDIST_WORKER and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", LLMCTL_TEST="1", OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("LLMCTL_DEBUG", None)
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> CliResult:
    """Run `python -m llmctl ARGS` (the same entry point as the console script) in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


def write_project(folder: Path, body: str = "", name: str = "t") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llmctl.yaml").write_text(f"name: {name}\n{body}")
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A seeded synthetic corpus (docs.jsonl + truth.json) shared by the session; read it, don't write."""
    from llmctl.data.synthetic import generate_corpus

    folder = tmp_path_factory.mktemp("corpus")
    generate_corpus(folder, n_docs=600, seed=3)
    return folder


@pytest.fixture
def corpus_project(tmp_path, small_corpus) -> Path:
    """A project reading the small synthetic corpus."""
    return write_project(
        tmp_path / "proj",
        f"data:\n  sources:\n    - path: {small_corpus / 'docs.jsonl'}\n",
    )


def write_random_model_folder(folder):
    """A plain HF-Llama folder (no manifest): random test-1m weights + a BPE trained on synthetic text."""
    import torch

    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    tok = train_tokenizer((d["text"] for d in iter_documents(200, seed=1)), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size))
    model.init_weights()
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder
