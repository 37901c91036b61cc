"""Artifacts that cannot lie, through the real store and runner: file hashes checked on resolve,
inputs given by path recorded as copies, ids never reused, corrupt manifests refused, pipelines
chained by id, identical concurrent runs publishing once, resume reusing, and cleaning leftovers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import stage_fixtures

from llmctl.config.project import ProjectConfig
from llmctl.errors import InputError
from llmctl.stages.runner import plan_stage, run_pipeline, run_stage, workspace_for
from llmctl.workspace.integrity import NO_VERIFY_ENV
from llmctl.workspace.manifest import MANIFEST_FILE
from llmctl.workspace.store import CHECKPOINTS_DIR

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _echo_stages(monkeypatch):
    stage_fixtures.install()
    monkeypatch.delenv(NO_VERIFY_ENV, raising=False)


@pytest.fixture
def project(tmp_path):
    return ProjectConfig(name="t", workspace=str(tmp_path / "ws")), tmp_path


def echo(project, text="a", stage="echo", refs=None, **kwargs):
    config, folder = project
    options = {"text": text, **kwargs.pop("options", {})}
    return run_stage(stage, config, folder, refs=refs, options=options, **kwargs)


def overwrite_same_size(path: Path) -> None:
    """Change a file in place keeping its size and its mtime (as a careless edit or bit rot would)."""
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ----------------------------------------------------------------------------- file hashes
def test_a_file_changed_after_publish_is_refused_by_every_consumer(project, monkeypatch):
    ws = workspace_for(*project)
    art = echo(project, "hello").artifact
    assert ws.resolve("echo:latest").id == "echo:v0001"  # untouched: resolves
    overwrite_same_size(art.path / "out.txt")
    for ref in ("echo:latest", "echo:v1", "latest", str(art.path)):
        with pytest.raises(InputError, match=r"out\.txt: was modified after publishing") as err:
            ws.resolve(ref)
        assert "echo:v0001" in err.value.message and NO_VERIFY_ENV in err.value.hint
    with pytest.raises(InputError, match="out.txt"):
        echo(project, "!", stage="sink")  # a stage consuming it refuses before running
    assert ws.artifacts("sink") == []

    monkeypatch.setenv(NO_VERIFY_ENV, "1")  # the explicit override for deliberate edits
    sink = echo(project, "!", stage="sink").artifact
    assert any(NO_VERIFY_ENV in note for note in sink.manifest.notes)


def test_a_missing_file_is_refused(project):
    ws = workspace_for(*project)
    art = echo(project).artifact
    (art.path / "partial.txt").unlink()
    with pytest.raises(InputError, match=r"partial\.txt: is missing"):
        ws.resolve("echo:latest")


def test_hash_cache_is_seeded_at_publish_and_not_fooled_by_restored_mtime(project):
    ws = workspace_for(*project)
    art = echo(project, "x" * 1000).artifact
    cache = ws.root / ".cache" / "file-hashes.json"
    assert str(art.path / "out.txt") in cache.read_text()  # the consumer need not rehash
    ws.resolve("echo:latest")
    overwrite_same_size(art.path / "out.txt")  # same size, same mtime: only ctime tells
    with pytest.raises(InputError, match="out.txt"):
        workspace_for(*project).resolve("echo:latest")  # a fresh process-level cache, from disk


# ------------------------------------------------------------------------- inputs by path
def test_an_input_given_by_path_is_recorded_as_a_copy(project, tmp_path, monkeypatch):
    ws = workspace_for(*project)
    original = echo(project, "abc").artifact
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original.path, copy)

    same = echo(project, "!", stage="sink", refs={"upstream": str(copy)}).artifact
    [record] = same.manifest.inputs
    assert record.copy_of == "echo:v0001" and record.id.startswith("copy:") and record.path == str(copy)
    assert same.manifest.metrics["upstream_id"] == record.id  # what the stage itself is told
    assert ws.dependents(original) == []  # the copy is not the artifact
    node = ws.lineage(same)["inputs"][0]
    assert node["copy_of"] == "echo:v0001" and node["matches_original"] is True

    # The same folder inside the workspace, given by path, is the genuine artifact.
    inside = echo(project, "?", stage="sink", refs={"upstream": str(original.path)}).artifact
    assert inside.manifest.inputs[0].id == "echo:v0001" and inside.manifest.inputs[0].copy_of is None

    (copy / "out.txt").write_text("abd")  # modified copy: refused unless explicitly allowed
    with pytest.raises(InputError, match="modified after publishing"):
        echo(project, "!", stage="sink", refs={"upstream": str(copy)})
    monkeypatch.setenv(NO_VERIFY_ENV, "1")
    changed = echo(project, "!", stage="sink", refs={"upstream": str(copy)})
    assert not changed.reused  # a different content is a different input
    [record2] = changed.artifact.manifest.inputs
    assert record2.copy_of == "echo:v0001" and record2.id != record.id
    assert ws.lineage(changed.artifact)["inputs"][0]["matches_original"] is False


# ------------------------------------------------------------------------------ version ids
def test_version_ids_are_never_reused_after_rm(project):
    ws = workspace_for(*project)
    for text in "abc":
        echo(project, text)
    ws.remove(ws.resolve("echo:v3"))
    assert echo(project, "d").artifact.id == "echo:v0004"
    assert [a.id for a in ws.artifacts("echo")] == ["echo:v0001", "echo:v0002", "echo:v0004"]


def test_ids_named_by_other_manifests_are_not_reused_in_old_workspaces(project):
    """A workspace written before the high-water file existed: the newest version was deleted by
    hand, but a consumer's manifest still names it."""
    ws = workspace_for(*project)
    echo(project, "a")
    echo(project, "b")
    echo(project, "!", stage="sink")  # consumes echo:v0002
    shutil.rmtree(ws.artifacts_dir / "echo" / "v0002")
    (ws.artifacts_dir / "echo" / ".last_version").unlink()
    assert echo(project, "c").artifact.id == "echo:v0003"


