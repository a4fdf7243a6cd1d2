"""Requests that do not parse: INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc.aio deserializes a request before (unary) or while (streams) the handler runs; a
DecodeError there (bytes that are not the wire format, invalid UTF-8 in a string field, a
message cut short) ends the call UNKNOWN with an ERROR log line and a traceback. The
interceptor here gives every handler a deserializer that returns a `Malformed` marker instead
of raising, and checks for it: a unary request that does not parse is refused before the
handler runs; on a request stream, the stream ends there for the handler (as if the client
had half-closed: the messages before it are answered) and then the call ends INVALID_ARGUMENT
(ErrorInfo reason INVALID_ARGUMENT, metadata `type`: the message type expected), logged like
any INVALID_ARGUMENT (not at all), and nothing reaches the engine. Found by tests/test_fuzz.py.

It is the innermost interceptor (server.py): authentication and rate limits still come first.
Per call: one dict lookup (the method's wrapped handler is built once) and one type check.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from stockhold.errors import DomainError, Reason, to_rpc_status
from stockhold.interceptor import WrappingInterceptor

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]


class Malformed:
    """What a request that does not parse deserializes to."""

    __slots__ = ("cause", "type_name")

    def __init__(self, type_name: str, cause: str) -> None:
        self.type_name = type_name
        self.cause = cause

    def error(self) -> DomainError:
        """The refusal: INVALID_ARGUMENT naming the expected type and what is wrong."""
        return DomainError(
            Reason.INVALID_ARGUMENT,
            f"the request does not parse as {self.type_name}: {self.cause}",
            metadata={"type": self.type_name},
        )


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the request"))


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer` that returns a Malformed instead of raising DecodeError."""
    type_name = _type_name(deserializer)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as err:
            cause = str(err).rpartition(": ")[2] or "not the wire format"
            return Malformed(type_name, cause)

    return parse


async def _refuse(request: Malformed, context: _Context) -> None:
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(request.error())))


def _checked_unary(inner: Any) -> Any:
    """A unary-request behaviour (coroutine or async generator) that refuses a Malformed."""
    if inspect.isasyncgenfunction(inner):

        async def checked_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            if type(request) is Malformed:
                await _refuse(request, context)
            async for item in inner(request, context):
                yield item

        return checked_stream

    async def checked(request: Any, context: _Context) -> Any:
        if type(request) is Malformed:
            await _refuse(request, context)
        result = inner(request, context)
        return await result if inspect.isawaitable(result) else result

    return checked


class _Messages:
    """A request stream that ends at the first message that does not parse (kept in
    `malformed`): the handler sees a half-close there and finishes what it has."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self.requests = requests
        self.malformed: Malformed | None = None

    async def read(self) -> AsyncIterator[Any]:
        async for request in self.requests:
            if type(request) is Malformed:
                self.malformed = request
                return
            yield request


def _checked_stream(inner: Any) -> Any:
    """A stream-request behaviour whose stream ends at a message that does not parse; once
    the handler is done (the messages before it answered), the call ends INVALID_ARGUMENT.
    Not an abort from inside the handler's read, which may run in another task while the
    handler writes (ReserveStream): the status is sent once the handler returned."""
    if inspect.isasyncgenfunction(inner):

        async def checked_stream(requests: Any, context: _Context) -> AsyncIterator[Any]:
            messages = _Messages(requests)
            async for item in inner(messages.read(), context):
                yield item
            if messages.malformed is not None:
                await _refuse(messages.malformed, context)

        return checked_stream

    async def checked(requests: Any, context: _Context) -> Any:
        messages = _Messages(requests)
        result = inner(messages.read(), context)
        if inspect.isawaitable(result):
            result = await result
        if messages.malformed is not None:
            await _refuse(messages.malformed, context)
        return result

    return checked


def _tolerant_handler(handler: Handler) -> Handler:
    assert handler.request_deserializer is not None
    parse = tolerant(handler.request_deserializer)
    out = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_checked_unary(handler.unary_unary), parse, out)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _checked_unary(handler.unary_stream), parse, out
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _checked_stream(handler.stream_unary), parse, out
        )
    return grpc.stream_stream_rpc_method_handler(_checked_stream(handler.stream_stream), parse, out)


class DecodeInterceptor(WrappingInterceptor):
    """Every method (Inventory, Health, reflection) refuses a request that does not parse
    with INVALID_ARGUMENT; see the module docstring."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler with a tolerant deserializer."""
        if handler.request_deserializer is None:
            return handler
        return _tolerant_handler(handler)
