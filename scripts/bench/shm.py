#!/usr/bin/env python
"""Benchmark of SharedMemoryManager against a plain memcpy and the spec's approaches.

A state dict of ``--tensors`` float32 tensors totalling ``--mb`` MB (default 200
tensors, 512 MB).  In one run, each figure the median of ``--reps`` repetitions
where that is cheap:

* ``memcpy``: one ``copy_`` of the same bytes into a preallocated, already
  touched tensor (the baseline);
* ``first_store``: ``store()`` of a new key (allocation of shared memory, one copy,
  registry publish, metadata row); the key is deleted between repetitions so each
  one allocates afresh;
* ``swap``: ``store()`` again to the same key, same layout (the chunk-boundary
  swap: in place, crash-safe — a copy into the manager's journal, then one into
  the shared tensors); ``swap_first`` is the first such store, timed apart: it
  also allocates the journal (once per manager);
* ``load``: ``load()`` timed inside a second, spawned process (first load there,
  i.e. no cache; ``load_cached`` is the second); the child also checks that the
  load is zero-copy (same shared file as the parent's, a write is seen);
* ``clone_share``: the spec's original approach, ``{k: v.clone().share_memory_()}``
  then ``registry[key] = ...`` under the lock;
* ``save_load``: ``torch.save`` then ``torch.load`` through a file in /dev/shm.

Targets: ``swap_vs_memcpy <= 1.5``, ``load_vs_memcpy <= 0.1``,
``first_store_vs_clone_share <= 0.8``.  ``--json`` prints one JSON object on the
last line.  The metadata rows go to a temporary SQLite database (``--no-db``: none).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"swap_vs_memcpy": 1.5, "load_vs_memcpy": 0.1, "first_store_vs_clone_share": 0.8}


def _median_time(fn, reps: int, setup=None) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _child_load(manager, key: str, probe: str, result_queue) -> None:
    """Times load() in a fresh process and checks it is zero-copy."""
    try:
        import torch  # noqa: F401  (imported before timing: import cost is not the load's)

        start = time.perf_counter()
        value = manager.load(key)
        first = time.perf_counter() - start
        start = time.perf_counter()
        manager.load(key)
        cached = time.perf_counter() - start
        tensor = value[probe]
        name = tensor.untyped_storage()._share_filename_cpu_()[1]
        tensor[0] = -12345.0  # the parent checks that it sees this write
        result_queue.put({"ok": True, "load": first, "load_cached": cached, "filename": name,
                          "tensors": len(value)})
    except BaseException as exc:  # pragma: no cover - reported to the parent
        import traceback

        result_queue.put({"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="total size of the state dict in MB (default 512)")
    parser.add_argument("--tensors", type=int, default=200, help="number of float32 tensors (default 200)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the cheap measurements (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--no-db", action="store_true", help="no metadata rows (registry only)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="rf_bench_shm_"))
    os.environ["RF_HOME"] = str(workdir / "rf_home")
    import torch

    from rapidfire_state.shm_manager import SharedMemoryManager

    elems_total = args.mb * (1 << 20) // 4
    per = elems_total // args.tensors
    state = {f"layer{i}.weight": torch.randn(per) for i in range(args.tensors)}
    nbytes = per * args.tensors * 4
    probe = next(iter(state))
    results: dict = {"mb": nbytes / (1 << 20), "tensors": args.tensors, "reps": args.reps,
                     "torch_threads": torch.get_num_threads()}

    # memcpy baseline: the same bytes, one copy_ into a preallocated, touched tensor
    src = torch.randn(per * args.tensors)
    dst = torch.empty_like(src)
    dst.copy_(src)
    results["memcpy"], results["memcpy_all"] = _median_time(lambda: dst.copy_(src), args.reps)
    del src, dst

    db = None
    if not args.no_db:
        from rapidfire_state import StateDB

        db = StateDB(f"sqlite:///{workdir / 'state.db'}")
    manager = SharedMemoryManager("bench", db=db, min_free_bytes=0)
    try:
        registry, lock = manager.get_shm_objects()

        counter = iter(range(1_000_000))
        keys: list = []

        def first_store():
            key = f"first{next(counter)}"
            keys.append(key)
            manager.store(key, state)

        def drop_previous():
            while keys:
                manager.delete(keys.pop())

        results["first_store"], results["first_store_all"] = _median_time(first_store, args.reps, setup=drop_previous)
        drop_previous()

        manager.store("swap", state)
        start = time.perf_counter()
        manager.store("swap", state)  # the first in-place store allocates the journal
        results["swap_first"] = time.perf_counter() - start
        results["swap"], results["swap_all"] = _median_time(lambda: manager.store("swap", state), args.reps)

        # load in a second (spawned) process
        queue = multiprocessing.get_context("spawn").Queue()
        child = multiprocessing.get_context("spawn").Process(target=_child_load, args=(manager, "swap", probe, queue))
        child.start()
        answer = queue.get(timeout=600)
        child.join(60)
        if not answer.get("ok"):
            print(answer.get("error"), file=sys.stderr)
            return 2
        mine = manager.load("swap")[probe]
        results["load"] = answer["load"]
        results["load_cached"] = answer["load_cached"]
        results["load_zero_copy"] = bool(
            answer["filename"] == mine.untyped_storage()._share_filename_cpu_()[1] and mine[0].item() == -12345.0
        )
        manager.delete("swap")
        del mine

        # the spec's original approach: clone, share_memory_, put into the registry
        def clone_share():
            shared = {k: v.clone().share_memory_() for k, v in state.items()}
            with lock:
                registry["clone_share"] = shared

        def drop_clone():
            registry.pop("clone_share", None)

        results["clone_share"], results["clone_share_all"] = _median_time(clone_share, args.reps, setup=drop_clone)
        drop_clone()

        # torch.save + torch.load through /dev/shm
        path = Path("/dev/shm") / f"rf_bench_{os.getpid()}.pt"

        def save_load():
            torch.save(state, path)
            torch.load(path, weights_only=True)

        try:
            results["save_load"], results["save_load_all"] = _median_time(save_load, args.reps)
        finally:
            path.unlink(missing_ok=True)
    finally:
        manager.close()
        if db is not None:
            db.close()

    memcpy = results["memcpy"]
    results["swap_vs_memcpy"] = results["swap"] / memcpy
    results["load_vs_memcpy"] = results["load"] / memcpy
    results["first_store_vs_clone_share"] = results["first_store"] / results["clone_share"]
    results["save_load_vs_memcpy"] = results["save_load"] / memcpy
    results["targets_met"] = all(results[name] <= limit for name, limit in TARGETS.items())

    print(f"state dict: {args.tensors} float32 tensors, {results['mb']:.0f} MB; median of {args.reps}; "
          f"torch threads {results['torch_threads']}; db: {'none' if args.no_db else 'sqlite'}")
    for name in ("memcpy", "first_store", "swap_first", "swap", "load", "load_cached", "clone_share", "save_load"):
        spread = results.get(f"{name}_all")
        extra = f"  (all: {', '.join(f'{t * 1000:.1f}' for t in spread)})" if spread else ""
        print(f"  {name:<12} {results[name] * 1000:9.1f} ms{extra}")
    print(f"  load is zero-copy: {results['load_zero_copy']}")
    for name, limit in TARGETS.items():
        verdict = "ok" if results[name] <= limit else "MISSED"
        print(f"  {name:<28} {results[name]:7.3f}  (target <= {limit})  {verdict}")
    print(f"  {'save_load_vs_memcpy':<28} {results['save_load_vs_memcpy']:7.3f}")
    if args.json:
        print(json.dumps(results))
    return 0 if results["targets_met"] and results["load_zero_copy"] else 1


if __name__ == "__main__":
    sys.exit(main())