# --------------------------------------------------------------------------- corrupt manifests
def test_a_corrupt_manifest_is_listed_and_latest_refuses_to_skip_it(project):
    config, folder = project
    ws = workspace_for(config, folder)
    echo(project, "a")
    newest = echo(project, "b").artifact
    manifest = newest.path / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes()[:40])  # truncated
    assert [a.id for a in ws.artifacts()] == ["echo:v0001"]
    [corrupt] = ws.corrupt()
    assert corrupt.id == "echo:v0002" and "corrupt manifest" in corrupt.error
    for ref in ("echo:latest", "latest", "echo:v2"):
        with pytest.raises(InputError, match="echo:v0002 has a corrupt manifest"):
            ws.resolve(ref, kinds=("text",))
    assert ws.resolve("echo:v1").id == "echo:v0001"  # an explicit older version still works
    with pytest.raises(InputError, match="echo:v0002 has a corrupt manifest"):
        echo(project, "!", stage="sink")  # the default input is not silently the older one
    assert ws.find_corrupt("echo:v2") == corrupt
    ws.remove(corrupt)
    assert ws.corrupt() == [] and echo(project, "c").artifact.id == "echo:v0003"


# ------------------------------------------------------------------------- pipeline chaining
def test_pipeline_stages_consume_what_the_previous_stage_produced_or_reused(project):
    config, folder = project
    echo(project, "old")  # echo:v0001
    echo(project, "new")  # echo:v0002 is echo:latest
    outcomes = run_pipeline(["echo", "sink"], config, folder, options={"echo": {"text": "old"}})
    assert outcomes[0].reused and outcomes[0].artifact.id == "echo:v0001"
    assert outcomes[1].inputs == {"upstream": "echo:v0001"}
    assert (outcomes[1].artifact.path / "out.txt").read_text() == "oldhello"


_PIPELINE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import stage_fixtures
    stage_fixtures.install()
    from llmctl.config.project import ProjectConfig
    from llmctl.reporting import Reporter
    from llmctl.stages.runner import run_pipeline
    folder = Path({folder!r})
    config = ProjectConfig(name="t", workspace=str(folder / "ws"))

    class PauseBeforeSink(Reporter):
        def log(self, message):
            if message.startswith("[2/2]"):  # echo published; let the other run publish one too
                (folder / "a-echo-done").touch()
                while not (folder / "b-echo-done").exists():
                    time.sleep(0.005)

    [echo, sink] = run_pipeline(
        ["echo", "sink"], config, folder, force=True, reporter=PauseBeforeSink(),
        options={{"echo": {{"text": "A"}}}},
    )
    print(echo.artifact.id, sink.inputs["upstream"], (sink.artifact.path / "out.txt").read_text())
    """
)


def test_a_concurrent_run_publishing_between_stages_does_not_leak_in(project):
    config, folder = project
    script = _PIPELINE.format(tests=str(TESTS_DIR), folder=str(folder))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (folder / "a-echo-done").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    assert echo(project, "B", force=True).artifact.id == "echo:v0002"  # now echo:latest
    (folder / "b-echo-done").touch()
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert stdout.split() == ["echo:v0001", "echo:v0001", "Ahello"]


_CONCURRENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import stage_fixtures
    stage_fixtures.install()
    from llmctl.config.project import ProjectConfig
    from llmctl.stages.runner import run_stage
    folder = Path({folder!r})
    config = ProjectConfig(name="t", workspace=str(folder / "ws"))
    (folder / f"ready-{{sys.argv[1]}}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    outcome = run_stage("echo", config, folder, options={{"text": "same", "sleep": 1.0}})
    print(outcome.artifact.id, outcome.reused)
    """
)


