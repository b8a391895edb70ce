"""Background threads that leave the process's signals to the main thread.

Python runs every signal handler in the main thread, but the kernel may deliver
a signal sent to the process to any thread that does not block it.  A SIGTERM
that lands on a background thread sets the handler's flag without waking the
main thread: a main thread inside ``time.sleep(120)`` runs the handler only
when the sleep ends.  The library's own threads therefore block the signals a
controller handles (SIGINT, SIGTERM), so the kernel delivers them to the main
thread, which wakes at once.  A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

#: the signals a background thread of this library never takes from the main thread
MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def start_background_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start ``target`` in a daemon thread named ``name`` that blocks :data:`MAIN_THREAD_SIGNALS`."""

    def run() -> None:
        if hasattr(signal, "pthread_sigmask"):  # POSIX; Windows delivers no such signals to threads
            signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
