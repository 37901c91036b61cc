"""Token shards (format, corruption), corpus encoding (split, parallel determinism, encoders) and the loader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import normalizers

from llmctl.data.encode import encode_corpus, is_val_document
from llmctl.data.loader import TokenLoader, val_batches
from llmctl.data.shards import (
    HEADER_SIZE,
    INDEX_FILE,
    ShardWriter,
    TokenShard,
    list_shards,
    read_header,
    read_index,
    token_dtype,
    write_shard,
)
from llmctl.data.synthetic import iter_documents
from llmctl.data.tokenizer import Tokenizer, train_tokenizer
from llmctl.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str]]:
    return [(d["id"], d["text"]) for d in iter_documents(800, seed=5)]


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer((t for _, t in docs), vocab_size=1024)


@pytest.fixture(scope="module")
def encoded(docs, tok, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("enc1")
    result = encode_corpus(docs, tok, out, val_fraction=0.1, shard_tokens=50_000, workers=1, seed=7)
    return out, result


# -- shard format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size,dtype", [(1024, np.uint16), (65536, np.uint16), (70_000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    tokens = np.array([0, 5, 6, 0, vocab_size - 1, 0, 9], dtype=np.int64)
    starts = np.array([0, 3, 5])
    path = write_shard(tmp_path / "s.bin", tokens, starts, vocab_size=vocab_size, bos_id=0)
    shard = TokenShard(path, verify=True)
    assert shard.tokens.dtype == np.dtype(dtype) and isinstance(shard.tokens, np.memmap)
    assert shard.tokens.tolist() == tokens.tolist()
    assert shard.doc_starts.tolist() == [0, 3, 5]
    assert shard.document(1).tolist() == [0, vocab_size - 1] and shard.document(2).tolist() == [0, 9]
    h = read_header(path)
    assert (h.n_tokens, h.n_docs, h.vocab_size, h.bos_id) == (7, 3, vocab_size, 0)
    assert path.stat().st_size == h.file_size
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_shards_name_the_file(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(100) % 50, np.array([0, 40]), vocab_size=50, bos_id=None)
    raw = path.read_bytes()
    cases = {
        "truncated.bin": raw[:-5],
        "tiny.bin": raw[:10],
        "magic.bin": b"NOTATOK!" + raw[8:],
        "version.bin": raw[:8] + struct.pack("<I", 99) + raw[12:],
        "extra.bin": raw + b"\0" * 8,
    }
    messages = {
        "truncated.bin": "truncated or corrupt",
        "tiny.bin": "truncated token shard",
        "magic.bin": "not an llmctl token shard",
        "version.bin": "format version 99",
        "extra.bin": "truncated or corrupt",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=messages[name]) as err:
            TokenShard(tmp_path / name)
        assert name in err.value.message


def test_verify_catches_bad_ids(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.array([0, 1, 60]), np.array([0]), vocab_size=50, bos_id=0)
    with pytest.raises(InputError, match="token id 60 >= vocab_size 50"):
        TokenShard(path, verify=True)


def test_writer_rotates_at_document_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    docs = [np.concatenate([[0], rng.integers(1, 1000, size=n - 1)]) for n in lengths]
    with ShardWriter(tmp_path, vocab_size=1000, bos_id=0, shard_tokens=10_000) as w:
        for i in range(0, 500, 37):  # chunks of documents, as the encoder adds them
            w.add(np.concatenate(docs[i : i + 37]), lengths[i : i + 37])
    infos = w.shards
    assert [p.name for p in list_shards(tmp_path)] == [s.file for s in infos]
    assert all(s.n_tokens >= 10_000 for s in infos[:-1])
    assert all(s.n_tokens < 10_000 + 300 for s in infos)
    back = []
    for path in list_shards(tmp_path):
        shard = TokenShard(path, verify=True)
        back += [shard.document(i) for i in range(shard.n_docs)]
    assert len(back) == 500 and all(np.array_equal(a, b) for a, b in zip(back, docs, strict=True))


# -- encoding --------------------------------------------------------------------------------------


def test_encode_contents_split_and_metrics(docs, tok, encoded):
    out, result = encoded
    val_ids = {i for i, _ in docs if is_val_document(i, 0.1, seed=7)}
    train_docs = [t for i, t in docs if i not in val_ids]
    val_docs = [t for i, t in docs if i in val_ids]
    assert 0.05 < len(val_docs) / len(docs) < 0.15
    for split, expected in (("train", train_docs), ("val", val_docs)):
        got = []
        for path in list_shards(out / split):
            shard = TokenShard(path, verify=True)
            assert shard.header.bos_id == tok.bos_id
            got += [tok.decode(shard.document(i)[1:].tolist()) for i in range(shard.n_docs)]
        assert got == expected
    assert result.train.documents == len(train_docs) and result.val.documents == len(val_docs)
    assert result.train.shards > 1
    text_tokens = result.train.tokens - result.train.documents
    assert result.train.bytes_per_token == pytest.approx(
        sum(len(t.encode()) for t in train_docs) / text_tokens, rel=1e-3
    )
    assert 0 < result.vocab_usage <= 1
    assert result.encoder == "tiktoken"
    index = read_index(out)
    assert index["tokenizer_id"] == tok.tokenizer_id and index["document_convention"] == "bos_prepended"
    assert index["splits"]["train"]["n_tokens"] == result.train.tokens
    json.dumps(result.to_dict())


def test_parallel_and_fallback_encoders_give_identical_shards(docs, tok, encoded, tmp_path):
    out1, _ = encoded
    out2 = tmp_path / "enc2"
    r2 = encode_corpus(docs, tok, out2, val_fraction=0.1, shard_tokens=50_000, workers=2, seed=7)
    out3 = tmp_path / "enc3"
    r3 = encode_corpus(
        docs, tok, out3, val_fraction=0.1, shard_tokens=50_000, workers=1, seed=7, encoder="tokenizers"
    )
    assert (r2.encoder, r3.encoder, r2.workers) == ("tiktoken", "tokenizers", 2)
    for split in ("train", "val"):
        files = [list_shards(o / split) for o in (out1, out2, out3)]
        assert len({len(f) for f in files}) == 1
        for a, b, c in zip(*files, strict=True):
            assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_fallback_when_tiktoken_cannot_match(docs, tok, tmp_path):
    # A normalizer (lowercasing) has no tiktoken equivalent: auto falls back, 'tiktoken' refuses.
    hf = tokenizers.Tokenizer.from_str(tok.tokenizer_json)
    hf.normalizer = normalizers.Lowercase()
    lower = Tokenizer(
        hf, bos_token="<|bos|>", pad_token="<|pad|>", im_start_token="<|im_start|>", im_end_token="<|im_end|>"
    )
    result = encode_corpus(docs[:50], lower, tmp_path / "a", workers=1)
    assert result.encoder == "tokenizers" and "cannot be expressed as tiktoken" in result.encoder_note
    with pytest.raises(ConfigError, match="tokenize.encoder is 'tiktoken'"):
        encode_corpus(docs[:50], lower, tmp_path / "b", workers=1, encoder="tiktoken")


def test_encode_empty_corpus(tok, tmp_path):
    with pytest.raises(InputError, match="the corpus is empty"):
        encode_corpus([], tok, tmp_path / "a", workers=1)
    with pytest.raises(InputError, match=r"empty \(3 empty documents\)"):
        encode_corpus([("a", ""), ("b", ""), ("c", "")], tok, tmp_path / "b", workers=1)


def test_encode_refuses_a_used_folder(docs, tok, encoded):
    out, _ = encoded
    with pytest.raises(InputError, match="already holds token shards"):
        encode_corpus(docs[:5], tok, out, workers=1)


# -- loader ----------------------------------------------------------------------------------------


def _stream(out: Path, split: str = "train") -> np.ndarray:
    return np.concatenate([np.asarray(TokenShard(p).tokens) for p in list_shards(out / split)]).astype(
        np.int64
    )


def test_loader_windows_are_shifted_slices(encoded):
    out, _ = encoded
    stream = _stream(out)
    T = 64
    seq = TokenLoader(out / "train", batch_size=4, seq_len=T, mode="sequential")
    for step in range(3):
        x, y = seq.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
        for b in range(4):
            start = (step * 4 + b) * T
            assert x[b].tolist() == stream[start : start + T].tolist()
            assert y[b].tolist() == stream[start + 1 : start + T + 1].tolist()
    rnd = TokenLoader(out / "train", batch_size=4, seq_len=T, seed=1)
    x, y = rnd.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:  # every random window is a real slice of the stream
        first = row[:8].numpy()
        hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, 8) == first, axis=1))
        assert any(stream[h : h + T].tolist() == row.tolist() for h in hits)


def test_loader_is_deterministic_and_seeded(encoded):
    out, _ = encoded
    a = TokenLoader(out / "train", batch_size=4, seq_len=32, seed=3)
    b = TokenLoader(out / "train", batch_size=4, seq_len=32, seed=3)
    c = TokenLoader(out / "train", batch_size=4, seq_len=32, seed=4)
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_loader_resume_from_json_state(encoded):
    out, _ = encoded
    a = TokenLoader(out / "train", batch_size=8, seq_len=64, seed=2)
    n = a.windows_per_epoch() // 8
    for _ in range(n - 1):  # stop just before the epoch boundary
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(3)]  # crosses into epoch 1
    assert a.epoch == 1
    b = TokenLoader(out / "train", batch_size=8, seq_len=64, seed=2)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(InputError, match="seq_len was 64, now 32"):
        TokenLoader(out / "train", batch_size=8, seq_len=32, seed=2).load_state_dict(state)


def test_random_epoch_covers_each_window_once(encoded):
    out, _ = encoded
    loader = TokenLoader(out / "train", batch_size=1, seq_len=128, seed=0)
    n = loader.windows_per_epoch()
    firsts = {tuple(loader.next_batch()[0][0, :16].tolist()) for _ in range(n)}
    assert loader.epoch == 0 and len(firsts) > 0.99 * n


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_together_equal_the_global_batch(encoded, mode):
    out, _ = encoded
    single = TokenLoader(out / "train", batch_size=6, seq_len=32, mode=mode, seed=9)
    ranks = [
        TokenLoader(out / "train", batch_size=2, seq_len=32, mode=mode, seed=9, rank=r, world_size=3)
        for r in range(3)
    ]
    steps = single.windows_per_epoch() // 6 + 5  # run past an epoch boundary
    for _ in range(steps):
        gx, gy = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(gx, torch.cat([p[0] for p in parts])) and torch.equal(
            gy, torch.cat([p[1] for p in parts])
        )
    assert {json.dumps(r.state_dict(), sort_keys=True) for r in ranks} == {
        json.dumps(single.state_dict(), sort_keys=True)
    }


def test_val_batches(encoded):
    out, result = encoded
    stream = _stream(out, "val")
    full = list(val_batches(out / "val", batch_size=4, seq_len=32))
    assert len(full) == (result.val.tokens - 1) // 32 // 4
    assert full[0][0][0].tolist() == stream[:32].tolist()
    assert all(
        torch.equal(a[0], b[0])
        for a, b in zip(full, val_batches(out / "val", batch_size=4, seq_len=32), strict=True)
    )
    r0 = list(val_batches(out / "val", batch_size=2, seq_len=32, rank=0, world_size=2, max_batches=3))
    r1 = list(val_batches(out / "val", batch_size=2, seq_len=32, rank=1, world_size=2, max_batches=3))
    assert len(r0) == 3
    for g, a, b in zip(full, r0, r1, strict=False):
        assert torch.equal(g[0], torch.cat([a[0], b[0]]))


def test_loader_errors(encoded, tmp_path):
    out, result = encoded
    with pytest.raises(InputError, match="needs"):
        TokenLoader(out / "val", batch_size=64, seq_len=result.val.tokens)
    with pytest.raises(InputError, match="needs"):
        list(val_batches(out / "val", batch_size=64, seq_len=result.val.tokens))
    with pytest.raises(InputError, match="no token shards"):
        TokenLoader(tmp_path, batch_size=1, seq_len=8)
    assert (out / INDEX_FILE).is_file() and HEADER_SIZE == 64
