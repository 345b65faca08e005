"""`api.api_key`: the front-end's app, in process, over a bridge that answers every request at once.
A /v1 request without `Authorization: Bearer <key>` gets OpenAI's 401 before its body is read;
/health and /metrics stay open; the config refuses a bad key naming it; the launcher's curl line and
the bench client carry the header."""
import argparse
import asyncio
from dataclasses import replace

import pytest
from aiohttp import web
from fake_openai import fake_server
from starlette.testclient import TestClient

from pdpipe.api.bridge import TokenStream
from pdpipe.api.metrics import ApiMetrics
from pdpipe.api.server import ApiContext, build_app
from pdpipe.bench.cli import add_bench_commands
from pdpipe.bench.compare import serve_config
from pdpipe.bench.config import CompareConfig, ServeConfig, recorded_settings
from pdpipe.bench.datasets import Prompt
from pdpipe.bench.serve import client_api_key, resolve_target, send_all
from pdpipe.cli_args import dataclass_from_args
from pdpipe.config import ApiConfig, LaunchConfig, load_launch_config
from pdpipe.launcher import Launcher
from pdpipe.messages import EngineOutput
from pdpipe.tokenizer import Tokenizer

KEY = "sk-test-0123"
MODEL = "llama"


def serving_snapshot() -> dict:
    """The scheduler's snapshot of a launch whose one mixed instance has reported: it serves."""
    from pdpipe.config import DeadlineConfig
    from pdpipe.messages import InstanceStats
    from pdpipe.scheduler.core import SchedulerCore

    core = SchedulerCore({"mixed-0": "mixed"}, DeadlineConfig(), lambda dest, msg: None)
    core.handle(InstanceStats(instance="mixed-0", role="mixed", time=0.0))
    return core.snapshot()


SNAPSHOT = serving_snapshot()


class AnsweringBridge:
    """The scheduler and engines in one: every request gets one token and ends; what arrives is kept."""

    def __init__(self):
        self.submitted: list[list[int]] = []
        self.streams: dict = {}
        self.waiting: dict = {}
        self.waiting_tokens = 0

    async def submit(self, request_id, prompt, params, arrival, cache_salt="") -> TokenStream:
        self.submitted.append(prompt)
        stream = TokenStream()
        stream.put(EngineOutput(request_id=request_id, token_ids=[65], finish_reason="length"))
        return stream

    async def abort(self, request_id, reason) -> None:
        pass

    def forget(self, request_id) -> None:
        pass

    async def control(self, op, timeout=2.0, **kwargs) -> dict:
        return SNAPSHOT


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir(MODEL))


def make_app(tokenizer, api_key: str = KEY):
    bridge = AnsweringBridge()
    ctx = ApiContext(tokenizer, bridge, MODEL, max_model_len=256, max_body_bytes=64 * 1024, metrics=ApiMetrics())
    return build_app(ctx, api_key), bridge


REQUESTS = {
    "/v1/completions": ("POST", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
    "/v1/chat/completions": ("POST", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}),
    "/v1/models": ("GET", None),
}
REFUSED = {"none": {}, "basic scheme": {"Authorization": f"Basic {KEY}"}, "token alone": {"Authorization": KEY},
           "wrong key": {"Authorization": "Bearer sk-test-0124"}, "key's prefix": {"Authorization": "Bearer sk-test"},
           "empty bearer": {"Authorization": "Bearer "}}


@pytest.mark.parametrize("path", sorted(REQUESTS))
@pytest.mark.parametrize("headers", list(REFUSED.values()), ids=list(REFUSED))
def test_a_v1_request_without_the_key_gets_openais_401(tokenizer, path, headers):
    app, bridge = make_app(tokenizer)
    method, body = REQUESTS[path]
    with TestClient(app) as client:
        resp = client.request(method, path, json=body, headers=headers)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)
    assert error["message"] and KEY not in error["message"]
    assert bridge.submitted == []


@pytest.mark.parametrize("path", sorted(REQUESTS))
@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_the_key_lets_a_request_through(tokenizer, path, scheme):
    app, bridge = make_app(tokenizer)
    method, body = REQUESTS[path]
    with TestClient(app) as client:
        resp = client.request(method, path, json=body, headers={"Authorization": f"{scheme} {KEY}"})
    assert resp.status_code == 200, resp.text
    if path == "/v1/models":
        assert resp.json()["data"][0]["id"] == MODEL
    else:
        assert resp.json()["usage"]["completion_tokens"] == 1 and len(bridge.submitted) == 1


def test_health_and_metrics_need_no_key_and_other_routes_do(tokenizer):
    app, _ = make_app(tokenizer)
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and b"pdpipe_scheduler_up 1.0" in metrics.content
        assert client.get("/v1/nothing").status_code == 401  # closed by default: no route is guessed
        assert client.get("/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_without_a_key_configured_every_route_is_open(tokenizer):
    app, bridge = make_app(tokenizer, api_key="")
    with TestClient(app) as client:
        body = REQUESTS["/v1/completions"][1]
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer x"}).status_code == 200
    assert len(bridge.submitted) == 2


def test_a_refused_request_has_none_of_its_body_read(tokenizer):
    app, bridge = make_app(tokenizer)
    received: list[dict] = []
    sent: list[dict] = []

    async def receive() -> dict:
        received.append({})
        return {"type": "http.request", "body": b'{"model": "llama", "prompt": "hi"}', "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json"), (b"content-length", b"34")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5),
             "root_path": "", "app": app}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and b"invalid_api_key" in sent[1]["body"]
    assert received == [] and bridge.submitted == []


