"""Load a model folder for generation: the model, its tokenizer, its chat template, one Engine.

Shared by `llmctl generate`, `llmctl chat` and (later) serving. A model folder carries its tokenizer
files (tokenizer.json, tokenizer_config.json with the chat template), so nothing is guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import InputError


@dataclass
class LoadedModel:
    engine: Any  # llmctl.model.engine.Engine
    tokenizer: Any  # tokenizers.Tokenizer
    config: Any  # ModelConfig
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    add_bos: bool  # llmctl-trained models saw BOS before every document; others say so in their config

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.tokenizer.token_to_id(self.bos_token) if self.bos_token and self.add_bos else None
        return ([bos] if bos is not None else []) + ids

    def stop_token_ids(self) -> tuple[int, ...]:
        ids = {self.tokenizer.token_to_id(t) for t in (self.eos_token, "<|im_end|>", "<|endoftext|>") if t}
        return tuple(sorted(i for i in ids if i is not None))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to `messages`, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise InputError(
                "this model's tokenizer has no chat template", hint="use `llmctl generate` instead"
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_model(folder: Path, *, device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """Load the model and tokenizer stored in an HF-compatible model folder."""
    import tokenizers

    from llmctl.model.checkpoint import load_model_folder
    from llmctl.model.engine import Engine

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InputError(
            f"{folder}: no tokenizer.json in the model folder", hint="import or train it with llmctl"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    config_file = folder / "tokenizer_config.json"
    tok_config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model, cfg = load_model_folder(folder, device=device, dtype=dtype)
    return LoadedModel(
        engine=Engine(model, tokenizer),
        tokenizer=tokenizer,
        config=cfg,
        bos_token=_token_text(tok_config.get("bos_token")),
        eos_token=_token_text(tok_config.get("eos_token")),
        chat_template=tok_config.get("chat_template"),
        add_bos=(folder / "llmctl_tokenizer.json").is_file() or bool(tok_config.get("add_bos_token", False)),
    )
