"""The chat template a merged model gets from its recipe's ``chat_template``.

The value is, as in mergekit: the name of a built-in template (``chatml``, ``llama3``,
``mistral``, ``alpaca``), ``auto`` (the template that most of the input models share; none if
none has one), or a Jinja template itself. The result is written as ``chat_template.jinja``
(what recent transformers releases read first) and into ``tokenizer_config.json`` (what older
ones read), so every supported transformers applies the same template.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import ClassVar

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError

# Written for splice from each format's published conventions.
BUILTIN: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def model_chat_template(ckpt: Checkpoint) -> str | None:
    """A model's own default chat template (``chat_template.jinja`` or tokenizer_config.json)."""
    jinja = ckpt.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    config = ckpt.path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except ValueError:
        return None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str | None, models: Mapping[str, Checkpoint]) -> str | None:
    """The template text for a recipe's ``chat_template`` (``SpliceError`` if it is none)."""
    if not value:
        return None
    if value == "auto":
        found = [t for ckpt in models.values() if (t := model_chat_template(ckpt))]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" not in value:
        raise SpliceError(
            f"chat_template {value!r}: not a built-in name ({', '.join(BUILTIN)}, auto) "
            "and not a Jinja template"
        )
    check_template(value)
    return value


def check_template(template: str) -> None:
    """Compile ``template`` as transformers does (sandboxed, ``loopcontrols``, its
    ``{% generation %}`` block and ``tojson`` filter); ``SpliceError`` with Jinja's message."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # parsed like transformers' AssistantTracker
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    try:
        env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        message = " ".join(str(e.message or e).split())
        raise SpliceError(
            f"chat_template is not a valid Jinja template: {message} (line {e.lineno})"
        ) from None


def template_files(
    template: str, tokenizer_from: Checkpoint | None, config_text: str | None = None
) -> dict[str, str]:
    """``{file name: text}`` that give the output ``template``: the Jinja file, and the
    tokenizer config (``config_text``, else the donor's file, if any) with its
    ``chat_template`` replaced."""
    files = {"chat_template.jinja": template}
    config = tokenizer_from.path / "tokenizer_config.json" if tokenizer_from else None
    if config_text is None and config is not None and config.is_file():
        config_text = config.read_text()
    if config_text is not None:
        data = json.loads(config_text)
        data["chat_template"] = template
        files["tokenizer_config.json"] = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return files
