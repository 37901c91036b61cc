"""Project templates and `llmctl init`: create a project folder from `templates/<name>/`.

A template folder holds `llmctl.yaml` (commented; `{{name}}` is replaced by the project name) and
`template.yaml` describing it, what it needs (`requires`: network, GPUs), the command to run next
(`next`), and how to make its data (e.g. the seeded synthetic corpus, so the tiny template needs no
network).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmctl.errors import InputError, UsageError

PROJECT_FILE = "llmctl.yaml"


def templates_dir() -> Path:
    """Templates ship beside the package in a checkout, or under <prefix>/share/llmctl when installed."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "templates",
        Path(sys.prefix) / "share" / "llmctl" / "templates",
    ):
        if candidate.is_dir():
            return candidate
    raise InputError("project templates not found", hint="reinstall llmctl (pip install -e .)")


DEFAULT_NEXT = "llmctl run"


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    folder: Path
    data: dict[str, Any]
    next: str = DEFAULT_NEXT  # the command to run in the new project
    requires: str | None = None  # what that command needs beyond this machine (network, GPUs)


def list_templates() -> list[Template]:
    found = []
    for folder in sorted(templates_dir().iterdir()):
        meta_file = folder / "template.yaml"
        if not (folder / PROJECT_FILE).is_file() or not meta_file.is_file():
            continue
        meta = yaml.safe_load(meta_file.read_text()) or {}
        found.append(
            Template(
                folder.name,
                meta.get("description", ""),
                folder,
                meta.get("data") or {},
                next=meta.get("next") or DEFAULT_NEXT,
                requires=meta.get("requires"),
            )
        )
    return found


def get_template(name: str) -> Template:
    templates = {t.name: t for t in list_templates()}
    if name not in templates:
        raise UsageError(f"unknown template {name!r}", hint=f"templates: {', '.join(templates)}")
    return templates[name]


def render_project_file(template: Template, name: str) -> str:
    return (template.folder / PROJECT_FILE).read_text().replace("{{name}}", name)


def init_project(dest: Path, template_name: str = "tiny", name: str | None = None) -> dict[str, Any]:
    """Create `dest` from a template; refuses to touch an existing project. Returns what was made."""
    template = get_template(template_name)
    if (dest / PROJECT_FILE).exists():
        raise UsageError(f"{dest / PROJECT_FILE} already exists", hint="choose a new folder name")
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"{dest} exists and is not empty", hint="choose a new folder name")
    name = name or dest.name
    staging = dest.with_name(f".{dest.name}.init-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / "data").mkdir()
        (staging / PROJECT_FILE).write_text(render_project_file(template, name))
        made: dict[str, Any] = {
            "project": str(dest),
            "template": template.name,
            "files": [PROJECT_FILE],
            "next": template.next,
            "requires": template.requires,
        }
        synthetic = template.data.get("synthetic")
        if synthetic:
            from llmctl.data.synthetic import generate_corpus

            generate_corpus(
                staging / "data", n_docs=int(synthetic["docs"]), seed=int(synthetic.get("seed", 0))
            )
            if synthetic.get("conversations"):  # chat data, preference pairs and RL prompts about one world
                from llmctl.data.synthetic_chat import generate_chat
                from llmctl.data.synthetic_preferences import DEFAULT_PAIRS, generate_preferences
                from llmctl.data.synthetic_rl import generate_rl_prompts

                seed = int(synthetic.get("seed", 0))
                generate_chat(staging / "data", int(synthetic["conversations"]), seed=seed)
                generate_preferences(
                    staging / "data", int(synthetic.get("preferences", DEFAULT_PAIRS)), seed=seed
                )
                generate_rl_prompts(staging / "data", seed=seed)
            made["files"] += sorted(f"data/{p.name}" for p in (staging / "data").iterdir())
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)  # all or nothing: an interrupted init leaves no half project
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return made
