"""The processor's listening socket and its accept loop (asyncio), instead of `loop.create_server`.

Why not create_server: under uvloop, accept() failing with EMFILE (the worker is out of file
descriptors) runs libuv's "EMFILE trick": it frees a reserved descriptor, then accepts and at once
closes every connection waiting in the backlog, and if that fails the server is closed for good.
The waiting connections belong to whoever happened to connect then, mostly other endpoints: one
endpoint that exhausts the descriptors gets everybody's connections closed without a response.

Here the loop accepts itself, a batch per readiness event, and hands each socket to ``on_accept``
before any protocol exists (so admission.py can refuse it for the price of a close). When accept()
fails for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) it stops watching the socket for
`PAUSE_S` and tries again: connections wait in the backlog (the kernel's, 1024 deep) instead of
being closed, and the loop does not spin on a socket that stays readable. The errors are counted in
``errors`` by errno name (`meshagent_l7_accept_errors_total`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

__all__ = ["BACKLOG", "Listener", "PAUSE_S"]

BACKLOG = 1024
BATCH = 64  # accepts per readiness event: others' events get their turn
PAUSE_S = 0.1  # after EMFILE and the like: long enough not to spin, short enough to notice freed descriptors
_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_TRANSIENT = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN,
                        errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                        errno.ENETUNREACH))  # accept(2): errors of the connection at hand, not of the socket


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (SO_REUSEADDR; SO_REUSEPORT when asked)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts connections on ``sock`` while started; ``on_accept(conn)`` owns each accepted socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_accept: Callable[[socket.socket], None]) -> None:
        self.loop, self.sock, self.on_accept = loop, sock, on_accept
        self.errors: dict[str, int] = {}  # errno name -> accept() failures
        self._watching = False
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._watching:
            self.loop.add_reader(self.sock.fileno(), self._readable)
            self._watching = True

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._watching:
            self.loop.remove_reader(self.sock.fileno())
            self._watching = False
        self.sock.close()

    def _readable(self) -> None:
        accept = self.sock.accept
        for _ in range(BATCH):
            try:
                conn, _ = accept()
            except BlockingIOError:
                return
            except OSError as e:
                self._count(e)
                if e.errno in _TRANSIENT:
                    continue
                self._pause()  # out of descriptors or memory (or something unforeseen): back off, close nothing
                return
            self.on_accept(conn)

    def _count(self, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.errors[name] = self.errors.get(name, 0) + 1

    def _pause(self) -> None:
        if self._watching:
            self.loop.remove_reader(self.sock.fileno())
            self._watching = False
        if self._resume is None:
            self._resume = self.loop.call_later(PAUSE_S, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        if self.sock.fileno() >= 0:
            self.start()
