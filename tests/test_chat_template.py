"""A recipe's ``chat_template``: built-in names, ``auto`` and Jinja text, rendered by
transformers' own ``apply_chat_template`` from the merged folder and compared with hand-written
prompts in each format."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from splice.cli import main
from splice.merge import MergeOptions, run
from splice.merge.chat_template import BUILTIN

OPTS = MergeOptions(show_progress=False)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]
# the tiny fixtures' tokenizer has bos <s> and eos </s>
EXPECTED = {
    "chatml": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] be brief\n\nhi [/INST]hello</s>[INST] bye [/INST]",
    "alpaca": "be brief\n\n### Instruction:\nhi\n\n### Response:\nhello</s>\n\n"
    "### Instruction:\nbye\n\n### Response:\n",
}


def linear(trio, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(trio["ft1"]), "parameters": {"weight": 0.5}},
            {"model": str(trio["ft2"]), "parameters": {"weight": 0.5}},
        ],
        **extra,
    }


def rendered(folder) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_render_their_format(trio, tmp_path, name):
    out = run(linear(trio, chat_template=name), tmp_path / "out", OPTS)
    assert rendered(out) == EXPECTED[name]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (out / "chat_template.jinja").read_text()


def test_auto_takes_the_template_most_models_share(trio, tmp_path):
    models = {}
    for name, template in (("a", "chatml"), ("b", "alpaca"), ("c", "alpaca")):
        models[name] = shutil.copytree(trio["ft1"], tmp_path / name)
        (models[name] / "chat_template.jinja").write_text(BUILTIN[template])
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1 / 3}} for p in models.values()],
        "chat_template": "auto",
    }
    out = run(recipe, tmp_path / "out", OPTS)
    assert rendered(out) == EXPECTED["alpaca"]


def test_auto_without_templates_writes_none(trio, tmp_path):
    out = run(linear(trio, chat_template="auto"), tmp_path / "out", OPTS)
    assert not (out / "chat_template.jinja").exists()


def test_jinja_text_is_used_as_is(trio, tmp_path):
    jinja = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
    out = run(linear(trio, chat_template=jinja), tmp_path / "out", OPTS)
    assert rendered(out) == "s:be brief;u:hi;a:hello;u:bye;"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"chat_template": "chatmll"}, "chat_template 'chatmll': not a built-in name"),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}},
            "needs exactly one of `token`, `token_id`",
        ),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of must be >= 1"),
    ],
)
def test_bad_template_or_tokenizer_settings_are_one_line(trio, tmp_path, capsys, extra, message):
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(linear(trio, **extra)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()
