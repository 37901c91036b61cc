"""SFT tokenization: one chat template, assistant-only labels (end-of-turn included), packing.

References are the real libraries: transformers' `apply_chat_template` (bytes, ids and
`return_assistant_tokens_mask` on a `{% generation %}`-marked template) and TRL's SFTTrainer with
`assistant_only_loss=True` (its tokenized dataset and its loss on the same tiny HF-format model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_random_model_folder

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_model_folder, save_model_folder
from llmctl.model.config import preset
from llmctl.model.hf_tokenizer import load_folder_tokenizer
from llmctl.model.transformer import IGNORE_INDEX, Transformer
from llmctl.train.chat_template import (
    CHATML_TRAINING_TEMPLATE,
    ensure_chat_template,
    resize_embeddings,
    save_tokenizer_files,
)
from llmctl.train.chat_tokens import (
    ChatExample,
    check_end_of_turn_trained,
    inspect_conversation,
    tokenize_conversation,
)
from llmctl.train.packing import collate_packed, collate_padded, fit_to_length, pack, packing_efficiency

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is the capital of Velmora?"},
        {"role": "assistant", "content": "Tessaly."},
    ],
    "system-multi-turn": [
        SYSTEM,
        {"role": "user", "content": "What is the capital of Velmora?"},
        {"role": "assistant", "content": "Tessaly."},
        {"role": "user", "content": 'And "quotes" <b>&</b> unicode: é?'},
        {"role": "assistant", "content": "Ünïcode, fine: 42 → forty-two."},
    ],
    # Content starting with whitespace makes a token straddle the prompt/answer edge; it is trained.
    "edge-whitespace": [
        {"role": "user", "content": "Spaces?\n"},
        {"role": "assistant", "content": "\n  indented\n"},
        {"role": "user", "content": " two"},
        {"role": "assistant", "content": " leading space"},
    ],
    "ends-with-user": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
}

# Generation markers around the last assistant message only: the reference for turns="last".
CHATML_LAST_ONLY_TEMPLATE = (
    "{% set ns = namespace(last=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if loop.index0 == ns.last %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random HF-Llama folder with llmctl's BPE and its ChatML template."""
    return write_random_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok(model_folder):
    return load_folder_tokenizer(model_folder)


@pytest.fixture(scope="module")
def hf_tok(model_folder):
    return transformers.AutoTokenizer.from_pretrained(model_folder)


def _hf_mask(hf_tok, messages, template):
    out = hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


# ---- 3. one chat template ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_saved_chatml_renders_and_encodes_like_transformers(tok, hf_tok, name):
    messages = CONVERSATIONS[name]
    for gen in (True, False):
        theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.render_chat(messages, add_generation_prompt=gen).encode() == theirs.encode()
        # The generation-marked copy is the same template for every byte it renders.
        marked = hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, chat_template=CHATML_TRAINING_TEMPLATE
        )
        assert marked.encode() == theirs.encode()
    assert tokenize_conversation(tok, messages).input_ids == list(
        hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )


