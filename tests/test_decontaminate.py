"""Decontamination: eval items planted in a corpus (verbatim, re-cased and re-punctuated, one short
item, one that shares only 12 words with it) are exactly the ones found; through the real pipeline,
`llmctl eval --decontaminate --json` reports the counts and the clean-subset score, reuses the index
the second time, leaves the corpus artifact verifiable, and says so when a model has no corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_project

from llmctl.evals.decontaminate import Corpus, Decontaminator, item_text, words
from llmctl.evals.evaluate import load_results
from llmctl.evals.tasks import build_arc, build_custom_mc, build_gsm8k, build_mmlu
from llmctl.reporting import Reporter
from llmctl.stages.eval import training_documents
from llmctl.stages.registry import project_model
from llmctl.stages.runner import run_stage
from llmctl.workspace.store import Workspace

LIGHTHOUSE = (
    "The old lighthouse keeper counted every ship that passed the northern cape during that long "
    "winter, and the total came to"
)
FARMERS = "Farmers in the eastern valley grow barley and rye because the soil there is far too thin for"
TRADERS = (
    "A small band of traders crossed the salt desert every spring to sell copper bowls in the markets of"
)
QUIZ = [
    {"query": LIGHTHOUSE, "choices": [" forty ships.", " seven ships."], "gold": 0},  # planted verbatim
    {"query": FARMERS, "choices": [" wheat.", " rice."], "gold": 0},  # planted re-cased, re-punctuated
    {
        "query": "The river Osk flows north into the cold",
        "choices": [" sea.", " hills."],
        "gold": 0,
    },  # 9 words
    {"query": TRADERS, "choices": [" Tarn.", " Vell."], "gold": 1},  # only its first 12 words planted
    {
        "query": "Every child in the mountain village learns to carve a wooden whistle before the age of",
        "choices": [" ten.", " two."],
        "gold": 0,
    },
    {
        "query": "The scribes of the lower city copied each letter of the old law onto fresh vellum for",
        "choices": [" the council.", " the fish."],
        "gold": 0,
    },
    {"query": "Snow is", "choices": [" cold.", " loud."], "gold": 0},  # too short to check
]
FOUND = [True, True, True, False, False, False, None]
PLANTED = [
    LIGHTHOUSE + " forty ships.",
    "FARMERS in the Eastern Valley grow barley, and rye -- because the soil there is far too thin for WHEAT!!",
    "Travellers say the river Osk flows north into the cold sea, past the towers.",
    "A small band of traders crossed the salt desert every spring to trade wool, they said.",
]


class Logs(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_exactly_the_planted_items_are_found(tmp_path):
    docs = ["Nothing of the quiz is in this document at all, though it is long enough to count."]
    docs += [f"Some text before it. {p} And some after it." for p in PLANTED]
    checker = Decontaminator([Corpus("docs", tmp_path / "cache", "k" * 64, lambda: iter(docs))])
    assert checker.check(build_custom_mc(QUIZ, "quiz")) == FOUND
    assert {(x["n"], x["index"]) for x in checker.indexes} == {(9, "built"), (13, "built")}


def test_the_index_is_cached_per_corpus_key(tmp_path):
    """Two corpora sharing a cache folder (post-training data does) never read each other's index."""
    items = build_custom_mc(QUIZ, "quiz")
    first = Decontaminator([Corpus("a", tmp_path, "a" * 64, lambda: iter(PLANTED))])
    assert first.check(items) == FOUND
    files = sorted(tmp_path.glob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = Decontaminator([Corpus("a", tmp_path, "a" * 64, lambda: iter(["unused"]))])
    assert again.check(items) == FOUND  # read from the cache: the texts are not read again
    assert {x["index"] for x in again.indexes} == {"cached"}
    assert [f.stat().st_mtime_ns for f in files] == stamps
    other = Decontaminator([Corpus("b", tmp_path, "b" * 64, lambda: iter([PLANTED[0]]))])
    assert other.check(items) == [True, False, False, False, False, False, None]


def test_normalisation_and_the_words_checked():
    assert words("Don't STOP—the_end, O’Brien's café!") == ["dont", "stop", "the", "end", "obriens", "café"]
    mmlu = {"subject": "astronomy", "question": "Which star is closest to Earth?",
            "choices": ["Vega", "The Sun", "Sirius", "Rigel"], "answer": 1}  # fmt: skip
    dev = {
        **mmlu,
        "question": "Which planet is red?",
        "choices": ["Mars", "Venus", "Earth", "Jupiter"],
        "answer": 0,
    }
    (item,) = build_mmlu([mmlu], [dev], shots=1)
    assert item_text(item) == "Which star is closest to Earth? The Sun"  # no few-shot, no letters
    arc = {
        "question": "What melts ice?",
        "choices": {"text": ["heat", "cold"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    assert item_text(build_arc([arc])[0]) == "What melts ice? heat"
    gsm = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    (item,) = build_gsm8k([gsm], [{"question": "What is 1 + 1?", "answer": "#### 2"}], shots=1, seed=0)
    assert item_text(item) == "What is 2 + 3? 2 + 3 = 5\n#### 5"


# ---- through the real pipeline and CLI -----------------------------------------------------------

SMALL = [
    "--set", "tokenize.vocab_size=512",
    "--set", "pretrain.model.preset=test-1m",
    "--set", "pretrain.seq_len=64",
    "--set", "pretrain.micro_batch_size=4",
    "--set", "pretrain.batch_tokens=256",
    "--set", "pretrain.max_steps=2",
    "--set", "pretrain.eval_every=2",
    "--set", "pretrain.checkpoint_every=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from llmctl.data.synthetic import iter_documents

    tmp = tmp_path_factory.mktemp("decontam")
    docs = [d["text"] for d in iter_documents(300, seed=5)]
    for i, planted in enumerate(PLANTED):  # inside ordinary documents, which dedup and filter keep
        docs[10 + i] = f"{docs[10 + i]} {planted} {docs[50 + i]}"
    with open(tmp / "docs.jsonl", "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    (tmp / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUIZ))
    project = write_project(
        tmp / "p",
        f"data:\n  sources:\n    - path: {tmp / 'docs.jsonl'}\n"
        f"eval:\n  custom:\n    - {{name: quiz, path: {tmp / 'quiz.jsonl'}, type: multiple_choice}}\n",
    )
    done = run_cli("run", "--until", "pretrain", *SMALL, cwd=project)  # dedup, filter, tokenize, pretrain
    assert done.code == 0, done.stderr[-2000:]
    return project


def test_eval_decontaminate_reports_counts_and_clean_scores(project):
    first = run_cli("eval", "quiz", "--decontaminate", "--log-samples", "--json", cwd=project)
    assert first.code == 0, first.stderr[-2000:]
    doc = first.json()
    assert doc["decontamination"]["corpora"] == ["filter:v0001"]
    d = doc["tasks"]["quiz"]["decontamination"]
    assert (d["contaminated"], d["clean_n"], d["unchecked"]) == (3, 4, 1)
    samples = project / "workspace/artifacts/eval/v0001/samples/quiz.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["contaminated"] for r in rows] == FOUND
    clean = [float(r["pred"] == r["gold"]) for r in rows if not r["contaminated"]]
    assert d["metrics"]["acc"] == pytest.approx(sum(clean) / len(clean))
    assert d["stderr"]["acc"] is not None
    manifest = json.loads((project / "workspace/artifacts/eval/v0001/manifest.json").read_text())
    assert manifest["metrics"]["quiz/contaminated"] == 3
    assert manifest["metrics"]["quiz/clean/acc"] == pytest.approx(d["metrics"]["acc"])
    assert [x["index"] for x in doc["decontamination"]["indexes"]] == ["built", "built"]  # n = 9 and 13

    index = sorted((project / "workspace/artifacts/filter/v0001/.derived/decontaminate").glob("*.npy"))
    assert len(index) == 2
    stamps = [f.stat().st_mtime_ns for f in index]
    table = run_cli("eval", "quiz", "--decontaminate", cwd=project)  # eval:v0002, the table for people
    assert table.code == 0, table.stderr[-2000:]
    assert "acc (clean)" in table.stdout and "3 of 7 items found in the training documents" in table.stdout
    again = json.loads((project / "workspace/artifacts/eval/v0002/results.json").read_text())
    assert [x["index"] for x in again["decontamination"]["indexes"]] == ["cached", "cached"]
    assert again["tasks"]["quiz"]["decontamination"] == d
    assert [f.stat().st_mtime_ns for f in index] == stamps
    verified = run_cli("artifacts", "verify", "--all", cwd=project)
    assert verified.code == 0, verified.stdout + verified.stderr


def _config(project: Path, **sections):
    return project_model().model_validate(
        {**yaml.safe_load((project / "llmctl.yaml").read_text()), **sections}
    )


def test_a_model_without_a_corpus_is_said_and_scored(project):
    """An imported model (a hub model: no lineage); in this process, as the next test, to be fast."""
    config = _config(project)
    source = str(project / "workspace/artifacts/pretrain/v0001")
    imported = run_stage("import", config, project, options={"source": source}).artifact
    logs = Logs()
    options = {"tasks": ["quiz"], "decontaminate": True}
    done = run_stage("eval", config, project, refs={"model": imported.id}, options=options, reporter=logs)
    assert f"decontamination: {imported.id}'s lineage has no training documents; not checked" in logs.lines
    results = load_results(done.artifact.path)
    assert "decontamination" not in results and "decontamination" not in results["tasks"]["quiz"]


def test_post_training_data_counts_and_a_changed_file_is_said(project):
    """sft's chat data is training data too; a data file changed since sft ran is said and skipped."""
    chat = project / "chat.jsonl"
    question = QUIZ[4]["query"] + " what?"
    rows = [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant", "content": QUIZ[4]["query"] + " ten."}]}]  # fmt: skip
    rows += [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
             for i in range(20)]  # fmt: skip
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {
        "data": {"sources": [{"path": "chat.jsonl"}]},
        "max_steps": 2,
        "micro_batch_size": 2,
        "batch_size": 2,
    }
    config = _config(project, sft=sft)
    model = run_stage("sft", config, project, refs={"model": "pretrain:v0001"}).artifact
    options = {"tasks": ["quiz"], "decontaminate": True}
    done = run_stage("eval", config, project, refs={"model": model.id}, options=options, reporter=Logs())
    results = load_results(done.artifact.path)
    assert results["decontamination"]["corpora"] == ["filter:v0001", f"{model.id} training data"]
    assert results["tasks"]["quiz"]["decontamination"]["contaminated"] == 4

    chat.write_text(chat.read_text() + chat.read_text())
    ws, logs = Workspace(project / "workspace"), Logs()
    corpora = training_documents(ws.resolve("sft:latest"), ws, project, logs)
    assert [c.name for c in corpora] == ["filter:v0001"]
    assert logs.lines == [f"decontamination: {model.id}'s training data changed since it ran; not checked"]
