"""Load a model folder for generation: the model, its tokenizer and chat template, one Engine.

Shared by `llmctl generate`, `llmctl chat` and (later) serving. A model folder carries its tokenizer
files (tokenizer.json, tokenizer_config.json, chat_template.jinja), read by the one loader in
`llmctl.model.hf_tokenizer`, so nothing is guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.model.hf_tokenizer import FolderTokenizer, load_folder_tokenizer


@dataclass
class LoadedModel:
    engine: Any  # llmctl.model.engine.Engine
    tok: FolderTokenizer
    config: Any  # ModelConfig

    @property
    def tokenizer(self) -> Any:  # tokenizers.Tokenizer
        return self.tok.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def stop_token_ids(self) -> tuple[int, ...]:
        return self.tok.stop_token_ids()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to `messages`, ending with the assistant's turn opened."""
        return self.tok.render_chat(messages)


def load_model(folder: Path, *, device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """Load the model and tokenizer stored in an HF-compatible model folder."""
    from llmctl.model.checkpoint import load_model_folder
    from llmctl.model.engine import Engine

    tok = load_folder_tokenizer(folder)  # first: a folder without a tokenizer fails before the weights load
    model, cfg = load_model_folder(folder, device=device, dtype=dtype)
    return LoadedModel(engine=Engine(model, tok.tokenizer), tok=tok, config=cfg)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", '"': '"', "'": "'"}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", re.DOTALL)


def unescape(text: str) -> str:
    r"""Interpret the usual escapes a shell leaves in a quoted argument: \n \t \r \\ \0 \" \' \xHH \uHHHH.

    `--stop "\n"` reaches the program as backslash + n; a stop string of a newline is what was meant.
    Any other backslash sequence is kept as it is.
    """

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] in "ux" and len(code) > 1:
            return chr(int(code[1:], 16))
        return _ESCAPES.get(code, match.group(0))

    return _ESCAPE.sub(replace, text)
