"""The active channel of payment sync: poll payment-pending holds through provider clients.

Every server process runs one PaymentPoller as a background task (server.py). Each tick claims
due polls in Redis (`Engine.claim_polls`: payment_poll.lua moves each claimed entry to its next
step in the same call, so every order is queried once per step whatever the number of
processes), at most as many as there are free query slots, and queries the providers
concurrently, never more than `concurrency` at once. A PAID, FAILED or CLOSED answer goes
through the idempotent ReportPayment path (`sync.report_result`); PENDING and "unknown order"
change nothing; a ProviderError has counted as a poll and the next step tries again. The
schedule, the flag after the last step and the final poll before the deadline live in the
script (docs/payments.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from stockhold import constants as c
from stockhold.errors import DomainError
from stockhold.model import PollClaim
from stockhold.payments.provider import PaymentStatus, ProviderClient, ProviderError
from stockhold.payments.sync import report_result

if TYPE_CHECKING:
    from stockhold.engine import Engine

log = logging.getLogger(__name__)

# On close, how long queries in flight may finish, and how often their cancel is repeated.
_CLOSE_WAIT_S = 0.5
_CLOSE_ROUNDS = 10


class PaymentPoller:
    """Claims due payment polls and queries the providers, at most `concurrency` at once."""

    def __init__(
        self, engine: Engine, clients: Mapping[str, ProviderClient], concurrency: int
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.engine = engine
        self.clients = dict(clients)
        self.concurrency = concurrency
        self._inflight: set[asyncio.Task[None]] = set()
        # Figures for logs and tests: queries sent, results reported, provider failures.
        self.queried = 0
        self.reported = 0
        self.failed = 0

    @property
    def inflight(self) -> int:
        """Provider queries running now."""
        return len(self._inflight)

    async def tick(self) -> int:
        """Claim as many due polls as there are free slots and start their queries."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        claims = await self.engine.claim_polls(free, actor=c.ACTOR_POLLER)
        for claim in claims:
            task = asyncio.create_task(self._poll(claim))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(claims)

    async def _poll(self, claim: PollClaim) -> None:
        extra = {"order_id": claim.order_id, "provider": claim.provider, "poll": claim.poll}
        client = self.clients.get(claim.provider)
        if client is None:
            self.failed += 1
            log.error("payment poll for a provider not configured here", extra=extra)
            return
        self.queried += 1
        try:
            result = await client.query(claim.out_trade_no)
        except ProviderError as exc:
            self.failed += 1
            log.warning(
                "payment poll failed; next step retries", extra={**extra, "error": str(exc)}
            )
            return
        except ValueError as exc:  # e.g. an out_trade_no this provider cannot take
            self.failed += 1
            log.error("payment poll impossible", extra={**extra, "error": str(exc)})
            return
        except Exception:
            self.failed += 1
            log.exception("payment poll failed", extra=extra)
            return
        if result is None or result.status is PaymentStatus.PENDING:
            return
        try:
            await report_result(self.engine, result, c.ACTOR_POLLER, claim.order_id)
            self.reported += 1
        except DomainError as err:
            log.warning("polled payment refused", extra={**extra, "reason": str(err.reason)})
        except Exception:
            log.exception("polled payment could not be reported", extra=extra)

    async def close(self) -> None:
        """Stop the queries in flight (their polls were counted; the next step retries)."""
        for _ in range(_CLOSE_ROUNDS):
            pending = [t for t in self._inflight if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)
