"""storage.staging.sweep_leftovers: a staged file is removed only once no live process holds its lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage.staging import sweep_leftovers

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from storage.staging import stage
with stage([b"s" * 4096], Path(sys.argv[1])) as staged:
    print(staged.path, flush=True)
    time.sleep(60)
"""


def test_a_killed_uploads_file_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        path = Path(holder.stdout.readline().strip())
        assert path.name.startswith("up-") and path.stat().st_size == 4096
        old = time.time() - 3600
        os.utime(path, (old, old))
        assert sweep_leftovers(tmp_path, grace_s=60).files == 0 and path.exists()  # its process holds the lock
        holder.send_signal(signal.SIGKILL)  # no finally runs: the file stays behind
        holder.wait(10)
        assert path.exists()
        swept = sweep_leftovers(tmp_path, grace_s=60)
        assert (swept.files, swept.bytes) == (1, 4096) and not path.exists()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_only_staged_files_past_the_grace_period(tmp_path: Path) -> None:
    fresh = tmp_path / "up-fresh"
    fresh.write_bytes(b"f")
    other = tmp_path / "ready-check"
    other.write_bytes(b"r")
    os.utime(other, (0, 0))
    link = tmp_path / "up-link"
    link.symlink_to(other)
    os.utime(link, (0, 0), follow_symlinks=False)  # old, but a link is never a staged upload
    assert sweep_leftovers(tmp_path, grace_s=60).files == 0
    assert fresh.exists() and other.exists() and link.is_symlink()
    assert sweep_leftovers(tmp_path / "missing").files == 0


def test_this_hosts_fresh_leftovers_go_at_once_with_own_grace_0_and_other_hosts_wait(tmp_path: Path) -> None:
    from storage.staging import host_prefix

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    mine = Path(holder.stdout.readline().strip())
    assert mine.name.startswith(host_prefix())
    assert sweep_leftovers(tmp_path, grace_s=60, own_grace_s=0).files == 0 and mine.exists()  # still held
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    other = tmp_path / "up-elsewhere.abc"  # another host's file on a shared folder: its lock may not reach here
    other.write_bytes(b"x" * 10)
    assert sweep_leftovers(tmp_path, grace_s=60).files == 0  # both seconds old: within the grace
    swept = sweep_leftovers(tmp_path, grace_s=60, own_grace_s=0)
    assert (swept.files, swept.bytes) == (1, 4096) and not mine.exists() and other.exists()
