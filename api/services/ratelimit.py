"""Per-key request rate limits on uploads and job submissions: token buckets (rate per minute, burst size).

When the broker is Redis the buckets live in Redis (one Lua script per request, Redis' own clock), so
every API process shares them; the embedded mode has no Redis and keeps them per process (a limit then
holds per API process). A Redis that does not answer falls back to the per-process buckets.
Bucket keys are namespaced by the database URL, so deployments sharing a Redis do not share buckets.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from api.errors import ProblemError
from models.settings import Settings

log = logging.getLogger("modelpress.api.ratelimit")

Action = Literal["upload", "submit"]
LABELS: dict[str, str] = {"upload": "uploads", "submit": "job submissions"}

# KEYS[1] the bucket; ARGV rate (tokens per second), burst. Returns the seconds to wait, "0" when a token was taken.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or burst
local ts = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return tostring(wait)
"""


@dataclass(frozen=True)
class Limit:
    """A bucket's shape: ``rate`` tokens per second up to ``burst`` tokens."""

    rate: float
    burst: int


def limit_for(settings: Settings, action: Action) -> Limit | None:
    """The configured limit of ``action``, or None when it is off (rate 0)."""
    per_minute = settings.upload_rate_per_minute if action == "upload" else settings.submit_rate_per_minute
    burst = settings.upload_rate_burst if action == "upload" else settings.submit_rate_burst
    return Limit(per_minute / 60.0, burst) if per_minute > 0 else None


class LocalBuckets:
    """Token buckets in this process (monotonic clock)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, name: str, limit: Limit, now: float | None = None) -> float:
        """Take one token from bucket ``name``: 0.0 when taken, else the seconds until one is there."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, ts = self._buckets.get(name, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + max(0.0, now - ts) * limit.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / limit.rate
            self._buckets[name] = (tokens, now)
            return wait

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()


LOCAL = LocalBuckets()
_REDIS: dict[str, Any] = {}


def _redis_for(url: str) -> Any:
    if url not in _REDIS:
        import redis

        _REDIS[url] = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return _REDIS[url]


def uses_redis(settings: Settings) -> bool:
    """Whether buckets are shared through Redis (the broker is Redis)."""
    return settings.broker_url.startswith(("redis://", "rediss://"))


def bucket_name(settings: Settings, action: Action, key: str) -> str:
    """The bucket's name: deployment (database URL digest), action, key."""
    deployment = hashlib.sha256(settings.database_url.encode()).hexdigest()[:16]
    return f"modelpress:ratelimit:{deployment}:{action}:{key}"


def wait_for(settings: Settings, action: Action, key: str) -> float:
    """Take a token for ``key``'s ``action``: 0.0 when allowed, else the seconds to wait."""
    limit = limit_for(settings, action)
    if limit is None:
        return 0.0
    name = bucket_name(settings, action, key)
    if uses_redis(settings):
        try:
            return float(_redis_for(settings.broker_url).eval(_LUA, 1, name, repr(limit.rate), limit.burst))
        except Exception as exc:  # a Redis that does not answer must not stop uploads: limit per process
            log.warning("rate limit via Redis failed (%s); using this process's buckets", type(exc).__name__)
    return LOCAL.take(name, limit)


def check(settings: Settings, action: Action, key: str) -> None:
    """Take a token, or raise 429 ``rate_limited`` with ``Retry-After`` (whole seconds, at least 1)."""
    wait = wait_for(settings, action, key)
    if wait <= 0:
        return
    limit = limit_for(settings, action)
    assert limit is not None
    retry = max(1, math.ceil(wait))
    per_minute = limit.rate * 60
    raise ProblemError(
        429,
        "rate_limited",
        f"too many {LABELS[action]} with this key: the limit is {per_minute:g} per minute "
        f"(bursts of {limit.burst}); retry in {retry} s",
        headers={"Retry-After": str(retry)},
        errors=[{"field": "rate_limit", "message": f"{LABELS[action]}: {per_minute:g} per minute",
                 "limit": per_minute, "burst": limit.burst, "retry_after_s": retry}],
    )
