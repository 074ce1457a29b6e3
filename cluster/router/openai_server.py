"""The OpenAI-compatible HTTP API (aiohttp), in the router process, over the router's Dispatcher.

It shares the gRPC router's Dispatcher (so drain, in-flight tracking, metrics and aborts are one
thing), its TLS files and its bearer token. A client that disconnects cancels the handler, and
cancelling a choice's stream aborts its cluster request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from batonserve.cluster.api import TokenDelta
from batonserve.cluster.config import RouterConfig
from batonserve.cluster.router.chat_template import ChatTemplate
from batonserve.cluster.router.dispatch import Dispatcher
from batonserve.cluster.router.errors import RequestError, to_request_error
from batonserve.cluster.router.openai_format import ChoiceState, Formatter, error_body
from batonserve.cluster.router.openai_protocol import OpenAIRequest, parse_chat, parse_completion
from batonserve.cluster.schema import ConfigError
from batonserve.workers.tokenizer import Tokenizer

log = logging.getLogger("batonserve.router")

OPEN_PATHS = ("/health",)  # probes need no secret, as gRPC health
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_END = object()  # a choice's stream ended


def _json_error(err: RequestError) -> web.Response:
    status, body = error_body(err)
    return web.json_response(body, status=status)


def ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    """The router's TLS files as a server context, or None for plain HTTP."""
    tls = config.tls
    if not tls.cert_file and not tls.key_file:
        return None
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("router.tls: set both cert_file and key_file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"router.tls: cannot load {tls.cert_file} / {tls.key_file}: {e}"
        ) from None
    return ctx


class ChoiceStreams:
    """One pump task per choice feeding one queue; closing cancels them (aborting each request)."""

    def __init__(self, dispatcher: Dispatcher, req: OpenAIRequest) -> None:
        self.queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        per_prompt = Counter(c.prompt_index for c in req.choices)
        seen: set[int] = set()
        self._tasks = []
        for c in req.choices:
            # The prompt's n goes with its first choice only (request_params_n counts requests).
            n = None if c.prompt_index in seen else per_prompt[c.prompt_index]
            seen.add(c.prompt_index)
            self._tasks.append(asyncio.create_task(self._pump(c.index, dispatcher, c.request, n)))

    async def next(self) -> tuple[int, object]:
        """The next (choice index, delta or end marker); a choice's error is raised here."""
        index, item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return index, item

    async def _pump(self, index: int, dispatcher: Dispatcher, request: Any, n: int | None) -> None:
        try:
            async with contextlib.aclosing(dispatcher.stream(request, n)) as deltas:
                async for delta in deltas:
                    self.queue.put_nowait((index, delta))
            self.queue.put_nowait((index, _END))
        except Exception as e:  # handed to the handler, which answers with its status
            self.queue.put_nowait((index, e))

    async def close(self) -> None:
        """Cancel what still runs (each stream's own cleanup aborts its cluster request)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class OpenAIServer:
    """/v1/completions, /v1/chat/completions, /v1/models and /health on router.http_port."""

    def __init__(
        self,
        config: RouterConfig,
        dispatcher: Dispatcher,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        token: str | None = None,
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self._tok = tokenizer
        self._template = template
        self._expected = f"Bearer {token}".encode() if token else None
        self._ssl = ssl_context(config)
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=config.max_message_bytes
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        # Cancel the handler when the client goes away: its streams then abort their requests.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.port = 0

    @property
    def scheme(self) -> str:
        """https with router.tls set, else http."""
        return "https" if self._ssl is not None else "http"

    async def start(self) -> int:
        """Bind router.host:http_port; returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.http_port, ssl_context=self._ssl
        )
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ConfigError(
                f"router.http_port: cannot listen on {self.config.host}:{self.config.http_port} "
                f"({e.strerror})"
            ) from None
        addresses = self._runner.addresses  # the bound port, when http_port is 0
        self.port = int(addresses[0][1]) if addresses else self.config.http_port
        return self.port

    async def stop(self) -> None:
        """Close the listener and cancel what still runs."""
        await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own (404 route, 405, 413): OpenAI's shape
            code = grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.UNIMPLEMENTED
            _, body = error_body(RequestError(code, f"{request.method} {request.path}: {e.reason}"))
            return web.json_response(body, status=e.status)
        except Exception as e:
            return _json_error(to_request_error(e, f"HTTP {request.path}"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if not got:
            why = "missing Authorization: Bearer <token> header"
        elif not hmac.compare_digest(got.encode(), self._expected):
            why = "invalid bearer token"
        else:
            return await handler(request)
        return _json_error(RequestError(grpc.StatusCode.UNAUTHENTICATED, why))

    async def health(self, request: web.Request) -> web.Response:
        """200 while requests are admitted; 503 while draining or before workers are up."""
        return web.Response(status=200 if self.dispatcher.admitting() else 503)

    async def models(self, request: web.Request) -> web.Response:
        """The served model, as OpenAI's model list."""
        info = self.dispatcher.cluster.model_info()
        model = {
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "batonserve",
            "root": info.name,
            "parent": None,
            "max_model_len": info.context_length,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "request: the body is not valid JSON"
            ) from None
        if not isinstance(body, dict):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request: must be a JSON object")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        body = await self._body(request)
        return await self._run(request, lambda info: parse_completion(body, info, self._tok))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        body = await self._body(request)
        return await self._run(
            request, lambda info: parse_chat(body, info, self._tok, self._template)
        )

    async def _run(
        self, request: web.Request, parse: Callable[[Any], OpenAIRequest]
    ) -> web.StreamResponse:
        try:
            req = parse(self.dispatcher.cluster.model_info())
        except Exception as e:
            self.dispatcher.refused(e)
            raise
        fmt = Formatter(req, self._tok)
        states = [ChoiceState() for _ in req.choices]
        streams = ChoiceStreams(self.dispatcher, req)
        try:
            if not req.stream:
                await self._collect(streams, states, len(states))
                return web.json_response(fmt.whole(states))
            return await self._stream(request, streams, fmt, states)
        finally:
            await streams.close()

    async def _collect(
        self, streams: ChoiceStreams, states: list[ChoiceState], until_ended: int
    ) -> None:
        """Fold deltas into states until `until_ended` choices ended; errors raise."""
        ended = 0
        while ended < until_ended:
            index, item = await streams.next()
            if item is _END:
                ended += 1
                continue
            assert isinstance(item, TokenDelta)
            states[index].add(item)

    async def _stream(
        self,
        request: web.Request,
        streams: ChoiceStreams,
        fmt: Formatter,
        states: list[ChoiceState],
    ) -> web.StreamResponse:
        # Hold the headers until every choice has its first delta, so a refusal (429, 503) is a
        # real HTTP status rather than an error event inside a 200 stream.
        held: list[tuple[int, object]] = []
        started: set[int] = set()
        while len(started) < len(states):
            index, item = await streams.next()
            held.append((index, item))
            started.add(index)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        live = [ChoiceState() for _ in states]  # chunk() folds deltas into these
        ended = 0

        async def send(data: object) -> None:
            await resp.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

        try:
            while ended < len(states):
                index, item = held.pop(0) if held else await streams.next()
                if item is _END:
                    ended += 1
                    continue
                assert isinstance(item, TokenDelta)
                chunk = fmt.chunk(index, live[index], item)
                if chunk is not None:
                    await send(chunk)
            if fmt.req.include_usage:
                await send(fmt.usage_chunk(live))
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client left: the caller's close() aborts what still runs
        except Exception as e:  # headers are out: the error goes in-band, as vLLM does
            _, body = error_body(to_request_error(e, "HTTP stream"))
            await send(body)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
