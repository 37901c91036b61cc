"""Tokenizer library: byte-level BPE training, exact round trips, HF folder format, adopt, inspect, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmctl.config.tokenize import TokenizeConfig
from llmctl.data.encode import PARITY_PROBES, choose_encoder
from llmctl.data.synthetic import iter_documents
from llmctl.data.tokenizer import (
    BOS,
    DEFAULT_SPECIAL_TOKENS,
    IM_END,
    IM_START,
    METADATA_FILE,
    PAD,
    adopt_tokenizer,
    load_tokenizer,
    printable_token,
    train_tokenizer,
)
from llmctl.errors import ConfigError, InputError
from llmctl.reporting import ProgressTask, Reporter

TRICKY = [
    "",
    " ",
    "   three leading spaces",
    "trailing spaces   ",
    "a\r\nb\r\n\r\n",
    "\n\n\n",
    "tabs\tand\t\ttabs",
    "emoji 😀👍🏽🇺🇸 family 👩‍👩‍👧",
    "中文测试，标点符号。日本語のテキスト",
    "combining: e\u0301 n\u0303 a\u030a\u0301\u0302",
    "control: \x00\x01\x07\x1b\x7f\x85\u2028\u2029\ufeff",
    "z" * 5000,
    " " * 257,
    "ab" * 1000,
    "12345678901234567890",
    "<|bos|><|im_start|>user\nhi<|im_end|>",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ Ⅻ ½ ١٢٣",
    "I'm SHOUTING, aren't WE? They'LL see.",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [d["text"] for d in iter_documents(600, seed=3)]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok"), model_max_length=512)


def test_train_layout_and_specials(tok):
    assert tok.vocab_size == 1024
    assert tok.special_tokens == {BOS: 0, PAD: 1, IM_START: 2, IM_END: 3}
    assert (tok.bos_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.eos_id) == (0, 1, 2, 3, 0)
    assert tok.stop_token_ids == [0, 3]
    # All 256 bytes are in the vocabulary, right after the specials.
    assert sorted(tok.token_bytes(i) for i in range(4, 260)) == [bytes([b]) for b in range(256)]
    assert tok.encode("the", bos=True)[0] == tok.bos_id


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    # Any code point except lone surrogates (which are not encodable text).
    pool = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for _ in range(200):
        s = "".join(chr(rng.choice(pool)) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(s)) == s


def test_specials_in_text_are_ordinary(tok):
    ids = tok.encode("x <|bos|> <|im_start|>")
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode([tok.im_start_id]) == IM_START


def test_training_is_deterministic(corpus, tok):
    again = train_tokenizer(corpus, vocab_size=1024)
    assert again.tokenizer_id == tok.tokenizer_id


def test_split_digits(corpus):
    texts = corpus[:20] + ["123 456 789 12345"] * 500
    grouped = train_tokenizer(texts, vocab_size=600)
    single = train_tokenizer(texts, vocab_size=600, split_digits=True)
    assert len(grouped.encode("123")) == 1
    assert [grouped.decode([i]) for i in grouped.encode("12345")] == ["123", "45"]
    assert [single.decode([i]) for i in single.encode("12345")] == ["1", "2", "3", "4", "5"]


def test_max_chars_caps_training_text(corpus):
    small = train_tokenizer(corpus, vocab_size=1024, max_chars=2000)
    assert small.source["chars"] == 2000
    assert small.vocab_size < 1024  # 2000 characters cannot support 764 merges


def test_tiktoken_matches_tokenizers(tok, corpus):
    enc = tok.to_tiktoken()
    assert enc is not None
    for text in [*TRICKY, *PARITY_PROBES, *corpus[:100]]:
        assert enc.encode_ordinary(text) == tok.encode(text), text[:40]
    assert choose_encoder(tok, "auto", corpus[:20])[0] == "tiktoken"


def test_saved_folder_loads_everywhere(tok, saved):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", METADATA_FILE):
        assert (saved / name).is_file(), name
    text = "The capital of Velmora is Ostrin.\n  Ünïcödé 😀"
    raw = tokenizers.Tokenizer.from_file(str(saved / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text)

    loaded = load_tokenizer(saved)
    assert loaded.tokenizer_id == tok.tokenizer_id
    assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)

    meta = json.loads((saved / METADATA_FILE).read_text())
    assert meta["tokenizer_id"] == tok.tokenizer_id
    assert meta["vocab_size"] == 1024
    assert meta["special_tokens"] == {BOS: 0, PAD: 1, IM_START: 2, IM_END: 3}
    assert meta["bos_id"] == meta["eos_id"] == 0
    assert meta["split_pattern"] == tok.split_pattern
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 512
    assert config["added_tokens_decoder"]["2"]["content"] == IM_START


def test_transformers_autotokenizer_and_chat_template(tok, saved):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(saved)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, BOS, PAD)
    assert hf.pad_token_id == tok.pad_id
    text = "Hello there , friend .  Two spaces."
    assert hf(text)["input_ids"] == tok.encode(text, bos=True)  # HF adds BOS like training does
    assert hf.decode(tok.encode(text)) == text  # no tokenization-space cleanup
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|bos|><|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = hf.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[:2] == [tok.bos_id, tok.im_start_id] and ids.count(tok.bos_id) == 1


def test_inspect(tok):
    pairs = tok.inspect("Hi there\n中")
    assert [i for i, _ in pairs] == tok.encode("Hi there\n中")
    shown = "".join(s for _, s in pairs)
    assert "␣there" in shown and "\\n" in shown
    assert printable_token("中".encode()[:2]) == "\\xe4\\xb8"
    assert printable_token(b"\x00") == "\\x00"


# -- adopting --------------------------------------------------------------------------------------


def _gpt2_style_folder(folder: Path, texts: list[str]) -> Path:
    """A GPT-2-like HF tokenizer folder: ByteLevel regex pre-tokenizer, <|endoftext|> as bos/eos."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_adopt_local_folder(tmp_path, corpus):
    folder = _gpt2_style_folder(tmp_path / "gpt2ish", corpus[:200])
    tok = adopt_tokenizer(folder)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_id == 0
    base = 700
    assert {tok.pad_id, tok.im_start_id, tok.im_end_id} == {base, base + 1, base + 2}
    assert tok.source["added_special_tokens"] == [PAD, IM_START, IM_END]
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert choose_encoder(tok, "auto", corpus[:20])[0] == "tiktoken"
    out = tok.save(tmp_path / "saved")
    assert load_tokenizer(out).tokenizer_id == tok.tokenizer_id
    # A tokenizer.json path works as well as its folder.
    assert adopt_tokenizer(folder / "tokenizer.json").tokenizer_id == tok.tokenizer_id


