"""`stockhold migrate-layout`: move the data of an earlier stockhold to the current key layout.

Layout 1 (before issue 11) kept a sales unit's stock hash in the partition of its unit id,
`<prefix>:{p<crc32(unit id) % P>}:stock:<unit id>`, and every SKU in one index,
`<prefix>:{meta}:skus`. Layout 2 keeps the stock hash in its SKU's partition (the partition
of the escaped SKU, that of its policy hash) and one SKU index per partition,
`<prefix>:{p<N>}:skus` (constants.py). A server refuses a Redis whose `{meta}:layout` is not
2 (Engine.check_partitions); this command, run while no stockhold process runs:

1. checks everything first, read-only: every stock hash is at its layout-1 or its layout-2
   key and not at both (both would be mixed data: refused, nothing written), and every stock
   key a reservation record names is one of this prefix;
2. marks `{meta}:layout` "1->2", so that servers keep refusing until the end;
3. renames each stock hash not in its SKU's partition to its layout-2 key (one script per
   hash: moved, or already gone, or refused when the target appeared since the check);
4. rewrites the "keys" field of every reservation record (transition.lua checks it against
   the stock keys it is given, so a HELD record must name the new ones; finished records are
   rewritten too);
5. adds every member of `{meta}:skus` to its partition's index, then deletes it;
6. sets `{meta}:layout` to 2.

Each step is idempotent (a stock hash at its layout-2 key is done, a record naming layout-2
keys is unchanged, ZADD adds nothing twice), so a run that was interrupted is finished by
running it again. Keys are found with SCAN (bounded COUNT) and written through pipelines.
Standalone Redis only: a Redis Cluster never held layout-1 data (cluster mode came with
layout 2).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final, TextIO, cast

import orjson
import redis
from redis.commands.core import Script

from stockhold import constants as c
from stockhold.embedded import EmbeddedRedis, EmbeddedRedisError
from stockhold.resolver import KeyResolver, escape, partition_tag
from stockhold.secretfile import redis_kwargs
from stockhold.settings import ConfigError, Settings, mask_url

# `{meta}:layout` while a migration runs: not LAYOUT, so every server still refuses.
MIGRATING: Final = "1->2"
# Keys per SCAN call and per pipeline.
BATCH: Final = 500
# Conflicting keys named in the refusal (the count says how many there are in all).
SHOWN_PROBLEMS: Final = 10

# KEYS[1] a stock hash at its layout-1 key, KEYS[2] its layout-2 key. Returns 1: moved,
# 0: no longer there (moved by an earlier run, or seen twice by SCAN), -1: the target
# exists (mixed data), nothing changed.
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""

# KEYS[1] a reservation record, ARGV[1] its "keys" text as read, ARGV[2] the new text.
# Only a record that still holds the text read is changed: one that expired in between is
# not brought back as a bare hash. Returns 1 when rewritten.
_REWRITE = """
if redis.call('HGET', KEYS[1], 'keys') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'keys', ARGV[2])
return 1
"""


class Refused(Exception):
    """Why the migration does not run (or stopped): one line for the operator, an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Summary:
    """What a run did (or, in a dry run, would do)."""

    stock_moved: int = 0
    stock_in_place: int = 0
    records_rewritten: int = 0
    held_rewritten: int = 0
    records_unchanged: int = 0
    skus_reindexed: int = 0
    sku_indexes: set[int] = dataclasses.field(default_factory=set)
    # Keys the migration cannot place (mixed data, foreign keys): it refuses to run.
    problems: list[str] = dataclasses.field(default_factory=list)
    problem_count: int = 0
    # Whether the migration wrote (a problem then stopped it part-way).
    written: bool = False

    def problem(self, text: str) -> None:
        """Record one problem (the first few are kept for the message)."""
        self.problem_count += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(text)


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _batches(items: Iterable[str], size: int = BATCH) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Migration:
    """Layout 1 -> 2 over one standalone Redis (sync redis-py: an offline command)."""

    def __init__(self, client: redis.Redis, prefix: str, partitions: int) -> None:
        self.client = client
        self.prefix = prefix
        self.partitions = partitions
        self.resolver = KeyResolver(prefix, partitions)
        self.layout_key = self.resolver.meta_key(c.META_LAYOUT)
        self.old_index = self.resolver.meta_key(c.META_SKUS_LAYOUT1)
        self._stock = re.compile(
            rf"{re.escape(prefix)}:\{{p(\d+)\}}:{re.escape(c.STOCK)}:(.+)\Z", re.DOTALL
        )
        self._move: Script = client.register_script(_MOVE)
        self._rewrite: Script = client.register_script(_REWRITE)

    # -- keys ---------------------------------------------------------------------------------
    def tag(self, partition: int) -> str:
        """`<prefix>:{p<N>}:`, the start of every key of a partition (from the resolver)."""
        return partition_tag(self.resolver, partition)

    def placed(self, key: str) -> tuple[str, bool] | None:
        """(layout-2 key, whether `key` is a layout-1 key elsewhere) of a stock key; None for
        a key in neither layout's place (not this prefix, or another partition count)."""
        m = self._stock.match(key)
        if m is None:
            return None
        partition, unit_id = int(m.group(1)), m.group(2)
        # The escaped SKU is the unit id's first segment (escaping leaves no ':' in it).
        new = self.resolver.partition_of(unit_id.split(":", 1)[0])
        if partition == new:
            return key, False
        if partition != self.resolver.partition_of(unit_id):
            return None
        return f"{self.tag(new)}{c.STOCK}:{unit_id}", True

    def _scan(self, kind: str) -> Iterator[str]:
        pattern = f"{_glob_escape(self.prefix)}:{{p*}}:{kind}:*"
        keys: Iterator[str] = self.client.scan_iter(match=pattern, count=BATCH, _type="hash")
        yield from keys

    # -- the steps ------------------------------------------------------------------------------
    def stock(self, summary: Summary, write: bool) -> None:
        """Check (write False) or move (write True) every stock hash to its layout-2 key."""
        for batch in _batches(self._scan(c.STOCK)):
            moves: list[tuple[str, str]] = []
            for key in batch:
                placed = self.placed(key)
                if placed is None:
                    summary.problem(f"{key}: in neither layout's partition")
                elif placed[1]:
                    moves.append((key, placed[0]))
                else:
                    summary.stock_in_place += 1
            if not moves:
                continue
            with self.client.pipeline(transaction=False) as pipe:
                for old, new in moves:
                    if write:
                        self._move(keys=(old, new), client=pipe)
                    else:
                        pipe.exists(old, new)
                replies = pipe.execute()
            for (old, new), reply in zip(moves, replies, strict=True):
                if write and reply == 0:
                    continue  # moved before (an earlier run), or seen twice by SCAN
                if (write and reply == -1) or (not write and reply == 2):
                    summary.problem(f"{old} and {new} both exist (mixed layouts)")
                else:
                    summary.stock_moved += 1

    def records(self, summary: Summary, write: bool) -> None:
        """Check or rewrite the "keys" field of every reservation record."""
        for batch in _batches(self._scan(c.ORDER)):
            with self.client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.hmget(key, "keys", "st")
                fields: list[list[str | None]] = pipe.execute()
            changes: list[tuple[str, str, bytes, bool]] = []
            for key, (text, state) in zip(batch, fields, strict=True):
                if not text:  # expired since SCAN, or a record without stock keys
                    summary.records_unchanged += 1
                    continue
                new_keys: list[str] = []
                for stock_key in orjson.loads(text):
                    placed = self.placed(stock_key)
                    if placed is None:
                        summary.problem(f"{key}: names {stock_key}, in neither layout's place")
                        break
                    new_keys.append(placed[0])
                else:
                    new_text = orjson.dumps(new_keys)
                    if new_text == text.encode():
                        summary.records_unchanged += 1
                        continue
                    changes.append((key, text, new_text, state == c.STATE_HELD))
            if write and changes:
                with self.client.pipeline(transaction=False) as pipe:
                    for key, text, new_text, _ in changes:
                        self._rewrite(keys=(key,), args=(text, new_text), client=pipe)
                    written = pipe.execute()
            else:
                written = [1] * len(changes)
            for (_, _, _, held), done in zip(changes, written, strict=True):
                summary.records_rewritten += done
                summary.held_rewritten += done and held

    def sku_index(self, summary: Summary, write: bool) -> None:
        """Count, or move, the members of `{meta}:skus` into their partitions' indexes."""
        summary.skus_reindexed = int(self.client.zcard(self.old_index))
        members: Iterator[tuple[str, float]] = self.client.zscan_iter(self.old_index, count=BATCH)
        for batch in _batches(m for m, _ in members):
            groups: dict[int, list[str]] = {}
            for sku in batch:
                groups.setdefault(self.resolver.partition_of(escape(sku)), []).append(sku)
            summary.sku_indexes.update(groups)
            if write:
                with self.client.pipeline(transaction=False) as pipe:
                    for partition, skus in groups.items():
                        pipe.zadd(f"{self.tag(partition)}{c.SKU_INDEX}", dict.fromkeys(skus, 0))
                    pipe.execute()
        if write:
            self.client.delete(self.old_index)

    def run(self, write: bool) -> Summary:
        """Check everything; then, unless a problem was found or `write` is False, migrate."""
        plan = Summary()
        self.stock(plan, write=False)
        self.records(plan, write=False)
        self.sku_index(plan, write=False)
        if plan.problem_count or not write:
            return plan
        self.client.set(self.layout_key, MIGRATING)
        done = Summary(written=True)
        self.stock(done, write=True)
        # SCAN may see a moved hash again under its new name: "already there" is the check's.
        done.stock_in_place = plan.stock_in_place
        self.records(done, write=True)
        if done.problem_count:  # a layout-1 process wrote since the check
            return done
        self.sku_index(done, write=True)
        self.client.set(self.layout_key, c.LAYOUT)
        return done


