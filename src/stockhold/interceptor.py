"""The one shape of stockhold's server interceptors: each method's handler is wrapped once.

grpc.aio asks an interceptor for every call's handler. `WrappingInterceptor` builds the
wrapped handler the first time it sees a method's handler (the subclass's `wrap`) and keeps it,
so a call costs one dict lookup; the map is bounded by the services' methods. A handler that
changes (a service added again) is wrapped anew.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base class: override `wrap(method, handler)`; it may return the handler as it is."""

    def __init__(self) -> None:
        # method path -> (the handler from the service, what `wrap` made of it)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The method's handler as `wrap` made it (once per method)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        result = self.wrap(method, handler)
        self._wrapped[method] = (handler, result)
        return result
