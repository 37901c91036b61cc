"""The CLI through real subprocesses: exit codes, --json documents, errors and hints."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli, write_project

from llmctl import __version__


def test_version_and_help_do_not_import_heavy_modules():
    result = run_cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"llmctl {__version__}"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from llmctl.cli.app import app; "
            "print(sorted(m for m in ('torch', 'datatrove', 'tokenizers', 'transformers', 'numpy') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    assert run_cli("--help").code == 0


def test_init_list_and_templates(tmp_path):
    listing = run_cli("init", "--list", "--json")
    assert listing.code == 0
    names = {t["name"] for t in listing.json()}
    assert {"tiny", "gpt2-fineweb"} <= names

    made = run_cli("--json", "init", "demo", cwd=tmp_path)
    assert made.code == 0, made.stderr
    assert made.json()["template"] == "tiny"
    assert (tmp_path / "demo" / "llmctl.yaml").is_file()
    assert (tmp_path / "demo" / "data" / "docs.jsonl").stat().st_size > 1_000_000
    assert (tmp_path / "demo" / "data" / "truth.json").is_file()

    again = run_cli("init", "demo", cwd=tmp_path)
    assert again.code == 2 and "already exists" in again.stderr

    unknown = run_cli("init", "other", "--template", "nope", cwd=tmp_path)
    assert unknown.code == 2 and "unknown template 'nope'" in unknown.stderr and "Hint:" in unknown.stderr
    assert not (tmp_path / "other").exists()


def test_every_template_validates(tmp_path):
    for template in ("tiny", "gpt2-fineweb"):
        folder = tmp_path / template
        assert run_cli("init", str(folder), "--template", template).code == 0
        result = run_cli("-C", str(folder), "config", "validate", "--json")
        assert result.code == 0, result.stderr
        assert result.json()["ok"] is True


def test_config_commands(tmp_path):
    project = write_project(tmp_path / "p", "dedup:\n  bands: 10\n")
    shown = run_cli("config", "show", "--json", "--set", "dedup.rows=4", cwd=project)
    assert shown.code == 0, shown.stderr
    assert shown.json()["dedup"]["bands"] == 10  # from the file
    assert shown.json()["dedup"]["rows"] == 4
    schema = run_cli("config", "schema", cwd=project)
    assert schema.code == 0 and schema.json()["title"] == "ProjectConfig"


def test_config_errors_exit_2_with_one_line_per_key(tmp_path):
    project = write_project(tmp_path / "p", "dedup:\n  bands: x\n  colour: red\n")
    result = run_cli("config", "validate", cwd=project)
    assert result.code == 2
    assert "llmctl.yaml:3: dedup.bands:" in result.stderr
    assert "llmctl.yaml:4: dedup.colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    as_json = run_cli("config", "validate", "--json", cwd=project)
    assert as_json.code == 2
    error = as_json.json()["error"]
    assert error["type"] == "ConfigError" and len(error["errors"]) == 2


def test_bad_set_syntax_and_malformed_yaml(tmp_path):
    project = write_project(tmp_path / "p")
    bad = run_cli("config", "validate", "--set", "dedup.bands", cwd=project)
    assert bad.code == 2 and "bad --set" in bad.stderr
    (project / "llmctl.yaml").write_text("name: p\ndedup: [\n")
    broken = run_cli("config", "show", cwd=project)
    assert broken.code == 2 and "llmctl.yaml:3: malformed YAML" in broken.stderr


def test_outside_a_project(tmp_path):
    result = run_cli("artifacts", "ls", cwd=tmp_path)
    assert result.code == 2
    assert "not inside an llmctl project" in result.stderr and "llmctl init" in result.stderr
    missing = run_cli("-C", str(tmp_path / "nowhere"), "config", "show")
    assert missing.code == 2 and "no llmctl.yaml" in missing.stderr


def test_artifacts_on_an_empty_workspace(tmp_path):
    project = write_project(tmp_path / "p")
    listing = run_cli("artifacts", "ls", "--json", cwd=project)
    assert listing.code == 0 and listing.json() == {"artifacts": [], "corrupt": [], "runs": []}
    unknown = run_cli("artifacts", "show", "dedup:latest", cwd=project)
    assert unknown.code == 2 and "no dedup artifacts" in unknown.stderr
    nested = tmp_path / "p" / "sub" / "dir"
    nested.mkdir(parents=True)
    assert run_cli("artifacts", "ls", cwd=nested).code == 0  # found by walking up, as git does


def _plain_progress(steps: list[dict], interval: float) -> list[str]:
    """Lines a non-TTY progress task prints for a sequence of updates."""
    import io

    from rich.console import Console

    from llmctl.cli.output import CliReporter

    sink = io.StringIO()
    reporter = CliReporter(Console(file=sink, width=200), quiet=False, plain=True, interval=interval)
    with reporter.progress("pretrain", total=4, unit="steps") as bar:
        for fields in steps:
            bar.update(**fields)
    return sink.getvalue().splitlines()


def test_plain_progress_prints_the_final_line_once():
    # Every update prints (interval 0): the last one already shows the final state, so no repeat.
    lines = _plain_progress([{"completed": i, "loss": 5.0 - i} for i in range(1, 5)], interval=0)
    assert len(lines) == 4 and lines[-1].startswith("pretrain: 4/4 steps") and "loss=1" in lines[-1]
    assert len(set(lines)) == 4
    # Nothing printed between updates (long interval): one final line, without an eta.
    quiet = _plain_progress([{"completed": 1}, {"completed": 3}], interval=3600)
    assert len(quiet) == 1 and quiet[0].startswith("pretrain: 3/4 steps") and "eta" not in quiet[0]
