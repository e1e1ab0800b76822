"""Network faults between a client and the real S3 server: a TCP proxy that can break off or go away.

The store under test talks to the proxy's port; the proxy forwards to SeaweedFS byte for byte until a
fault is due: ``break_responses`` cuts that many connections once they have carried ``after_bytes``
of response, and ``die_after_request_bytes`` takes the whole proxy down (its port refuses connections)
once that many request bytes went through, which is S3 becoming unreachable in the middle of an upload.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


class Proxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.break_responses = 0
        self.after_bytes = 0
        self.die_after_request_bytes: int | None = None
        self.request_bytes = 0
        self.broken = 0
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._up = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while self._up:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, server}
            cut = {"due": False}
            with self._lock:
                if self.break_responses > 0:
                    self.break_responses -= 1
                    cut["due"] = True
            threading.Thread(target=self._pump, args=(client, server, True, cut), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, cut), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool, cut: dict[str, bool]) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if request:
                    with self._lock:
                        self.request_bytes += len(data)
                        dying = self.die_after_request_bytes is not None and self.request_bytes > self.die_after_request_bytes
                    if dying:
                        self.down()
                        return
                elif cut["due"] and sent + len(data) > self.after_bytes:
                    dst.sendall(data[: max(0, self.after_bytes - sent)])
                    with self._lock:
                        self.broken += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def down(self) -> None:
        """Stop listening and drop every open connection: the port now refuses connections."""
        self._up = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(): a bare close() would not
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def proxy(upstream: str) -> Iterator[Proxy]:
    p = Proxy(upstream)
    try:
        yield p
    finally:
        p.down()
