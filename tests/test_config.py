"""llmctl.yaml validation, error messages with key paths and lines, and --set overrides."""

from __future__ import annotations

import json

import pytest

from llmctl.config.loading import load_config, parse_override
from llmctl.config.project import ProjectConfig
from llmctl.errors import ConfigError, UsageError


def _write(tmp_path, text):
    path = tmp_path / "llmctl.yaml"
    path.write_text(text)
    return path


def test_valid_file_fills_defaults(tmp_path):
    cfg = load_config(ProjectConfig, _write(tmp_path, "name: p\ndedup:\n  bands: 20\n"))
    assert cfg.name == "p" and cfg.dedup.bands == 20 and cfg.dedup.rows == 8


def test_all_errors_reported_at_once_with_key_paths_and_lines(tmp_path):
    path = _write(
        tmp_path,
        "name: p\n"
        "dedup:\n"
        "  bands: many\n"  # line 3: wrong type
        "  colour: red\n"  # line 4: unknown key
        "unknown_section: 1\n",  # line 5
    )
    with pytest.raises(ConfigError) as err:
        load_config(ProjectConfig, path)
    lines = err.value.errors
    assert len(lines) == 3
    assert any(line.startswith("llmctl.yaml:3: dedup.bands:") and "integer" in line for line in lines)
    assert "llmctl.yaml:4: dedup.colour: unknown key" in lines
    assert "llmctl.yaml:5: unknown_section: unknown key" in lines
    assert err.value.exit_code == 2


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(ProjectConfig, _write(tmp_path, "workspace: ws\n"))
    assert any("name: Field required" in line for line in err.value.errors)


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"llmctl.yaml:4: malformed YAML"):
        load_config(ProjectConfig, _write(tmp_path, "name: p\ndedup:\n  bands: [1, 2\n  rows: 3\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(ProjectConfig, tmp_path / "llmctl.yaml")


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    path = _write(tmp_path, "name: p\ndata:\n  sources:\n    - path: a.jsonl\n")
    cfg = load_config(
        ProjectConfig,
        path,
        ["dedup.bands=20", "dedup.exact=false", "data.sources.0.limit=10", "dedup.engine=datatrove"],
    )
    assert cfg.dedup.bands == 20 and cfg.dedup.exact is False
    assert cfg.data.sources[0].limit == 10 and cfg.dedup.engine == "datatrove"
    with pytest.raises(ConfigError) as err:
        load_config(ProjectConfig, path, ["dedup.bands=lots", "dedup.nope=1"])
    assert any(line.startswith("--set: dedup.bands:") for line in err.value.errors)
    assert "--set: dedup.nope: unknown key" in err.value.errors


@pytest.mark.parametrize("bad", ["dedup.bands", "=3", "dedup..bands=3", ""])
def test_bad_set_syntax(bad):
    with pytest.raises(UsageError, match="bad --set"):
        parse_override(bad)


def test_schema_is_json_schema_with_descriptions():
    schema = ProjectConfig.model_json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["workspace"]["description"]
