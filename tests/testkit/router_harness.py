"""Test helpers for the router: a tiny tokenizer, the fake cluster, a router on a free local port."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from batonserve.cluster.api import GenerateRequest, ModelInfo
from batonserve.cluster.config import RouterConfig, ServeConfig
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.router.app import ClusterFactory
from batonserve.cluster.router.server import RouterServer
from batonserve.proto import generation_pb2_grpc
from batonserve.workers.tokenizer import Tokenizer
from testkit import fakes
from testkit.loop_thread import LoopThread

T = TypeVar("T")
CONTEXT_LENGTH = 64
REPLY = "The baton passes from prefill to decode, token by token. ¡Olé! 🙂 Done."
CORPUS = [
    REPLY,
    "def generate(prompt): return the next token, one by one, until the stop token.",
    "Splitwise splits a request into a prefill and a decode phase on two machines.",
    "hello world, the quick brown fox jumps over the lazy dog; Python source code.",
]


def write_tiny_model(path: Path) -> Path:
    """A model directory with a trained byte-level BPE tokenizer.json and a config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": CONTEXT_LENGTH,
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def reply_script(tokenizer: Tokenizer, repeat: int = 1) -> Callable[[GenerateRequest], list[int]]:
    """Every request gets REPLY's tokens (repeated), whatever its prompt."""
    ids = tokenizer.encode(REPLY, add_special_tokens=False) * repeat
    return lambda request: ids


def eventually(cond: Callable[[], bool], timeout: float = 5.0, every: float = 0.02) -> None:
    """Poll `cond` from the test thread until it holds (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


class RouterHarness:
    """A RouterServer on 127.0.0.1 (free port) over a cluster, driven from test threads.

    The cluster is the FakeCluster unless `start_cluster` (a ClusterFactory such as
    batonserve.cluster.runtime.start_cluster) and `serve_config` are given: then the real one
    is started on the router's loop and shut down with the harness.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        info: ModelInfo,
        fake_config: Any = None,
        script: Callable[[GenerateRequest], list[int]] | None = None,
        router_config: RouterConfig | None = None,
        token: str | None = None,
        start_cluster: ClusterFactory | None = None,
        serve_config: ServeConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.loop = LoopThread()
        cfg = replace(router_config or RouterConfig(), host="127.0.0.1", port=0)

        async def start() -> tuple[Any, RouterServer]:
            if start_cluster is None:
                cluster = fakes.FakeCluster(
                    info, tokenizer, script or reply_script(tokenizer), fake_config
                )
            else:
                cluster = await start_cluster(serve_config or ServeConfig(), print)
            server = RouterServer(cfg, cluster, tokenizer, "test", token, metrics)
            await server.start()
            return cluster, server

        self.cluster, self.server = self.loop.run(start(), timeout=300)
        self.target = f"127.0.0.1:{self.server.port}"
        self._channels: list[grpc.Channel] = []

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A client channel to the router (closed with the harness)."""
        if credentials is None:
            ch = grpc.insecure_channel(self.target)
        else:
            ch = grpc.secure_channel(
                self.target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
            )
        self._channels.append(ch)
        return ch

    def stub(self) -> generation_pb2_grpc.GenerationStub:
        """A Generation client."""
        return generation_pb2_grpc.GenerationStub(self.channel())

    def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll `cond` on the server loop until true (bounded)."""
        deadline = time.monotonic() + timeout

        async def check() -> bool:
            return cond()

        while not self.loop.run(check()):
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop server and loop."""
        for ch in self._channels:
            ch.close()
        self.loop.run(self.server.stop(0.5))
        if hasattr(self.cluster, "shutdown"):
            self.loop.run(self.cluster.shutdown(), timeout=120)
        self.loop.close()


def tiny_model_info(tokenizer: Tokenizer) -> ModelInfo:
    """What the fake cluster serves over the tiny model."""
    return ModelInfo("tiny", "LlamaForCausalLM", CONTEXT_LENGTH, tokenizer.vocab_size, False)


@contextlib.contextmanager
def router_factory(
    tokenizer: Tokenizer, info: ModelInfo | None = None
) -> Iterator[Callable[..., RouterHarness]]:
    """A factory of router harnesses over the fake cluster; every one is closed on exit."""
    info = info or tiny_model_info(tokenizer)
    made: list[RouterHarness] = []

    def make(**kwargs: Any) -> RouterHarness:
        h = RouterHarness(tokenizer, info, **kwargs)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()
