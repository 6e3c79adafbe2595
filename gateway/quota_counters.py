"""The counters quotas are checked against: token buckets (requests per second; generated tokens per
minute, charged after the answer so a bucket may go into debt) and held slots (open streams). Two
implementations with one interface: `LocalCounters` in this process (the single-replica default, nothing to
install) and `RedisCounters`, which every gateway replica shares (each step one atomic Lua script, on the
Redis server's clock so replicas' clocks need not agree)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import defaultdict
from typing import Protocol

log = logging.getLogger(__name__)

# A slot held in Redis by a replica that died is given back after this long (streams longer than this stop
# counting then); a local slot is given back by the call's end, however it ends.
STREAM_LEASE_S = 3600.0


class Counters(Protocol):
    async def take(self, name: str, rate: float, capacity: float, amount: float = 1.0) -> float:
        """Takes `amount` from the bucket; 0 when taken, else the seconds until it could be (nothing taken)."""

    async def debt(self, name: str, rate: float, capacity: float) -> float:
        """0 while the bucket holds something, else the seconds until it does again."""

    def charge(self, name: str, rate: float, capacity: float, amount: float) -> None:
        """Takes `amount` even past empty (the debt delays the next calls)."""

    async def hold(self, name: str, limit: int) -> str | None:
        """Holds one of `limit` slots: a handle for `unhold`, or None when all are held."""

    def unhold(self, name: str, handle: str) -> None: ...

    async def close(self) -> None: ...


class LocalCounters:
    """Counters of this process: exact, and lost on restart (the buckets refill, the slots end with the calls)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, time of level)
        self._held: dict[str, int] = defaultdict(int)

    def _level(self, name: str, rate: float, capacity: float) -> tuple[float, float]:
        now = self._clock()
        level, at = self._buckets.get(name, (capacity, now))
        return min(capacity, level + max(0.0, now - at) * rate), now

    async def take(self, name: str, rate: float, capacity: float, amount: float = 1.0) -> float:
        level, now = self._level(name, rate, capacity)
        if level >= amount:
            self._buckets[name] = (level - amount, now)
            return 0.0
        self._buckets[name] = (level, now)
        return (amount - level) / rate if rate > 0 else math.inf

    async def debt(self, name: str, rate: float, capacity: float) -> float:
        level, _ = self._level(name, rate, capacity)
        if level > 0:
            return 0.0
        return (1.0 - level) / rate if rate > 0 else math.inf

    def charge(self, name: str, rate: float, capacity: float, amount: float) -> None:
        level, now = self._level(name, rate, capacity)
        self._buckets[name] = (level - amount, now)

    async def hold(self, name: str, limit: int) -> str | None:
        if self._held[name] >= limit:
            return None
        self._held[name] += 1
        return name

    def unhold(self, name: str, handle: str) -> None:
        self._held[name] = max(0, self._held[name] - 1)

    def held(self, name: str) -> int:
        return self._held.get(name, 0)

    async def close(self) -> None:
        return None


# KEYS[1]: the bucket (a hash: level, at). ARGV: rate, capacity, amount, mode (take | charge | debt).
# Returns the wait in seconds as a string (Lua numbers become integers in replies); -1 for never.
_BUCKET = """
local rate, cap, amount, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(state[1]) or cap
local at = tonumber(state[2]) or now
level = math.min(cap, level + math.max(0, now - at) * rate)
local wait = 0
if mode == 'take' then
  if level >= amount then level = level - amount
  elseif rate > 0 then wait = (amount - level) / rate else wait = -1 end
elseif mode == 'charge' then
  level = level - amount
elseif level <= 0 then
  if rate > 0 then wait = (1 - level) / rate else wait = -1 end
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
local full_in = 60
if rate > 0 then full_in = math.ceil((cap - math.min(level, cap)) / rate) + 60 end
redis.call('EXPIRE', KEYS[1], full_in)
return tostring(wait)
"""

# KEYS[1]: the slots (a sorted set: handle -> lease end). ARGV: limit, handle, lease_s. Returns 1 if held.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
return 1
"""


class RedisCounters:
    """Counters in Redis, shared by every gateway replica. Redis down answers UNAVAILABLE for the calls that
    need a counter (a quota is not silently lifted)."""

    def __init__(self, url: str, prefix: str = "ragtune:quota:"):
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._prefix = prefix
        self._bucket = self._redis.register_script(_BUCKET)
        self._hold = self._redis.register_script(_HOLD)
        self._pending: set[asyncio.Task] = set()

    async def _run(self, script, keys: list[str], args: list) -> object:
        from redis.exceptions import RedisError

        from ragtune.errors import Unavailable

        try:
            return await script(keys=[self._prefix + k for k in keys], args=args)
        except RedisError as error:
            log.warning("quota counters unavailable: %s", error)
            raise Unavailable("the quota counters (Redis) are unavailable; retry shortly") from error

    async def _bucket_step(self, name: str, rate: float, capacity: float, amount: float, mode: str) -> float:
        wait = float(await self._run(self._bucket, [name], [repr(rate), repr(capacity), repr(amount), mode]))
        return math.inf if wait < 0 else wait

    async def take(self, name: str, rate: float, capacity: float, amount: float = 1.0) -> float:
        return await self._bucket_step(name, rate, capacity, amount, "take")

    async def debt(self, name: str, rate: float, capacity: float) -> float:
        return await self._bucket_step(name, rate, capacity, 0.0, "debt")

    def _later(self, coroutine) -> None:
        # Charges and releases happen as a call ends, where nothing may wait: run them in the background
        # (kept referenced so they are not collected half-way) and log what fails.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("quota counter update lost: %s", task.exception())

    def charge(self, name: str, rate: float, capacity: float, amount: float) -> None:
        self._later(self._bucket_step(name, rate, capacity, amount, "charge"))

    async def hold(self, name: str, limit: int) -> str | None:
        handle = uuid.uuid4().hex
        held = await self._run(self._hold, [name], [limit, handle, repr(STREAM_LEASE_S)])
        return handle if int(held) == 1 else None

    def unhold(self, name: str, handle: str) -> None:
        self._later(self._redis.zrem(self._prefix + name, handle))

    async def flush(self) -> None:
        """Waits for the charges and releases in flight (tests, shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        await self._redis.aclose()
