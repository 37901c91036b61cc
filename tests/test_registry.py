"""The stage registry is the one place a stage is declared: a stage registered by another distribution
(an entry point in the `llmctl.stages` group) gets a command, a config section, a place in `llmctl run`
and completions; and "the newest model" is the newest in pipeline order, whichever stage made it.

The plugin is real: a module and a `.dist-info` folder with its entry point, on PYTHONPATH of the
`llmctl` subprocesses, exactly as an installed package would provide them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, write_project, write_random_model_folder

PLUGIN = '''
"""Two toy stages: `toy` writes a greeting from its own llmctl.yaml section; `toytrain` is a model
stage after pretrain in pipeline order (a zero-step "finetune" that republishes its input model)."""

import shutil

from pydantic import Field

from llmctl.config.base import Section
from llmctl.stages.registry import MODEL, InputSlot, Stage, register


class ToyConfig(Section):
    greeting: str = Field("hello", description="What the toy stage writes.")


register(
    Stage(
        name="toy",
        description="A toy stage from a plugin.",
        output_kind="text",
        sections=("toy",),
        config="toy_stages:ToyConfig",
        module="toy_stages",
    )
)
register(
    Stage(
        name="toytrain",
        description="A toy training stage: republishes the newest model.",
        output_kind=MODEL,
        sections=(),
        inputs=(InputSlot("model", (MODEL,), newest_in_pipeline=True),),
        module="toy_stages",
    )
)


def run(ctx):
    if ctx.stage.name == "toytrain":
        shutil.copytree(ctx.inputs["model"].path, ctx.output_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("manifest.json"))
        return {"from": ctx.input_ids["model"]}
    (ctx.output_dir / "out.txt").write_text(ctx.project.toy.greeting)
    if ctx.project.toy.greeting == "swallowed":  # a signal handled where its exception was lost
        from llmctl.errors import Interrupted, interrupt
        try:
            interrupt("SIGTERM")
        except Interrupted:
            pass
    return {"chars": len(ctx.project.toy.greeting)}
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    site = tmp_path_factory.mktemp("site")
    (site / "toy_stages.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "toy_stages-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stages\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmctl.stages]\ntoy = toy_stages\n")
    return str(site)


def _cli(plugin_path: str, *args: str, cwd: Path):
    return run_cli(*args, cwd=cwd, env=cli_env(PYTHONPATH=plugin_path))


def test_a_plugin_stage_gets_command_schema_run_and_completion(tmp_path, plugin_path, monkeypatch):
    project = write_project(tmp_path / "p", "toy:\n  greeting: hi there\n")

    help_text = _cli(plugin_path, "--help", cwd=project).stdout
    assert "toy " in help_text and "A toy stage from a plugin." in help_text
    assert "toy" not in run_cli("--help", cwd=project).stdout  # without the plugin: no such stage

    schema = json.loads(_cli(plugin_path, "config", "schema", cwd=project).stdout)
    assert "greeting" in json.dumps(schema["$defs"]["ToyConfig"]) and "toy" in schema["properties"]
    bad = _cli(plugin_path, "config", "validate", "--set", "toy.nope=1", cwd=project)
    assert bad.code == 2 and "toy.nope" in bad.stderr  # its section is validated like any other

    ran = _cli(plugin_path, "--json", "run", "--from", "toy", "--until", "toy", cwd=project)
    assert ran.code == 0, ran.stderr
    (row,) = ran.json()["stages"]
    assert row["artifact"] == "toy:v0001" and not row["reused"]
    assert (Path(row["path"]) / "out.txt").read_text() == "hi there"
    assert _cli(plugin_path, "--json", "toy", cwd=project).json()["reused"] is True  # its own command

    from test_completions import _bash_complete

    monkeypatch.setenv("PYTHONPATH", plugin_path)
    assert _bash_complete(project, "llmctl", "run", "--from", "to") == ["tokenize", "toy", "toytrain"]
    assert _bash_complete(project, "llmctl", "toy") == ["toy", "toytrain"]


def test_a_stage_that_got_a_signal_never_publishes_even_if_its_exception_was_swallowed(tmp_path, plugin_path):
    """The runner checks for a received signal before publishing: an Interrupted raised inside a
    callback whose errors Python only prints (an at-fork hook) must not let the run publish."""
    project = write_project(tmp_path / "p", "toy:\n  greeting: swallowed\n")
    ran = _cli(plugin_path, "toy", cwd=project)
    assert ran.code == 130 and "interrupted" in ran.stderr, ran.stderr
    assert not list((project / "workspace" / "artifacts").glob("toy/v*"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_random_model_folder(tmp_path_factory.mktemp("hf-model"))


def _model_used(result) -> str:
    assert result.code == 0, result.stderr
    return next(line for line in result.stderr.splitlines() if line.startswith("model: ")).split()[1]


@pytest.mark.slow  # nine CLI processes, about a minute on two busy cores
def test_the_newest_model_is_the_last_training_stage_in_pipeline_order(tmp_path, plugin_path, hf_folder):
    project = write_project(tmp_path / "p")
    assert _cli(plugin_path, "import", str(hf_folder), cwd=project).code == 0
    generate = ("generate", "The capital of", "-n", "2")
    assert _model_used(_cli(plugin_path, *generate, cwd=project)) == "import:v0001"

    trained = _cli(plugin_path, "--json", "toytrain", cwd=project)
    assert trained.code == 0, trained.stderr
    assert trained.json()["inputs"] == {"model": "import:v0001"}
    # An import published later is still a starting point: the trained model is the newest.
    assert _cli(plugin_path, "import", str(hf_folder), "--force", cwd=project).code == 0
    assert _model_used(_cli(plugin_path, *generate, cwd=project)) == "toytrain:v0001"
    assert _model_used(_cli(plugin_path, *generate, "--ckpt", "latest", cwd=project)) == "toytrain:v0001"

    evaluate = ("eval", "world_mc", "--limit", "2")
    assert _model_used(_cli(plugin_path, *evaluate, cwd=project)) == "toytrain:v0001"
    named = _cli(plugin_path, *evaluate, "--set", "eval.model=import:latest", cwd=project)
    assert _model_used(named) == "import:v0002"  # one named in config wins over the rule

    # The eval stage's own input slot follows the same rule (what `llmctl run` uses).
    ran = _cli(
        plugin_path,
        "--json",
        "run",
        "--from",
        "eval",
        "--until",
        "eval",
        "--set",
        "eval.tasks=[world_mc]",
        "--set",
        "eval.limit=2",
        cwd=project,
    )
    assert ran.code == 0, ran.stderr
    assert ran.json()["stages"][0]["inputs"]["model"] == "toytrain:v0001"
