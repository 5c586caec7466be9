"""Traffic for the socket fast-path tests, run inside namespaces (`ip netns exec NS python3 fastpath_tool.py ...`).
Prints one JSON line; exit 0 unless the arguments are wrong.

  serve IP PORT             accept connections, one thread each; the client's first line says what
                            to do: "sink N"   read until EOF, answer the sha256 of what came and N
                                              bytes of pattern(N), then close
                            "sink-late MS N"  like sink, but sleep MS ms before reading
                            "stall"           read nothing (the client tests flow control)
                            "close-after N"   read N bytes, then close with the rest unread
                            "flood N"         write N bytes of pattern(N), ignoring errors
                            "echo"            echo every byte back until EOF
                            "echo-late MS"    the same, starting MS ms late
                            "duplex MS N"     sleep MS ms, then send N bytes of pattern(N) while
                                              reading N, check them, answer "ok"/"bad" and close
  sink IP PORT SEND RECV [LATE_MS]
                            send SEND bytes of pattern in one sendall(), shut down writing (a
                            half-close), then read the answer until EOF; report both checksums;
                            with LATE_MS the server starts reading that late
  stall IP PORT             write without blocking until the socket refuses; report how much went
  close-after IP PORT N     the server closes after N bytes: keep writing; report the error
  flood IP PORT N READ      the server writes N bytes: read READ of them, then close
  rounds IP PORT N MS       N request/response rounds of 1000 bytes through "echo", MS ms apart
  duplex IP PORT N LATE_MS  both directions at once through "duplex": send N bytes while reading
                            the server's N; report whether each side got the other's bytes intact
  burst IP PORT N LATE_MS   through "echo-late": write N bytes while the server sleeps, read the
                            echo back; print {"burst_ok": ...}, wait for a line on stdin, then do
                            20 rounds on the same connection and print {"rounds": 20, "ok": ...}
"""

import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 16


# Random bytes repeating with a prime period: no chunk the kernel moves (multiples of 4 KiB) lines
# up with it, so a byte-for-byte comparison catches any reordering, and it is fast to make.
_BLOCK = random.Random(7).randbytes(1_000_003)


