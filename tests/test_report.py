"""`llmctl report`: the model card and the HTML page of a real (tiny) lineage, as a user gets them.

One project runs every stage (dedup -> filter -> tokenize -> pretrain -> sft -> dpo -> grpo -> eval
-> quantize, a few steps each, ~15 s) plus an eval of the sft model, so the card compares two eval
artifacts. Checked: the card's YAML header parses and its numbers are the manifests' numbers (data
funnel, filter reasons, tokens, params, steps, eval values with stderr, quantize deltas, lineage
hashes); the artifact folders stay untouched; an ancestor removed with `artifacts rm` is named, not
a crash; the page renders in a real headless Chromium with every section and plot and no console
error or network request.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from llmctl.workspace.manifest import file_sha256

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = [
    "Data",
    "Tokenizer",
    "Model",
    "Training",
    "Post-training",
    "Evaluation",
    "Quantization",
    "Lineage",
    "Environment",
]
PLOTS = ["data-funnel", "loss-pretrain", "loss-sft", "loss-dpo", "loss-grpo", "reward-grpo", "eval-scores"]
CONFIG = """\
name: demo
workspace: workspace
data:
  sources:
    - path: data/docs.jsonl
tokenize: {vocab_size: 512, val_fraction: 0.05}
pretrain:
  model: {preset: test-1m}
  seq_len: 64
  micro_batch_size: 4
  batch_tokens: 256
  max_steps: 6
  eval_every: 3
sft:
  data: {sources: [{path: data/chat.jsonl}], val_fraction: 0.1}
  seq_len: 128
  micro_batch_size: 4
  batch_size: 4
  max_steps: 4
  eval_every: 2
dpo:
  data: {sources: [{path: data/preferences.jsonl}], val_fraction: 0.1}
  seq_len: 128
  micro_batch_size: 4
  batch_size: 4
  max_steps: 3
  eval_every: 0
grpo:
  data:
    sources: [{path: data/rl_prompts.jsonl}]
    val_sources: [{path: data/rl_eval.jsonl, limit: 4}]
  rewards: [{type: contains, field: answer}]
  num_generations: 2
  prompts_per_step: 2
  micro_batch_size: 4
  max_steps: 3
  eval_every: 0
  rollout: {temperature: 0.7, max_new_tokens: 8}
eval: {tasks: [perplexity, world_mc], limit: 10}
quantize: {bits: 8, tasks: [perplexity, world_mc], limit: 5, speed_tokens: 0}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    assert run_cli("init", "demo", cwd=tmp).code == 0
    folder = tmp / "demo"
    for name, keep in (("docs.jsonl", 500), ("chat.jsonl", 200), ("preferences.jsonl", 160)):
        path = folder / "data" / name
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))
    (folder / "llmctl.yaml").write_text(CONFIG)
    ran = run_cli("run", "--json", cwd=folder)
    assert ran.code == 0, ran.stderr[-3000:]
    assert [row["artifact"] for row in ran.json()["stages"]][-3:] == [
        "grpo:v0001",
        "eval:v0001",
        "quantize:v0001",
    ]
    sft_eval = run_cli("eval", "--ckpt", "sft:v0001", cwd=folder)  # a second eval artifact, of an ancestor
    assert sft_eval.code == 0, sft_eval.stderr[-3000:]
    return folder


def manifest(project: Path, artifact_id: str) -> dict:
    stage, version = artifact_id.split(":")
    return json.loads((project / "workspace/artifacts" / stage / version / "manifest.json").read_text())


