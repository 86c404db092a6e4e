"""engine.chat_template renders conversations exactly as transformers' ``apply_chat_template`` does:
the same text and, tokenized, the same ids, for templates written the way real checkpoints write them
(ChatML with a default system prompt, Llama-3, Llama-2 / Mistral with bos_token and
raise_exception, and one using namespace / loop controls / tojson / {% generation %}); where the
template comes from (chat_template.jinja over tokenizer_config.json, named templates); refusals and
sandbox escapes become ChatTemplateError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.make_model import CORPUS
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>"]
SPECIALS += ["<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]"]

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ \
message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}\
{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}\
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' '  + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""
FANCY = """{%- set ns = namespace(count=0, last='') -%}
{%- for message in messages -%}
    {%- if message.role == 'tool' -%}{%- continue -%}{%- endif -%}
    {%- set ns.count = ns.count + 1 -%}
    <|im_start|>{{ message.role }}
    {% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}
    {%- else %}{{ message.content }}{% endif %}<|im_end|>
    {% if ns.count >= 4 %}{% break %}{% endif %}
{%- endfor -%}
meta={{ {"n": ns.count, "s": "é<tag>"} | tojson }}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "fancy": FANCY}
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "  Capital of Italy?  "},
        {"role": "assistant", "content": "Rome"},
        {"role": "user", "content": "And of Spain?"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "ignored by some", "name": None},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ],
]


def _checkpoint(root: Path, name: str, template: str, as_file: bool = False) -> Path:
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [str(CORPUS)],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    out = root / name
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    if name == "llama3":
        cfg["bos_token"] = "<|begin_of_text|>"
    if as_file:
        (out / "chat_template.jinja").write_text(template)
        cfg["chat_template"] = "{{ 'stale template in tokenizer_config.json' }}"
    else:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    out = {name: _checkpoint(root, name, t) for name, t in TEMPLATES.items()}
    out["file"] = _checkpoint(root, "file", CHATML, as_file=True)
    return out


def test_random_checkpoints_carry_a_template_equal_to_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from engine.make_model import make_model

    path = make_model(tmp_path / "m", "tiny", "qwen2")
    conv = CONVERSATIONS[1]
    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(
        conv, add_generation_prompt=True, return_dict=False
    )
    assert Tokenizer.from_pretrained(path).encode_chat(conv) == ids


@pytest.mark.parametrize("name", [*TEMPLATES, "file"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_and_ids_equal_apply_chat_template(
    name: str, add_generation_prompt: bool, dirs: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(dirs[name])
    ours = Tokenizer.from_pretrained(dirs[name])
    for conv in CONVERSATIONS:
        try:
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the Llama-2 template refuses the conversation with a tool turn
            with pytest.raises(ChatTemplateError, match="roles must alternate"):
                ours.render_chat(conv, add_generation_prompt)
            assert "roles must alternate" in str(e)
            continue
        assert ours.render_chat(conv, add_generation_prompt) == want
        ids = hf.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert ours.encode_chat(conv, add_generation_prompt) == ids


def test_chat_template_jinja_wins_over_tokenizer_config(dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(dirs["file"])
    assert tok.chat_template is not None and tok.chat_template.source == CHATML


def test_named_templates_use_default(tmp_path: Path) -> None:
    from engine.chat_template import load_chat_template

    cfg = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    tpl = load_chat_template(tmp_path, cfg)
    assert tpl is not None and tpl.source == "D"
    with pytest.raises(ChatTemplateError, match="none is called 'default'"):
        load_chat_template(tmp_path, {"chat_template": [{"name": "a", "template": "A"}]})
    assert load_chat_template(tmp_path, {}) is None


def test_refusals_and_escapes_are_chat_template_errors() -> None:
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    user = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(LLAMA2).render([{"role": "assistant", "content": "x"}], special)
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate(CHATML).render([], special)
    with pytest.raises(ChatTemplateError):  # the sandbox: no reaching into Python objects
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(user, special)
    with pytest.raises(ChatTemplateError):  # the namespace refuses underscore attributes
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(user, special)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}").render(user, special)
    with pytest.raises(ChatTemplateError, match="immutable|unsafe|not safely"):  # ImmutableSandbox
        ChatTemplate("{% set m = messages %}{{ m.append(1) }}").render(user, special)


def test_no_template_is_a_clear_error(tmp_path: Path) -> None:
    from engine.make_model import make_model

    path = make_model(tmp_path / "m", "tiny")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
