"""A model folder's BOS, EOS and stop ids are decided once (llmctl.model.hf_tokenizer) and generate,
chat and eval all use that decision, including the ids generation_config.json lists as EOS."""

from __future__ import annotations

import json

import pytest
from conftest import write_random_model_folder

from llmctl.evals.lm import EvalLM
from llmctl.inference import load_model
from llmctl.model.hf_tokenizer import load_folder_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_model_folder(tmp_path_factory.mktemp("model"))


def test_generate_chat_and_eval_stop_on_the_same_ids(folder):
    tok = load_folder_tokenizer(folder)
    extra = tok.tokenizer.token_to_id("the") or 300  # an end-of-turn id only generation_config names
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [tok.eos_id, extra]
    gen_path.write_text(json.dumps(gen))

    tok = load_folder_tokenizer(folder)
    assert tok.eos_id is not None and {tok.eos_id, extra} <= set(tok.stop_ids)
    assert load_model(folder).stop_token_ids() == tok.stop_ids  # generate and chat
    assert EvalLM.from_folder(folder).stop_ids == tok.stop_ids  # eval's generative tasks
    assert tok.encode("hello")[:1] == [tok.bos_id] == [tok.prompt_bos]  # llmctl models saw BOS first
