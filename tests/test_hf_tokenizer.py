"""A model folder's chat template is found wherever transformers keeps it and renders byte-identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmctl.data.synthetic import iter_documents
from llmctl.data.tokenizer import train_tokenizer
from llmctl.errors import InputError
from llmctl.model.hf_tokenizer import load_folder_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of Velmora?"},
    {"role": "assistant", "content": "Tessaly."},
    {"role": "user", "content": 'And "quotes" <b>&</b> unicode: é?'},
]

# Uses what real hub templates use: loop controls, transformers' tojson (no HTML escaping), the
# special-token variables, raise_exception, a namespace and the {% generation %} training tag.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if message['role'] == 'system' %}{% set ns.n = ns.n + 1 %}{% continue %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] | tojson }}{% endif %}<|im_end|>\n"
    "{% if loop.index > 10 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{{ ns.n }} system {{ eos_token }} {{ pad_token }}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory) -> Path:
    """A tokenizer folder as transformers' save_pretrained writes it today (chat_template.jinja)."""
    tok = train_tokenizer((d["text"] for d in iter_documents(100, seed=1)), vocab_size=300)
    llmctl_folder = tmp_path_factory.mktemp("llmctl-tok")
    tok.save(llmctl_folder, model_max_length=128)
    folder = tmp_path_factory.mktemp("hf-tok")
    transformers.AutoTokenizer.from_pretrained(llmctl_folder).save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    return folder


def _relayout(src: Path, dst: Path, layout: str, template: str) -> Path:
    """Copy a tokenizer folder and store `template` in one of the layouts transformers reads."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    config = json.loads((dst / "tokenizer_config.json").read_text())
    if layout == "jinja":
        (dst / "chat_template.jinja").write_text(template)
    elif layout == "config-string":
        config["chat_template"] = template
    elif layout == "config-list":
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ 'tools' }}"},
            {"name": "default", "template": template},
        ]
    elif layout == "named-files":
        (dst / "chat_template.jinja").write_text(template)
        (dst / "additional_chat_templates").mkdir()
        (dst / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
    elif layout == "template-json":
        (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("layout", ["jinja", "config-string", "config-list", "named-files", "template-json"])
@pytest.mark.parametrize("which", ["saved", "rich"])
def test_chat_template_found_and_rendered_like_transformers(saved_by_transformers, tmp_path, layout, which):
    template = (
        (saved_by_transformers / "chat_template.jinja").read_text() if which == "saved" else RICH_TEMPLATE
    )
    folder = _relayout(saved_by_transformers, tmp_path / layout, layout, template)
    ours = load_folder_tokenizer(folder)
    if layout == "template-json":  # the processor layout: AutoProcessor reads it, the tokenizer does not
        theirs = transformers.AutoTokenizer.from_pretrained(folder, chat_template=template)
    else:
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (CONVERSATION[:2], CONVERSATION):
        for gen in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(messages, add_generation_prompt=gen).encode() == expected.encode()
    expected_ids = theirs.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
        expected_ids = expected_ids["input_ids"]
    assert ours.encode_chat(CONVERSATION) == list(expected_ids)


def test_no_chat_template_says_where_it_looked(saved_by_transformers, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(saved_by_transformers, folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(InputError) as err:
        load_folder_tokenizer(folder).render_chat(CONVERSATION[:2])
    assert "chat_template.jinja" in err.value.message and "tokenizer_config.json" in err.value.message


def test_template_errors_are_input_errors(saved_by_transformers, tmp_path):
    folder = _relayout(saved_by_transformers, tmp_path / "rich", "jinja", RICH_TEMPLATE)
    with pytest.raises(InputError, match="bad role"):
        load_folder_tokenizer(folder).render_chat([{"role": "tool", "content": "x"}])
