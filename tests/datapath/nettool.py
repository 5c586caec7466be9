"""Tiny traffic tool the datapath tests run inside endpoints (`ip netns exec EP python3 nettool.py ...`).

  serve-tcp PORT            echo every connection's bytes back until it closes
  serve-udp PORT            echo datagrams
  tcp HOST PORT [TIMEOUT]   connect, send, expect the echo; exit 0 ok, 1 no connection/echo
  udp HOST PORT [TIMEOUT]   send one datagram, expect the echo; exit 0 ok, 1 timeout
  hold HOST PORT            connect, then on each line on stdin send it and print the echo or TIMEOUT
"""

import socket
import sys
import threading


def serve_tcp(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print("ready", flush=True)

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def serve_udp(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = srv.recvfrom(65536)
        srv.sendto(data, peer)


def tcp(host: str, port: int, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ping")
            return 0 if s.recv(16) == b"ping" else 1
    except OSError:
        return 1


def udp(host: str, port: int, timeout: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"ping", (host, port))
        try:
            return 0 if s.recvfrom(16)[0] == b"ping" else 1
        except OSError:
            return 1


def hold(host: str, port: int) -> None:
    s = socket.create_connection((host, port), timeout=5)
    print("connected", flush=True)
    for line in sys.stdin:
        s.settimeout(float(line.split()[1]) if len(line.split()) > 1 else 2.0)
        try:
            s.sendall(line.split()[0].encode())
            print(s.recv(64).decode() or "CLOSED", flush=True)
        except OSError:
            print("TIMEOUT", flush=True)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "serve-tcp":
        serve_tcp(int(rest[0]))
    elif cmd == "serve-udp":
        serve_udp(int(rest[0]))
    elif cmd == "tcp":
        sys.exit(tcp(rest[0], int(rest[1]), float(rest[2]) if len(rest) > 2 else 2.0))
    elif cmd == "udp":
        sys.exit(udp(rest[0], int(rest[1]), float(rest[2]) if len(rest) > 2 else 2.0))
    elif cmd == "hold":
        hold(rest[0], int(rest[1]))
    else:
        sys.exit(f"unknown command {cmd}")