def _base_folder(folder: Path, *, tie: bool) -> Path:
    """A base model without a chat template or chat tokens: a plain BPE saved by transformers."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    from llmctl.data.synthetic import iter_documents

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator((d["text"] for d in iter_documents(100, seed=2)), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=hf.get_vocab_size(), tie_embeddings=tie))
    eos = hf.token_to_id("<|endoftext|>")
    save_model_folder(model, folder, bos_token_id=eos, eos_token_id=eos)
    return folder


@pytest.mark.parametrize("tie", [True, False])
def test_base_tokenizer_gets_chatml_tokens_and_mean_initialised_rows(tmp_path, tie):
    base = _base_folder(tmp_path / "base", tie=tie)
    model, cfg = load_model_folder(base)
    before_embed = model.model.embed_tokens.weight.detach().clone()
    before_head = model.lm_head.weight.detach().clone()
    tok = load_folder_tokenizer(base)
    assert tok.chat_template is None and tok.tokenizer.token_to_id("<|im_end|>") is None

    chat_tok, message = ensure_chat_template(model, tok)

    assert message is not None and "<|im_start|>, <|im_end|>" in message and "ChatML" in message
    assert tok.tokenizer.token_to_id("<|im_end|>") is None  # the caller's tokenizer is not changed
    new_ids = [chat_tok.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    assert new_ids == [cfg.vocab_size, cfg.vocab_size + 1]
    assert model.config.vocab_size == cfg.vocab_size + 2
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed.shape == head.shape == (cfg.vocab_size + 2, cfg.n_embd)
    assert torch.equal(embed[: cfg.vocab_size], before_embed)
    for i in new_ids:
        torch.testing.assert_close(embed[i], before_embed.mean(0), rtol=0, atol=1e-7)
    if tie:
        assert head.data_ptr() == embed.data_ptr()
    else:
        assert torch.equal(head[: cfg.vocab_size], before_head)
        torch.testing.assert_close(head[new_ids[1]], before_head.mean(0), rtol=0, atol=1e-7)
    assert chat_tok.tokenizer.token_to_id("<|im_end|>") in chat_tok.stop_ids

    # The published folder: transformers loads tokenizer and model, renders and encodes as we do.
    out = tmp_path / "chat"
    save_model_folder(model, out, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_tokenizer_files(chat_tok, out)
    reloaded = load_folder_tokenizer(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    messages = CONVERSATIONS["system-multi-turn"]
    assert (
        reloaded.render_chat(messages).encode()
        == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).encode()
    )
    ids = tokenize_conversation(reloaded, messages).input_ids
    assert ids == list(theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    assert ids.count(new_ids[1]) == 5  # <|im_end|> is one special token, once per message
    check_end_of_turn_trained(reloaded)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.get_input_embeddings().weight.shape[0] == cfg.vocab_size + 2


def test_tokenizer_with_a_template_is_left_alone(model_folder, tok):
    model, _ = load_model_folder(model_folder)
    same, message = ensure_chat_template(model, tok)
    assert same is tok and message is None


def test_resize_initialises_listed_rows_inside_the_existing_table():
    """Padded vocabularies have spare rows: new ids there are re-initialised too, without growing."""
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=300))
    before = model.model.embed_tokens.weight.detach().clone()
    resize_embeddings(model, 300, [299])
    assert model.config.vocab_size == 300
    torch.testing.assert_close(model.model.embed_tokens.weight[299], before[:299].mean(0), rtol=0, atol=1e-7)


# ---- 4. assistant-only labels --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_match_transformers_generation_mask(tok, hf_tok, name):
    messages = CONVERSATIONS[name]
    for turns, template in (("all", CHATML_TRAINING_TEMPLATE), ("last", CHATML_LAST_ONLY_TEMPLATE)):
        ex = tokenize_conversation(tok, messages, turns=turns)
        ids, mask = _hf_mask(hf_tok, messages, template)
        assert ex.input_ids == ids
        assert [int(label != IGNORE_INDEX) for label in ex.labels] == mask, turns
        assert all(label in (IGNORE_INDEX, i) for label, i in zip(ex.labels, ex.input_ids, strict=True))


def test_every_assistant_turn_trains_its_end_of_turn_token(tok):
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    messages = CONVERSATIONS["system-multi-turn"]
    ex = tokenize_conversation(tok, messages)
    ends = [p for p, i in enumerate(ex.input_ids) if i == im_end]
    assert len(ends) == 5  # system, user, assistant, user, assistant
    trained = [ex.labels[p] == im_end for p in ends]
    assert trained == [False, False, True, False, True]
    last = tokenize_conversation(tok, messages, turns="last")
    assert [last.labels[p] == im_end for p in ends] == [False, False, False, False, True]
    check_end_of_turn_trained(tok)


def test_train_on_prompt_trains_every_token(tok):
    ex = tokenize_conversation(tok, CONVERSATIONS["system-multi-turn"], train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_template_whose_end_of_turn_follows_the_turn_is_refused(model_folder, tmp_path):
    """The end token written by the next message is outside the assistant's span: never learns to stop."""
    folder = tmp_path / "late-end"
    shutil.copytree(model_folder, folder)
    late_end = (
        "{% for message in messages %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_end|>\\n<|im_start|>assistant\\n' }}{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(late_end)
    with pytest.raises(InputError, match="not with a stop token"):
        check_end_of_turn_trained(load_folder_tokenizer(folder))


def test_template_that_rewrites_earlier_turns_is_refused(model_folder, tmp_path):
    folder = tmp_path / "rewrites"
    shutil.copytree(model_folder, folder)
    # Earlier assistant turns lose their text once a later turn follows (as reasoning templates do).
    rewriting = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' and not loop.last %}...{% else %}{{ message['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(rewriting)
    with pytest.raises(InputError, match="not prefix-preserving"):
        tokenize_conversation(load_folder_tokenizer(folder), CONVERSATIONS["system-multi-turn"])


def test_inspection_segments_and_json(tok):
    messages = CONVERSATIONS["system-multi-turn"]
    seen = inspect_conversation(tok, messages)
    assert "".join(text for text, _ in seen.segments) == seen.text
    assert [text for text, trained in seen.segments if trained] == [
        "Tessaly.<|im_end|>\n",
        "Ünïcode, fine: 42 → forty-two.<|im_end|>\n",
    ]
    data = json.loads(json.dumps(seen.to_json()))
    assert [t["id"] for t in data["tokens"]] == tokenize_conversation(tok, messages).input_ids
    assert data["n_trained"] == tokenize_conversation(tok, messages).n_trained
    assert "".join(t["text"] for t in data["tokens"]) == seen.text


# ---- parity with TRL -------------------------------------------------------------------------------


def test_labels_and_loss_match_trl_sft_trainer(model_folder, tok, tmp_path):
    """Same tokenizer + template and same weights: TRL's (input_ids, labels) and per-token loss are ours,
    padded and packed."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    folder = tmp_path / "trl"
    shutil.copytree(model_folder, folder)
    (folder / "chat_template.jinja").write_text(CHATML_TRAINING_TEMPLATE)  # TRL needs the markers
    conversations = [CONVERSATIONS[k] for k in sorted(CONVERSATIONS)]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        assistant_only_loss=True,
        max_length=None,
        per_device_train_batch_size=len(conversations),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = trl.SFTTrainer(
        model=hf_model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
        processing_class=transformers.AutoTokenizer.from_pretrained(folder),
    )
    ours = [tokenize_conversation(tok, c) for c in conversations]
    theirs = list(trainer.train_dataset)
    assert [ex.input_ids for ex in ours] == [row["input_ids"] for row in theirs]
    assert [ex.labels for ex in ours] == [row["labels"] for row in theirs]

    batch = trainer.data_collator(theirs)
    hf_model.eval()
    with torch.no_grad():
        logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_loss = trainer.compute_loss(hf_model, dict(batch)).item()
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    theirs_losses = per_token[labels != IGNORE_INDEX]

    model, _ = load_model_folder(model_folder)
    rows = [[ours[i] for i in row] for row in pack(ours, 256, strategy="sequential")]  # in order
    assert len(rows) < len(ours)
    for ours_batch in (
        collate_padded(ours, tok.tokenizer.token_to_id("<|pad|>")),
        collate_packed(rows, 256, 1),
    ):
        with torch.no_grad():
            losses = model(
                ours_batch.input_ids, ours_batch.targets, reduction="none", **ours_batch.forward_kwargs()
            )
        ours_losses = losses[ours_batch.targets != IGNORE_INDEX]
        torch.testing.assert_close(ours_losses, theirs_losses, rtol=0, atol=1e-5)
        assert abs(ours_losses.mean().item() - trl_loss) < 1e-5


# ---- 5. packing ------------------------------------------------------------------------------------


def test_conversation_in_a_packed_row_has_its_logits_alone(model_folder, tok):
    model, _ = load_model_folder(model_folder)
    examples = [tokenize_conversation(tok, CONVERSATIONS[k]) for k in sorted(CONVERSATIONS)]
    seq_len = 256
    rows = pack(examples, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert len(rows) < len(examples)  # some row holds several conversations
    batch = collate_packed([[examples[i] for i in row] for row in rows], seq_len, pad_id=1)
    with torch.no_grad():
        packed = model(batch.input_ids, **batch.forward_kwargs())
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                alone = model(torch.tensor([examples[i].input_ids]))[0]
                n = len(examples[i])
                torch.testing.assert_close(packed[b, at : at + n], alone, rtol=0, atol=1e-5)
                assert batch.position_ids[b, at : at + n].tolist() == list(range(n))
                at += n
    assert batch.n_real == sum(len(ex) for ex in examples)
    assert batch.n_trained == sum(ex.n_trained for ex in examples)
    assert batch.efficiency == pytest.approx(batch.n_real / (len(rows) * seq_len))


def test_targets_are_shifted_within_each_conversation(tok):
    a = ChatExample([10, 11, 12], [IGNORE_INDEX, 11, 12])
    b = ChatExample([20, 21], [20, 21])  # trained from its first token: nothing predicts it across rows
    batch = collate_packed([[a, b]], 6, pad_id=0)
    assert batch.targets.tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    moved = batch.to("cpu")
    assert torch.equal(moved.attention_mask, batch.attention_mask) and moved.seq_lens == [[3, 2]]
    padded = collate_padded([a, b], pad_id=0, pad_to_multiple_of=4)
    assert padded.targets.tolist() == [
        [11, 12, IGNORE_INDEX, IGNORE_INDEX],
        [21, IGNORE_INDEX] + [IGNORE_INDEX] * 2,
    ]
    assert padded.input_ids.tolist() == [[10, 11, 12, 0], [20, 21, 0, 0]]
    assert padded.forward_kwargs() == {} and padded.efficiency == 5 / 8


def test_padded_rows_give_each_conversation_its_logits_alone(model_folder, tok):
    model, _ = load_model_folder(model_folder)
    examples = [tokenize_conversation(tok, CONVERSATIONS[k]) for k in sorted(CONVERSATIONS)]
    batch = collate_padded(examples, pad_id=1)
    with torch.no_grad():
        padded = model(batch.input_ids, **batch.forward_kwargs())
        for b, ex in enumerate(examples):
            alone = model(torch.tensor([ex.input_ids]))[0]
            torch.testing.assert_close(padded[b, : len(ex)], alone, rtol=0, atol=1e-5)


def test_fit_to_length_truncates_or_drops_and_counts():
    trained = ChatExample(list(range(10)), [IGNORE_INDEX] * 4 + list(range(4, 10)))
    prompt_only_at_start = ChatExample(list(range(10)), [IGNORE_INDEX] * 8 + [8, 9])
    short = ChatExample([1, 2], [IGNORE_INDEX, 2])
    untrained = ChatExample([1, 2], [IGNORE_INDEX, IGNORE_INDEX])
    data = [trained, prompt_only_at_start, short, untrained]

    kept, counts = fit_to_length(data, 6, overlong="truncate")
    assert [len(ex) for ex in kept] == [6, 2]
    assert kept[0].labels == [IGNORE_INDEX] * 4 + [4, 5]
    assert counts.as_dict() == {"kept": 2, "truncated": 2, "dropped_overlong": 0, "dropped_untrained": 2}

    kept, counts = fit_to_length(data, 6, overlong="drop")
    assert kept == [short]
    assert counts.as_dict() == {"kept": 1, "truncated": 0, "dropped_overlong": 2, "dropped_untrained": 1}


def test_best_fit_packs_tighter_than_sequential_and_never_overflows():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(500)]
    rows = {s: pack(lengths, 512, strategy=s) for s in ("best_fit", "sequential")}
    for got in rows.values():
        assert sorted(i for row in got for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 512 for row in got)
    assert rows["sequential"] == [row for row in rows["sequential"] if row]  # in order, no empty rows
    assert [i for row in rows["sequential"] for i in row] == list(range(len(lengths)))
    best, seq = (packing_efficiency(lengths, rows[s], 512) for s in ("best_fit", "sequential"))
    assert best > 0.97 and best > seq
    # Each into the fullest row that has room: 4 fills the first row exactly, 3 and 2 the second.
    assert pack([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(InputError, match="more than the sequence length"):
        pack([513], 512)
