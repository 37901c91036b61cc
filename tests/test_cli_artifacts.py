"""The workspace guarantees through the real CLI and real stages: `llmctl run` chains by id,
`artifacts verify` and consumers refuse changed files, corrupt manifests are listed and refused,
filter does not fall back to raw sources after a failed dedup, `artifacts clean` lists sizes."""

from __future__ import annotations

import json

from conftest import run_cli

from llmctl.workspace.store import Workspace


def test_run_chains_by_id_and_consumers_check_files(corpus_project):
    """Issue 11 #1, issue 12 #1 and #4 on real dedup/filter artifacts."""
    assert run_cli("dedup", cwd=corpus_project).code == 0  # dedup:v0001 (the project's config)
    other = run_cli("dedup", "--json", "--set", "dedup.seed=2", cwd=corpus_project)
    assert other.json()["artifact"] == "dedup:v0002"  # now dedup:latest, made with another config

    pipeline = run_cli("run", "--until", "filter", "--json", cwd=corpus_project)
    assert pipeline.code == 0, pipeline.stderr
    dedup, filtered = pipeline.json()["stages"]
    assert dedup["artifact"] == "dedup:v0001" and dedup["reused"] is True
    assert dedup["inputs"] == {"sources": "data.sources"}
    assert filtered["inputs"] == {"corpus": "dedup:v0001"}  # what this run's dedup gave, not latest
    table = run_cli("run", "--until", "filter", cwd=corpus_project)
    assert "corpus=dedup:v0001" in table.stdout

    # A file of dedup:v0001 changed in place: every reader refuses, naming the file.
    shard = corpus_project / "workspace/artifacts/dedup/v0001/removed.jsonl.gz"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    verify = run_cli("artifacts", "verify", "dedup:v1", cwd=corpus_project)
    assert verify.code == 2 and "removed.jsonl.gz" in verify.stderr and "Hint:" in verify.stderr
    doc = run_cli("artifacts", "verify", "--all", "--json", cwd=corpus_project)
    assert doc.code == 2
    status = {row["id"]: row for row in doc.json()["artifacts"]}
    assert status["dedup:v0002"]["ok"] and not status["dedup:v0001"]["ok"]
    assert status["dedup:v0001"]["problems"][0]["file"] == str(shard)
    consumer = run_cli("filter", "--input", "dedup:v1", "--force", cwd=corpus_project)
    assert consumer.code == 2 and f"{shard}: was modified after publishing" in consumer.stderr
    shown = run_cli("artifacts", "show", "dedup:v1", "--json", cwd=corpus_project)
    assert shown.code == 0 and shown.json()["integrity"]["ok"] is False

    # A truncated manifest: listed as corrupt, and dedup:latest refuses instead of skipping it.
    manifest = corpus_project / "workspace/artifacts/dedup/v0002/manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    listing = run_cli("artifacts", "ls", "--json", cwd=corpus_project).json()
    assert [c["id"] for c in listing["corrupt"]] == ["dedup:v0002"]
    assert "dedup:v0002" not in [a["id"] for a in listing["artifacts"]]
    refused = run_cli("filter", "--force", cwd=corpus_project)
    assert refused.code == 2 and "dedup:v0002 has a corrupt manifest" in refused.stderr
    assert run_cli("artifacts", "rm", "dedup:v2", cwd=corpus_project).code == 0
    assert run_cli("artifacts", "ls", "--json", cwd=corpus_project).json()["corrupt"] == []


def test_show_renders_list_metrics_as_tables(corpus_project):
    assert run_cli("filter", cwd=corpus_project).code == 0
    shown = run_cli("artifacts", "show", "filter:latest", cwd=corpus_project)
    assert shown.code == 0, shown.stderr
    assert "[{" not in shown.stdout and "{'" not in shown.stdout  # no Python reprs
    steps = shown.stdout[shown.stdout.index("\nsteps") :]
    assert "gopher_quality" in steps and "documents_out" in steps


def test_filter_does_not_fall_back_to_sources_after_a_failed_dedup(corpus_project):
    ws = Workspace(corpus_project / "workspace")
    failed = ws.begin_run("dedup", "h")
    ws.write_run_state(failed, status="failed", error="No space left on device")
    refused = run_cli("filter", cwd=corpus_project)
    assert refused.code == 2
    assert "`dedup`, which has none: its last run is failed: No space left on device" in refused.stderr
    assert "llmctl dedup" in refused.stderr and "artifacts clean dedup" in refused.stderr
    assert not list((corpus_project / "workspace/artifacts").glob("filter/v*"))

    assert run_cli("artifacts", "clean", "dedup", "--yes", cwd=corpus_project).code == 0
    fallback = run_cli("filter", "--json", cwd=corpus_project)  # never run: the sources, said so
    assert fallback.code == 0, fallback.stderr
    assert fallback.json()["inputs"] == {"sources": "data.sources"}
    assert "reading data.sources directly" in fallback.stderr


def test_clean_lists_sizes_asks_and_keeps_resumable_runs(corpus_project):
    ws = Workspace(corpus_project / "workspace")
    published = ws.begin_run("pretrain", "h1")
    ckpt = published / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\0" * 4096)
    ws.write_run_state(published, status="published", artifact="pretrain:v0001")
    resumable = ws.begin_run("pretrain", "h2")
    (resumable / "checkpoints" / "step_000002").mkdir(parents=True)
    ws.write_run_state(resumable, status="interrupted")
    leftover = corpus_project / "workspace/artifacts/dedup/.deleting-v0003-0a0b0c"
    leftover.mkdir(parents=True)
    (leftover / "x.bin").write_bytes(b"\0" * 1000)

    dry = run_cli("artifacts", "clean", "--dry-run", "--json", cwd=corpus_project)
    assert dry.code == 0, dry.stderr
    would = {row["path"]: row for row in dry.json()["would_remove"]}
    assert set(would) == {str(published / "checkpoints"), str(leftover)}
    assert would[str(published / "checkpoints")]["bytes"] == 4096 and dry.json()["bytes"] == 5096
    assert (published / "checkpoints").exists()

    unconfirmed = run_cli("artifacts", "clean", cwd=corpus_project)  # not a TTY, no --yes
    assert unconfirmed.code == 2 and "add --yes" in unconfirmed.stderr and leftover.exists()

    done = run_cli("artifacts", "clean", "--yes", cwd=corpus_project)
    assert done.code == 0 and "removed 2 item(s)" in done.stdout
    assert not leftover.exists() and not (published / "checkpoints").exists()
    assert (published / "run.json").exists() and resumable.exists()
    assert json.loads((published / "run.json").read_text())["status"] == "published"

    everything = run_cli("artifacts", "clean", "--resumable", "--yes", "--json", cwd=corpus_project)
    assert [row["path"] for row in everything.json()["removed"]] == [str(resumable)]
