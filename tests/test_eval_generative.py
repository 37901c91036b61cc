"""Generative chat eval: scoring of fixed answers, rendering with a real tokenizer's chat template,
end-of-turn detection, the base model asked the same way, custom chat tasks and `llmctl eval world_chat`.

A random model answers nothing, so the models that must answer are real Transformers whose greedy
next token depends only on the current one (blocks zeroed, embeddings one-hot, the head a transition
table): `chain_model` makes one that says exactly what a test wants and then ends its turn, or not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_project, write_random_model_folder

from llmctl.errors import InputError
from llmctl.evals import tasks as T
from llmctl.evals.chat import ChatPrompts, run_chat
from llmctl.evals.data import read_rows
from llmctl.evals.evaluate import evaluate
from llmctl.evals.lm import EvalLM
from llmctl.model.hf_tokenizer import load_folder_tokenizer

ROWS = [
    {"prompt": "What does Yelnar Kallum do for a living? Reply with the answer only.", "answer": "farmer",
     "subject": "Yelnar Kallum", "relation": "profession"},
    {"prompt": "What is the capital of Velmora? Reply with the answer only.", "answer": "Ostrin",
     "subject": "Velmora", "relation": "capital"},
    {"prompt": "Who is Mira Tallo? Reply with the answer only.", "answer": ["a farmer", "farmer"],
     "system": "You are terse."},
]  # fmt: skip
# A base model's own template, unlike ChatML: a base must still be asked in the chat model's template.
OTHER_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "llmctl_tokenizer.json",
)


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory) -> Path:
    return write_random_model_folder(tmp_path_factory.mktemp("gen") / "random")


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chain_model(
    folder: Path, tokenizer_folder: Path, say: str, then: str | None, own_template: str | None = None
) -> Path:
    """A model folder (the tokenizer of `tokenizer_folder`) that answers any ChatML prompt with `say`
    and then emits the token `then` (e.g. <|im_end|>), or, with then=None, repeats " the" forever.
    Any other prompt gets " the" forever. `own_template` replaces ChatML as the folder's template."""
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_folder / name, folder / name)
    tok = load_folder_tokenizer(folder)
    hf = tok.tokenizer
    start = tok.encode_chat([{"role": "user", "content": "?"}])[-1]  # what every chat prompt ends with
    answer = hf.encode(say, add_special_tokens=False).ids
    loop = hf.encode(" the", add_special_tokens=False).ids
    assert len(loop) == 1
    path = [start, *answer, hf.token_to_id(then) if then else loop[0]]
    assert len(set(path)) == len(path), "the chain must not revisit a token"
    chain = dict(zip(path[:-1], path[1:], strict=True))
    V = hf.get_vocab_size(with_added_tokens=True)
    model = Transformer(preset("test-1m", vocab_size=V, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        other = len(chain)  # the dimension every token outside the chain maps to: it leads to " the"
        embed[:, other] = 1.0
        head[loop[0], other] = 1.0
        for slot, (token, nxt) in enumerate(chain.items()):
            embed[token].zero_()
            embed[token, slot] = 1.0
            head[nxt, slot] = 1.0
    cfg = json.loads((tokenizer_folder / "config.json").read_text())
    save_model_folder(model, folder, bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
    if own_template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": own_template}))
    return folder


@pytest.fixture(scope="module")
def chains(random_folder, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chains")
    eos = load_folder_tokenizer(random_folder).eos_token
    return {
        "chat": chain_model(tmp / "chat", random_folder, "farmer", "<|im_end|>"),
        "eos": chain_model(tmp / "eos", random_folder, "farmer", eos),
        "endless": chain_model(tmp / "endless", random_folder, "Ostrin", None, own_template=OTHER_TEMPLATE),
    }


# ---- scoring ---------------------------------------------------------------------------------------


def test_scores_normalize_case_spaces_and_trailing_punctuation():
    item = T.build_chat([{"prompt": "q", "answer": "Ostrin"}], "rows")[0]
    assert T.score_chat(item, "  ostrin.\n") == {"exact_match": 1.0, "contains": 1.0}
    assert T.score_chat(item, "OSTRIN!?") == {"exact_match": 1.0, "contains": 1.0}
    assert T.score_chat(item, "The capital is Ostrin.") == {"exact_match": 0.0, "contains": 1.0}
    assert T.score_chat(item, "Ostrinia") == {"exact_match": 0.0, "contains": 0.0}  # whole words only
    assert T.score_chat(item, "Velmora") == {"exact_match": 0.0, "contains": 0.0}
    two = T.build_chat([{"prompt": "q", "answer": ["a farmer", "farmer"]}], "rows")[0]
    assert T.score_chat(two, "Farmer.") == {"exact_match": 1.0, "contains": 1.0}
    assert T.score_chat(two, "She is a  farmer") == {"exact_match": 0.0, "contains": 1.0}


def test_chat_rows_keep_system_and_fields_and_bad_rows_name_file_and_line(tmp_path):
    items = T.build_chat(read_rows(write_rows(tmp_path / "ok.jsonl")), "ok")
    assert [i.answers for i in items] == [("farmer",), ("Ostrin",), ("a farmer", "farmer")]
    assert items[2].system == "You are terse." and items[0].system is None
    assert items[0].extra == {"subject": "Yelnar Kallum", "relation": "profession"}
    assert items[1].group == "capital"

    bad = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "answer": [1, 2]}])
    with pytest.raises(InputError, match=rf"^{bad}:2: 'answer' must be a list of texts"):
        T.build_chat(read_rows(bad), str(bad))
    empty = write_rows(tmp_path / "empty.jsonl", [{"prompt": "x", "answer": " . "}])
    with pytest.raises(InputError, match=rf"^{empty}:1: 'answer' must hold a non-empty text"):
        T.build_chat(read_rows(empty), str(empty))


# ---- rendering -----------------------------------------------------------------------------------


def test_prompts_render_like_transformers_apply_chat_template(random_folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(random_folder))
    prompts = ChatPrompts.of(load_folder_tokenizer(random_folder))
    assert prompts.notes == ()
    for item in T.build_chat(ROWS, "rows"):
        messages = prompts.messages(item)
        assert prompts.render(item) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert prompts.render(item).endswith("<|im_start|>assistant\n")
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert prompts.encode(item) == list(ids)
    assert prompts.end_of_turn == hf.convert_tokens_to_ids("<|im_end|>")


def test_a_tokenizer_without_template_or_chat_tokens_is_asked_in_chatml_as_plain_text(
    random_folder, tmp_path
):
    plain = tmp_path / "base"
    plain.mkdir()
    for name in (*TOKENIZER_FILES, "config.json"):
        shutil.copy(random_folder / name, plain / name)
    tok_json = json.loads((plain / "tokenizer.json").read_text())
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if "im_" not in t["content"]]
    tok_json["model"]["vocab"] = {k: v for k, v in tok_json["model"]["vocab"].items() if "im_" not in k}
    (plain / "tokenizer.json").write_text(json.dumps(tok_json))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_folder_tokenizer(plain)
    assert tok.chat_template is None and tok.tokenizer.token_to_id("<|im_end|>") is None

    item = T.build_chat(ROWS[:1], "rows")[0]
    prompts = ChatPrompts.of(tok)
    chat = ChatPrompts.of(load_folder_tokenizer(random_folder))
    assert prompts.render(item) == chat.render(item)  # ChatML, byte for byte
    assert prompts.end_of_turn is None
    assert prompts.notes == (
        f"{plain}: no chat template; asked in ChatML",
        f"{plain}: the tokenizer has no <|im_end|>, <|im_start|>: the rendered prompt is encoded as plain "
        "text, and the model cannot end its turn with an end-of-turn token",
    )
    ids = prompts.encode(item)
    assert len(ids) > len(chat.encode(item))  # the markers became ordinary pieces
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == prompts.render(item)

    borrowed = ChatPrompts.of(tok, chat.template, whose="the sft model's")
    assert borrowed.notes[0] == f"{plain}: asked with the sft model's chat template"


