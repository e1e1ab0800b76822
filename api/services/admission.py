"""Admission: a bounded number of job submissions at work per API process; past it, a fast 503 ``overloaded``.

A burst of submissions (each a few database round trips under the owner's quota lock) would otherwise take
every worker thread and pooled connection, and reads would wait behind it. Each submission takes a turn
first: at most ``SUBMIT_CONCURRENCY`` run at once, the others wait up to ``OVERLOAD_WAIT_S`` and are then
answered 503 with ``Retry-After`` before they touched the database (so a refused submission left nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from api.errors import ProblemError
from models.settings import Settings

RETRY_AFTER_S = 1


def overloaded(what: str) -> ProblemError:
    """The 503 problem of a request refused because this API process is busy."""
    return ProblemError(
        503, "overloaded", f"the server is busy with other {what}; nothing was done, retry in {RETRY_AFTER_S} s",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _gate(state: Any, name: str, size: int) -> asyncio.Semaphore:
    """The app's semaphore ``name`` for the running event loop (a TestClient runs each app on loops of its own)."""
    gates: dict[tuple[int, str], asyncio.Semaphore] = state.__dict__.setdefault("_admission", {})
    key = (id(asyncio.get_running_loop()), name)
    if key not in gates:
        gates[key] = asyncio.Semaphore(size)
    return gates[key]


@asynccontextmanager
async def turn(state: Any, settings: Settings, name: str = "submit") -> AsyncIterator[None]:
    """Hold one of the ``settings.submit_concurrency`` turns of ``name`` for the block; 503 when none frees
    up within ``settings.overload_wait_s``."""
    gate = _gate(state, name, settings.submit_concurrency)
    try:
        await asyncio.wait_for(gate.acquire(), timeout=settings.overload_wait_s)
    except TimeoutError:
        raise overloaded("job submissions") from None
    try:
        yield
    finally:
        gate.release()
