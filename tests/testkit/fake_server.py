"""`batonserve serve` with the fake cluster, as a subprocess for the SIGTERM tests.

Usage, from tests/: python -m testkit.fake_server MODEL_DIR GRACE_S TOKEN_INTERVAL_S
[CONTEXT_LENGTH [REPEAT]]. Runs the same serve() coroutine as the CLI, on a free port; prints
where it listens and, on exit, the fake's block count. (Also the server of tests/bench/bench_router.py.)
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


def main(
    model_dir: str, grace_s: float, interval_s: float, context: int = 64, repeat: int = 4
) -> int:
    """Serve until SIGTERM; report the fake cluster's state after shutdown."""
    config = ServeConfig(
        model=model_dir,
        router=RouterConfig(
            host="127.0.0.1", port=0, http_port=0, metrics_port=0, grace_period_s=grace_s
        ),
    )
    tokenizer = load_tokenizer(model_dir)
    info = ModelInfo("tiny", "LlamaForCausalLM", context, tokenizer.vocab_size, False)
    made = []

    async def start(cfg: ServeConfig, progress: Callable[[str], None]) -> object:
        progress("fake cluster: loading")
        cluster = fakes.FakeCluster(
            info,
            tokenizer,
            reply_script(tokenizer, repeat=repeat),
            fakes.FakeClusterConfig(token_interval_s=interval_s, num_blocks=1 << 16),
        )
        made.append(cluster)
        return cluster

    code = asyncio.run(serve(config, start, os.environ))  # type: ignore[arg-type]
    cluster = made[0]
    print(
        f"fake cluster: shut_down={cluster.shut_down} used_blocks={cluster.used_blocks}", flush=True
    )
    return code


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(a[0], float(a[1]), float(a[2]), *(int(x) for x in a[3:5])))