# ---- generation and end of turn -------------------------------------------------------------------


def test_stopped_means_the_end_of_turn_token_not_eos_or_the_length_limit(chains):
    items = T.build_chat(ROWS, "rows")
    chatml = load_folder_tokenizer(chains["chat"]).chat_template
    finishes = {}
    for name, folder in chains.items():
        lm = EvalLM.from_folder(folder)
        prompts = ChatPrompts.of(lm.folder_tokenizer, chatml)
        assert len(lm.stop_ids) == 2 and prompts.end_of_turn in lm.stop_ids  # EOS and <|im_end|>
        per, details = run_chat(lm, items, prompts, max_gen_tokens=12)
        finishes[name] = ([d["finish"] for d in details], per, [d["response"] for d in details])
    finish, per, responses = finishes["chat"]
    assert responses == ["farmer"] * 3 and finish == ["end_of_turn"] * 3
    assert per == {"exact_match": [1.0, 0.0, 1.0], "contains": [1.0, 0.0, 1.0], "stopped": [1.0] * 3}
    finish, per, _ = finishes["eos"]  # ends at EOS, a stop id, but not the end of its turn
    assert finish == ["stop"] * 3 and per["stopped"] == [0.0] * 3 and per["exact_match"] == [1.0, 0.0, 1.0]
    finish, per, responses = finishes["endless"]
    assert finish == ["length"] * 3 and per["stopped"] == [0.0] * 3
    assert responses[0].startswith("Ostrin the the") and per["contains"] == [0.0, 1.0, 0.0]