@pytest.mark.parametrize("key", ["has space", "tab\there", "caf\u00e9", "new\nline", "\x7f", 12345])
def test_a_bad_key_names_the_field(key):
    with pytest.raises(ValueError, match=r"^api\.api_key: ") as err:
        ApiConfig(api_key=key)
    assert str(key) not in str(err.value)  # a secret stays out of logs


@pytest.mark.parametrize("line", ['api_key = "has space"', "api_key = 12345"])
def test_a_bad_key_in_a_config_file_names_the_field(line, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f"[api]\n{line}\n")
    with pytest.raises(ValueError, match=r"^api\.api_key: "):
        load_launch_config(str(path))


def test_the_key_stays_out_of_reprs_and_result_files():
    assert KEY not in repr(ApiConfig(api_key=KEY)) and KEY not in repr(ServeConfig(api_key=KEY))
    assert KEY not in repr(LaunchConfig(api=ApiConfig(api_key=KEY)))
    assert recorded_settings(ServeConfig(api_key=KEY))["api_key"] == "(set)"
    assert recorded_settings(CompareConfig(api_key=KEY))["api_key"] == "(set)"
    assert recorded_settings(ServeConfig())["api_key"] == ""


def test_the_launchers_curl_line_carries_the_key():
    curl = Launcher(LaunchConfig(api=ApiConfig(served_model_name="m", api_key="k'ey"))).curl_line()
    assert """-H 'Authorization: Bearer k'"'"'ey'""" in curl  # quoted for the shell, a quote and all
    assert "Authorization" not in Launcher(LaunchConfig(api=ApiConfig(served_model_name="m"))).curl_line()


# ---- the bench client ---------------------------------------------------------------------------
def authorizations_sent(cfg: ServeConfig) -> list[tuple[str, str | None]]:
    """(path, Authorization header) of every request `bench serve`'s client sends to a tiny server
    (two prompts; the model asked of GET /v1/models)."""
    seen: list[tuple[str, str | None]] = []

    async def models(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization")))
        return web.json_response({"data": [{"id": "fake"}]})

    async def completions(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization")))
        return web.Response(body=b'data: {"id": "c", "choices": [{"text": "a"}]}\n\ndata: [DONE]\n\n',
                            content_type="text/event-stream")

    async def run():
        async with fake_server({("GET", "/v1/models"): models, ("POST", "/v1/completions"): completions}) as url:
            target = resolve_target(replace(cfg, base_url=url))
            _, results, _ = await send_all(target, [Prompt("x", max_tokens=1)] * 2, [0.0, 0.0])
        assert all(r.ok for r in results), [r.error for r in results]

    asyncio.run(run())
    return sorted(seen)


def test_bench_serve_sends_the_key_on_every_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bearer = f"Bearer {KEY}"
    assert authorizations_sent(ServeConfig(api_key=KEY, progress=False)) == [
        ("/v1/completions", bearer), ("/v1/completions", bearer), ("/v1/models", bearer)]
    assert {auth for _, auth in authorizations_sent(ServeConfig(progress=False))} == {None}
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert {auth for _, auth in authorizations_sent(ServeConfig(progress=False))} == {"Bearer from-env"}
    assert {auth for _, auth in authorizations_sent(ServeConfig(api_key=KEY, progress=False))} == {bearer}


def test_the_flag_wins_then_the_launch_configs_key_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert client_api_key("flag", ApiConfig(api_key="conf")) == "flag"
    assert client_api_key("", ApiConfig(api_key="conf")) == "conf"
    assert client_api_key("", ApiConfig()) == client_api_key("") == "from-env"
    config = tmp_path / "keyed.toml"
    config.write_text('[api]\nport = 8123\napi_key = "conf"\n')
    target = resolve_target(ServeConfig(config=str(config)))
    assert (target.base_url, target.api_key) == ("http://127.0.0.1:8123", "conf")


def test_bench_compare_uses_each_launched_configs_key_unless_given_one(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    keyed, open_ = LaunchConfig(api=ApiConfig(api_key="conf")), LaunchConfig()
    assert serve_config("a", keyed, CompareConfig(), 1.0, tmp_path).api_key == "conf"
    assert serve_config("a", keyed, CompareConfig(api_key="flag"), 1.0, tmp_path).api_key == "flag"
    assert serve_config("b", open_, CompareConfig(), 1.0, tmp_path).api_key == ""


def test_bench_flags_take_the_key():
    parser = argparse.ArgumentParser()
    add_bench_commands(parser)
    serve = parser.parse_args(["serve", "--api-key", KEY])
    compare = parser.parse_args(["compare", "a.toml", "--api-key", KEY])
    assert dataclass_from_args(ServeConfig, serve).api_key == KEY
    assert dataclass_from_args(CompareConfig, compare, configs=("a.toml",)).api_key == KEY
