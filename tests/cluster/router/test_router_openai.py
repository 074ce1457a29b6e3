"""The OpenAI-compatible HTTP API over the fake cluster, driven by the unmodified `openai` client.

One router (fake cluster, scripted reply) and one HTTP server per module; the error tests flip
the shared dispatcher's state and put it back.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest
from test_router_security import _self_signed
from testkit.router_harness import REPLY, RouterHarness, fakes, router_factory

from batonserve.cluster.api import ModelInfo
from batonserve.cluster.config import RouterConfig, TLSConfig
from batonserve.cluster.router.chat_template import ChatTemplate
from batonserve.cluster.router.openai_server import OpenAIServer
from batonserve.workers.tokenizer import Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TOKEN = "s3cret-token"


@dataclass
class Api:
    """A router over the fake cluster plus its HTTP servers (one open, one with auth)."""

    harness: RouterHarness
    url: str
    auth_url: str
    bare_url: str  # a server whose model has no chat template

    def client(self, url: str | None = None, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=url or self.url, api_key=key, max_retries=0, timeout=30)

    @property
    def cluster(self) -> Any:
        return self.harness.cluster


@pytest.fixture(scope="module")
def api(tokenizer: Tokenizer, model_info: ModelInfo) -> Iterator[Api]:
    with router_factory(tokenizer, replace(model_info, context_length=128)) as make:
        h = make(fake_config=fakes.FakeClusterConfig(num_blocks=256, max_running=16))
        cfg = replace(RouterConfig(), host="127.0.0.1", http_port=0)
        dispatcher = h.server.dispatcher
        servers = [
            OpenAIServer(cfg, dispatcher, tokenizer, ChatTemplate(TEMPLATE, "<s>")),
            OpenAIServer(cfg, dispatcher, tokenizer, ChatTemplate(TEMPLATE, "<s>"), TOKEN),
            OpenAIServer(cfg, dispatcher, tokenizer, None),
        ]
        ports = [h.loop.run(s.start()) for s in servers]
        urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
        try:
            yield Api(h, *urls)
        finally:
            for s in servers:
                h.loop.run(s.stop())


def test_completion_whole_and_streamed(api: Api) -> None:
    client = api.client()
    whole = client.completions.create(model="tiny", prompt="hello world", max_tokens=60)
    assert whole.object == "text_completion" and whole.model == "tiny"
    assert whole.choices[0].text == REPLY and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="hello world",
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_forms_echo_and_n(api: Api, tokenizer: Tokenizer) -> None:
    client = api.client()
    ids = tokenizer.encode("hello world")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, echo=True)
    assert by_ids.choices[0].text.startswith(tokenizer.decode(ids, skip_special_tokens=False))
    many = client.completions.create(model="tiny", prompt=["hello", "world"], max_tokens=3, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage is not None and many.usage.completion_tokens == 12
    want = len(tokenizer.encode("hello")) + len(tokenizer.encode("world"))
    assert many.usage.prompt_tokens == want  # each prompt counted once, not n times


def test_chat_whole_and_streamed(api: Api) -> None:
    client = api.client()
    messages = [{"role": "user", "content": "say hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60)
    msg = whole.choices[0].message
    assert whole.object == "chat.completion" and msg.role == "assistant" and msg.content == REPLY
    sent = api.cluster.requests[-1].prompt_token_ids
    assert sent[0] == 0 and sent.count(0) == 1  # the template's <s> only: none added again
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_default_max_tokens_is_the_rest_of_the_context(api: Api) -> None:
    client = api.client()
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    sent = api.cluster.requests[-1]
    assert sent.sampling.max_tokens == 128 - len(sent.prompt_token_ids)


def test_models_and_health(api: Api) -> None:
    assert [m.id for m in api.client().models.list()] == ["tiny"]
    base = api.url.removesuffix("/v1")
    assert _http("GET", f"{base}/health")[0] == 200


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body or None) of a plain HTTP call."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
            return resp.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        data = e.read()
        return e.code, json.loads(data) if data else None


def _error(fn: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


def test_bad_input_is_400_naming_the_field(api: Api) -> None:
    client = api.client()
    cases = {
        "temperature": {"temperature": -1},
        "top_p": {"top_p": 0},
        "max_tokens": {"max_tokens": 0},
        "n": {"n": 0},
        "logprobs": {"logprobs": 99},
        "presence_penalty": {"presence_penalty": 0.5},
        "seed": {"extra_body": {"seed": "x"}},
    }
    for field, kw in cases.items():
        err = _error(lambda kw=kw: client.completions.create(model="tiny", prompt="hi", **kw))
        assert err.status_code == 400, field
        assert err.body["param"] == field and err.body["message"].startswith(f"{field}:")
        assert err.body["type"] == "invalid_request_error"
    long = _error(lambda: client.completions.create(model="tiny", prompt="hi", max_tokens=5000))
    assert long.status_code == 400 and long.body["param"] == "max_tokens"
    chat = _error(
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    )
    assert chat.status_code == 400 and chat.body["param"] == "top_logprobs"
    over = _error(
        lambda: client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_completion_tokens=5000,
        )
    )
    assert over.body["param"] == "max_completion_tokens"
    role = _error(
        lambda: client.chat.completions.create(
            model="tiny",
            messages=[{"role": "robot", "content": "x"}],  # type: ignore[misc,list-item]
        )
    )
    assert role.status_code == 400 and role.body["param"] == "messages[0].role"
    status, raw = _http("POST", f"{api.url}/completions", b"{not json")
    assert status == 400 and raw["error"]["param"] == "request"


def test_no_chat_template_is_400(api: Api) -> None:
    err = _error(
        lambda: api.client(api.bare_url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}]
        )
    )
    assert err.status_code == 400 and "chat template" in err.body["message"]


def test_unknown_model_is_404(api: Api) -> None:
    err = _error(lambda: api.client().completions.create(model="gpt-9", prompt="hi"))
    assert err.status_code == 404 and "gpt-9" in err.body["message"]


def test_admission_refused_is_429(api: Api) -> None:
    cfg = api.cluster.config
    old = cfg.max_running
    cfg.max_running = 0
    try:
        err = _error(lambda: api.client().completions.create(model="tiny", prompt="hi"))
        assert err.status_code == 429 and "admission refused" in err.body["message"]
        err = _error(
            lambda: list(api.client().completions.create(model="tiny", prompt="hi", stream=True))
        )
        assert err.status_code == 429  # a refused stream is an HTTP status, not an event
    finally:
        cfg.max_running = old


def test_draining_is_503(api: Api) -> None:
    dispatcher = api.harness.server.dispatcher
    dispatcher.draining = True
    try:
        err = _error(lambda: api.client().completions.create(model="tiny", prompt="hi"))
        assert err.status_code == 503
        base = api.url.removesuffix("/v1")
        assert _http("GET", f"{base}/health")[0] == 503
    finally:
        dispatcher.draining = False


def test_auth(api: Api) -> None:
    err = _error(lambda: api.client(api.auth_url, key="wrong").models.list())
    assert err.status_code == 401 and err.body["type"] == "authentication_error"
    assert _http("GET", f"{api.auth_url}/models")[0] == 401
    out = api.client(api.auth_url, key=TOKEN).completions.create(
        model="tiny", prompt="hi", max_tokens=3
    )
    assert out.choices[0].text
    assert _http("GET", api.auth_url.removesuffix("/v1") + "/health")[0] == 200


def test_disconnect_aborts_the_request(api: Api) -> None:
    cfg = api.cluster.config
    old = cfg.token_interval_s
    cfg.token_interval_s = 0.05  # ~3 s for the whole reply: the client leaves long before
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "stream": True}
        host, port = api.url.removeprefix("http://").removesuffix("/v1").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline().decode()
        assert first.startswith("data: ") and json.loads(first[6:])["choices"]
        conn.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 5
        while api.cluster.running or api.harness.server.dispatcher.inflight:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.02)
        assert api.cluster.used_blocks == 0 and api.cluster.aborted
    finally:
        cfg.token_interval_s = old


def test_tls_uses_the_router_certificate(api: Api, tokenizer: Tokenizer, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    tls = TLSConfig(cert_file=str(cert), key_file=str(key))
    cfg = replace(RouterConfig(), host="127.0.0.1", http_port=0, tls=tls)
    server = OpenAIServer(cfg, api.harness.server.dispatcher, tokenizer, None)
    port = api.harness.loop.run(server.start())
    try:
        assert server.scheme == "https"
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}/v1/models"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "tiny"
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    finally:
        api.harness.loop.run(server.stop())
