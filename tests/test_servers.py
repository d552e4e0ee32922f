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
