"""One request over the OpenAI-compatible HTTP API (streamed /v1/completions), timed.

Any OpenAI-compatible server works (batonserve's router, vLLM, SGLang). Prompts are token ids
below 256 (every byte-level vocabulary has them), `ignore_eos` pins the output length, and
`stream_options.include_usage` gives the true output token count at the end.
"""

from __future__ import annotations

import json
import random
import ssl
import time
from typing import Any

import aiohttp

from batonserve.cluster.bench.drivers import Connection, RequestResult, Timer
from batonserve.cluster.bench.workload import BenchRequest, fit_to_context, synthetic_token_ids

_SAFE_VOCAB = 256  # ids every byte-level BPE vocabulary has
# gRPC status names for HTTP statuses, so reports compare across protocols.
_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def base_url(conn: Connection) -> str:
    """http(s)://host:port of the API (https when a CA file is given); a full URL is kept."""
    target = conn.target.rstrip("/").removesuffix("/v1")
    if "://" in target:
        return target
    return f"{'https' if conn.ca_file else 'http'}://{target}"


class OpenAIDriver:
    """Streams /v1/completions with token-id prompts; one SSE chunk with text is one token."""

    def __init__(self, conn: Connection, seed: int, model: str = "") -> None:
        self._url = base_url(conn)
        self._timeout = aiohttp.ClientTimeout(total=conn.timeout_s)
        headers = {"Content-Type": "application/json"}
        if conn.token_file:
            with open(conn.token_file) as f:
                headers["Authorization"] = f"Bearer {f.read().strip()}"
        # limit=0: no client-side connection cap, so concurrency is the bench's alone.
        tls: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=conn.ca_file) if conn.ca_file else True
        )
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(ssl=tls, limit=0)
        )
        self._rng = random.Random(seed)
        self.model = model
        self.context_length = 0

    async def prepare(self) -> None:
        """GET /v1/models: the model name (unless given) and its context length, if listed."""
        async with self._session.get(f"{self._url}/v1/models", timeout=self._timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"--target: GET /v1/models answered HTTP {resp.status}")
            models = (await resp.json())["data"]
        if not models:
            raise ValueError("--target: the server lists no model")
        chosen = next((m for m in models if m["id"] == self.model), models[0])
        self.model = self.model or chosen["id"]
        self.context_length = int(chosen.get("max_model_len") or 0)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._session.close()

    def _body(self, req: BenchRequest, p: int, o: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": synthetic_token_ids(p, _SAFE_VOCAB, self._rng),
            "max_tokens": o,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def send(self, req: BenchRequest, t0: float) -> RequestResult:
        """Run one request to its end; HTTP errors become gRPC-style codes, never exceptions."""
        p, o = req.prompt_tokens, req.output_tokens
        if self.context_length:
            p, o = fit_to_context(p, o, self.context_length)
        result = RequestResult(req.index, time.perf_counter() - t0, p)
        timer = Timer(result, t0)
        url = f"{self._url}/v1/completions"
        try:
            async with self._session.post(
                url, json=self._body(req, p, o), timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    result.code = _CODES.get(resp.status, "INTERNAL")
                else:
                    await self._read_stream(resp, result, timer)
        except TimeoutError:
            result.code = "DEADLINE_EXCEEDED"
        except aiohttp.ClientError:
            result.code = "UNAVAILABLE"
        result.end_s = time.perf_counter() - t0
        return result

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, result: RequestResult, timer: Timer
    ) -> None:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.code = "INTERNAL"
                return
            if any(c.get("text") for c in chunk.get("choices", ())):
                timer.tokens(1)
            usage = chunk.get("usage")
            if usage:  # the true count: a chunk may have carried several tokens
                result.output_tokens = int(usage["completion_tokens"])