def _check_redis(client: redis.Redis, settings: Settings) -> str | None:
    """The layout recorded in this Redis (None: layout 1); Refused when there is nothing to
    migrate or this Redis cannot be migrated here."""
    if str(client.info("cluster").get("cluster_enabled", 0)) == "1":
        raise Refused("this Redis is a Redis Cluster node; a cluster never held layout-1 data")
    resolver = KeyResolver(settings.key_prefix, settings.partitions)
    values = client.mget(resolver.meta_partitions_key(), resolver.meta_key(c.META_LAYOUT))
    stored, layout = cast(list[str | None], values)
    if stored is None:
        raise Refused(
            f"no stockhold data with key prefix {settings.key_prefix!r} here "
            f"({resolver.meta_partitions_key()} is not set): nothing to migrate"
        )
    if int(stored) != settings.partitions:
        raise Refused(
            f"this Redis holds data for {stored} partitions; stockhold is configured with "
            f"{settings.partitions} (--partitions, env STOCKHOLD_PARTITIONS)"
        )
    if layout not in (None, "1", MIGRATING, c.LAYOUT):
        raise Refused(f"unknown key layout {layout!r} in {resolver.meta_key(c.META_LAYOUT)}")
    return layout


def _report(summary: Summary, where: str, dry_run: bool, took: float, out: TextIO) -> None:
    would = "would be " if dry_run else ""
    print(f"stockhold migrate-layout: {where}: key layout 1 -> {c.LAYOUT}", file=out)
    print(
        f"  stock hashes:        {summary.stock_moved} {would}moved to their SKU's partition, "
        f"{summary.stock_in_place} already there",
        file=out,
    )
    print(
        f"  reservation records: {summary.records_rewritten} {would}rewritten "
        f"({summary.held_rewritten} HELD), {summary.records_unchanged} unchanged",
        file=out,
    )
    print(
        f"  SKU index:           {summary.skus_reindexed} SKUs {would}re-indexed into "
        f"{len(summary.sku_indexes)} partition indexes",
        file=out,
    )
    if dry_run:
        print("dry run: nothing written; run without --dry-run to migrate", file=out)
    else:
        print(f"done in {took:.1f} s: key layout {c.LAYOUT}; stockhold serve may start", file=out)


