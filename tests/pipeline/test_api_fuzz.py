"""Property-based fuzzing of the front-end (hypothesis) against a launched pipeline: request bodies
drawn over the OpenAI schema with values of every JSON type and range, plus malformed bodies. No
answer is a 5xx, every 4xx is OpenAI's error format and names the field where there is one, and the
service keeps serving with no request left open."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_launch import launched, leak_free, make_launch_config, snapshot, wait_until

MODEL = "llama"

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
SMALL = st.integers(min_value=-3, max_value=24)
FIELDS = {  # each: plausible values, or anything
    "temperature": st.floats(min_value=-1, max_value=3), "top_p": st.floats(min_value=-0.5, max_value=1.5),
    "top_k": st.one_of(SMALL, st.integers(min_value=2 ** 31 - 2, max_value=2 ** 65)),
    "min_p": st.floats(min_value=-0.5, max_value=1.5), "seed": st.integers(min_value=-(2 ** 65), max_value=2 ** 65),
    "max_tokens": SMALL, "min_tokens": SMALL, "n": st.integers(min_value=0, max_value=3),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=80)),
    "stop_token_ids": st.lists(st.integers(min_value=-5, max_value=2 ** 64), max_size=4),
    "logprobs": st.one_of(SMALL, st.booleans()), "top_logprobs": SMALL, "ignore_eos": st.booleans(),
    "repetition_penalty": st.floats(min_value=-1, max_value=3),
    "presence_penalty": st.floats(min_value=-3, max_value=3), "stream": st.booleans(),
    "stream_options": st.one_of(st.just({"include_usage": True}), JSON), "echo": st.booleans(),
}
PROMPTS = st.one_of(st.text(max_size=40), st.lists(st.integers(min_value=-3, max_value=600), max_size=12), JSON)
MESSAGES = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                      "content": st.one_of(st.text(max_size=30), JSON)}),
                              max_size=3), JSON)


@st.composite
def bodies(draw):
    chat = draw(st.booleans())
    body = {"model": draw(st.one_of(st.just(MODEL), JSON)), "max_tokens": 4}  # fuzzed below, or short
    body["messages" if chat else "prompt"] = draw(MESSAGES if chat else PROMPTS)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True)):
        body[name] = draw(st.one_of(FIELDS[name], JSON) if draw(st.booleans()) else FIELDS[name])
    return ("/v1/chat/completions" if chat else "/v1/completions"), json.dumps(body).encode()


MALFORMED = st.one_of(st.binary(max_size=64), st.just(b"[" * 5000 + b"]" * 5000),
                      st.just(b'{"model": "llama", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
                      st.just(b'{"model": "llama", "prompt": "x", "seed": 18446744073709551616}'))


@pytest.fixture(scope="module")
def pipeline(model_dir):
    with launched(make_launch_config(model_dir(MODEL), ["mixed"])) as launcher:
        yield launcher


def check(base: str, path: str, body: bytes) -> None:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", base + path, content=body, headers={"content-type": "application/json"}) as r:
            text = b"".join(r.iter_bytes()).decode(errors="replace")
    assert r.status_code < 500, (r.status_code, text[:300], body[:300])
    if r.status_code >= 400:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"]
        if r.status_code == 400 and not error["param"]:  # only a body that is not an object of fields
            assert any(w in error["message"] for w in ("JSON", "Expected `object`", "prompt", "messages")), error
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=bodies())
def test_fuzzed_requests_get_no_5xx_and_errors_name_their_field(pipeline, request):
    check(f"http://127.0.0.1:{pipeline.cfg.api.port}", *request)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=MALFORMED, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_malformed_bodies_get_a_400(pipeline, body, path):
    check(f"http://127.0.0.1:{pipeline.cfg.api.port}", path, body)


def test_after_the_fuzzing_the_service_serves_and_holds_nothing(pipeline):
    base = f"http://127.0.0.1:{pipeline.cfg.api.port}"
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    wait_until(lambda: snapshot(pipeline)["api"].get("running") == 0, what="no request open in the api")
    assert wait_until(lambda: leak_free(pipeline), what="every block free")
