"""A fake cluster with scripted tokens, for testing the router without Ray or model math.

It behaves like the real one where the router can tell: it stops at max_tokens, stop token ids
and EOS (stop strings are not modelled); an abort ends the stream and frees the request's KV
blocks; admission is refused when blocks or running slots run out; it paces tokens so deadlines
can expire mid-stream; it reports prefix-cache hits as cached tokens.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from batonserve.cluster.api import (
    AdmissionRejected,
    ClusterUnavailable,
    GenerateRequest,
    ModelInfo,
    ServerInfo,
    TokenDelta,
    Usage,
    WorkerInfo,
)
from batonserve.workers.tokenizer import IncrementalDetokenizer, Tokenizer

Script = Callable[[GenerateRequest], Sequence[int]]


@dataclass
class FakeClusterConfig:
    """Knobs of the fake; defaults make a small healthy cluster."""

    num_blocks: int = 64
    block_size: int = 4
    max_running: int = 8
    token_interval_s: float = 0.0  # pause before each token (deadlines and cancels mid-stream)
    eos_token_id: int | None = None
    tokens_per_delta: int = 1
    ready: bool = True
    pools: tuple[str, ...] = ("prefill", "decode")
    fail_after_tokens: int | None = None  # raise a bug (RuntimeError) after this many tokens


@dataclass
class _Running:
    request: GenerateRequest
    blocks: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeCluster:
    """Implements ClusterAPI (and shutdown) with a scripted token sequence per request."""

    def __init__(
        self,
        info: ModelInfo,
        tokenizer: Tokenizer,
        script: Script,
        config: FakeClusterConfig | None = None,
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.script = script
        self.config = config or FakeClusterConfig()
        self.running: dict[str, _Running] = {}
        self.used_blocks = 0
        self.requests: list[GenerateRequest] = []  # every admitted request, in order
        self.aborted: list[str] = []  # ids aborted while running
        self.rejected = 0
        self.shut_down = False
        self._prefix_blocks: set[tuple[int, ...]] = set()  # full prompt blocks seen before

    # --- ClusterAPI ---
    def model_info(self) -> ModelInfo:
        """The scripted model."""
        return self.info

    def server_info(self) -> ServerInfo:
        """One worker per pool; the decode worker carries the running requests."""
        workers = tuple(
            WorkerInfo(
                name=f"{pool}-0",
                pool=pool,
                role=pool,
                healthy=self.config.ready,
                running_requests=len(self.running) if pool != "prefill" else 0,
                waiting_requests=0,
                pending_prefill_tokens=0,
                kv_cache_usage=self.used_blocks / self.config.num_blocks,
            )
            for pool in self.config.pools
        )
        return ServerInfo(pools=self.config.pools, workers=workers)

    def ready(self) -> bool:
        """As configured; tests flip it to provoke UNAVAILABLE."""
        return self.config.ready and not self.shut_down

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Admit at once (or raise) and return the request's stream."""
        if not self.ready():
            raise ClusterUnavailable("no healthy decode worker")
        if request.request_id in self.running:
            raise AssertionError(f"request {request.request_id} admitted twice")
        need = math.ceil(
            (len(request.prompt_token_ids) + request.sampling.max_tokens) / self.config.block_size
        )
        free = self.config.num_blocks - self.used_blocks
        if len(self.running) >= self.config.max_running or need > free:
            self.rejected += 1
            raise AdmissionRejected(
                f"needs {need} KV blocks, {free} free; {len(self.running)} running"
            )
        self.used_blocks += need
        run = _Running(request, need)
        self.running[request.request_id] = run
        self.requests.append(request)
        return self._stream(run)

    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its blocks now; unknown ids are ignored."""
        run = self.running.get(request_id)
        if run is None:
            return
        self.aborted.append(request_id)
        run.aborted.set()
        self._release(run)

    async def shutdown(self) -> None:
        """What the real cluster does on exit: abort everything."""
        for rid in list(self.running):
            await self.abort(rid)
        self.shut_down = True

    # --- internals ---
    def _release(self, run: _Running) -> None:
        if self.running.pop(run.request.request_id, None) is run:
            self.used_blocks -= run.blocks

    def _cached_tokens(self, prompt: Sequence[int]) -> int:
        bs = self.config.block_size
        blocks = [tuple(prompt[: (i + 1) * bs]) for i in range(len(prompt) // bs)]
        hits = 0
        for b in blocks:
            if b not in self._prefix_blocks:
                break
            hits += 1
        self._prefix_blocks.update(blocks)
        return hits * bs

    async def _stream(self, run: _Running) -> AsyncIterator[TokenDelta]:
        req, sp = run.request, run.request.sampling
        cached = self._cached_tokens(req.prompt_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        out: list[int] = []
        pending: list[int] = []  # tokens not yet sent, and their text
        pending_text = ""
        finish: str | None = None
        for tok in self.script(req):
            if self.config.token_interval_s:
                await asyncio.sleep(self.config.token_interval_s)
            if run.aborted.is_set():
                finish = "abort"
                break
            fail_at = self.config.fail_after_tokens
            if fail_at is not None and len(out) >= fail_at:
                raise RuntimeError("fake cluster bug: secret internal detail")
            out.append(tok)
            pending.append(tok)
            pending_text += detok.add([tok])
            if tok in sp.stop_token_ids or (tok == self.config.eos_token_id and not sp.ignore_eos):
                finish = "stop"
            elif len(out) >= sp.max_tokens:
                finish = "length"
            if finish is not None:
                break
            if len(pending) >= self.config.tokens_per_delta:
                yield TokenDelta(tuple(pending), pending_text)
                pending, pending_text = [], ""
        else:
            finish = "stop"  # the script ran out: the model said EOS
        usage = Usage(len(req.prompt_token_ids), len(out), cached)
        # Like the real cluster, blocks are freed when the request finishes or is aborted;
        # a consumer that just walks away (closes this generator) leaks them until abort().
        self._release(run)
        yield TokenDelta(tuple(pending), pending_text + detok.flush(), finish, usage)