def migrate(settings: Settings, url: str, dry_run: bool, out: TextIO) -> int:
    """Migrate the Redis at `url` (standalone); the exit status. Refused for what cannot."""
    where = f"{mask_url(url)}, key prefix {settings.key_prefix!r}, {settings.partitions} partitions"
    try:
        auth = redis_kwargs(settings)  # the password of redis_password_file
    except ConfigError as err:
        raise Refused(str(err), code=2) from None
    client = redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=60.0, **auth
    )
    try:
        layout = _check_redis(client, settings)
        if layout == c.LAYOUT:
            print(f"stockhold migrate-layout: {where}: already layout {c.LAYOUT}", file=out)
            return 0
        started = time.monotonic()
        summary = Migration(client, settings.key_prefix, settings.partitions).run(not dry_run)
        if summary.problem_count:
            listed = "".join(f"\n  {p}" for p in summary.problems)
            more = summary.problem_count - len(summary.problems)
            state = (
                f"stopped part-way ({c.META_LAYOUT} is {MIGRATING!r}: servers keep refusing); "
                "stop every stockhold process, then run it again"
                if summary.written
                else "nothing written"
            )
            raise Refused(
                f"refusing to migrate: {summary.problem_count} stock key(s) in no layout's "
                f"place or in both; {state}:{listed}"
                + (f"\n  ... and {more} more" if more else ""),
                code=1,
            )
        _report(summary, where, dry_run, time.monotonic() - started, out)
        return 0
    except redis.RedisError as err:
        raise Refused(f"redis at {mask_url(url)}: {type(err).__name__}: {err}", code=1) from None
    finally:
        client.close()


def run(settings: Settings, dry_run: bool = False, out: TextIO = sys.stdout) -> int:
    """`stockhold migrate-layout`: the exit status; a refusal is one line (or a short list)
    on stderr. Without a Redis URL, the embedded Redis of the data directory is started
    (its lock keeps a running stockhold of that directory out)."""
    try:
        if settings.redis_cluster:
            raise Refused(
                "--redis-cluster: a Redis Cluster never held layout-1 data (cluster mode came "
                "with layout 2); nothing to migrate"
            )
        if settings.redis_url is not None:
            return migrate(settings, settings.redis_url, dry_run, out)
        data_dir = Path(settings.data_dir)
        if not data_dir.is_dir():
            raise Refused(f"no data directory {data_dir}: nothing to migrate")
        try:
            with EmbeddedRedis(data_dir) as embedded:
                own = dataclasses.replace(settings, redis_password_file=str(embedded.password_path))
                return migrate(own, embedded.url, dry_run, out)
        except EmbeddedRedisError as err:
            raise Refused(str(err), code=1) from None
    except Refused as err:
        print(f"stockhold: {err}", file=sys.stderr)
        return err.code
