"""Give a model and its tokenizer what chat training needs: a chat template and its special tokens.

    tok, message = ensure_chat_template(model, load_folder_tokenizer(base_folder))
    if message: reporter.log(message)       # e.g. "added <|im_start|>, <|im_end|> ...; embeddings 512 -> 514"
    save_tokenizer_files(tok, out_folder)    # the published folder carries the template sft trained with

The template lives in the tokenizer files (tokenizer_config.json or chat_template.jinja) and every
consumer renders it through `FolderTokenizer.render_chat`. llmctl's own tokenizers carry ChatML
(`llmctl.data.tokenizer.CHATML_TEMPLATE`) and its tokens from `llmctl tokenize` on; an imported chat
model keeps its own template. A base tokenizer with no template gets ChatML, and its special tokens are
added when missing, with new embedding rows set to the mean of the existing ones (a new token starts as
an average token instead of a random one, whose logits would be arbitrary; Hewitt 2021,
https://nlp.stanford.edu/~johnhew/vocab-expansion.html). A tied head stays tied.

`CHATML_TRAINING_TEMPLATE` is ChatML with `{% generation %}` around what the assistant must produce.
It renders the same bytes as ChatML; transformers and TRL read the markers to build assistant masks,
which is what the tests compare llmctl's masks against.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from llmctl.data.tokenizer import CHATML_TEMPLATE, IM_END, IM_START, added_tokens_decoder
from llmctl.model.checkpoint import TOKENIZER_FILES
from llmctl.model.hf_tokenizer import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON,
    LLMCTL_TOKENIZER_META,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    FolderTokenizer,
    chat_templates,
    default_chat_template,
)
from llmctl.model.transformer import Transformer

CHATML_TRAINING_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TOKENS = (IM_START, IM_END)


def ensure_chat_template(model: Transformer, tok: FolderTokenizer) -> tuple[FolderTokenizer, str | None]:
    """(tokenizer ready for chat training, message for the output or None when nothing changed).

    A tokenizer with a chat template is returned as is. Without one it gets ChatML, any missing ChatML
    token is added as a special token, and `model`'s embeddings (and untied head) grow in place to hold
    the new ids."""
    if tok.chat_template:
        return tok, None
    hf = tok.tokenizer
    missing = [t for t in CHAT_TOKENS if hf.token_to_id(t) is None]
    notes = ["no chat template: using ChatML"]
    if missing:
        import tokenizers

        hf = tokenizers.Tokenizer.from_str(hf.to_str())  # the caller's tokenizer stays as it was
        hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        new_ids = [hf.token_to_id(t) for t in missing]
        before = model.config.vocab_size
        resize_embeddings(model, max(before, hf.get_vocab_size(with_added_tokens=True)), new_ids)
        notes.append(
            f"added {', '.join(missing)} to the tokenizer (ids {', '.join(map(str, new_ids))}); "
            f"embeddings {before} -> {model.config.vocab_size} rows, new rows = mean of the existing ones"
        )
    stops = {*tok.stop_ids, hf.token_to_id(IM_END)}
    chat_tok = dataclasses.replace(
        tok, tokenizer=hf, chat_template=CHATML_TEMPLATE, stop_ids=tuple(sorted(stops))
    )
    return chat_tok, "; ".join(notes)


@torch.no_grad()
def resize_embeddings(model: Transformer, vocab_size: int, init_ids: list[int]) -> None:
    """Give `model` `vocab_size` embedding rows (and head rows), set rows `init_ids` to the mean of the
    rows that are not being initialised; a tied head keeps sharing the embedding tensor."""
    old = model.model.embed_tokens.weight
    keep = torch.ones(old.shape[0], dtype=torch.bool)
    keep[[i for i in init_ids if i < old.shape[0]]] = False

    def grown(weight: torch.Tensor) -> torch.Tensor:
        new = weight.new_empty((vocab_size, weight.shape[1]))
        n = min(vocab_size, weight.shape[0])
        new[:n] = weight[:n]
        new[init_ids] = weight[keep].mean(dim=0)
        return new

    embed = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    embed.weight.copy_(grown(old))
    model.model.embed_tokens = embed
    head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
    if model.config.tie_embeddings:
        head.weight = embed.weight
    else:
        head.weight.copy_(grown(model.lm_head.weight))
    model.lm_head = head
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)


def save_tokenizer_files(tok: FolderTokenizer, folder: str | Path) -> None:
    """Write `tok` into a model folder: its source folder's tokenizer files, then, where `tok` differs
    from them (tokens added, ChatML assigned), its tokenizer.json and template in tokenizer_config.json."""
    import tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, LLMCTL_TOKENIZER_META):
        if (tok.folder / name).is_file():
            shutil.copy2(tok.folder / name, folder / name)
    source = tok.tokenizer.to_str()
    same_tokens = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON)).to_str() == source
    if same_tokens and default_chat_template(chat_templates(folder)) == tok.chat_template:
        return
    (folder / TOKENIZER_JSON).write_text(source, encoding="utf-8")
    config_path = folder / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config["added_tokens_decoder"] = added_tokens_decoder(tok.tokenizer.get_added_tokens_decoder())
    extra = config.get("additional_special_tokens") or []
    config["additional_special_tokens"] = [*extra, *(t for t in CHAT_TOKENS if t not in extra)]
    config["chat_template"] = tok.chat_template
    for name in (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON):  # either would win over the config's template
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / CHAT_TEMPLATE_DIR, ignore_errors=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
