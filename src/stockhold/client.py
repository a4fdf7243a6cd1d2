"""The CLI's client side (issue 13): one function makes every client channel.

`client_channel(args)` connects to `args.address` and sends the caller's credentials on
every call: `authorization: Bearer <token>` from --token-file, STOCKHOLD_TOKEN_FILE or
STOCKHOLD_TOKEN (in that order); over TLS when --tls-ca, --tls-cert/--tls-key (a client
certificate, for mTLS) or their variables are given (docs/security.md "TLS").

The client's variables are STOCKHOLD_TLS_CA, STOCKHOLD_TLS_CLIENT_CERT and
STOCKHOLD_TLS_CLIENT_KEY: the server's STOCKHOLD_TLS_CERT/KEY name its own certificate, and
a CLI run beside a server (a health check in its container) must not present that as its
identity.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import grpc

TOKEN_ENV: Final = "STOCKHOLD_TOKEN"
TOKEN_FILE_ENV: Final = "STOCKHOLD_TOKEN_FILE"
# Client TLS (flag, its variable, help).
_TLS_FLAGS: Final = (
    ("--tls-ca", "STOCKHOLD_TLS_CA", "CA certificate(s) the server's certificate must chain to"),
    ("--tls-cert", "STOCKHOLD_TLS_CLIENT_CERT", "client certificate chain, for mTLS"),
    ("--tls-key", "STOCKHOLD_TLS_CLIENT_KEY", "its private key (mode 0600)"),
    (
        "--tls-server-name",
        "STOCKHOLD_TLS_SERVER_NAME",
        "name to check the server's certificate against (default: the address's host)",
    ),
)


def add_client_args(p: argparse.ArgumentParser) -> None:
    """The credential flags of every client command."""
    p.add_argument(
        "--token-file",
        help=f"file holding the bearer token (env {TOKEN_FILE_ENV}; or the token itself in "
        f"env {TOKEN_ENV})",
    )
    for flag, env, help_ in _TLS_FLAGS:
        p.add_argument(flag, help=f"{help_} (env {env}); any of them: TLS")


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


def _tls_option(args: argparse.Namespace, flag: str) -> str:
    env = next(e for f, e, _ in _TLS_FLAGS if f == flag)
    value: str = getattr(args, flag[2:].replace("-", "_"), None) or os.environ.get(env, "")
    return value


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SystemExit(f"error: cannot read the {what} {path}: {err.strerror}") from None


def tls_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """Channel credentials of the TLS flags (and variables); None when none is given (a
    plaintext channel). No --tls-ca: the system's trusted CAs. SystemExit (one line) for a
    file it cannot read, a key others may read, a certificate without its key."""
    from stockhold.settings import private_file_problem

    ca, cert, key = (_tls_option(args, f) for f in ("--tls-ca", "--tls-cert", "--tls-key"))
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SystemExit("error: --tls-cert and --tls-key go together (a client certificate)")
    problem = private_file_problem(key) if key else None
    if problem:
        raise SystemExit(f"error: --tls-key {key}: expected {problem}")
    return grpc.ssl_channel_credentials(
        _read(ca, "CA file") if ca else None,
        _read(key, "key") if key else None,
        _read(cert, "certificate") if cert else None,
    )


def client_channel(args: argparse.Namespace, address: str | None = None) -> grpc.Channel:
    """A channel to `address` (default args.address) carrying the caller's credentials,
    over TLS when the TLS flags say so."""
    credentials = tls_credentials(args)
    if credentials is None:
        channel = grpc.insecure_channel(address or args.address)
    else:
        name = _tls_option(args, "--tls-server-name")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(address or args.address, credentials, options)
    token = token_of(args)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _Bearer(token))


def connector(args: argparse.Namespace) -> Callable[[str], grpc.Channel]:
    """client_channel for an address given later (top.refresh takes one)."""
    return lambda address: client_channel(args, address)


__all__ = ["add_client_args", "client_channel", "connector", "tls_credentials", "token_of"]
