"""Chat data for sft: real files (JSONL plain/gz/zst, parquet, a hub dataset from an offline HF cache)
read into validated conversations; every bad record named by file:line or skipped and counted; the
tiny template's synthetic conversations never ask about the facts held out for evaluation."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import run_cli
from pydantic import ValidationError

from llmctl.config.loading import load_config
from llmctl.config.sft import ChatDataConfig, SftConfig
from llmctl.data.chat import ChatCounts, is_val, load_chat_data, read_conversations
from llmctl.data.synthetic import World
from llmctl.data.synthetic_chat import (
    ABOUT,
    ABOUT_THE,
    ANSWER_ONLY,
    CHAT_EVAL_FILE,
    CHAT_FILE,
    GREETINGS,
    QUESTIONS,
    SHORT_ANSWERS,
    fact_sentence,
    generate_chat,
    heldout_facts,
    relations,
)
from llmctl.errors import InputError
from llmctl.evals.tasks import build_custom_generative
from llmctl.project import get_template, render_project_file

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]


def _jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _load(base: Path, **cfg) -> tuple[list, dict]:
    data = load_chat_data(ChatDataConfig(**{"val_fraction": 0, **cfg}), base)
    return data.train, data.summary()


def _error(base: Path, **cfg) -> InputError:
    with pytest.raises(InputError) as e:
        _load(base, **cfg)
    return e.value


# --- local files ---------------------------------------------------------------------------------


def test_messages_from_plain_gz_and_zst_jsonl(tmp_path: Path) -> None:
    records = [
        {"messages": CHAT, "id": "a", "prompt": "kept as an extra field when messages are there"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
    ]
    (tmp_path / "plain.jsonl").write_bytes(_jsonl(records[:1]) + b"\n" + _jsonl(records[1:]))
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(_jsonl(records)))
    (tmp_path / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(records)))
    train, summary = _load(tmp_path, sources=[{"path": "plain.jsonl"}, {"path": "packed.*"}])
    assert [c.where for c in train] == [
        "plain.jsonl:1",
        "plain.jsonl:3",  # the blank line 2 keeps the numbering honest
        "packed.jsonl.gz:1",
        "packed.jsonl.gz:2",
        "packed.jsonl.zst:1",
        "packed.jsonl.zst:2",
    ]
    assert train[0].messages == CHAT and train[0].completion_start is None
    assert train[0].extra == {"id": "a", "prompt": "kept as an extra field when messages are there"}
    assert summary == {"files": 3, "records": 6, "conversations": 6, "skipped": {}, "train": 6, "val": 0}
    limited, _ = _load(tmp_path, sources=[{"path": "packed.*", "limit": 3}])
    assert [c.where for c in limited] == ["packed.jsonl.gz:1", "packed.jsonl.gz:2", "packed.jsonl.zst:1"]


def test_bz2_jsonl(tmp_path: Path) -> None:
    import bz2

    (tmp_path / "c.jsonl.bz2").write_bytes(bz2.compress(_jsonl([{"messages": CHAT}])))
    assert _load(tmp_path, sources=[{"path": "c.jsonl.bz2"}])[0][0].messages == CHAT


def test_text_parts_tool_calls_and_null_fields(tmp_path: Path) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Ostrin"}'},
    }
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Ostrin?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "rain"},
        {"role": "assistant", "content": "It rains.", "name": None},
    ]
    (tmp_path / "tools.jsonl").write_bytes(_jsonl([{"messages": messages}]))
    [conv], _ = _load(tmp_path, sources=[{"path": "tools.jsonl"}])
    assert conv.messages == [
        {"role": "user", "content": "Weather in Ostrin?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "rain", "tool_call_id": "call_1", "name": "weather"},
        {"role": "assistant", "content": "It rains."},
    ]


def test_prompt_completion_pairs_standard_and_conversational(tmp_path: Path) -> None:
    records = [
        {"prompt": "2+2?", "completion": "4", "id": 1},
        {"prompt": CHAT[:2], "completion": [{"role": "assistant", "content": "Hello."}]},
        {"prompt": [*CHAT, {"role": "user", "content": "And?"}], "completion": "Bye."},
    ]
    (tmp_path / "pairs.jsonl").write_bytes(_jsonl(records))
    train, _ = _load(tmp_path, sources=[{"path": "pairs.jsonl"}])
    assert train[0].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert train[0].completion_start == 1 and train[0].extra == {"id": 1}
    assert train[1].messages == CHAT and train[1].completion_start == 2
    assert train[2].messages == [
        *CHAT,
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Bye."},
    ]
    assert train[2].completion_start == 4


def test_parquet_messages_and_pairs(tmp_path: Path) -> None:
    # pyarrow gives every message every field of the struct: absent ones come back as None
    pq.write_table(
        pa.table(
            {
                "messages": [
                    CHAT,
                    [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "r"}],
                    [{"role": "user", "content": "q"}],
                ]
            }
        ),
        tmp_path / "chat.parquet",
    )
    err = _error(tmp_path, sources=[{"path": "chat.parquet"}])
    assert err.message == "chat.parquet:3: no assistant turn (nothing to train on)"
    train, summary = _load(tmp_path, sources=[{"path": "chat.parquet"}], on_error="skip")
    assert train[0].messages == CHAT
    assert train[1].messages == [
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": "r"},
    ]
    assert summary["skipped"] == {"no_assistant_turn": 1}

    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), tmp_path / "pairs.parquet")
    train, _ = _load(tmp_path, sources=[{"path": "pairs.parquet"}])
    assert [c.messages[1]["content"] for c in train] == ["x", "y"] and train[1].where == "pairs.parquet:2"

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "docs.parquet")
    err = _error(tmp_path, sources=[{"path": "docs.parquet"}])
    assert err.message.startswith("docs.parquet: no 'messages' column") and "columns: text" in err.message
    assert "messages_key" in err.hint


# --- validation ----------------------------------------------------------------------------------

BAD = [
    ('{"messages": oops}', "malformed_json", "malformed JSON"),
    ("[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ('{"text": "a document"}', "no_messages", "no 'messages' (nor 'prompt' and 'completion') field (keys present: 'text')"),
    ('{"messages": []}', "no_messages", "'messages' must be a non-empty list of messages, got an empty list"),
    ('{"prompt": "q"}', "no_messages", "has 'prompt' but no 'completion'"),
    ('{"prompt": "q", "completion": [{"role": "user", "content": "x"}]}', "no_assistant_turn", "'completion' holds no assistant message"),
    ('{"messages": ["hi"]}', "bad_message", "messages[0] is a str, not an object with role and content"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown_role", "messages[0]: role 'bot' is not one of system, user, assistant, tool"),
    ('{"messages": [{"content": "x"}]}', "unknown_role", "messages[0]: role None is not one of"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no_assistant_turn", "no assistant turn (nothing to train on)"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \\n"}]}', "empty_assistant", "messages[1]: empty assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}', "empty_assistant", "messages[1]: empty assistant message"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "bad_content", "messages[0]: user message has no content"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}', "bad_content", "messages[0].content is a int, not a string or a list of text parts"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": "a"}]}', "bad_content", "messages[0].content[0] is a 'image_url' part; only text parts"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "reason", "message"), BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_each_bad_record_names_file_and_line(tmp_path: Path, line: str, reason: str, message: str) -> None:
    good = json.dumps({"messages": CHAT})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{good}\n{line}\n{good}\n")
    err = _error(tmp_path, sources=[{"path": "bad.jsonl"}])
    assert err.message.startswith(f"bad.jsonl:3: {message}"), err.message
    assert "sft.data.on_error=skip" in err.hint


def test_on_error_skip_counts_each_reason(tmp_path: Path) -> None:
    good = json.dumps({"messages": CHAT})
    (tmp_path / "bad.jsonl").write_text("\n".join([good, *(line for line, _, _ in BAD), good]) + "\n")
    train, summary = _load(tmp_path, sources=[{"path": "bad.jsonl"}], on_error="skip")
    assert [c.where for c in train] == ["bad.jsonl:1", f"bad.jsonl:{len(BAD) + 2}"]
    assert summary["skipped"] == dict(sorted(Counter(reason for _, reason, _ in BAD).items()))
    assert summary["records"] == len(BAD) + 2 and summary["conversations"] == 2


def test_empty_data_sets_are_errors(tmp_path: Path) -> None:
    (tmp_path / "blank.jsonl").write_text("\n\n")
    err = _error(tmp_path, sources=[{"path": "blank.jsonl"}])
    assert err.message.startswith("sft.data.sources[0]: blank.jsonl holds no conversations")
    (tmp_path / "junk.jsonl").write_text('{"text": "x"}\n[]\n')
    err = _error(tmp_path, sources=[{"path": "junk.jsonl"}], on_error="skip")
    assert "holds no conversations" in err.message and "1 no_messages, 1 not_an_object" in err.message
    err = _error(tmp_path, sources=[{"path": "chats/*.jsonl"}])
    assert (
        err.message == "sft.data.sources[0].path: no files match chats/*.jsonl"
    )  # our section, not data.sources
    (tmp_path / "notes.txt").write_text("hello")
    assert "no JSONL or parquet files" in _error(tmp_path, sources=[{"path": "notes.txt"}]).message
    (tmp_path / "one.jsonl").write_bytes(_jsonl([{"messages": CHAT}]))
    err = _error(tmp_path, sources=[{"path": "one.jsonl"}], val_sources=[{"path": "blank.jsonl"}])
    assert err.message.startswith("sft.data.val_sources[0]: blank.jsonl holds no conversations")


def test_corrupt_files_are_named(tmp_path: Path) -> None:
    whole = gzip.compress(_jsonl([{"messages": CHAT}] * 300))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    assert _error(tmp_path, sources=[{"path": "cut.jsonl.gz"}]).message.startswith(
        "cut.jsonl.gz: cannot read"
    )
    (tmp_path / "packed.jsonl").write_bytes(gzip.compress(_jsonl([{"messages": CHAT}])))
    assert "rename it to .jsonl.gz" in _error(tmp_path, sources=[{"path": "packed.jsonl"}]).hint
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert _error(tmp_path, sources=[{"path": "bad.parquet"}]).message.startswith("bad.parquet: cannot read")


# --- hub datasets (offline cache) ----------------------------------------------------------------


@pytest.fixture
def hf_chat_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF cache holding a chat dataset whose README declares train (parquet) and test (JSONL)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = cache / "datasets--some-org--chats"
    rev = "89abcdef0123456789abcdef0123456789abcdef"
    snap = repo / "snapshots" / rev
    (snap / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (snap / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n  - split: test\n    path: data/test.jsonl\n---\n"
    )
    for k in range(2):
        convs = [
            [{"role": "user", "content": f"q{k}-{i}"}, {"role": "assistant", "content": f"a{k}-{i}"}]
            for i in range(3)
        ]
        pq.write_table(
            pa.table({"messages": convs, "prompt": [f"q{k}-{i}" for i in range(3)]}),
            snap / "data" / f"train-0000{k}.parquet",
        )
    (snap / "data" / "test.jsonl").write_bytes(_jsonl([{"prompt": "tq", "completion": "ta"}]))
    return tmp_path


def test_hub_chat_dataset_from_the_offline_cache(hf_chat_cache: Path) -> None:
    hub = "hf://datasets/some-org/chats"
    data = load_chat_data(
        ChatDataConfig(
            sources=[{"path": hub, "split": "train", "limit": 5}],
            val_sources=[{"path": hub, "split": "test"}],
        ),
        hf_chat_cache,
    )
    assert [c.messages[1]["content"] for c in data.train] == ["a0-0", "a0-1", "a0-2", "a1-0", "a1-1"]
    assert data.train[3].where == "some-org/chats/data/train-00001.parquet:1"
    assert data.train[0].extra == {"prompt": "q0-0"}  # ultrachat-style: messages win, prompt is kept
    assert [c.messages for c in data.val] == [
        [{"role": "user", "content": "tq"}, {"role": "assistant", "content": "ta"}]
    ]
    assert data.summary()["val_sources"]["files"] == 1
    files, _ = _load(
        hf_chat_cache, sources=[{"path": hub + "/data/test.jsonl"}]
    )  # files by a path in the repo
    assert files[0].where == "some-org/chats/data/test.jsonl:1"
    err = _error(hf_chat_cache, sources=[{"path": "hf://datasets/some-org/not-cached"}])
    assert err.message.startswith("sft.data.sources[0]: hub dataset some-org/not-cached is not in the local")
    assert (
        "split 'validation'" in _error(hf_chat_cache, sources=[{"path": hub, "split": "validation"}]).message
    )


# --- val split and config ------------------------------------------------------------------------


def test_val_split_is_a_hash_of_the_conversation(tmp_path: Path) -> None:
    convs = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(400)
    ]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(convs + convs[:50]))  # 50 exact duplicates
    (tmp_path / "b.jsonl").write_bytes(_jsonl(convs[::-1]))
    cfg = {"val_fraction": 0.1}
    a = load_chat_data(ChatDataConfig(sources=[{"path": "a.jsonl"}], **cfg), tmp_path)
    b = load_chat_data(ChatDataConfig(sources=[{"path": "b.jsonl"}], **cfg), tmp_path)
    val_a = [c.messages[0]["content"] for c in a.val]
    assert 20 <= len(set(val_a)) <= 60  # ~10% of 400
    assert set(val_a) == {c.messages[0]["content"] for c in b.val}  # file order does not matter
    train_a = {c.messages[0]["content"] for c in a.train}
    assert not train_a & set(val_a)  # duplicates never straddle the split
    assert a.summary()["train"] + a.summary()["val"] == 450
    assert not is_val(convs[0]["messages"], 0.0)


def test_config_model() -> None:
    assert SftConfig().data is None  # the stage's section exists before a project names chat data
    cfg = SftConfig(data={"sources": [{"path": "data/chat.jsonl"}]})
    assert cfg.data is not None and cfg.data.on_error == "error" and cfg.data.val_fraction == 0.05
    with pytest.raises(ValidationError, match="either val_fraction or val_sources"):
        ChatDataConfig(sources=[{"path": "a"}], val_fraction=0.1, val_sources=[{"path": "b"}])
    with pytest.raises(ValidationError, match="extra"):
        SftConfig(data={"sources": [{"path": "a", "text_key": "t"}]})
    with pytest.raises(ValidationError, match="extra"):
        SftConfig(data={"sources": [{"path": "a"}]}, lr=1.0)
    with pytest.raises(ValidationError, match="only apply to hub sources"):
        ChatDataConfig(sources=[{"path": "a", "split": "train"}])
    with pytest.raises(ValidationError, match="at least 1"):
        ChatDataConfig(sources=[])
    with pytest.raises(ValidationError, match="on_error"):
        ChatDataConfig(sources=[{"path": "a"}], on_error="fail")


# --- the tiny template's synthetic conversations ---------------------------------------------------


def _question_parsers() -> list[tuple[str, re.Pattern]]:
    suffix = "(?:" + "|".join(re.escape(s) for s in ANSWER_ONLY) + ")?"
    parsers = []
    for relation, phrasings in QUESTIONS.items():
        for p in phrasings:
            body = re.escape(p).replace(re.escape("{s}"), "(?P<s>.+?)")
            parsers.append((relation, re.compile(f"^{body}{suffix}$")))
    return parsers


def _asked_facts(user_turn: str, world: World, parsers) -> set[tuple[str, str]]:
    """The (subject, relation) keys a user turn asks about, parsed from the text alone."""
    kinds = {r.name: r.subject for r in relations(world)}
    return {
        (m["s"], rel)
        for rel, rx in parsers
        if (m := rx.match(user_turn)) and m["s"] in world.entities[kinds[rel]]
    }


def test_synthetic_chat_is_deterministic(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_chat(tmp_path / name, 300, seed=seed)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for file in (CHAT_FILE, CHAT_EVAL_FILE):
        assert digest(tmp_path / "a" / file) == digest(tmp_path / "b" / file)
        assert digest(tmp_path / "a" / file) != digest(tmp_path / "c" / file)


def test_heldout_facts_are_never_asked_nor_stated(tmp_path: Path) -> None:
    chat_set = generate_chat(tmp_path, 2000, seed=0)
    world = World.build(0)
    heldout = set(chat_set.heldout)
    assert 65 <= len(heldout) <= 80 and {r for _, r in heldout} == set(QUESTIONS)  # every relation
    assert chat_set.heldout == heldout_facts(world, 0)
    kind_of = {s: k for k, names in world.entities.items() for s in names}
    rank = lambda s: world.entities[kind_of[s]].index(s) / len(world.entities[kind_of[s]])  # noqa: E731
    # whole entities, popular ones (whose facts a model can know): a uniform draw averages ~0.5
    assert all((s, r.name) in heldout for s, _ in heldout for r in world.relations_of(kind_of[s]))
    assert sum(rank(s) for s, _ in heldout) / len(heldout) < 0.4
    records = [json.loads(line) for line in (tmp_path / CHAT_FILE).read_text().splitlines()]
    parsers = _question_parsers()
    known_turns = {g for g, _ in GREETINGS}
    about = [
        re.compile("^" + re.escape(p).replace(re.escape("{s}"), "(?P<s>.+)") + "$") for p in ABOUT + ABOUT_THE
    ]
    statements = {
        (s, r.name): [fact_sentence(t, s, world.facts[(s, r.name)]) for t in (r.canonical, *r.variants)]
        for r in relations(world)
        for s in world.entities[r.subject]
    }
    asked_keys: set[tuple[str, str]] = set()
    for rec in records:
        msgs = rec["messages"]
        user = [(i, m["content"]) for i, m in enumerate(msgs) if m["role"] == "user"]
        parsed: set[tuple[str, str]] = set()
        for i, text in user:
            keys = _asked_facts(text, world, parsers)
            if not keys and text not in known_turns:
                assert any(rx.match(text) for rx in about), f"{rec['id']}: unparsed user turn {text!r}"
            parsed |= keys
            answer = msgs[i + 1]["content"]
            for s, rel in heldout:  # a turn about a held-out fact's subject never gives its value
                if s in text:
                    assert not re.search(rf"\b{re.escape(world.facts[(s, rel)])}\b", answer), (
                        rec["id"],
                        s,
                        rel,
                    )
        assert not parsed & heldout, rec["id"]  # by key, parsed from the text
        assert not {tuple(f) for f in rec["facts"]} & heldout, rec["id"]  # by the recorded keys
        assert parsed <= {tuple(f) for f in rec["facts"]}
        asked_keys |= parsed
        assistant = " ".join(m["content"] for m in msgs if m["role"] == "assistant")
        for key in heldout:
            assert not any(sent in assistant for sent in statements[key]), (rec["id"], key)
    n_facts = sum(len(world.entities[r.subject]) for r in relations(world))
    assert len(asked_keys) >= 0.9 * (n_facts - len(heldout))  # the trainable facts are all asked, nearly


def test_synthetic_chat_has_phrasings_turns_and_system_prompts(tmp_path: Path) -> None:
    generate_chat(tmp_path, 2000, seed=0)
    records = [json.loads(line) for line in (tmp_path / CHAT_FILE).read_text().splitlines()]
    assert len(records) == 2000 and len({r["id"] for r in records}) == 2000
    users = Counter(m["content"].split("?")[0] for r in records for m in r["messages"] if m["role"] == "user")
    world = World.build(0)
    for relation, phrasings in QUESTIONS.items():
        for p in phrasings:  # every phrasing of every relation is used, many times
            used = sum(
                n
                for text, n in users.items()
                if re.fullmatch(re.escape(p.split("?")[0]).replace(re.escape("{s}"), ".+"), text)
            )
            assert used >= 10, (relation, p, used)
    turns = Counter(sum(m["role"] == "user" for m in r["messages"]) for r in records)
    assert turns[1] > 500 and sum(n for k, n in turns.items() if k >= 3) > 300
    systems = sum(r["messages"][0]["role"] == "system" for r in records)
    assert 0.25 * 2000 < systems < 0.45 * 2000
    short = [
        m
        for r in records
        for i, m in enumerate(r["messages"])
        if m["role"] == "assistant" and i and r["messages"][i - 1]["content"].endswith(ANSWER_ONLY)
    ]
    values = {v for v in world.facts.values()}
    assert len(short) > 400 and all(
        m["content"] in values for m in short
    )  # answer-only turns: the bare value
    # every other answer to a question is the relation's short sentence, ending with the value
    parsers = _question_parsers()
    sentences = 0
    for r in records:
        for question, answer in zip(r["messages"], r["messages"][1:], strict=False):
            keys = _asked_facts(question["content"], world, parsers) if question["role"] == "user" else ()
            if keys and not question["content"].endswith(ANSWER_ONLY):
                [(subject, relation)] = keys
                value = world.facts[(subject, relation)]
                assert answer["content"] == SHORT_ANSWERS[relation].format(v=value)
                assert answer["content"].endswith(f" {value}.") and subject not in answer["content"]
                sentences += 1
    assert sentences > 3000


def test_chat_eval_rows_and_the_template_config_read_clean(tmp_path: Path) -> None:
    chat_set = generate_chat(tmp_path / "data", 2000, seed=0)
    world = World.build(0)
    rows = [json.loads(line) for line in (tmp_path / "data" / CHAT_EVAL_FILE).read_text().splitlines()]
    assert [(r["subject"], r["relation"]) for r in rows] == chat_set.heldout
    assert all(r["answer"] == world.facts[(r["subject"], r["relation"])] for r in rows)
    assert not any(
        r["prompt"].endswith(ANSWER_ONLY) for r in rows
    )  # a plain question: answered in a sentence
    assert all(r["prompt"] in {p.format(s=r["subject"]) for p in QUESTIONS[r["relation"]]} for r in rows)
    items = build_custom_generative(rows, "data/chat_eval.jsonl", ("\n",))  # llmctl's custom task reader
    assert [i.answer for i in items] == [r["answer"] for r in rows]

    # the tiny template's project file (every stage's section) validates and its sft section reads
    # the files init makes
    from llmctl.stages.registry import project_model

    text = render_project_file(get_template("tiny"), "t")
    cfg = load_config(project_model(), None, defaults=yaml.safe_load(text))
    data = load_chat_data(cfg.sft.data, tmp_path)
    summary = data.summary()
    assert summary["skipped"] == {} and summary["conversations"] == 2000
    assert 60 <= summary["val"] <= 140


def test_init_writes_the_chat_files(tmp_path: Path) -> None:
    made = run_cli("--json", "init", "demo", cwd=tmp_path)
    assert made.code == 0, made.stderr
    assert {"data/chat.jsonl", "data/chat_eval.jsonl"} <= set(made.json()["files"])
    generate_chat(tmp_path / "ref", 2000, seed=0)
    for file in (CHAT_FILE, CHAT_EVAL_FILE):
        assert (tmp_path / "demo" / "data" / file).read_bytes() == (tmp_path / "ref" / file).read_bytes()
    counts = ChatCounts()
    list(
        read_conversations(
            ChatDataConfig(sources=[{"path": "data/chat.jsonl"}]).sources, tmp_path / "demo", counts=counts
        )
    )
    assert counts.conversations == 2000 and not counts.skipped
