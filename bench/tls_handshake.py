"""The cost of a new connection with TLS and mTLS against plaintext (issue 13, Measured).

A grpc.aio server (health service only: the handshake does not depend on what is served),
built with stockhold.tls's credentials as `stockhold serve` builds them, runs in a child
process per mode. The client opens N new channels one after another, each making one
Health.Check, then N calls on one reused channel for reference. Reported per mode: wall ms
per new connection, client and server CPU ms per new connection (server CPU from
/proc/<pid>/stat), and wall ms per call on the reused channel.

    .venv/bin/python bench/tls_handshake.py [--connections 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from certs import CertAuthority

_SERVER = r"""
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2_grpc
from stockhold.settings import TlsFiles
from stockhold.tls import GrpcTLS

async def main(mode, cert, key, ca):
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if mode == "plaintext":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        tls = GrpcTLS(TlsFiles(cert, key, ca if mode == "mtls" else ""))
        port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)

asyncio.run(main(*sys.argv[1:]))
"""


def _cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _run(mode: str, n: int, files: dict[str, str], client: dict[str, bytes]) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, mode, files["cert"], files["key"], files["ca"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = f"127.0.0.1:{int(proc.stdout.readline())}"
        creds = None
        if mode != "plaintext":
            mtls = mode == "mtls"
            creds = grpc.ssl_channel_credentials(
                client["ca"], client["key"] if mtls else None, client["cert"] if mtls else None
            )

        def channel() -> grpc.Channel:
            if creds is None:
                return grpc.insecure_channel(address)
            return grpc.secure_channel(address, creds)

        request = health_pb2.HealthCheckRequest()
        with channel() as ch:  # warm-up: imports, first-use costs
            health_pb2_grpc.HealthStub(ch).Check(request, timeout=10)
        server0, client0, wall0 = _cpu_ms(proc.pid), time.process_time(), time.perf_counter()
        for _ in range(n):
            # A fresh channel is a fresh connection (grpc shares subchannels only within
            # one channel's lifetime; each is closed before the next).
            with channel() as ch:
                health_pb2_grpc.HealthStub(ch).Check(request, timeout=10)
        wall = time.perf_counter() - wall0
        client_cpu = (time.process_time() - client0) * 1000
        server_cpu = _cpu_ms(proc.pid) - server0
        with channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(request, timeout=10)
            t0 = time.perf_counter()
            for _ in range(n):
                stub.Check(request, timeout=10)
            reused = time.perf_counter() - t0
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
    return {
        "new_conn_wall_ms": wall * 1000 / n,
        "new_conn_client_cpu_ms": client_cpu / n,
        "new_conn_server_cpu_ms": server_cpu / n,
        "reused_call_wall_ms": reused * 1000 / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300)
    args = parser.parse_args()
    ca = CertAuthority("bench CA")
    server = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
    client = ca.issue("bench-client", uris=["spiffe://bench/client"])
    with tempfile.TemporaryDirectory() as tmp:
        written = server.write(Path(tmp) / "server")
        files = {"cert": str(written.cert), "key": str(written.key), "ca": str(written.ca)}
        pems = {"ca": ca.pem, "cert": client.cert_pem, "key": client.key_pem}
        rows = {m: _run(m, args.connections, files, pems) for m in ("plaintext", "tls", "mtls")}
    print(f"{args.connections} new connections per mode, one Health.Check each (EC P-256 keys)")
    columns = list(rows["plaintext"])
    print(f"{'mode':<10}" + "".join(f"{c:>24}" for c in columns))
    for mode, row in rows.items():
        print(f"{mode:<10}" + "".join(f"{row[c]:>24.3f}" for c in columns))


if __name__ == "__main__":
    main()
