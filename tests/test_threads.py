"""The library's background threads leave SIGINT/SIGTERM to the main thread (``rapidfire_state/threads.py``).

Read from the kernel's own record of each thread's blocked signals
(``/proc/self/task/<tid>/status``, ``SigBlk``), and shown end to end: a process
whose main thread sleeps while a library thread runs handles SIGTERM at once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rapidfire_state.threads import MAIN_THREAD_SIGNALS, start_background_thread

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")


def blocked_signals(native_id: int) -> set[int]:
    for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask & (1 << (number - 1))}
    raise AssertionError("no SigBlk line")


def test_a_background_thread_blocks_the_main_threads_signals_and_the_main_thread_does_not():
    started, release = threading.Event(), threading.Event()
    ids: list[int] = []

    def target() -> None:
        ids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = start_background_thread(target, "rf-test-background")
    try:
        assert started.wait(10)
        assert thread.daemon and thread.name == "rf-test-background"
        assert {int(s) for s in MAIN_THREAD_SIGNALS} <= blocked_signals(ids[0])
        assert not {int(s) for s in MAIN_THREAD_SIGNALS} & blocked_signals(threading.get_native_id())
    finally:
        release.set()
        thread.join(10)


SLEEPER = r"""
import signal, sys, threading, time
from rapidfire_state.threads import start_background_thread
def handler(signum, frame):
    print("handled", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, handler)
for index in range(4):  # busy library threads, as a controller has them (flusher, heartbeats)
    start_background_thread(lambda: [time.sleep(0.001) for _ in iter(int, 1)], f"bg{index}")
print("ready", flush=True)
time.sleep(60)
print("slept through", flush=True)
"""


def test_sigterm_reaches_a_sleeping_main_thread_at_once_while_library_threads_run():
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            sent = time.monotonic()
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=30) == 143
            assert time.monotonic() - sent < 10
            assert child.stdout.read().strip() == "handled"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
