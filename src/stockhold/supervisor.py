"""`stockhold serve --workers N`: N server processes on one port (SO_REUSEPORT), supervised.

The parent owns the embedded Redis (if any), starts each worker as a fresh interpreter running
`stockhold serve --workers 1`, restarts a worker that dies, and on SIGTERM/SIGINT forwards
SIGTERM to every worker, waits for them to drain, then stops the embedded Redis.

With a metrics port the supervisor alone serves /metrics: it makes a fresh, private
PROMETHEUS_MULTIPROC_DIR, hands it to the workers (which record into it, never binding the
port), serves the sum of their files plus the contention gauges, marks each dead worker's
files (`mark_process_dead`) and deletes the directory when it stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType
from typing import Final

from stockhold import auth, metrics
from stockhold.embedded import EmbeddedRedis, parent_death_argv
from stockhold.server import INTERNAL_LISTEN_ENV, BindError, warn_at_start
from stockhold.settings import Settings
from stockhold.tls import ContextTLS, TlsError

log = logging.getLogger(__name__)

# A worker that dies this soon after its start, twice in a row, is not restarted again:
# something is wrong with its configuration or its surroundings.
_EARLY_EXIT_SECONDS = 5.0

# The exit status of a worker (`serve --supervised`) that cannot start and would fail the same
# way again: a refused setting, an address it cannot bind, a partition-count mismatch. It has
# printed why; the supervisor stops every worker and exits 1 instead of restarting it.
WORKER_CANNOT_START: Final = 3


class Supervisor:
    """Runs and watches the worker processes."""

    def __init__(self, settings: Settings, workers: int, argv: Sequence[str]) -> None:
        # The caller checked the settings (settings.worker_count: a fixed port).
        if workers < 2:
            raise ValueError("the supervisor is for 2 or more workers")
        self.settings = settings
        self.workers = workers
        self.argv = list(argv)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.early_exits: dict[int, int] = {}
        self.stopping = False
        # The workers' prometheus_client multiprocess directory (None: metrics off).
        self.metrics_dir: str | None = None
        # The workers' redis_password_file (the embedded Redis's once it started).
        self.redis_password_file = settings.redis_password_file
        # The workers accept it from the metrics collector here (auth.internal_token).
        self.internal_token = auth.new_token()
        # With gRPC TLS: the workers' plaintext loopback port for the collector here
        # (server.INTERNAL_LISTEN_ENV), held by _internal_socket.
        self.internal_listen = ""
        self._internal_socket: socket.socket | None = None
        self.endpoint: metrics.MetricsEndpoint | None = None
        self.reload_requested = False

    def _spawn(self, slot: int, redis_url: str) -> None:
        # A worker never serves metrics itself (it would fight its siblings for the port);
        # with metrics on it records into the supervisor's directory. It logs in to Redis as
        # the supervisor does: the password file of the settings or of the embedded Redis.
        env = dict(os.environ, STOCKHOLD_REDIS_URL=redis_url, STOCKHOLD_METRICS_PORT="0")
        env.pop("STOCKHOLD_REDIS_PASSWORD_FILE", None)
        if self.redis_password_file:
            env["STOCKHOLD_REDIS_PASSWORD_FILE"] = self.redis_password_file
        env.pop(metrics.MULTIPROC_ENV, None)
        env[auth.INTERNAL_TOKEN_ENV] = self.internal_token
        env.pop(INTERNAL_LISTEN_ENV, None)
        if self.internal_listen:
            env[INTERNAL_LISTEN_ENV] = self.internal_listen
        if self.metrics_dir is not None:
            env[metrics.MULTIPROC_ENV] = self.metrics_dir
        cmd = [sys.executable, "-m", "stockhold.cli", "serve", *self.argv, "--workers", "1"]
        cmd.append("--supervised")
        # A worker gets SIGTERM (and drains) when the supervisor dies, even by SIGKILL: it
        # must not keep serving the port without the supervisor and its embedded Redis. The
        # run loop, which spawns, is the main thread: it lives as long as the supervisor.
        self.procs[slot] = subprocess.Popen(parent_death_argv(cmd), env=env)
        self.started_at[slot] = time.monotonic()
        log.info("worker started", extra={"worker": slot, "pid": self.procs[slot].pid})

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stopping = True

        def on_hangup(signum: int, frame: FrameType | None) -> None:
            # SIGHUP reloads (the auth file, certificates): every worker reloads its own;
            # the metrics endpoint here reloads its TLS files in the watch loop.
            self.reload_requested = True
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        embedded: EmbeddedRedis | None = None
        url = self.settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(self.settings.data_dir)
            url = embedded.start()
            self.redis_password_file = str(embedded.password_path)
            log.info("embedded redis started", extra={"url": url})
        code = 0
        endpoint: metrics.MetricsEndpoint | None = None
        contention: metrics.ContentionCollector | None = None
        try:
            target = metrics.local_target(self.settings.listen)
            if self.settings.tls_files() is not None:
                # gRPC TLS: the collector calls the workers' plaintext loopback port.
                target = self.internal_listen = self._reserve_internal_port()
            warn_at_start(self.settings)
            if self.settings.metrics_port:
                self.metrics_dir = tempfile.mkdtemp(prefix="stockhold-metrics-")
                contention = metrics.ContentionCollector(
                    target,
                    self.settings.metrics_contention_top_n,
                    token=self.internal_token,
                )
                try:
                    files = self.settings.tls_files("metrics")
                    endpoint = self.endpoint = metrics.MetricsEndpoint(
                        self.settings.metrics_host,
                        self.settings.metrics_port,
                        metrics.supervisor_registry(self.metrics_dir, contention),
                        ContextTLS("metrics", files) if files else None,
                    )
                except OSError as err:
                    raise BindError(str(err)) from None
                log.info(
                    "metrics serving",
                    extra={"metrics_port": endpoint.port, "metrics_dir": self.metrics_dir},
                )
            for slot in range(self.workers):
                self._spawn(slot, url)
            code = self._watch(url)
        finally:
            self._stop_workers()
            if endpoint is not None:
                endpoint.close()
            if contention is not None:
                contention.close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self._internal_socket is not None:
                self._internal_socket.close()
            if embedded is not None:
                embedded.stop()
        log.info("supervisor stopped")
        return code

    def _reserve_internal_port(self) -> str:
        """A free 127.0.0.1 port for the workers' internal callers, held (bound with
        SO_REUSEPORT, never listening) so that no other program takes it meanwhile."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        self._internal_socket = sock
        return f"127.0.0.1:{sock.getsockname()[1]}"

    def _reload(self) -> None:
        """SIGHUP here: the metrics endpoint's TLS files (the workers reload their own)."""
        self.reload_requested = False
        if self.endpoint is None or self.endpoint.tls is None:
            return
        try:
            self.endpoint.tls.reload()
        except TlsError as err:
            log.error("tls reload failed; the previous files stay in force: %s", err)

    def _watch(self, url: str) -> int:
        while not self.stopping:
            time.sleep(0.1)
            if self.reload_requested:
                self._reload()
            for slot, proc in list(self.procs.items()):
                rc = proc.poll()
                if rc is None or self.stopping:
                    continue
                lived = time.monotonic() - self.started_at[slot]
                early = lived < _EARLY_EXIT_SECONDS
                self.early_exits[slot] = self.early_exits.get(slot, 0) + 1 if early else 0
                log.error("worker exited", extra={"worker": slot, "code": rc, "lived_s": lived})
                if self.metrics_dir is not None:
                    metrics.mark_process_dead(proc.pid, self.metrics_dir)
                if rc == WORKER_CANNOT_START:
                    log.critical("worker cannot start; stopping", extra={"worker": slot})
                    return 1
                if self.early_exits[slot] >= 2:
                    log.critical("worker keeps failing at start; stopping", extra={"worker": slot})
                    return 1
                self._spawn(slot, url)
        return 0

    def _stop_workers(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 5.0
        for slot, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing", extra={"worker": slot})
                proc.kill()
                proc.wait()
