"""Adopting and stopping the L7 processor by its PID file (agent/l7_supervisor.py), with a stand-in process."""

import subprocess
import sys
import time

from agent.l7_supervisor import _start_time, running_processor, stop_processor


def _stand_in(listen: str) -> subprocess.Popen:
    # argv carries what running_processor checks: "userspace_l7" and the listen address
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "userspace_l7",
                             "--listen", listen])
    # Right after exec, /proc/PID/cmdline can still read empty for a moment.
    deadline = time.monotonic() + 5
    while b"userspace_l7" not in open(f"/proc/{proc.pid}/cmdline", "rb").read() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_adopts_only_the_recorded_process(tmp_path):
    pidfile = tmp_path / "l7-n1.pid"
    proc = _stand_in("10.200.0.1:15001")
    try:
        pidfile.write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
        assert running_processor(str(pidfile)) == proc.pid
        assert running_processor(str(pidfile), "10.200.0.1:15001") == proc.pid
        assert running_processor(str(pidfile), "10.200.0.1:15999") is None  # listens elsewhere
        assert running_processor(str(pidfile), "10.200.0.1:15001", workers=1) == proc.pid  # no --workers: 1
        assert running_processor(str(pidfile), "10.200.0.1:15001", workers=2) is None  # l7_workers changed
        assert running_processor(str(pidfile), args=["--listen", "10.200.0.1:15001"]) == proc.pid
        # a node setting changed (e.g. l7_request_timeout): the agent replaces it rather than adopt it
        assert running_processor(str(pidfile), args=["--listen", "10.200.0.1:15001", "--request-timeout", "5"]) is None
        pidfile.write_text(f"{proc.pid} {_start_time(proc.pid) + 1}\n")  # a recycled PID
        assert running_processor(str(pidfile)) is None
    finally:
        proc.kill()
        proc.wait()


def test_foreign_garbage_and_missing_files_are_not_adopted(tmp_path):
    pidfile = tmp_path / "l7-n1.pid"
    assert running_processor(str(pidfile)) is None
    pidfile.write_text("not a pid\n")
    assert running_processor(str(pidfile)) is None
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile.write_text(f"{other.pid} {_start_time(other.pid)}\n")
        assert running_processor(str(pidfile)) is None  # alive, but not a processor
        assert stop_processor(str(pidfile)) is None and other.poll() is None  # and never killed
    finally:
        other.kill()
        other.wait()


def test_stop_processor_ends_it_and_removes_the_file(tmp_path):
    pidfile = tmp_path / "l7-n1.pid"
    proc = _stand_in("10.200.0.1:15001")
    try:
        pidfile.write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
        assert stop_processor(str(pidfile), timeout=5) == proc.pid
        assert proc.wait(5) is not None
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_metrics_addresses():
    from agent.l7_supervisor import L7Supervisor

    sup = L7Supervisor("/tmp/l7.json", "10.200.0.1:15001", "/tmp/f.sock", "127.0.0.1:9963", "n1", print, workers=3)
    assert sup.metrics_addrs() == ["127.0.0.1:9963", "127.0.0.1:9964", "127.0.0.1:9965"]


def test_the_processor_gets_the_node_settings():
    from agent.l7_supervisor import L7Supervisor

    sup = L7Supervisor("/run/l7.json", "10.200.0.1:15001", "/run/f.sock", "127.0.0.1:15020", "n1", lambda f: None,
                       bpffs_dir="/sys/fs/bpf/x", max_connections_per_endpoint=300, request_headers_timeout=5.0,
                       request_timeout=12.5)
    args = sup._args()
    for flag, value in (("--max-connections-per-endpoint", "300"), ("--header-timeout", "5"),
                        ("--request-timeout", "12.5"), ("--bpffs", "/sys/fs/bpf/x")):
        assert args[args.index(flag) + 1] == value
