"""Chat templates: a checkpoint's Jinja template, found and rendered the way transformers renders it.

Where the template comes from (transformers' order): ``chat_template.jinja`` (plus named ones in
``additional_chat_templates/*.jinja``), else ``chat_template`` in tokenizer_config.json (a string, or
a list of ``{"name", "template"}``), else the GGUF file's ``tokenizer.chat_template``. With several
named templates the one called ``default`` is used.

How it is rendered (``transformers.utils.chat_template_utils``): a jinja2
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension and a ``{% generation %}`` block that renders its body; ``tojson`` without HTML escaping;
globals ``raise_exception`` (the template refuses a conversation), ``strftime_now``, ``dict`` and a
``namespace`` that refuses underscore names; variables ``messages`` (keys whose value is None
dropped), ``tools`` / ``documents`` (None), ``add_generation_prompt`` and the named special tokens
(``bos_token``, ``eos_token``, ...). Templates come from model files, so they are untrusted code:
the sandbox is the point, and every failure is a :class:`ChatTemplateError` naming the cause.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class ChatTemplateError(ValueError):
    """A conversation cannot be rendered: no template, the template refused it, or it is broken."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering
    only needs its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace minus underscore attributes (no way to reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (jinja's own signature trick)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


class ChatTemplate:
    """One model's template source, compiled on first use (and cached per source text)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        special_tokens: Mapping[str, str],
        add_generation_prompt: bool = True,
    ) -> str:
        if not messages:
            raise ChatTemplateError("the conversation is empty")
        # OpenAI-style clients send content=None; templates handle a missing key, not a None.
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        template = _compile(self.source)
        try:
            return template.render(
                **dict(special_tokens),
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None


def pick_template(value: Any) -> str | None:
    """One template source from a tokenizer_config ``chat_template`` value or a name -> source map."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
    if isinstance(value, dict) and value:
        if "default" in value:
            return str(value["default"])
        raise ChatTemplateError(f"several chat templates {sorted(value)} and none is called 'default'")
    return None


def load_chat_template(root: Path, tok_cfg: Mapping[str, Any]) -> ChatTemplate | None:
    """The chat template of the checkpoint directory ``root`` (tokenizer_config.json already read)."""
    templates: dict[str, str] = {}
    main = root / CHAT_TEMPLATE_FILE
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    extra = root / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    source = pick_template(templates) if templates else pick_template(tok_cfg.get("chat_template"))
    return ChatTemplate(source) if source is not None else None
