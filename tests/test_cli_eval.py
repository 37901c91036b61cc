"""`llmctl eval` through the real CLI: which model `latest` is, --log-samples, compare with deltas and
model names, and task data in users' shapes (a header CSV, one hub-schema file) or malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_project

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from test_eval_lm_eval import make_model

    tmp = tmp_path_factory.mktemp("cli-eval")
    folder = make_model(tmp / "model", max_seq_len=256)
    project = write_project(tmp / "p")
    imported = run_cli("import", str(folder), cwd=project)
    assert imported.code == 0, imported.stderr
    return project


@pytest.mark.slow
def test_eval_names_the_model_keeps_all_samples_and_compares(project):
    first = run_cli("eval", "world_mc", "--ckpt", "latest", "--limit", "8", "--json", cwd=project)
    assert first.code == 0, first.stderr
    assert "model: import:v0001 (--ckpt latest)" in first.stderr
    assert first.json()["model"] == "import:v0001"

    logged = run_cli("eval", "world_mc", "--limit", "30", "--log-samples", "--json", cwd=project)
    assert logged.code == 0, logged.stderr
    artifact = logged.json()["artifact"]
    samples = project / "workspace/artifacts/eval" / artifact.split(":")[1] / "samples/world_mc.jsonl"
    assert len(samples.read_text().splitlines()) == 30  # every item, not the default 20

    table = run_cli("eval", "compare", "eval:v1", artifact, cwd=project)
    assert table.code == 0, table.stderr
    assert "Δ vs eval:v0001" in table.stdout and table.stdout.count("import:v0001") == 2
    doc = run_cli("eval", "compare", "eval:v1", artifact, "--json", cwd=project).json()
    assert [e["model"] for e in doc["evals"]] == ["import:v0001", "import:v0001"]
    (acc,) = [r for r in doc["rows"] if r["metric"] == "world_mc/acc"]
    a, b = acc["values"]["eval:v0001"], acc["values"][artifact]
    assert acc["delta"] == {artifact: pytest.approx(b - a)}
    assert f"{b - a:+.4f}" in table.stdout


@pytest.mark.slow
def test_eval_reads_header_csvs_and_single_files_and_names_bad_lines(project, tmp_path):
    mmlu = tmp_path / "mmlu/test/astronomy_test.csv"
    mmlu.parent.mkdir(parents=True)
    mmlu.write_text(
        "question,choice0,choice1,choice2,choice3,answer\n"
        "What is the closest star to Earth?,Proxima Centauri,The Sun,Sirius,Vega,1\n"
        "Which planet has the most moons?,Earth,Mars,Saturn,Venus,2\n"
    )
    ok = run_cli("eval", "mmlu", "--data-dir", str(tmp_path), "--json", cwd=project)
    assert ok.code == 0, ok.stderr
    assert ok.json()["tasks"]["mmlu"]["n"] == 2

    mmlu.write_text(mmlu.read_text().replace("Venus,2", "Venus,E"))
    # --force: the eval of this --data-dir is up to date (the runner keys it by the path, not the files)
    bad = run_cli("eval", "mmlu", "--data-dir", str(tmp_path), "--force", cwd=project)
    assert bad.code == 2
    assert f"Error: {mmlu}:3: 'answer' must be a choice index (0-3 or A-D), got 'E'" in bad.stderr
    assert "Hint:" in bad.stderr and "internal error" not in bad.stderr

    arc = tmp_path / "arc-data/test.jsonl"
    arc.parent.mkdir()
    arc.write_text((FIXTURES / "arc/ARC-Easy/ARC-Easy-Test.jsonl").read_text())
    res = run_cli("eval", "arc_easy", "--data-dir", str(arc), "--json", cwd=project)
    assert res.code == 0, res.stderr
    assert res.json()["tasks"]["arc_easy"]["n"] == len(arc.read_text().splitlines())

    arc.write_text(json.dumps({"id": "x"}) + "\n")  # not ARC's schema: not taken, and the error says why
    missing = run_cli("eval", "arc_easy", "--data-dir", str(arc.parent), cwd=project)
    assert missing.code == 2 and "tried:" in missing.stderr and "answerKey" in missing.stderr
