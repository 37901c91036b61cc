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


def test_duplicate_keys_are_an_error_with_both_lines(tmp_path):
    path = _write(
        tmp_path,
        "name: p\npretrain:\n  max_steps: 10\ndedup:\n  bands: 20\npretrain:\n  max_steps: 99\n",
    )
    with pytest.raises(ConfigError, match=r"^llmctl.yaml:6: duplicate key pretrain \(first at line 2\)$"):
        load_config(ProjectConfig, path)
    nested = _write(tmp_path, "name: p\ndedup:\n  bands: 20\n  rows: 4\n  bands: 10\n")
    with pytest.raises(ConfigError, match=r"llmctl.yaml:5: duplicate key dedup.bands \(first at line 3\)"):
        load_config(ProjectConfig, nested)
    with pytest.raises(UsageError, match=r"duplicate key bands"):
        parse_override("dedup={bands: 2, bands: 3}")


def test_merge_keys_and_single_anchors_still_load(tmp_path):
    path = _write(
        tmp_path,
        "name: p\ndata:\n  sources:\n    - &src {path: a.jsonl, limit: 5}\n    - <<: *src\n      path: b.jsonl\n",
    )
    cfg = load_config(ProjectConfig, path)
    assert [(s.path, s.limit) for s in cfg.data.sources] == [("a.jsonl", 5), ("b.jsonl", 5)]


def _alias_bomb(levels: int) -> str:
    rows = ["name: p", 'x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(rows) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path, cli):
    (tmp_path / "llmctl.yaml").write_text(_alias_bomb(10))
    assert len(_alias_bomb(10)) < 3000
    result = cli("config", "validate", cwd=tmp_path, timeout=60)
    assert result.code == 2, result.stderr
    assert "expands to more than 200,000 nodes through its anchors and aliases" in result.stderr
    with pytest.raises(UsageError, match="expands to more than"):
        parse_override("dedup.bands=" + _alias_bomb(8).split("\n", 1)[1].replace("\n", ", ").join("{}"))
