"""The artifact store through the real runner: publish, references, reuse, lineage, removal,
atomicity under SIGKILL, and version allocation under concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import stage_fixtures

from llmctl.config.project import ProjectConfig
from llmctl.errors import InputError
from llmctl.stages.runner import run_stage, workspace_for
from llmctl.workspace.manifest import MANIFEST_FILE, file_sha256

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _echo_stages():
    stage_fixtures.install()


@pytest.fixture
def project(tmp_path):
    return ProjectConfig(name="t", workspace=str(tmp_path / "ws")), tmp_path


def echo(project, text="a", force=False, refs=None, stage="echo", **options):
    config, folder = project
    return run_stage(stage, config, folder, refs=refs, force=force, options={"text": text, **options})


def test_publish_writes_manifest_with_hashes_and_environment(project):
    outcome = echo(project, "hello")
    art = outcome.artifact
    assert not outcome.reused
    assert art.id == "echo:v0001" and art.path.name == "v0001"
    manifest = json.loads((art.path / MANIFEST_FILE).read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"] == {"options": {"text": "hello"}}
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {"out.txt", "partial.txt"}
    assert files["out.txt"]["sha256"] == file_sha256(art.path / "out.txt")
    assert files["out.txt"]["bytes"] == 5
    assert manifest["metrics"]["chars"] == 5
    assert manifest["environment"]["python"] == sys.version.split()[0]
    # the run folder is gone once published
    assert workspace_for(*project).runs() == []


def test_up_to_date_reuse_and_force(project):
    first = echo(project, "x")
    again = echo(project, "x")
    assert again.reused and again.artifact.id == first.artifact.id
    forced = echo(project, "x", force=True)
    assert not forced.reused and forced.artifact.id == "echo:v0002"
    changed = echo(project, "y")
    assert not changed.reused and changed.artifact.id == "echo:v0003"


def test_downstream_reruns_when_input_changes(project):
    echo(project, "a")
    sink1 = echo(project, "!", stage="sink")
    assert (sink1.artifact.path / "out.txt").read_text() == "a!"
    assert echo(project, "!", stage="sink").reused
    echo(project, "b")  # a newer upstream artifact
    sink2 = echo(project, "!", stage="sink")
    assert not sink2.reused and (sink2.artifact.path / "out.txt").read_text() == "b!"
    assert sink2.artifact.manifest.inputs[0].id == "echo:v0002"


def test_reference_resolution(project):
    config, folder = project
    ws = workspace_for(config, folder)
    for text in "abc":
        echo(project, text)
    assert ws.resolve("echo:latest").id == "echo:v0003"
    assert ws.resolve("echo:v2").id == "echo:v0002"
    assert ws.resolve("echo:2").id == "echo:v0002"
    assert ws.resolve("echo:v0001").id == "echo:v0001"
    assert ws.resolve("latest", kinds=("text",)).id == "echo:v0003"
    assert ws.resolve(str(ws.artifacts_dir / "echo" / "v0002")).id == "echo:v0002"
    with pytest.raises(InputError, match="unknown reference 'echo:v9'") as err:
        ws.resolve("echo:v9")
    assert "echo:v0001" in err.value.hint
    with pytest.raises(InputError, match="no pretrain artifacts") as err:
        ws.resolve("pretrain:latest")
    assert "echo:latest" in err.value.hint
    with pytest.raises(InputError, match="expected model"):
        ws.resolve("echo:latest", kinds=("model",))
    with pytest.raises(InputError, match="not an artifact"):
        ws.resolve(str(folder))
    with pytest.raises(InputError, match="unknown reference"):
        ws.resolve("nonsense")


def test_lineage_and_rm_refuses_dependents(project):
    config, folder = project
    ws = workspace_for(config, folder)
    up = echo(project, "a").artifact
    down = echo(project, "b", stage="sink").artifact
    tree = ws.lineage(down)
    assert tree["id"] == "sink:v0001"
    assert [c["id"] for c in tree["inputs"]] == ["echo:v0001"]
    with pytest.raises(InputError, match="is an input of sink:v0001"):
        ws.remove(up)
    assert ws.remove(up, force=True) == ["sink:v0001"]
    assert [a.id for a in ws.artifacts()] == ["sink:v0001"]
    assert ws.lineage(down)["inputs"][0]["missing"] is True


def test_failed_stage_publishes_nothing(project):
    config, folder = project
    with pytest.raises(RuntimeError, match="asked to fail"):
        echo(project, "a", fail=True)
    ws = workspace_for(config, folder)
    assert ws.artifacts() == []
    runs = ws.runs()
    assert [r.status for r in runs] == ["failed"]
    assert "asked to fail" in runs[0].error
    assert ws.clean(ws.leftovers()) and ws.runs() == []


_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import stage_fixtures
    stage_fixtures.install()
    from pathlib import Path
    from llmctl.config.project import ProjectConfig
    from llmctl.stages.runner import run_stage
    folder = Path({folder!r})
    config = ProjectConfig(name="t", workspace=str(folder / "ws"))
    for i in range({count}):
        run_stage("echo", config, folder, force=True, options={{"text": str(i), "sleep": {sleep}}})
    """
)


def _spawn(folder: Path, count: int, sleep: float) -> subprocess.Popen:
    script = _SCRIPT.format(tests=str(TESTS_DIR), folder=str(folder), count=count, sleep=sleep)
    return subprocess.Popen([sys.executable, "-c", script])


def test_sigkill_mid_run_leaves_nothing_that_resolves(project):
    config, folder = project
    ws = workspace_for(config, folder)
    proc = _spawn(folder, count=1, sleep=60)
    deadline = time.monotonic() + 60
    while not list(ws.runs_dir.glob("echo/*/output/partial.txt")):
        assert time.monotonic() < deadline, "the stage never started"
        assert proc.poll() is None, "the stage process died early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ws.artifacts() == []
    with pytest.raises(InputError):
        ws.resolve("echo:latest")
    runs = ws.runs()
    assert [r.status for r in runs] == ["incomplete"]
    # The next run is not fooled: it runs and publishes v0001.
    assert echo(project, "0").artifact.id == "echo:v0001"
    assert [r.path for r in ws.clean(ws.leftovers())] == [runs[0].path]


def test_concurrent_processes_get_distinct_versions(project):
    config, folder = project
    procs = [_spawn(folder, count=6, sleep=0) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    ws = workspace_for(config, folder)
    versions = sorted(a.version for a in ws.artifacts("echo"))
    assert versions == list(range(1, 13))
