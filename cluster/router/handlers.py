"""Wires service objects to gRPC method handlers by the .proto's service descriptor.

The generated add_*_to_server helpers deserialize inside grpc, so a request with invalid UTF-8
in a string field would end as INTERNAL; here a request that does not parse reaches the handler
as a Malformed value and the client gets INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from batonserve.cluster.router.errors import RequestError


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message whose bytes did not parse."""

    message_type: str
    reason: str

    def error(self) -> RequestError:
        """INVALID_ARGUMENT naming the message that failed to parse."""
        return RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: not a valid {self.message_type} ({self.reason}; "
            "string fields must be valid UTF-8)",
        )


def _safe_parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(name, str(e) or "cannot parse")

    return parse


def _reject_malformed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """For handlers written without Malformed in mind: abort INVALID_ARGUMENT up front."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            err = request.error()
            await context.abort(err.code, err.message)
        return await fn(request, context)

    return unary


def generic_handler(
    service: ServiceDescriptor, impl: object, malformed_aware: tuple[str, ...] = ()
) -> grpc.GenericRpcHandler:
    """A handler for every method of `service`, calling impl.<MethodName>(request, context).

    Methods named in malformed_aware receive Malformed themselves (streams need that, to answer
    in-band); other unary-request methods get it rejected before they run.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        fn = getattr(impl, method.name)
        parse = _safe_parser(GetMessageClass(method.input_type))
        serialize = GetMessageClass(method.output_type).SerializeToString
        streaming_in = method.client_streaming
        if not streaming_in and not method.server_streaming and method.name not in malformed_aware:
            fn = _reject_malformed(fn)
        if streaming_in and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif streaming_in:
            make = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(fn, request_deserializer=parse, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
