"""Test certificates (issue 13): a CA, server and client certificates made with `cryptography`.

    ca = CertAuthority("test CA")
    server = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1", "::1"], server=True)
    client = ca.issue("checkout", uris=["spiffe://shop/checkout"])
    expired = ca.issue("old", not_after=-1)          # expired a day ago
    files = server.write(tmp_path / "server")          # -> CertFiles(cert, key, ca)

Keys are EC P-256 (fast to make); every certificate is valid from a day before now. No pytest
import: benches may use it too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class CertFiles:
    """Paths of a written certificate, its key (mode 0600) and its CA's certificate."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Issued:
    """A certificate with its key, as PEM bytes, and the PEM of the CA that signed it."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes

    def write(self, stem: Path) -> CertFiles:
        """Write <stem>.crt, <stem>.key (0600) and <stem>.ca.crt; returns their paths."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        cert, key, ca = (stem.with_suffix(s) for s in (".crt", ".key", ".ca.crt"))
        cert.write_bytes(self.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        os.chmod(key, 0o600)
        ca.write_bytes(self.ca_pem)
        return CertFiles(cert, key, ca)


class CertAuthority:
    """A self-signed CA that issues certificates."""

    def __init__(self, name: str = "stockhold test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
        uris: list[str] | None = None,
        server: bool = False,
        not_after: int = 30,
    ) -> Issued:
        """A certificate for `common_name` with the given SANs, valid until `not_after` days
        from now (negative: already expired). `server`: server auth usage, else client auth."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        end = now + dt.timedelta(days=not_after)
        start = min(now - _DAY, end - _DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        names += [x509.UniformResourceIdentifier(u) for u in uris or []]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), self.pem)
