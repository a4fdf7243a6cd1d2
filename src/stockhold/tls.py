"""TLS on the server's listeners (issue 13, docs/security.md "TLS").

Each listener's files (settings.TlsFiles) are read and checked when the server starts, and
again on SIGHUP (`reload`): a new certificate, key or client CA then serves every new
connection while the connections already open go on with what they negotiated.

- gRPC: `grpc.dynamic_ssl_server_credentials`. grpc core asks `GrpcTLS._fetch` before each
  new handshake (from one of its own threads) and takes the configuration handed over once
  after a reload: certificate, key and client CA are all replaced.
- metrics and the payment webhook: one live `ssl.SSLContext` per listener, on which a reload
  calls `load_cert_chain` (new certificate and key for new handshakes) and
  `load_verify_locations` (a new client CA is added; OpenSSL cannot remove one from a live
  context, so a CA taken out of the file stays trusted there until a restart).

A reload that cannot load a listener's new files (missing, unreadable, a key that does not
match the certificate, not PEM) keeps what that listener serves and says so in a
TlsError; nothing is half applied.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from dataclasses import dataclass, field

import grpc
from cryptography import x509

from stockhold.settings import ConfigError, Settings, TlsFiles, private_file_problem

log = logging.getLogger(__name__)

# The oldest protocol any listener accepts.
MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """TLS files a listener cannot use; str() names the listener, the file and the cause."""


@dataclass(frozen=True)
class Material:
    """A listener's files as read: PEM bytes, checked to load and to match."""

    files: TlsFiles
    cert: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None
    not_after: dt.datetime


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load(listener: str, files: TlsFiles) -> Material:
    """Read and check a listener's files: the key private to its owner, the certificate and
    key a matching PEM pair, the client CA PEM certificates. TlsError otherwise."""
    try:
        problem = private_file_problem(files.key)
        if problem:
            raise TlsError(f"{listener} TLS key {files.key}: expected {problem}")
        cert, key = _read(files.cert), _read(files.key)
        ca = _read(files.client_ca) if files.client_ca else None
        # The checks OpenSSL makes when serving: PEM, a key matching the certificate.
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        scratch.load_cert_chain(files.cert, files.key, password=_no_password)
        if ca is not None:
            scratch.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        not_after = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    except (OSError, ssl.SSLError, ValueError) as err:
        if isinstance(err, TlsError):
            raise
        what = f"{files.cert}, {files.key}" + (f", {files.client_ca}" if files.client_ca else "")
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise TlsError(f"{listener} TLS files {what}: {reason}") from err
    return Material(files, cert, key, ca, not_after)


def _loaded(listener: str, material: Material, reloaded: bool) -> None:
    log.info(
        "tls certificate reloaded" if reloaded else "tls certificate loaded",
        extra={
            "listener": listener,
            "cert": material.files.cert,
            "not_after": material.not_after.isoformat(),
            "mtls": material.client_ca is not None,
        },
    )


class GrpcTLS:
    """The gRPC listener's credentials; `reload` hands new files to the next handshakes."""

    listener = "grpc"

    def __init__(self, files: TlsFiles) -> None:
        self.material = load(self.listener, files)
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0

    @staticmethod
    def _configuration(material: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca
        )

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for add_secure_port: client certificates required when the
        files name a client CA (fixed for the server's life: the path does not change)."""
        _loaded(self.listener, self.material, reloaded=False)
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.material),
            self._fetch,  # type: ignore[arg-type]  # None is "keep the current one"
            require_client_authentication=self.material.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc core before each handshake, in its own thread: the configuration
        of the last reload, once (None: keep the current one)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        """Read the files again; new connections get them. TlsError: nothing changes."""
        material = load(self.listener, self.material.files)
        with self._lock:
            self._pending = self._configuration(material)
        self.material = material
        self.reloads += 1
        _loaded(self.listener, material, reloaded=True)


def _no_password() -> str:
    raise ValueError("an encrypted key (stockhold takes unencrypted PEM keys, mode 0600)")


def server_context(material: Material) -> ssl.SSLContext:
    """A server SSLContext of a listener's files: TLS 1.2 at least, client certificates
    required (and checked against the client CA) when there is one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    _apply(context, material)
    if material.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _apply(context: ssl.SSLContext, material: Material) -> None:
    context.load_cert_chain(material.files.cert, material.files.key, password=_no_password)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii"))


class ContextTLS:
    """A Python listener's (metrics, payment webhook) TLS: `context` is a fresh SSLContext
    after each reload (for a listener that picks it per connection: metrics, whose accept
    loop is another thread); `live` is the one context handed to an event-loop server (the
    webhook), reloaded in place from the loop's thread: new certificate and key, client
    CAs added but never removed."""

    def __init__(self, listener: str, files: TlsFiles) -> None:
        self.listener = listener
        self.material = load(listener, files)
        self.context = server_context(self.material)
        self.live = server_context(self.material)
        _loaded(listener, self.material, reloaded=False)

    def reload(self) -> None:
        """Read the files again; new handshakes use them. TlsError: nothing changes."""
        material = load(self.listener, self.material.files)
        try:
            fresh = server_context(material)
            _apply(self.live, material)
        except (OSError, ssl.SSLError, ValueError) as err:  # changed again since load()
            raise TlsError(f"{self.listener} TLS files: {err}") from err
        self.context, self.material = fresh, material
        _loaded(self.listener, material, reloaded=True)


def check(settings: Settings) -> None:
    """Load every listener's files once (serve runs it before any worker starts):
    ConfigError naming the setting of the first listener that cannot use its files."""
    for listener in ("grpc", "metrics", "payment_webhook"):
        files = settings.tls_files("" if listener == "grpc" else listener)
        if files is None:
            continue
        try:
            load(listener, files)
        except TlsError as err:
            prefix = "" if listener == "grpc" else f"{listener}_"
            raise ConfigError(f"{prefix}tls_cert", files.cert, f"usable TLS files ({err})") from err


__all__ = [
    "MIN_VERSION",
    "ContextTLS",
    "GrpcTLS",
    "Material",
    "TlsError",
    "check",
    "load",
    "server_context",
]
