"""The CLI's client side (issue 13): one function makes every client channel.

`client_channel(args)` connects to `args.address` and sends the caller's credentials on
every call: `authorization: Bearer <token>` from --token-file, STOCKHOLD_TOKEN_FILE or
STOCKHOLD_TOKEN (in that order). TLS options (--tls-ca/--tls-cert/--tls-key) belong here too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import grpc

TOKEN_ENV: Final = "STOCKHOLD_TOKEN"
TOKEN_FILE_ENV: Final = "STOCKHOLD_TOKEN_FILE"


def add_client_args(p: argparse.ArgumentParser) -> None:
    """The credential flags of every client command."""
    p.add_argument(
        "--token-file",
        help=f"file holding the bearer token (env {TOKEN_FILE_ENV}; or the token itself in "
        f"env {TOKEN_ENV})",
    )


def token_of(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file, else the file STOCKHOLD_TOKEN_FILE names, else
    STOCKHOLD_TOKEN; None without any. SystemExit (one line) for a file it cannot read."""
    path = getattr(args, "token_file", None) or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise SystemExit(f"error: cannot read the token file {path}: {reason}") from None
        if not token:
            raise SystemExit(f"error: the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: Any) -> _Details:
        metadata = [*(d.metadata or ()), self._header]
        return _Details(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call with the header."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call with the header."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Client-streaming call with the header."""
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """Bidirectional call with the header."""
        return continuation(self._details(details), requests)


def client_channel(args: argparse.Namespace, address: str | None = None) -> grpc.Channel:
    """A channel to `address` (default args.address) carrying the caller's credentials."""
    channel = grpc.insecure_channel(address or args.address)
    token = token_of(args)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _Bearer(token))


def connector(args: argparse.Namespace) -> Callable[[str], grpc.Channel]:
    """client_channel for an address given later (top.refresh takes one)."""
    return lambda address: client_channel(args, address)


__all__ = ["add_client_args", "client_channel", "connector", "token_of"]
