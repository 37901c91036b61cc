"""One conversation -> `input_ids` and `labels` for supervised fine-tuning, with the loss on assistant turns only.

    example = tokenize_conversation(tok, messages)                 # tok: load_folder_tokenizer(folder)
    example.input_ids, example.labels                              # labels: -100 where nothing is trained
    tokenize_conversation(tok, messages, turns="last")             # only the final assistant turn
    inspect_conversation(tok, messages).segments                   # [(text, trained), ...] for --inspect

What is trained (TRL's `assistant_only_loss`, transformers' `return_assistant_tokens_mask`): each
assistant turn from the first character after the generation prompt (`<|im_start|>assistant\\n` in
ChatML) through the end-of-turn token and whatever the template writes before the next turn starts
(ChatML: `<|im_end|>\\n`). A model that never sees its end-of-turn token in the loss never learns to stop.

The spans come from prefix renders with the model's own template, through the one renderer every
consumer uses (`FolderTokenizer.render_chat`): the text the model must produce for assistant turn i is
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True). This works for any
prefix-preserving template with no `{% generation %}` markers; where markers exist, transformers' mask
over them is the reference the tests compare against. A token is trained when its characters overlap
a trained span (the rule transformers uses), so a token straddling a span edge is trained.

`labels` use the Hugging Face convention (same length as `input_ids`, the model shifts); the packer
(`llmctl.train.packing`) turns them into next-token targets per conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmctl.errors import InputError
from llmctl.model.hf_tokenizer import FolderTokenizer
from llmctl.model.transformer import IGNORE_INDEX

Turns = Literal["all", "last"]

# Probe for check_end_of_turn_trained: an assistant turn followed by another turn, because some
# templates leave the final assistant turn open.
_PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


@dataclass(frozen=True)
class ChatExample:
    """One tokenized conversation: ids and labels (-100 = no loss) of equal length."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def truncated(self, length: int) -> ChatExample:
        """The first `length` tokens (the start holds the system prompt and the question)."""
        return ChatExample(self.input_ids[:length], self.labels[:length])


@dataclass(frozen=True)
class ChatInspection:
    """What `llmctl sft --inspect` shows: the rendered text and each token with its trained flag."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in `text`
    trained: list[bool]

    @property
    def segments(self) -> list[tuple[str, bool]]:
        """The text cut where the trained flag changes; the pieces concatenate to `text`."""
        out: list[tuple[str, bool]] = []
        start = 0
        for i in range(1, len(self.input_ids) + 1):
            if i == len(self.input_ids) or self.trained[i] != self.trained[i - 1]:
                # Cut at the next token's start so no character is lost where offsets leave gaps.
                end = len(self.text) if i == len(self.input_ids) else self.offsets[i][0]
                out.append((self.text[start:end], self.trained[i - 1]))
                start = end
        return out

    def to_json(self) -> dict[str, Any]:
        """The token mask as data: one entry per token with its id, text and trained flag.

        A character split over several byte-level tokens goes to the first of them (the others get
        ""), so the tokens' texts concatenate to `text`."""
        tokens, done = [], 0
        for i, (start, end), trained in zip(self.input_ids, self.offsets, self.trained, strict=True):
            tokens.append({"id": i, "text": self.text[max(start, done) : end], "trained": trained})
            done = max(done, end)
        return {
            "text": self.text,
            "n_tokens": len(self.input_ids),
            "n_trained": sum(self.trained),
            "tokens": tokens,
        }


def trained_spans(
    tok: FolderTokenizer, messages: list[dict[str, Any]], *, turns: Turns = "all"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans (start, end) of the assistant output trained."""
    text = tok.render_chat(messages, add_generation_prompt=False)
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if turns == "last":
        assistant = assistant[-1:]
    spans = []
    for i in assistant:
        prompt = tok.render_chat(messages[:i], add_generation_prompt=True)
        through_turn = tok.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise InputError(
                f"{tok.folder}: the chat template renders message {i + 1} differently once later messages "
                "follow (it is not prefix-preserving), so the assistant's text cannot be located",
                hint="use a template that renders earlier turns the same whatever follows (ChatML does)",
            )
        if len(through_turn) > len(prompt):
            spans.append((len(prompt), len(through_turn)))
    return text, spans


def _encode_with_mask(
    tok: FolderTokenizer, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    # The template writes its own special tokens (BOS included), so none are added here; special-token
    # text inside the rendered string is recognised, as in transformers' apply_chat_template.
    enc = tok.tokenizer.encode(text, add_special_tokens=False)
    trained = []
    span = 0
    for start, end in enc.offsets:
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        trained.append(span < len(spans) and end > spans[span][0])
    return list(enc.ids), [tuple(o) for o in enc.offsets], trained


def inspect_conversation(
    tok: FolderTokenizer,
    messages: list[dict[str, Any]],
    *,
    turns: Turns = "all",
    train_on_prompt: bool = False,
) -> ChatInspection:
    """The rendered conversation, its tokens and which of them carry loss (see the module docstring)."""
    text, spans = trained_spans(tok, messages, turns=turns)
    ids, offsets, trained = _encode_with_mask(tok, text, spans)
    if train_on_prompt:
        trained = [True] * len(ids)
    return ChatInspection(text=text, input_ids=ids, offsets=offsets, trained=trained)


def tokenize_conversation(
    tok: FolderTokenizer,
    messages: list[dict[str, Any]],
    *,
    turns: Turns = "all",
    train_on_prompt: bool = False,
) -> ChatExample:
    """`input_ids` of the rendered conversation and `labels` that are -100 outside trained spans.

    turns: "all" assistant turns or only the "last"; train_on_prompt: every token carries loss."""
    seen = inspect_conversation(tok, messages, turns=turns, train_on_prompt=train_on_prompt)
    labels = [i if t else IGNORE_INDEX for i, t in zip(seen.input_ids, seen.trained, strict=True)]
    return ChatExample(seen.input_ids, labels)


def check_end_of_turn_trained(tok: FolderTokenizer) -> None:
    """Raise InputError unless an assistant turn's trained span ends on a stop token (e.g. <|im_end|>).

    Otherwise the model is never taught to end its turn and generates until the length limit."""
    seen = inspect_conversation(tok, _PROBE)
    tokens = seen.to_json()["tokens"]
    last = next((t["id"] for t in reversed(tokens) if t["trained"] and t["text"].strip()), None)
    if last is None or last not in tok.stop_ids:
        found = "nothing" if last is None else repr(tok.tokenizer.id_to_token(last))
        raise InputError(
            f"{tok.folder}: the chat template's assistant turn ends with {found}, not with a stop token "
            f"(ids {list(tok.stop_ids)}); a model trained on it would not learn to end its turn",
            hint="give the tokenizer a template whose assistant turns end with an end-of-turn token "
            "(ChatML: <|im_end|>), or remove its chat template so ChatML is used",
        )