def split_card(text: str) -> tuple[dict, dict[str, str]]:
    """(YAML header, section title -> body) of a model card."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, text[:300]
    parts = re.split(r"^## (.+)$", match.group(2), flags=re.M)
    return yaml.safe_load(match.group(1)), dict(zip(parts[1::2], parts[2::2], strict=True))


def table(body: str, first: int = 0) -> list[dict[str, str]]:
    """The rows of the `first`-th markdown table in a section, as dicts by header."""
    tables, current = [], []
    for line in [*body.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    header, _, *rows = tables[first]
    return [dict(zip(header, row, strict=True)) for row in rows]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def close(cell: str, value: float) -> bool:
    """A card cell (4 significant digits) shows `value`."""
    return number(cell) == pytest.approx(value, rel=1e-3, abs=1e-12)


def test_card_from_the_cli_has_the_manifests_numbers(project):
    ran = run_cli("--json", "report", cwd=project)
    assert ran.code == 0, ran.stderr
    doc = ran.json()
    assert doc["artifact"] == "grpo:v0001"  # the newest model (quantize is a copy, not "newest")
    assert doc["out"] == str(project / "reports" / "grpo-v0001") and doc["missing"] == []
    assert doc["summary"]["model"]["params"] == manifest(project, "grpo:v0001")["metrics"]["params"]
    meta, sections = split_card(Path(doc["card"]).read_text())
    assert list(sections) == SECTIONS
    assert meta["license"] == "other" and meta["pipeline_tag"] == "text-generation"
    assert {"llmctl", "pretrain", "sft", "dpo", "grpo"} <= set(meta["tags"])
    assert "data/docs.jsonl" in meta["datasets"] and "data/chat.jsonl" in meta["datasets"]
    assert "data/rl_prompts.jsonl" in meta["datasets"] and "data/rl_eval.jsonl" not in meta["datasets"]

    dedup, filt, tok = (manifest(project, f"{s}:v0001")["metrics"] for s in ("dedup", "filter", "tokenize"))
    funnel = {row["step"]: number(row["count"]) for row in table(sections["Data"])}
    assert funnel["documents in"] == dedup["documents_in"] == 500
    assert funnel["after dedup"] == dedup["documents_out"] and funnel["after filter"] == filt["documents_out"]
    assert funnel["train tokens"] == tok["train"]["tokens"] and funnel["val tokens"] == tok["val"]["tokens"]
    removed = {(row["stage"], row["reason"]): number(row["documents"]) for row in table(sections["Data"], 1)}
    assert removed[("dedup", "exact duplicates")] == dedup["exact_duplicates"] > 0
    for step in filt["steps"]:
        for reason, count in step["dropped"].items():
            assert removed[("filter", f"{step['name']}: {reason}")] == count
    assert sum(v for (stage, _), v in removed.items() if stage == "filter") == filt["documents_excluded"]
    (tokenizer,) = table(sections["Tokenizer"])
    assert number(tokenizer["vocab size"]) == tok["vocab_size"]
    assert close(tokenizer["bytes per token"], tok["train"]["bytes_per_token"])
    (shape,) = table(sections["Model"])
    config = json.loads((project / "workspace/artifacts/grpo/v0001/config.json").read_text())
    assert (
        number(shape["n_layer"]) == config["num_hidden_layers"]
        and number(shape["n_embd"]) == config["hidden_size"]
    )

    runs = table(sections["Training"]) + table(sections["Post-training"])
    assert [r["artifact"] for r in runs] == ["pretrain:v0001", "sft:v0001", "dpo:v0001", "grpo:v0001"]
    for row in runs:
        m = manifest(project, row["artifact"])["metrics"]
        assert number(row["steps"]) == m["steps"] and number(row["tokens"]) == m["tokens"], row
        assert close(row["final train loss"], m["train_loss"]), row
        assert (
            row["final val loss"] == "—"
            if "val_loss" not in m
            else close(row["final val loss"], m["val_loss"])
        )
    dpo = manifest(project, "dpo:v0001")["metrics"]
    assert f"val_rewards/accuracies {dpo['val_rewards/accuracies']:.4g}" in sections["Post-training"]

    scores = table(sections["Evaluation"])
    pairs = list(dict.fromkeys((r["eval"], r["model"]) for r in scores))
    assert pairs == [("eval:v0002", "sft:v0001"), ("eval:v0001", "grpo:v0001")]  # in the models' order
    for row in scores:
        stage, version = row["eval"].split(":")
        results = json.loads((project / "workspace/artifacts" / stage / version / "results.json").read_text())
        task = results["tasks"][row["task"]]
        assert close(row["value"], task["metrics"][row["metric"]]), row
        stderr = task["stderr"].get(row["metric"])
        assert row["stderr"] == "—" if stderr is None else close(row["stderr"], stderr), row
    assert any(r["task"] == "world_mc" and r["stderr"] != "—" for r in scores)

    quant = manifest(project, "quantize:v0001")["metrics"]
    deltas = {row["score"]: row for row in table(sections["Quantization"])}
    assert close(deltas["world_mc/acc"]["quantized"], quant["quantized/world_mc/acc"])
    assert close(deltas["perplexity/ppl"]["delta"], quant["delta/perplexity/ppl"])

    lineage = table(sections["Lineage"])
    assert [row["artifact"].strip("· ") for row in lineage] == [
        "grpo:v0001",
        "dpo:v0001",
        "sft:v0001",
        "pretrain:v0001",
        "tokenize:v0001",
        "filter:v0001",
        "dedup:v0001",
    ]
    for row in lineage:
        stage, version = row["artifact"].strip("· ").split(":")
        folder = project / "workspace/artifacts" / stage / version
        assert row["manifest sha256"] == file_sha256(folder / "manifest.json")[:16] and row["status"] == "ok"
    env = {row["what"]: row["value"] for row in table(sections["Environment"])}
    assert env["llmctl (made it)"] == manifest(project, "grpo:v0001")["llmctl_version"] and env["python"]


def _tree(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_out_folder_and_a_quantized_model_leave_the_artifacts_untouched(project, tmp_path):
    before = _tree(project / "workspace/artifacts")
    ran = run_cli(
        "report", "quantize:latest", "--out", str(tmp_path / "card"), "--license", "apache-2.0", cwd=project
    )
    assert ran.code == 0, ran.stderr
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["README.md", "report.html"]
    meta, sections = split_card((tmp_path / "card/README.md").read_text())
    assert meta["license"] == "apache-2.0" and "quantized" in meta["tags"]
    assert "quantize:v0001 from grpo:v0001: rtn int8 per-channel sym" in sections["Quantization"]
    assert "quantize:v0001" in table(sections["Lineage"])[0]["artifact"]
    assert _tree(project / "workspace/artifacts") == before  # nothing written into an artifact
    verified = run_cli("artifacts", "verify", "--all", "--json", cwd=project)
    assert verified.code == 0 and verified.json()["ok"], verified.stdout


def test_a_removed_ancestor_is_named_not_a_crash(project, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("reports"))
    assert run_cli("artifacts", "rm", "pretrain:v0001", "--force", cwd=copy).code == 0
    ran = run_cli("--json", "report", "grpo:v1", cwd=copy)
    assert ran.code == 0, ran.stderr
    assert ran.json()["missing"] == ["pretrain:v0001"]
    assert "pretrain:v0001 (input of sft:v0001) is no longer in the workspace" in ran.stderr
    text = Path(ran.json()["card"]).read_text()
    assert "**Incomplete lineage:** pretrain:v0001 (the `model` input of sft:v0001)" in text
    _, sections = split_card(text)
    assert list(sections) == SECTIONS
    rows = {row["artifact"].strip("· "): row for row in table(sections["Lineage"])}
    assert rows["pretrain:v0001"]["status"] == "**missing**" and "tokenize:v0001" not in rows
    assert "lineage is incomplete (pretrain:v0001" in sections["Data"]
    assert [r["artifact"] for r in table(sections["Post-training"])] == [
        "sft:v0001",
        "dpo:v0001",
        "grpo:v0001",
    ]


def test_an_imported_model_says_where_it_came_from(project, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("reports"))
    source = copy / "workspace/artifacts/sft/v0001"
    assert run_cli("import", str(source), cwd=copy).code == 0
    ran = run_cli("--json", "report", "import:latest", cwd=copy)
    assert ran.code == 0, ran.stderr
    meta, sections = split_card(Path(ran.json()["card"]).read_text())
    assert "base_model" not in meta  # a local folder is no hub id
    assert f"starts from an imported model, {source} (folder)" in sections["Training"]
    assert (
        int(table(sections["Model"])[0]["parameters"].replace(",", ""))
        == ran.json()["summary"]["model"]["params"]
    )


def test_unknown_reference_is_an_input_error(project):
    ran = run_cli("report", "pretrain:v9", cwd=project)
    assert ran.code == 2 and ran.stderr.startswith("Error: unknown reference 'pretrain:v9'"), ran.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (.ci/run installs it with apt as root)"
)
def test_the_page_renders_in_a_headless_browser(project, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    ran = run_cli("--json", "report", "--out", str(tmp_path / "r"), cwd=project)
    assert ran.code == 0, ran.stderr
    page_file = Path(ran.json()["html"])
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_file.as_uri(), wait_until="load")
            headings = page.eval_on_selector_all("h2", "nodes => nodes.map(n => n.textContent)")
            figures = page.eval_on_selector_all(
                "figure.plot",
                """nodes => nodes.map(f => {
                    const svg = f.querySelector('svg'); const box = svg ? svg.getBoundingClientRect() : null;
                    return {name: f.dataset.plot, width: box ? box.width : 0, height: box ? box.height : 0,
                            shapes: svg ? svg.querySelectorAll('path, rect, line').length : 0,
                            text: svg ? svg.textContent : ''};
                })""",
            )
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    assert requests == [page_file.as_uri()], requests  # nothing fetched: the page is self-contained
    assert headings == SECTIONS
    assert [f["name"] for f in figures] == PLOTS
    for figure in figures:
        assert figure["width"] > 200 and figure["height"] > 100 and figure["shapes"] > 10, figure
    evals = next(f for f in figures if f["name"] == "eval-scores")
    assert "eval:v0001 (grpo:v0001)" in evals["text"] and "eval:v0002 (sft:v0001)" in evals["text"]
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.format == "PNG" and shot.width == 1200 and shot.height > 3000, shot.size
        colors = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50, "the screenshot is (nearly) blank"
