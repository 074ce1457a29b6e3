"""The router over the fake cluster as a process on a given port, for router kill/restart tests.

Usage, from tests/: python -m testkit.fault_server MODEL_DIR PORT TOKEN_INTERVAL_S.
Prints "listening on HOST:PORT".
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

from batonserve.cluster.api import ModelInfo
from batonserve.cluster.config import RouterConfig, ServeConfig
from batonserve.cluster.router.app import load_tokenizer, serve
from testkit.router_harness import fakes, reply_script


def main(model_dir: str, port: int, interval_s: float) -> int:
    """Serve until SIGTERM (or until killed)."""
    config = ServeConfig(
        model=model_dir,
        router=RouterConfig(
            host="127.0.0.1", port=port, http_port=0, metrics_port=0, grace_period_s=1
        ),
    )
    tokenizer = load_tokenizer(model_dir)
    info = ModelInfo("tiny", "LlamaForCausalLM", 64, tokenizer.vocab_size, False)

    async def start(cfg: ServeConfig, progress: Callable[[str], None]) -> object:
        return fakes.FakeCluster(
            info,
            tokenizer,
            reply_script(tokenizer, repeat=4),
            fakes.FakeClusterConfig(token_interval_s=interval_s, num_blocks=1 << 16),
        )

    return asyncio.run(serve(config, start, os.environ))  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
