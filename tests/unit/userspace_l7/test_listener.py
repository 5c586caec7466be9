"""The processor's accept loop (userspace_l7/listener.py) out of descriptors, on real sockets.

A worker in a subprocess whose descriptor table is nearly full: accept() fails with EMFILE. The
connections that wait must stay open in the backlog (libuv would accept and close them all), the
loop must back off instead of spinning, and once descriptors are free they are all accepted.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from tests.paths import REPO

WORKER = r"""
import asyncio, json, os, resource, sys, threading
import uvloop
from userspace_l7.listener import Listener, bind

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

async def main():
    loop = asyncio.get_running_loop()
    held = []
    listener = Listener(loop, bind("127.0.0.1", 0), held.append)
    listener.start()
    ballast = []
    try:
        while True:
            ballast.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(5):  # room for five connections, no more
        os.close(ballast.pop())
    commands = asyncio.Queue()
    threading.Thread(target=lambda: [loop.call_soon_threadsafe(commands.put_nowait, l.strip())
                                     for l in sys.stdin], daemon=True).start()
    print(listener.sock.getsockname()[1], flush=True)
    while (cmd := await commands.get()) != "quit":
        if cmd == "free":
            for fd in ballast:
                os.close(fd)
            ballast.clear()
        print(json.dumps({"accepted": len(held), "errors": listener.errors}), flush=True)

uvloop.run(main())
"""


def _open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read and no EOF: open
    except OSError:
        return False  # reset


def test_emfile_pauses_accepting_and_closes_nothing():
    proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    clients: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())

        def ask(cmd: str) -> dict:
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        for _ in range(30):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # the worker meets EMFILE and backs off, PAUSE_S at a time
        state = ask("report")
        assert state["accepted"] == 5, state
        # about one failed accept() per pause: a loop that spins on the readable socket makes thousands
        assert 1 <= state["errors"].get("EMFILE", 0) <= 100, state
        assert all(_open(c) for c in clients), "a waiting connection was closed"
        ask("free")
        deadline = time.monotonic() + 10
        while (state := ask("report"))["accepted"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["accepted"] == 30, state
        assert all(_open(c) for c in clients)
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait(5)
