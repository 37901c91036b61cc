"""A model folder's tokenizer, special tokens and chat template, read the way `transformers` reads them.

One loader for every consumer of a model folder (`llmctl generate`, `llmctl chat`, evaluation):

    tok = load_folder_tokenizer(folder)
    tok.encode("Hello")                                  # BOS first when the model was trained so
    tok.render_chat([{"role": "user", "content": "hi"}])  # == transformers' apply_chat_template(...)

Where transformers keeps a chat template, newest layout first (a separate file wins over the entry in
tokenizer_config.json, as in `PreTrainedTokenizerBase.from_pretrained`):
- `chat_template.jinja` (transformers >= 4.50 writes this), with named extras in
  `additional_chat_templates/NAME.jinja`;
- `chat_template.json` (`{"chat_template": "..."}`, the processor layout);
- `tokenizer_config.json` `chat_template`: a string, or a list of `{"name", "template"}`.
With several named templates the one named `default` is used.

Rendering uses the environment transformers uses (sandboxed, trim/lstrip blocks, loop controls,
its `tojson`, `raise_exception`, `strftime_now` and a pass-through `{% generation %}` tag), with the
tokenizer's special tokens as variables, so the prompt is byte-identical to `apply_chat_template`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmctl.errors import InputError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CHAT_TEMPLATE_JSON = "chat_template.json"
LLMCTL_TOKENIZER_META = "llmctl_tokenizer.json"  # written by llmctl's tokenizer: BOS before every document
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_templates(folder: Path, tok_config: dict[str, Any] | None = None) -> dict[str, str]:
    """Every chat template stored in `folder`, by name (`default` for the unnamed one)."""
    folder = Path(folder)
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    legacy = _read_json(folder / CHAT_TEMPLATE_JSON).get("chat_template")
    if isinstance(legacy, str):
        return {"default": legacy}
    config = _read_json(folder / TOKENIZER_CONFIG) if tok_config is None else tok_config
    entry = config.get("chat_template")
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list):
        return {
            item["name"]: item["template"]
            for item in entry
            if isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        }
    return {}


def default_chat_template(templates: dict[str, str]) -> str | None:
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:
        return next(iter(templates.values()))
    return None


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass
class FolderTokenizer:
    """A model folder's `tokenizers.Tokenizer` with its special tokens and chat template.

    The folder's BOS, EOS and stop ids are decided here, once, for every consumer (generate, chat,
    eval): `bos_id`/`eos_id` from config.json (what the model was trained with), else the token
    texts; `stop_ids` is EOS plus every id generation_config.json lists as `eos_token_id` plus the
    end-of-turn/end-of-text tokens the vocabulary has; `prompt_bos` is the BOS a prompt starts with."""

    tokenizer: Any  # tokenizers.Tokenizer
    folder: Path
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    add_bos: bool = False  # llmctl-trained models saw BOS before every document; others say so in config
    stop_ids: tuple[int, ...] = ()

    @property
    def prompt_bos(self) -> int | None:
        """The id a prompt starts with: BOS when the model expects it, else none."""
        return self.bos_id if self.add_bos else None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as a prompt: BOS first when the model expects it, no other specials."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.prompt_bos] if self.prompt_bos is not None else []) + ids

    def stop_token_ids(self) -> tuple[int, ...]:
        return self.stop_ids

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` (by default ending with the assistant's turn opened)."""
        if not self.chat_template:
            raise InputError(
                f"{self.folder}: this model has no chat template (looked for {CHAT_TEMPLATE_FILE}, "
                f"{CHAT_TEMPLATE_DIR}/, {CHAT_TEMPLATE_JSON} and `chat_template` in {TOKENIZER_CONFIG})",
                hint="use `llmctl generate` for a base model, or add the template as chat_template.jinja",
            )
        import jinja2

        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise InputError(f"{self.folder}: the chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The rendered chat as ids; the template writes its own special tokens (BOS included)."""
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids


def load_folder_tokenizer(folder: str | Path) -> FolderTokenizer:
    """Read `tokenizer.json`, the special tokens and the chat template of a model folder."""
    import tokenizers

    folder = Path(folder)
    tokenizer_file = folder / TOKENIZER_JSON
    if not tokenizer_file.is_file():
        raise InputError(
            f"{folder}: no {TOKENIZER_JSON} in the model folder",
            hint="a model artifact carries its tokenizer; import (`llmctl import`) or train it with llmctl",
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    tok_config = _read_json(folder / TOKENIZER_CONFIG)
    special_map = _read_json(folder / "special_tokens_map.json")
    specials = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(tok_config.get(key)) or _token_text(special_map.get(key))
        if text is not None:
            specials[key] = text
    model_config = _read_json(folder / "config.json")

    def special_id(role: str) -> int | None:
        # config.json's id is what the model was trained with; the token text is the fallback.
        value = model_config.get(f"{role}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
        text = specials.get(f"{role}_token")
        return tokenizer.token_to_id(text) if text else None

    eos_id = special_id("eos")
    listed = _read_json(folder / "generation_config.json").get("eos_token_id")
    stops = {eos_id, *(listed if isinstance(listed, list) else [listed])}
    stops |= {
        tokenizer.token_to_id(t) for t in (specials.get("eos_token"), "<|im_end|>", "<|endoftext|>") if t
    }
    return FolderTokenizer(
        tokenizer=tokenizer,
        folder=folder,
        special_tokens=specials,
        bos_id=special_id("bos"),
        eos_id=eos_id,
        stop_ids=tuple(sorted(i for i in stops if isinstance(i, int))),
        chat_template=default_chat_template(chat_templates(folder, tok_config)),
        add_bos=(folder / LLMCTL_TOKENIZER_META).is_file() or bool(tok_config.get("add_bos_token", False)),
    )