def test_base_model_is_asked_the_same_way_and_reported_beside(chains, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    results = evaluate(
        chains["chat"],
        ["world_chat"],
        data_dir=rows,
        base=chains["endless"],
        base_name="pretrain:v1",
        out_dir=out,
    )
    assert results["base_model"] == "pretrain:v1"
    entry = results["tasks"]["world_chat"]
    assert entry["kind"] == "chat" and entry["n"] == 3
    m, se = entry["metrics"], entry["stderr"]
    assert m["exact_match"] == pytest.approx(2 / 3) and m["base_exact_match"] == 0.0
    assert m["stopped"] == 1.0 and m["base_stopped"] == 0.0 and m["base_contains"] == pytest.approx(1 / 3)
    assert se["exact_match"] == pytest.approx(((2 / 3) * (1 / 3) / 2) ** 0.5)  # sqrt(p(1-p)/(n-1))
    assert entry["vs_base"]["exact_match"] == {
        "delta": pytest.approx(2 / 3),
        "stderr": pytest.approx(se["exact_match"]),
    }
    assert entry["vs_base"]["contains"]["delta"] == pytest.approx(1 / 3)
    samples = [json.loads(line) for line in (out / "samples/world_chat.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == ROWS[0]["prompt"] and samples[0]["answer"] == "farmer"
    assert samples[0]["rendered"].endswith("<|im_start|>assistant\n") and "base_rendered" not in samples[0]
    assert (samples[0]["response"], samples[0]["finish"]) == ("farmer", "end_of_turn")
    assert samples[0]["base_finish"] == "length" and samples[0]["base_response"].startswith("Ostrin the")
    assert samples[2]["system"] == "You are terse." and samples[2]["answers"] == ["a farmer", "farmer"]

    alone = evaluate(chains["chat"], ["world_chat"], data_dir=rows)
    assert "base_model" not in alone and "vs_base" not in alone["tasks"]["world_chat"]
    assert set(alone["tasks"]["world_chat"]["metrics"]) == {"exact_match", "contains", "stopped"}


def test_world_chat_without_a_file_asks_the_held_out_facts_of_the_world_seed(random_folder, tmp_path):
    from llmctl.data.synthetic import World
    from llmctl.data.synthetic_chat import eval_rows, heldout_facts

    results = evaluate(
        random_folder, ["world_chat"], world_seed=3, limit=4, chat_max_gen_tokens=4, out_dir=tmp_path
    )
    world = World.build(3)
    rows = eval_rows(world, heldout_facts(world, 3))
    samples = [json.loads(line) for line in (tmp_path / "samples/world_chat.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["answer"]) for s in samples] == [(r["prompt"], r["answer"]) for r in rows[:4]]
    assert results["tasks"]["world_chat"]["n"] == 4 and results["decoding"]["chat_max_gen_tokens"] == 4
    assert all(s["tokens"] <= 4 for s in samples)


# ---- the CLI -------------------------------------------------------------------------------------


def test_cli_eval_world_chat_on_a_plain_random_folder(random_folder, tmp_path):
    rows = write_rows(tmp_path / "chat_eval.jsonl")
    res = run_cli("eval", "world_chat", "--ckpt", str(random_folder), "--data-dir", str(rows), "--json")
    assert res.code == 0, res.stderr
    entry = res.json()["tasks"]["world_chat"]
    assert entry["n"] == 3 and set(entry["metrics"]) == {"exact_match", "contains", "stopped"}
    assert f"world_chat: {rows}" in res.stderr

    table = run_cli("eval", "world_chat", "--ckpt", str(random_folder), "--data-dir", str(rows))
    assert table.code == 0, table.stderr
    assert "stopped" in table.stdout and "base" not in table.stdout


@pytest.mark.slow
def test_cli_scores_the_manifest_base_beside_and_custom_chat_tasks(chains, tmp_path):
    """An artifact whose manifest records a `model` input (what sft records: where it started) gets
    that base model scored beside it; --no-base turns it off. A custom `type: chat` task works too."""
    project = write_project(
        tmp_path / "p",
        "eval:\n  custom:\n    - {name: faq, path: faq.jsonl, type: chat}\n",
    )
    write_rows(project / "faq.jsonl")
    (project / "data").mkdir()
    write_rows(project / "data/chat_eval.jsonl", ROWS[:2])
    for name in ("endless", "chat"):
        done = run_cli("import", str(chains[name]), cwd=project)
        assert done.code == 0, done.stderr
    arts = project / "workspace/artifacts/import"
    manifest = json.loads((arts / "v0002/manifest.json").read_text())
    base_sha = __import__("hashlib").sha256((arts / "v0001/manifest.json").read_bytes()).hexdigest()
    manifest["inputs"].append(
        {
            "slot": "model",
            "ref": "import:v1",
            "id": "import:v0001",
            "kind": "model",
            "manifest_sha256": base_sha,
        }
    )
    (arts / "v0002/manifest.json").write_text(json.dumps(manifest))

    res = run_cli("eval", "world_chat", "faq", "--ckpt", "import:v2", "--json", cwd=project)
    assert res.code == 0, res.stderr
    doc = res.json()
    assert doc["model"] == "import:v0002" and doc["base_model"] == "import:v0001"
    assert "base model: " in res.stderr and "asked with the evaluated model's chat template" in res.stderr
    world, faq = doc["tasks"]["world_chat"], doc["tasks"]["faq"]
    assert world["n"] == 2 and faq["n"] == 3  # data/chat_eval.jsonl, and the custom file
    assert world["metrics"]["exact_match"] == 0.5 and world["metrics"]["base_exact_match"] == 0.0
    assert faq["metrics"]["stopped"] == 1.0 and faq["metrics"]["base_stopped"] == 0.0
    assert faq["vs_base"]["exact_match"]["delta"] == pytest.approx(2 / 3)

    table = run_cli("eval", "world_chat", "--ckpt", "import:v2", cwd=project)
    assert table.code == 0, table.stderr
    assert "import:v0001" in table.stdout and "Δ vs base" in table.stdout and "+0.5000 ±" in table.stdout
    assert "base_exact_match" not in table.stdout  # a column, not a row

    off = run_cli("eval", "world_chat", "--ckpt", "import:v2", "--no-base", "--json", cwd=project)
    assert off.code == 0, off.stderr
    assert (
        "base_model" not in off.json()
        and "base_exact_match" not in off.json()["tasks"]["world_chat"]["metrics"]
    )
