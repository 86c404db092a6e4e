"""router.validation: every bad field is refused with a ValidationError naming it."""

from __future__ import annotations

import math

import pytest

from router.validation import (
    GenerateInput,
    ModelLimits,
    ValidationError,
    check_prompt_length,
    check_request,
    to_sampling_params,
)

pytestmark = pytest.mark.unit

DEMO = ModelLimits(
    name="demo", max_context_length=128, max_tokens_limit=64, default_max_tokens=16, vocab_size=1000
)
MODELS = {"demo": DEMO}


def _req(**kw: object) -> GenerateInput:
    base: dict[str, object] = {"model": "demo", "prompt_text": "hello"}
    base.update(kw)
    return GenerateInput(**base)  # type: ignore[arg-type]


def _refused(req: GenerateInput, models: dict[str, ModelLimits] = MODELS) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        check_request(req, models)
    assert str(info.value).startswith(info.value.field + ": ")
    return info.value


def test_valid_request_resolves_model_and_builds_params() -> None:
    req = _req(max_tokens=8, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3, stop=["\n"], logprobs=2)
    assert check_request(req, MODELS) is DEMO
    p = to_sampling_params(req, DEMO)
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (8, 0.7, 5, 0.9, 0.1, 3)
    assert (p.stop, p.logprobs) == (["\n"], 2)
    req = _req(repetition_penalty=1.3, frequency_penalty=-0.5, presence_penalty=2.0)
    p = to_sampling_params(req, DEMO)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.3, -0.5, 2.0)
    chat = _req(prompt_text=None, prompt_chat=[{"role": "user", "content": "hi"}])
    assert check_request(chat, MODELS) is DEMO


def test_unset_fields_take_defaults() -> None:
    req = GenerateInput(prompt_token_ids=[1, 2, 3])  # empty model name: the only model
    assert check_request(req, MODELS) is DEMO
    p = to_sampling_params(req, DEMO)
    assert (p.max_tokens, p.top_p, p.temperature) == (16, 1.0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("kw", "field", "needle"),
    [
        ({"prompt_text": ""}, "prompt", "is empty"),
        ({"prompt_text": None}, "prompt", "is empty"),
        ({"prompt_text": None, "prompt_token_ids": []}, "prompt.token_ids", "is empty"),
        ({"prompt_text": None, "prompt_token_ids": [1] * 129}, "prompt.token_ids", "129 tokens"),
        ({"prompt_text": None, "prompt_token_ids": [1, 1000]}, "prompt.token_ids", "token id 1000"),
        ({"prompt_token_ids": [1]}, "prompt", "not several"),
        ({"prompt_text": None, "prompt_chat": []}, "prompt.chat.messages", "is empty"),
        (
            {
                "prompt_text": None,
                "prompt_chat": [{"role": "user", "content": "a"}, {"role": "", "content": "b"}],
            },
            "prompt.chat.messages[1].role",
            "is empty",
        ),
        ({"prompt_chat": [{"role": "user", "content": "a"}]}, "prompt", "not several"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty", "must be > 0"),
        ({"repetition_penalty": -1.0}, "sampling.repetition_penalty", "must be > 0"),
        ({"repetition_penalty": math.inf}, "sampling.repetition_penalty", "finite"),
        ({"frequency_penalty": 2.5}, "sampling.frequency_penalty", "[-2, 2]"),
        ({"frequency_penalty": math.nan}, "sampling.frequency_penalty", "finite"),
        ({"presence_penalty": -2.1}, "sampling.presence_penalty", "[-2, 2]"),
        ({"max_tokens": 0}, "sampling.max_tokens", "must be > 0, got 0"),
        ({"max_tokens": -3}, "sampling.max_tokens", "must be > 0, got -3"),
        ({"max_tokens": 65}, "sampling.max_tokens", "over this server's limit 64"),
        ({"temperature": -0.1}, "sampling.temperature", "must be >= 0"),
        ({"temperature": math.nan}, "sampling.temperature", "finite"),
        ({"top_p": 0.0}, "sampling.top_p", "(0, 1]"),
        ({"top_p": 1.5}, "sampling.top_p", "(0, 1]"),
        ({"top_p": math.nan}, "sampling.top_p", "finite"),
        ({"top_k": -1}, "sampling.top_k", ">= 0"),
        ({"min_p": -0.5}, "sampling.min_p", "[0, 1]"),
        ({"min_p": 1.5}, "sampling.min_p", "[0, 1]"),
        ({"logprobs": -1}, "sampling.logprobs", ">= 0"),
        ({"stop": [""]}, "sampling.stop", "empty"),
        ({"stop_token_ids": [-2]}, "sampling.stop_token_ids", ">= 0"),
        ({"disaggregation": "sometimes"}, "disaggregation", "'sometimes'"),
        ({"model": "gpt-9"}, "model", "unknown model 'gpt-9'"),
    ],
)
def test_each_bad_field_is_named(kw: dict[str, object], field: str, needle: str) -> None:
    err = _refused(_req(**kw))
    assert err.field == field
    assert needle in err.message


def test_top_p_one_and_min_p_bounds_are_allowed() -> None:
    assert check_request(_req(top_p=1.0, min_p=0.0), MODELS) is DEMO
    assert check_request(_req(min_p=1.0, max_tokens=64), MODELS) is DEMO


def test_model_name_required_with_several_models() -> None:
    other = ModelLimits(name="other", max_context_length=64, max_tokens_limit=8)
    models = {"demo": DEMO, "other": other}
    assert check_request(_req(model="other", max_tokens=8), models) is other
    assert _refused(_req(model=""), models).field == "model"
    assert _refused(_req(), {}).message == "this server serves no model"


def test_prompt_length_after_tokenization() -> None:
    check_prompt_length(112, 16, DEMO)  # exactly fills the 128-token context
    with pytest.raises(ValidationError) as info:
        check_prompt_length(129, 1, DEMO)
    assert info.value.field == "prompt"
    assert "129 tokens, over the context length 128" in info.value.message
    with pytest.raises(ValidationError) as info:
        check_prompt_length(113, 16, DEMO)
    assert info.value.field == "sampling.max_tokens"
    assert "at most 15 fit" in info.value.message
    with pytest.raises(ValidationError) as info:
        check_prompt_length(0, 16, DEMO)
    assert info.value.field == "prompt"