def test_adopt_from_hub_cache_offline(tmp_path, corpus, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-tok" / "snapshots" / ("a" * 40)
    _gpt2_style_folder(snapshot, corpus[:200])
    (cache / "models--someorg--tiny-tok" / "refs").mkdir(parents=True)
    (cache / "models--someorg--tiny-tok" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    tok = adopt_tokenizer("someorg/tiny-tok")
    assert tok.bos_token == "<|endoftext|>"
    assert tok.source["from"] == "hf://someorg/tiny-tok"
    with pytest.raises(InputError, match="not in the local Hugging Face cache") as err:
        adopt_tokenizer("someorg/not-downloaded")
    assert "hf download someorg/not-downloaded" in err.value.hint


def test_adopt_bad_sources(tmp_path):
    with pytest.raises(InputError, match="neither an existing file or folder nor a hub repo id"):
        adopt_tokenizer("./does/not/exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no tokenizer.json"):
        adopt_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text('{"model": {"type": "nonsense"}')
    with pytest.raises(InputError, match=r"bad/tokenizer.json: not a readable tokenizer.json"):
        adopt_tokenizer(bad)


# -- bad input -------------------------------------------------------------------------------------


def test_empty_corpus():
    with pytest.raises(InputError, match="no text to train the tokenizer"):
        train_tokenizer([], vocab_size=512)
    with pytest.raises(InputError, match="no text"):
        train_tokenizer(["", ""], vocab_size=512)


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="at least 260"):
        train_tokenizer(["hello"], vocab_size=259)
    with pytest.raises(ConfigError, match="at least 261"):
        train_tokenizer(["hello"], vocab_size=260, special_tokens=[*DEFAULT_SPECIAL_TOKENS, "<|tool|>"])
    with pytest.raises(ValueError, match="the minimum is 260"):
        TokenizeConfig(vocab_size=100)


def test_special_token_collision():
    with pytest.raises(ConfigError, match="listed twice"):
        train_tokenizer(["hello"], vocab_size=512, special_tokens=[*DEFAULT_SPECIAL_TOKENS, BOS])
    with pytest.raises(ConfigError, match="missing <\\|pad\\|>"):
        train_tokenizer(["hello"], vocab_size=512, special_tokens=[BOS, IM_START, IM_END])
    with pytest.raises(ValueError, match="listed more than once: <\\|pad\\|>"):
        TokenizeConfig(special_tokens=[*DEFAULT_SPECIAL_TOKENS, PAD])


def test_config_defaults_and_pattern_check():
    cfg = TokenizeConfig()
    assert cfg.vocab_size == 4096 and cfg.special_tokens == list(DEFAULT_SPECIAL_TOKENS)
    assert all(f.description for f in TokenizeConfig.model_fields.values())
    with pytest.raises(ValueError, match="not a valid regex"):
        TokenizeConfig(split_pattern="(unclosed")
    with pytest.raises(ValueError, match="extra"):
        TokenizeConfig(vocab=5)


def test_unreadable_or_modified_saved_tokenizer(tok, tmp_path):
    folder = tok.save(tmp_path / "t")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzz-extra"] = 99999
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="modified after it was saved"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(InputError, match=r"t/tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(folder)
    (folder / METADATA_FILE).unlink()
    with pytest.raises(InputError, match="not saved by llmctl") as err:
        load_tokenizer(folder)
    assert "tokenize.adopt" in err.value.hint
    with pytest.raises(InputError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path / "nowhere")


class _Totals(Reporter):
    """Records the totals the training progress bar is given (the CLI draws them)."""

    def __init__(self) -> None:
        self.totals: list[float | None] = []

    def progress(self, description: str, total: float | None = None, unit: str = "it") -> ProgressTask:
        totals = self.totals
        totals.append(total)

        class Task(ProgressTask):
            def update(self, completed=None, total=None, **fields) -> None:  # noqa: ANN001
                if total is not None:
                    totals.append(total)

        return Task()


def test_training_progress_total_is_the_corpus_not_the_budget():
    texts = [d["text"] for d in iter_documents(1500, seed=2)]
    used = sum(min(len(t), 10_000) for t in texts)
    rep = _Totals()
    train_tokenizer(
        iter(texts),
        vocab_size=512,
        max_chars=100_000_000,
        reporter=rep,
        total_docs=len(texts),
        total_bytes=sum(len(t.encode()) for t in texts),
    )
    assert rep.totals[-1] == used  # the final total is exactly what was read
    assert len(rep.totals) >= 3 and all(abs(t - used) / used < 0.1 for t in rep.totals[1:]), (
        rep.totals,
        used,
    )
    assert max(rep.totals) < 100_000_000
    unknown = _Totals()  # nothing says how big the corpus is: no total until the end, never the budget
    train_tokenizer(iter(texts[:100]), vocab_size=512, max_chars=100_000_000, reporter=unknown)
    assert unknown.totals == [None, sum(min(len(t), 10_000) for t in texts[:100])]