def pattern(n: int) -> bytes:
    """The first n bytes of the test stream."""
    return (_BLOCK * (n // len(_BLOCK) + 1))[:n]


def read_line(conn: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            break
        line += b
    return line.decode().strip()


def handle(conn: socket.socket) -> None:
    with conn:
        cmd, *args = read_line(conn).split()
        if cmd in ("sink", "sink-late"):
            if cmd == "sink-late":
                time.sleep(int(args.pop(0)) / 1000)
            h, n = hashlib.sha256(), 0
            while data := conn.recv(CHUNK):
                h.update(data)
                n += len(data)
            conn.sendall(f"{h.hexdigest()} {n}\n".encode() + pattern(int(args[0])))
        elif cmd == "stall":
            time.sleep(30)
        elif cmd == "close-after":
            want = int(args[0])
            while want > 0 and (data := conn.recv(min(want, CHUNK))):
                want -= len(data)
        elif cmd in ("echo", "echo-late"):
            if cmd == "echo-late":
                time.sleep(int(args[0]) / 1000)
            while data := conn.recv(CHUNK):
                conn.sendall(data)
        elif cmd == "duplex":
            time.sleep(int(args[0]) / 1000)
            n = int(args[1])
            writer = threading.Thread(target=conn.sendall, args=(pattern(n),))
            writer.start()
            got = _read_exactly(conn, n)
            writer.join()
            conn.sendall(b"ok" if got == pattern(n) else b"bad")
        elif cmd == "flood":
            try:
                conn.sendall(pattern(int(args[0])))
            except OSError:
                pass


def serve(ip: str, port: int) -> None:
    if ":" in ip:  # "::": a dual-stack server, whose IPv4 peers show as ::ffff:a.b.c.d
        srv = socket.socket(socket.AF_INET6)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    else:
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(64)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def connect(ip: str, port: int, line: str) -> socket.socket:
    s = socket.create_connection((ip, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(line.encode() + b"\n")
    return s


def sink(ip: str, port: int, send: int, recv: int, late_ms: int = 0) -> dict:
    data = pattern(send)
    with connect(ip, port, f"sink-late {late_ms} {recv}" if late_ms else f"sink {recv}") as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(CHUNK):
            got += chunk
    head, _, body = bytes(got).partition(b"\n")
    digest, _, count = head.decode().partition(" ")
    return {"sent_ok": digest == hashlib.sha256(data).hexdigest() and int(count or -1) == send,
            "server_saw": int(count or -1), "received_ok": body == pattern(recv), "received": len(body)}


def stall(ip: str, port: int) -> dict:
    with connect(ip, port, "stall") as s:
        s.setblocking(False)
        total, chunk, deadline = 0, b"s" * CHUNK, time.monotonic() + 10
        while time.monotonic() < deadline and total < (1 << 30):
            try:
                total += s.send(chunk)
            except BlockingIOError:
                return {"blocked_after": total}
    return {"blocked_after": None, "sent": total}


def close_after(ip: str, port: int, n: int) -> dict:
    with connect(ip, port, f"close-after {n}") as s:
        total, chunk, deadline = 0, b"c" * 4096, time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                total += s.send(chunk)
                time.sleep(0.0005)  # give the server's close time to reach us
        except OSError as e:
            return {"error": type(e).__name__, "sent": total}
    return {"error": None, "sent": total}


def flood(ip: str, port: int, n: int, read: int) -> dict:
    s = connect(ip, port, f"flood {n}")
    got = bytearray()
    while len(got) < read and (chunk := s.recv(min(CHUNK, read - len(got)))):
        got += chunk
    s.close()
    return {"read_ok": bytes(got) == pattern(n)[:read], "read": len(got)}


def _read_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n and (chunk := s.recv(min(CHUNK, n - len(got)))):
        got += chunk
    return bytes(got)


def _echo_round(s: socket.socket, i: int) -> bool:
    """Round ``i`` on an echo connection: a message of its own, back whole and unchanged?"""
    msg = pattern(1000 + i)[i:]
    s.sendall(msg)
    return _read_exactly(s, len(msg)) == msg


def rounds(ip: str, port: int, n: int, ms: int) -> dict:
    ok = 0
    with connect(ip, port, "echo") as s:
        for i in range(n):
            ok += _echo_round(s, i)
            time.sleep(ms / 1000)
    return {"rounds": n, "ok": ok}


def duplex(ip: str, port: int, n: int, late_ms: int) -> dict:
    with connect(ip, port, f"duplex {late_ms} {n}") as s:
        s.settimeout(60)
        writer = threading.Thread(target=s.sendall, args=(pattern(n),))
        writer.start()
        got = _read_exactly(s, n)
        writer.join()
        verdict = _read_exactly(s, 3)
    return {"client_got_ok": got == pattern(n), "server_got": verdict.decode()}


def burst(ip: str, port: int, n: int, late_ms: int) -> None:
    data = pattern(n)
    with connect(ip, port, f"echo-late {late_ms}") as s:
        s.settimeout(60)
        writer = threading.Thread(target=s.sendall, args=(data,))
        writer.start()
        got = _read_exactly(s, n)
        writer.join()
        print(json.dumps({"burst_ok": got == data, "received": len(got)}), flush=True)
        sys.stdin.readline()
        ok = sum(_echo_round(s, i) for i in range(20))
        print(json.dumps({"rounds": 20, "ok": ok}), flush=True)


if __name__ == "__main__":
    mode, ip, port, *rest = sys.argv[1:]
    args = [int(a) for a in rest]
    if mode == "serve":
        serve(ip, int(port))
    elif mode == "burst":
        burst(ip, int(port), *args)
    else:
        fn = {"sink": sink, "stall": stall, "close-after": close_after, "flood": flood, "rounds": rounds,
              "duplex": duplex}[mode]
        print(json.dumps(fn(ip, int(port), *args)), flush=True)
