"""worker.memory: the memory a job freed goes back to the system when the task ends."""

from __future__ import annotations

import pytest

from worker import memory


def _fragment(mib: int) -> list[bytes]:
    """Fill ``mib`` MiB of the malloc heap with 16 KiB blocks, then free all but one in 64 (pins the heap's top)."""
    blocks = [bytes(16 * 1024) for _ in range(mib * 64)]
    return blocks[::64]


def test_rss_and_total_memory_are_read() -> None:
    assert 10 * 1024**2 < memory.rss_bytes() < memory.total_memory_bytes()


def test_memory_freed_inside_the_heap_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's freed blocks below live ones stay resident without malloc_trim; the task gives them back."""
    from worker import tasks

    base = memory.release_memory()["rss_after"]
    kept: list[list[bytes]] = []

    def job(job_id: str) -> str:
        kept.append(_fragment(512))  # what outlives the job (one block in 64)
        return "succeeded"

    monkeypatch.setattr("worker.jobs.execute", job)
    monkeypatch.setattr(memory, "release_memory", _spy := _Spy(memory.release_memory))
    assert tasks.run_job.run("job-1") == "succeeded"
    assert _spy.calls == 1
    freed = _spy.result
    assert freed["rss_before"] - base > 256 * 1024**2  # the freed 504 MiB still resident before the trim
    assert freed["rss_after"] - base < 64 * 1024**2  # tolerance: the 8 MiB kept, allocator slack
    assert len(kept[0]) == 512


class _Spy:
    def __init__(self, fn: object) -> None:
        self.fn, self.calls, self.result = fn, 0, {}

    def __call__(self) -> dict[str, int]:
        self.calls += 1
        self.result = self.fn()  # type: ignore[operator]
        return self.result