def test_identical_concurrent_runs_publish_once(project):
    config, folder = project
    script = _CONCURRENT.format(tests=str(TESTS_DIR), folder=str(folder))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (folder / "go").touch()  # both check for an up-to-date artifact at the same moment
    results = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(stdout.split())
    assert [a.id for a in workspace_for(config, folder).artifacts("echo")] == ["echo:v0001"]
    assert sorted(results) == [["echo:v0001", "False"], ["echo:v0001", "True"]]


# ---------------------------------------------------------------------------------- resume
def test_resume_with_nothing_to_resume_reuses_and_force_starts_over(project):
    config, folder = project
    ws = workspace_for(config, folder)
    first = echo(project, "a").artifact
    again = echo(project, "a", resume=True)
    assert again.reused and again.artifact.id == first.id

    plan = plan_stage("echo", config, folder, options={"text": "a"})
    stale = ws.begin_run("echo", plan.config_hash)
    ws.write_run_state(stale, status="interrupted")
    resumed = echo(project, "a", resume=True)  # an unfinished run with this config: continue it
    assert not resumed.reused and resumed.artifact.id == "echo:v0002"
    assert ws.runs() == [] and not stale.exists()

    stale = ws.begin_run("echo", plan.config_hash)
    ws.write_run_state(stale, status="interrupted")
    over = echo(project, "a", resume=True, force=True)  # start over: the old run stays for clean
    assert not over.reused and over.artifact.id == "echo:v0003"
    assert [r.path for r in ws.runs()] == [stale]


# ---------------------------------------------------------------------------------- cleaning
def test_leftovers_are_listed_with_sizes_and_resumable_runs_kept(project):
    config, folder = project
    ws = workspace_for(config, folder)
    published = ws.begin_run("pretrain", "h1")
    (published / CHECKPOINTS_DIR / "step_000002").mkdir(parents=True)
    (published / CHECKPOINTS_DIR / "step_000002" / "model.safetensors").write_bytes(b"x" * 5000)
    (published / "metrics.jsonl").write_text("{}\n")
    ws.write_run_state(published, status="published", artifact="pretrain:v0001")
    resumable = ws.begin_run("pretrain", "h2")
    (resumable / CHECKPOINTS_DIR / "step_000001").mkdir(parents=True)
    ws.write_run_state(resumable, status="interrupted")
    failed = ws.begin_run("dedup", "h3")
    ws.write_run_state(failed, status="failed", error="boom")
    echo(project, "a")
    gone = ws.artifacts_dir / "echo" / ".deleting-v0007-abc123"
    gone.mkdir()
    (gone / "big.bin").write_bytes(b"y" * 3000)

    items = {item.path: item for item in ws.leftovers()}
    assert set(items) == {published / CHECKPOINTS_DIR, failed, gone}
    assert items[published / CHECKPOINTS_DIR].bytes == 5000 and items[gone].bytes == 3000
    assert items[published / CHECKPOINTS_DIR].what == "published run checkpoints"
    ws.clean(list(items.values()))
    assert not (published / CHECKPOINTS_DIR).exists() and (published / "metrics.jsonl").exists()
    assert not failed.exists() and not gone.exists() and resumable.exists()
    assert [i.path for i in ws.leftovers(resumable=True)] == [resumable]
    assert ws.resolve("echo:latest").id == "echo:v0001"


def test_checkpoints_dir_is_the_one_training_writes():
    from llmctl.train import checkpoint

    assert checkpoint.CHECKPOINTS_DIR == CHECKPOINTS_DIR


def test_schema_1_manifests_still_read(project):
    """Workspaces written before inputs recorded content hashes and copies (schema_version 1)."""
    import json

    ws = workspace_for(*project)
    echo(project, "a")
    sink = echo(project, "!", stage="sink").artifact
    manifest = json.loads((sink.path / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 1
    for record in manifest["inputs"]:
        for key in ("content_sha256", "copy_of", "path"):
            del record[key]
    (sink.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert ws.resolve("sink:latest").manifest.inputs[0].id == "echo:v0001"
    assert ws.lineage(ws.resolve("sink:latest"))["inputs"][0]["id"] == "echo:v0001"
