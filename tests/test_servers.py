"""tests/servers.py itself: a server we start never outlives the test process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import servers
s = servers.start("redis")
print(s.proc.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is gone once its state is Z or it is reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_server_dies_with_the_process_that_started_it_even_on_sigkill():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid = int(child.stdout.readline())
        assert _alive(server_pid)
        child.send_signal(signal.SIGKILL)  # no atexit, no fixture teardown
        child.wait(10)
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = _alive(server_pid)
        if alive:
            os.kill(server_pid, signal.SIGKILL)
        assert not alive, "the redis-server outlived the killed test process"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_a_server_whose_port_was_taken_meanwhile_is_not_mistaken_for_the_one_there(monkeypatch):
    # Between _free_port() and the new server's bind, another process may take the port (another
    # session's server, on a shared machine): the new server then exits, while the other one
    # answers PING on that port. It must not be taken for ours (tests would FLUSHALL it, stop a
    # process that is gone, ...): start() tries another port.
    from tests import servers

    first = servers.start("redis")
    try:
        taken = iter([first.port])  # the first port handed out is first's, as if just taken
        real = servers._free_port
        monkeypatch.setattr(servers, "_free_port", lambda: next(taken, None) or real())
        second = servers.start("redis")
        try:
            assert second.port != first.port
            assert second.proc is not None and second.proc.poll() is None
            assert servers.listens(second.pid, second.port)
            assert not servers.listens(second.pid, first.port)
        finally:
            second.cleanup()
    finally:
        first.cleanup()
