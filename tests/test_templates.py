"""Project templates say true things: their commented defaults are the schema's defaults, their numbers
match the config, `init` suggests a next command that fits the template, and they fit a small machine."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from conftest import run_cli

from llmctl.config.dedup import DedupConfig
from llmctl.config.loading import load_config
from llmctl.config.tokenize import DEFAULT_SPECIAL_TOKENS
from llmctl.project import get_template, list_templates, render_project_file
from llmctl.stages.limits import Machine, check_limits
from llmctl.stages.registry import project_model

TEMPLATES = [t.name for t in list_templates()]
_KEY = re.compile(r"^[a-z_]+:")


def commented_blocks(text: str) -> list[tuple[str, str, dict]]:
    """(section, first line, parsed YAML) of each commented-out block of keys inside a section:
    consecutive `  # key: ...` lines (and their indented continuations) that parse as a mapping."""
    blocks: list[tuple[str, str, dict]] = []
    section, lines = None, []

    def flush() -> None:
        if section and lines:
            data = yaml.safe_load("\n".join(lines))
            if isinstance(data, dict):
                blocks.append((section, lines[0], data))
        lines.clear()

    for line in text.splitlines():
        if m := re.match(r"^([a-z_]+):", line):
            flush()
            section = m.group(1)
        elif line.startswith("  # ") and (lines or _KEY.match(line[4:])):
            lines.append(line[4:])
        else:
            flush()
    flush()
    return blocks


@pytest.mark.parametrize("name", TEMPLATES)
def test_commented_out_keys_show_the_schema_defaults(name):
    text = render_project_file(get_template(name), "t")
    defaults = project_model()(name="t")
    for section, first, block in commented_blocks(text):
        model = type(getattr(defaults, section))
        assert set(block) <= set(model.model_fields), f"{name}: {section}: {first!r} names unknown keys"
        shown = model.model_validate(block)
        for key in block:
            assert getattr(shown, key) == getattr(getattr(defaults, section), key), (
                f"{name}: the commented {section}.{key} is not the default"
            )


def test_the_tiny_template_documents_the_default_filter_steps():
    blocks = commented_blocks(render_project_file(get_template("tiny"), "t"))
    assert any(section == "filter" and "steps" in block for section, _, block in blocks)


def test_the_tiny_template_comments_quote_the_config():
    text = render_project_file(get_template("tiny"), "t")
    m = re.search(r"word (\d+)-grams, (\d+) bands x (\d+) rows", text)
    assert m is not None
    d = DedupConfig()
    assert tuple(map(int, m.groups())) == (d.n_grams, d.bands, d.rows)
    specials = re.search(r"special tokens ((?:<\|\w+\|> ?)+)", text)
    assert specials is not None and specials.group(1).split() == DEFAULT_SPECIAL_TOKENS
    cfg = load_config(project_model(), None, defaults=yaml.safe_load(text))
    pct = re.search(r"(\d+)% of documents \(by id hash\) go to val", text)
    assert pct is not None and int(pct.group(1)) / 100 == cfg.tokenize.val_fraction


@pytest.mark.parametrize("name", TEMPLATES)
def test_init_suggests_what_the_template_needs(tmp_path, name):
    template = get_template(name)
    made = run_cli("init", "proj", "--template", name, cwd=tmp_path)
    assert made.code == 0, made.stderr
    assert f"Next: cd proj && {template.next}" in made.stdout
    assert ("Needs: " in made.stdout) is (template.requires is not None)
    for command in template.next.split("&&"):  # each suggested command exists
        argv = shlex.split(command)
        assert argv[0] == "llmctl"
        assert run_cli(*argv[1:2], "--help").code == 0, command


def test_the_hub_and_gpu_template_does_not_suggest_a_plain_run(tmp_path):
    made = run_cli("--json", "init", "gpt2", "--template", "gpt2-fineweb", cwd=tmp_path).json()
    assert made["next"] != "llmctl run" and "--gpus 8" in made["next"]
    assert "hub" in made["requires"] and "8 GPUs" in made["requires"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_data_stages_fit_a_small_machine(name):
    text = render_project_file(get_template(name), "t")
    project = load_config(project_model(), None, defaults=yaml.safe_load(text))
    check_limits(["dedup", "filter", "tokenize"], project, machine=Machine(cores=2, memory_bytes=4 * 1024**3))
