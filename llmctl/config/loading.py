"""Load llmctl.yaml, apply `--set key.path=value` overrides, validate, and report every error at once.

Errors name the key path and, where the key comes from the file, its line:
    llmctl.yaml:12: dedup.bands: Input should be a valid integer, unable to parse string as an integer
Overrides are parsed as YAML scalars/flow values (`--set dedup.bands=20`, `--set data.sources=[...]`)
and typed by the schema, so a wrong type fails exactly like it would in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from llmctl.errors import ConfigError, UsageError

PROJECT_FILE = "llmctl.yaml"

M = TypeVar("M", bound=BaseModel)


def find_project_dir(start: Path) -> Path | None:
    """The nearest folder at or above `start` that holds llmctl.yaml (as git finds .git)."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / PROJECT_FILE).is_file():
            return folder
    return None


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (['a', 'b', 0, 'c'], parsed value). Raises UsageError on bad syntax."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(
            f"bad --set {text!r}: expected KEY.PATH=VALUE",
            hint="for example: --set dedup.bands=20 --set data.sources.0.limit=1000",
        )
    try:
        value = safe_yaml_load(raw, "value") if raw.strip() else ""
    except ConfigError as exc:  # its message starts "value:LINE: "; the value is one --set item
        problem = exc.message.split(": ", 1)[1]
        raise UsageError(f"bad --set {text!r}: {problem}", hint=exc.hint) from None
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    return path, value


def apply_override(data: dict, path: list[str | int], value: Any, origin: str) -> None:
    """Set `value` at `path` inside nested dicts/lists, creating dicts on the way."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise UsageError(f"{origin}: {_dotted(path[: i + 1])} does not exist (no list item {part})")
            if not isinstance(node[part], dict | list):
                node[part] = {}
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise UsageError(f"{origin}: {_dotted(path[:i])} is not a mapping")
            if not isinstance(node.get(part), dict | list):
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise UsageError(f"{origin}: {_dotted(path)} does not exist")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise UsageError(f"{origin}: {_dotted(path[:-1])} is not a mapping")
        node[last] = value


def _dotted(path: tuple | list) -> str:
    return ".".join(str(p) for p in path)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader; the composed node tree is checked (`_check_tree`) before anything is constructed."""


# A real project file has hundreds of nodes (a long source list: tens of thousands). Anchors and
# aliases share nodes, so a few KB of nested aliases expand to billions when walked or validated
# (an "alias bomb"); count nodes as expanded and stop long before that hurts.
MAX_YAML_NODES = 200_000


def _check_tree(root: yaml.Node | None, source: str) -> dict[str, int]:
    """Walk the composed tree as it will be expanded: the line of every key path, duplicate keys and
    alias expansion refused. Raises ConfigError naming the lines."""
    lines: dict[str, int] = {}
    expanded = 0

    def walk(node: yaml.Node | None, path: tuple) -> None:
        nonlocal expanded
        expanded += 1
        if expanded > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} nodes through its anchors "
                "and aliases (&name / *name)",
                hint="write the repeated parts out, or reference them fewer times",
            )
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in first_line:
                        key = _dotted((*path, key_node.value))
                        raise ConfigError(
                            f"{source}:{line}: duplicate key {key} (first at line "
                            f"{first_line[key_node.value]})",
                            hint="merge the two into one, or delete one of them",
                        )
                    first_line[key_node.value] = line
                sub = (*path, key_node.value)
                lines.setdefault(_dotted(sub), line)
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = (*path, i)
                lines.setdefault(_dotted(sub), item.start_mark.line + 1)
                walk(item, sub)

    walk(root, ())
    return lines


def _load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML text safely: (data, line of every dotted key path). Malformed YAML, duplicate keys
    and alias bombs are ConfigErrors naming `source` and the line."""
    loader = _LineLoader(text)
    try:
        root = loader.get_single_node()
        lines = _check_tree(root, source)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{where}: malformed YAML: {problem}", hint="fix the YAML syntax at that line"
        ) from None
    finally:
        loader.dispose()
    return data, lines


def safe_yaml_load(text: str, source: str) -> Any:
    """yaml.safe_load with duplicate keys and alias bombs refused (ConfigError naming `source`)."""
    return _load_yaml_with_lines(text, source)[0]


def format_validation_errors(
    exc: ValidationError, source: str, lines: dict[str, int], overridden: set[str]
) -> list[str]:
    """One `source:line: key.path: message` line per pydantic error."""
    out = []
    for err in exc.errors():
        # Discriminated unions put the tag in loc (e.g. ('steps', 0, 'gopher_quality', 'x')); drop it.
        loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
        key = _dotted(loc) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        where = source
        for n in range(len(loc), 0, -1):
            prefix = _dotted(loc[:n])
            if prefix in overridden:
                where = "--set"
                break
            if prefix in lines:
                where = f"{source}:{lines[prefix]}"
                break
        if where != "--set" and any(o.startswith(f"{key}.") for o in overridden):
            where += " (with --set)"  # a rule across fields of a section that an override touched
        out.append(f"{where}: {key}: {message}")
    return out


def load_config(
    model: type[M],
    path: Path | None,
    overrides: list[str] | None = None,
    *,
    defaults: dict | None = None,
    context: dict | None = None,
) -> M:
    """Read `path` (or start from `defaults` when None), apply overrides, validate into `model`.

    `context` reaches validators (e.g. {"base_dir": project folder} so file paths are checked)."""
    source = path.name if path is not None else "(defaults)"
    data: Any = dict(defaults or {})
    lines: dict[str, int] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file", hint="llmctl init NAME creates a project") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        data, lines = _load_yaml_with_lines(text, source)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}:1: the project file must be a mapping of sections")
    overridden: set[str] = set()
    for item in overrides or []:
        key_path, value = parse_override(item)
        apply_override(data, key_path, value, origin=f"--set {item}")
        overridden.add(_dotted(key_path))
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = format_validation_errors(exc, source, lines, overridden)
        noun = "error" if len(errors) == 1 else "errors"
        raise ConfigError(
            f"{source}: {len(errors)} config {noun}",
            errors=errors,
            hint="`llmctl config schema` lists every key; fix the keys named above",
        ) from None
