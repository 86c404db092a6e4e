"""The HTTP front door's pure parts: OpenAI bodies -> Plans (defaults, field names, refusals),
logprobs in each endpoint's shape, pydantic errors and exceptions -> statuses, admission's check."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError as PydanticError

from router.admission import AdmissionQueue
from router.errors import BackendUnavailable, InvalidRequest, Overloaded
from router.http.errors import http_error, pydantic_errors, response_parts
from router.http.openai import Logprobs, Plan, chat_plan, completion_plan
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.validation import ValidationError

pytestmark = pytest.mark.unit


def test_completion_plan_defaults_prompt_forms_and_extensions() -> None:
    plan = completion_plan(CompletionRequest(prompt="hi"))
    (inp,) = plan.inputs
    assert (inp.prompt_text, inp.max_tokens, inp.temperature, inp.top_k, inp.top_p) == (
        "hi",
        16,
        1.0,
        0,
        None,
    )
    assert (plan.n, plan.stream, plan.include_usage, plan.fill_context) == (1, False, False, False)
    assert [i.prompt_token_ids for i in completion_plan(CompletionRequest(prompt=[3, 4])).inputs] == [[3, 4]]
    many = completion_plan(CompletionRequest(prompt=[[3], [4, 5]], n=2, best_of=2))
    assert [i.prompt_token_ids for i in many.inputs] == [[3], [4, 5]] and many.n == 2
    assert [i.prompt_text for i in completion_plan(CompletionRequest(prompt=["a", "b"])).inputs] == ["a", "b"]
    body = CompletionRequest(
        prompt="x", top_k=-1, stop="END", seed=3, ignore_eos=True, disaggregation="always", logprobs=2,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
    )  # fmt: skip
    plan = completion_plan(body)
    (inp,) = plan.inputs
    assert (inp.top_k, inp.stop, inp.seed, inp.ignore_eos, inp.disaggregation) == (
        0,
        ["END"],
        3,
        True,
        "always",
    )
    assert (inp.logprobs, plan.logprobs, plan.include_usage, plan.continuous_usage) == (2, 2, True, True)
    # unknown fields are ignored
    assert CompletionRequest.model_validate({"prompt": "x", "frobnicate": 1}).prompt == "x"


def test_chat_plan_maps_content_parts_max_completion_tokens_and_top_logprobs() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = ChatCompletionRequest(
        messages=[{"role": "system", "content": None}, {"role": "user", "content": parts}],
        max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    plan = chat_plan(body)
    (inp,) = plan.inputs
    assert inp.prompt_chat == [{"role": "system", "content": ""}, {"role": "user", "content": "a\nb"}]
    assert (inp.max_tokens, plan.max_tokens_field, inp.logprobs, plan.fill_context) == (
        7,
        "max_completion_tokens",
        3,
        False,
    )
    plan = chat_plan(ChatCompletionRequest(messages=[{"role": "u", "content": "x"}], logprobs=True))
    assert (plan.inputs[0].logprobs, plan.fill_context, plan.max_tokens_field) == (0, True, "max_tokens")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": "x", "top_k": -3}, "top_k"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completion_refusals_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        completion_plan(CompletionRequest.model_validate(body))
    assert e.value.field == field and str(e.value).startswith(field + ": ")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "u", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ],
)
def test_chat_refusals_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        chat_plan(ChatCompletionRequest.model_validate({"messages": [{"role": "u", "content": "x"}], **body}))
    assert e.value.field == field


def test_validation_fields_are_renamed_for_http() -> None:
    chat = chat_plan(ChatCompletionRequest(messages=[{"role": "u"}], max_completion_tokens=3))
    comp = completion_plan(CompletionRequest(prompt="x"))
    cases = {
        "sampling.max_tokens": ("max_completion_tokens", "max_tokens"),
        "sampling.top_p": ("top_p", "top_p"),
        "sampling.logprobs": ("top_logprobs", "logprobs"),
        "prompt.chat.messages[2].role": ("messages[2].role", "messages[2].role"),  # chats only
        "prompt.token_ids": ("messages", "prompt"),
        "model": ("model", "model"),
    }
    for name, (in_chat, in_completion) in cases.items():
        assert (chat.field(name), comp.field(name)) == (in_chat, in_completion), name
    e = comp.translate(InvalidRequest("prompt.token_ids", "token id 9 is outside"))
    assert (e.field, str(e)) == ("prompt", "prompt: token id 9 is outside")


def test_logprobs_render_in_each_endpoints_shape() -> None:
    text = {10: "a", 11: "bc", 12: "é"}.__getitem__
    comp = Logprobs("completion", text)
    out = comp.render([10, 11], [-0.1, float("-inf")], [[(11, -0.05)], None])
    assert out == {
        "tokens": ["a", "bc"],
        "token_logprobs": [-0.1, -9999.0],
        "top_logprobs": [{"bc": -0.05, "a": -0.1}, {"bc": -9999.0}],
        "text_offset": [0, 1],
    }
    assert comp.render([12], [-1.0], [[]])["text_offset"] == [3]  # continues across chunks
    chat = Logprobs("chat", text).render([12], [-1.0], [[(10, -2.0)]])
    assert chat == {
        "content": [
            {
                "token": "é",
                "logprob": -1.0,
                "bytes": [195, 169],
                "top_logprobs": [{"token": "a", "logprob": -2.0, "bytes": [97]}],
            }
        ]
    }


def test_errors_map_to_statuses_and_openai_objects() -> None:
    assert http_error(ValidationError("top_p", "bad")).status == 400
    assert http_error(InvalidRequest("prompt", "bad")).param == "prompt"
    status, body, headers = response_parts(Overloaded("full"))
    assert (status, body["error"]["type"], headers) == (429, "rate_limit_error", {"Retry-After": "1"})
    assert response_parts(BackendUnavailable("gone"))[0] == 503
    status, body, _ = response_parts(RuntimeError("boom"))
    assert (status, body["error"]["message"]) == (500, "internal error: RuntimeError: boom")
    with pytest.raises(PydanticError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "u", "content": 3}]})
    err = pydantic_errors(list(e.value.errors()))
    assert (err.status, err.param) == (400, "messages[0].content") and err.message.startswith(
        "messages[0].content: "
    )
    with pytest.raises(PydanticError) as e:
        CompletionRequest.model_validate({"prompt": 12})
    assert pydantic_errors(list(e.value.errors())).param == "prompt"


def test_admission_check_refuses_what_acquire_would_shed_without_taking_a_slot() -> None:
    async def main() -> None:
        q = AdmissionQueue(max_concurrency=2, max_queue=1)
        q.check(3)  # two slots and one queue place: fits
        with pytest.raises(Overloaded):
            q.check(4)
        assert (q.in_flight, q.num_shed) == (0, 1)
        await q.acquire()
        await q.acquire()
        q.check(1)
        with pytest.raises(Overloaded):
            q.check(2)
        q.close()
        with pytest.raises(BackendUnavailable):
            q.check(1)

    asyncio.run(main())


def test_plan_is_a_plain_value() -> None:
    assert Plan("completion", []).prompt_field == "prompt" and Plan("chat", []).prompt_field == "messages"
