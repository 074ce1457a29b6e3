"""A small synchronous client of the router's native API, used by the CLI."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from batonserve.cluster.api import ModelInfo, ServerInfo, TokenDelta, Usage, WorkerInfo
from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:8001"


@dataclass(frozen=True)
class ClientOptions:
    """Where and how to reach the router."""

    target: str = DEFAULT_TARGET
    ca_file: str = ""  # PEM root certificate: when set, the connection uses TLS
    token_file: str = ""  # bearer token for a router started with auth
    timeout_s: float | None = None


class RouterClient:
    """Calls batonserve.v1.Generation and returns the cluster API's typed objects."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        if options.ca_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(options.ca_file, "--ca-file")
            )
            self._channel = grpc.secure_channel(options.target, creds)
        else:
            self._channel = grpc.insecure_channel(options.target)
        token = (
            _read(options.token_file, "--token-file").decode().strip() if options.token_file else ""
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        ignore_eos: bool | None = None,
        request_id: str = "",
    ) -> Iterator[TokenDelta]:
        """Stream the completion of `prompt`; unset options take the server's defaults."""
        sampling = pb.SamplingParams(stop=stop)
        for name, value in (
            ("max_tokens", max_tokens),
            ("temperature", temperature),
            ("top_p", top_p),
            ("top_k", top_k),
            ("seed", seed),
            ("ignore_eos", ignore_eos),
        ):
            if value is not None:
                setattr(sampling, name, value)
        req = pb.GenerateRequest(request_id=request_id, text=prompt, sampling=sampling)
        for msg in self._stub.Generate(
            req, timeout=self.options.timeout_s, metadata=self._metadata
        ):
            usage = (
                Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens)
                if msg.HasField("usage")
                else None
            )
            finish = msg.finish_reason if msg.HasField("finish_reason") else None
            yield TokenDelta(tuple(msg.token_ids), msg.text, finish, usage)

    def model_info(self) -> ModelInfo:
        """The served model."""
        m = self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.options.timeout_s, metadata=self._metadata
        )
        return ModelInfo(m.name, m.architecture, m.context_length, m.vocab_size, m.is_moe)

    def server_info(self) -> ServerInfo:
        """Pools and workers."""
        s = self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=self.options.timeout_s, metadata=self._metadata
        )
        workers = tuple(
            WorkerInfo(
                w.name,
                w.pool,
                w.role,
                w.healthy,
                w.running_requests,
                w.waiting_requests,
                w.pending_prefill_tokens,
                w.kv_cache_usage,
                w.tensor_parallel_size or 1,  # 0: a router from before the field
                tuple(w.rank_param_bytes),
            )
            for w in s.workers
        )
        return ServerInfo(tuple(s.pools), workers)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--target, --ca-file, --token-file (the token never goes on the command line)."""
    p.add_argument("--target", default=DEFAULT_TARGET, help="router address HOST:PORT")
    p.add_argument("--ca-file", default="", help="PEM root certificate; enables TLS")
    p.add_argument("--token-file", default="", help="file holding the bearer token")


def options_from_args(args: argparse.Namespace, timeout_s: float | None = None) -> ClientOptions:
    """ClientOptions from the flags add_connection_args added."""
    return ClientOptions(args.target, args.ca_file, args.token_file, timeout_s)


def rpc_failure(e: grpc.RpcError, target: str) -> int:
    """Print a failed call as one line (no traceback); returns the exit status."""
    code = e.code()
    print(f"batonserve: error: {target}: {code.name}: {e.details()}", file=sys.stderr)
    return 1


def run_remote_generate(args: argparse.Namespace) -> int:
    """`batonserve generate` against a running router: print text as it streams."""
    client = RouterClient(options_from_args(args))
    deltas: list[TokenDelta] = []
    try:
        for delta in client.generate(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos or None,
        ):
            deltas.append(delta)
            if not args.json:
                print(delta.text, end="", flush=True)
    except grpc.RpcError as e:
        if deltas and not args.json:
            print()
        return rpc_failure(e, args.target)
    finally:
        client.close()
    last = deltas[-1] if deltas else TokenDelta((), "")
    if args.json:
        record = {
            "token_ids": [t for d in deltas for t in d.token_ids],
            "text": "".join(d.text for d in deltas),
            "finish_reason": last.finish_reason,
        }
        print(json.dumps(record, ensure_ascii=False))
    else:
        print()
        if last.usage is not None:
            u = last.usage
            print(
                f"batonserve: {u.completion_tokens} tokens ({last.finish_reason}); prompt "
                f"{u.prompt_tokens} tokens, {u.cached_tokens} cached",
                file=sys.stderr,
            )
    return 0
