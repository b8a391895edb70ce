"""Shared by the benchmarks: run one target per process (spawn) behind a barrier, collect results.

Each target is called as ``target(*args, barrier, results)`` and puts one dict on
``results`` (``{"error": traceback}`` when it failed).  A process that dies or
hangs stops the whole benchmark with its exit code, never a partial figure.
"""

from __future__ import annotations

import multiprocessing
import queue
import time


def run_children(target, args_list: list[tuple], *, deadline_s: float = 900) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args_list))
    results = ctx.Queue()
    children = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_list]
    for child in children:
        child.start()
    outcomes: list[dict] = []
    deadline = time.monotonic() + deadline_s
    while len(outcomes) < len(children):
        try:
            outcomes.append(results.get(timeout=1))
        except queue.Empty:
            dead = [c for c in children if c.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for child in children:
                    child.kill()
                raise SystemExit(f"benchmark processes died or hung: exit codes {[c.exitcode for c in children]}")
    for child in children:
        child.join(timeout=60)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise SystemExit("a benchmark process failed:\n" + "\n".join(errors))
    return outcomes
