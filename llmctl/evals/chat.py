"""Generative chat tasks: ask a model in its chat format, generate greedily, score the answer.

    prompts = ChatPrompts.of(lm.folder_tokenizer)               # the model's own template
    per, details = run_chat(lm, items, prompts, max_gen_tokens=32)
    per["exact_match"], per["contains"], per["stopped"]          # one score per item

Each item's prompt is one user turn (after its system prompt, if any), rendered by the model folder's
tokenizer loader with `add_generation_prompt` (`FolderTokenizer.encode_chat`: the path `llmctl chat`
takes) and generated greedily until one of the model's stop ids. `stopped` is 1 when the answer ended
at the template's end-of-turn token (`<|im_end|>` for ChatML): a chat model that never ends its turn
is a known fine-tuning failure that exact match alone would hide.

A base model is asked the same way: `ChatPrompts.of(base_tok, template=prompts.template)` renders with
the chat model's template. A model with no template of its own is asked in ChatML. When the tokenizer
lacks the template's special tokens, the rendered text is encoded as plain text; `notes` says so.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from llmctl.data.tokenizer import CHATML_TEMPLATE
from llmctl.errors import InputError
from llmctl.evals import tasks as T
from llmctl.evals.lm import EvalLM
from llmctl.model.hf_tokenizer import FolderTokenizer
from llmctl.reporting import ProgressTask

CHAT_METRICS = ("exact_match", "contains", "stopped")
_SPECIAL_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<(?:start|end)_of_turn>")  # ChatML, Llama 3, Gemma
_PROBE = "\x00answer\x00"  # an assistant message no template changes, to find what follows it


@dataclass(frozen=True)
class ChatPrompts:
    """How to ask one model: its tokenizer carrying the template to render with, the id that ends an
    assistant turn in that template (None when the tokenizer has no such stop token), and notes."""

    tok: FolderTokenizer
    end_of_turn: int | None
    notes: tuple[str, ...] = ()

    @property
    def template(self) -> str:
        assert self.tok.chat_template is not None
        return self.tok.chat_template

    @classmethod
    def of(cls, tok: FolderTokenizer | None, template: str | None = None, *, whose: str = "") -> ChatPrompts:
        """Prompts for a model with tokenizer `tok`, rendered with `template` (default: its own, else
        ChatML). `whose` names the template's owner in the notes ("the sft model's")."""
        if tok is None:
            raise InputError(
                "chat tasks need the model folder's tokenizer files (tokenizer.json, its chat template)",
                hint="evaluate a model folder or artifact, not a bare model object",
            )
        notes = []
        if template is None and tok.chat_template is None:
            template = CHATML_TEMPLATE
            notes.append(f"{tok.folder}: no chat template; asked in ChatML")
        elif template is not None and template != tok.chat_template:
            notes.append(f"{tok.folder}: asked with {whose or 'another model’s'} chat template")
        chat_tok = dataclasses.replace(tok, chat_template=template or tok.chat_template)
        sample = chat_tok.render_chat(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}],
            add_generation_prompt=False,
        )
        missing = sorted({m for m in _SPECIAL_MARKER.findall(sample) if tok.tokenizer.token_to_id(m) is None})
        if missing:
            notes.append(
                f"{tok.folder}: the tokenizer has no {', '.join(missing)}: the rendered prompt is encoded "
                "as plain text, and the model cannot end its turn with an end-of-turn token"
            )
        return cls(chat_tok, _end_of_turn(chat_tok, sample), tuple(notes))

    def messages(self, item: T.Item) -> list[dict[str, str]]:
        system = [{"role": "system", "content": item.system}] if item.system is not None else []
        return [*system, {"role": "user", "content": item.prompt or ""}]

    def render(self, item: T.Item) -> str:
        return self.tok.render_chat(self.messages(item), add_generation_prompt=True)

    def encode(self, item: T.Item) -> list[int]:
        return self.tok.encode_chat(self.messages(item))


def _end_of_turn(tok: FolderTokenizer, sample: str) -> int | None:
    """The first stop id the template writes after an assistant message (`<|im_end|>` in ChatML)."""
    after = sample.split(_PROBE, 1)[1] if _PROBE in sample else ""
    ids = tok.tokenizer.encode(after, add_special_tokens=False).ids
    return next((i for i in ids if i in tok.stop_ids), None)


def run_chat(
    lm: EvalLM,
    items: list[T.Item],
    prompts: ChatPrompts,
    *,
    max_gen_tokens: int,
    batch_size: int = 16,
    progress: ProgressTask | None = None,
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Per-item scores ({metric: [score per item]}) and per-item details (rendered prompt, response,
    how it finished: end_of_turn, stop (another stop token, e.g. EOS) or length)."""
    encoded = [prompts.encode(item) for item in items]
    room = lm.max_length - max_gen_tokens
    for item, ids in zip(items, encoded, strict=True):
        if len(ids) > room:
            raise InputError(
                f"{item.where}: the rendered chat prompt has {len(ids)} tokens; with "
                f"{max_gen_tokens} to generate it does not fit the model's context of {lm.max_length}",
                hint="shorten the prompt or lower eval.chat_max_gen_tokens",
            )
    completions = lm.generate_tokens(
        encoded, max_gen_tokens=max_gen_tokens, batch_size=batch_size, progress=progress
    )
    ended = _ended_at(lm, encoded, completions, prompts.end_of_turn)
    per: dict[str, list[float]] = {m: [] for m in CHAT_METRICS}
    details = []
    for item, c, at_eot in zip(items, completions, ended, strict=True):
        text = c.text or ""
        scores = {**T.score_chat(item, text), "stopped": float(at_eot)}
        for m, v in scores.items():
            per[m].append(v)
        finish = "end_of_turn" if at_eot else c.finish_reason
        details.append(
            {
                "rendered": prompts.render(item),
                "response": text,
                "finish": finish,
                "tokens": len(c.tokens),
                **scores,
            }
        )
    return per, details


def _ended_at(lm: EvalLM, prompts: list[list[int]], completions: list, token: int | None) -> list[bool]:
    """Whether each completion stopped on `token`. The engine stops at any of the model's stop ids
    without saying which; under greedy decoding it was `token` exactly when `token` is the greedy
    next token after the response, which one scoring pass over the stopped rows tells."""
    stopped = [c.finish_reason == "stop" for c in completions]
    if token is None:
        return [False] * len(completions)
    if set(lm.stop_ids) == {token}:
        return stopped
    rows = [i for i, s in enumerate(stopped) if s]
    lls = lm.loglikelihood_tokens([(prompts[i] + completions[i].tokens, [token]) for i in rows])
    ended = [False] * len(completions)
    for i, ll in zip(rows, lls, strict=True):
        ended[i] = ll.is_greedy
    return ended
