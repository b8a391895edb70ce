"""A process standing for another host in ``test_shm_hosts``: run with ``RF_HOST`` set.

``python tests/shm_host_child.py DB_URL MANAGER_NAME PLACEMENT [SHARED_DIR]`` opens
its own registry (as a manager on another host would) and then answers one JSON
command per stdin line with one JSON line on stdout:

* ``{"op": "store", "key", "seed", "experiment_id", "run_id"}`` → the row (host, copy_path, location)
* ``{"op": "copy_to_shared", "key"}`` → the row
* ``{"op": "has_entry", "key"}`` → whether this host's registry holds the key
* ``{"op": "reconcile"}`` → ``dropped_elsewhere`` and ``removed`` of the report
* ``{"op": "load", "key"}`` → the loaded tensors as lists
* ``{"op": "exit"}``

Errors answer ``{"error": type name, "message": text}``.
"""

from __future__ import annotations

import json
import sys


def value_for(seed: int):
    """The state dict a test stores for ``seed`` (the parent builds the same one to compare)."""
    import torch

    return {
        "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) * seed,
        "bias": torch.full((4,), float(seed), dtype=torch.float64),
        "step": seed,
    }


def main() -> None:
    from rapidfire_state import StateDB
    from rapidfire_state.shm_manager import SharedMemoryManager

    url, name, placement = sys.argv[1:4]
    shared_dir = sys.argv[4] if len(sys.argv) > 4 else None
    db = StateDB(url)
    manager = SharedMemoryManager(name, db=db, placement=placement, shared_dir=shared_dir)
    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            try:
                if op == "exit":
                    break
                if op == "store":
                    record = manager.store(command["key"], value_for(command["seed"]),
                                           experiment_id=command.get("experiment_id"), run_id=command.get("run_id"))
                    answer = {"host": record.host, "copy_path": record.copy_path, "location": record.location.value}
                elif op == "copy_to_shared":
                    record = manager.copy_to_shared(command["key"])
                    answer = {"host": record.host, "copy_path": record.copy_path}
                elif op == "has_entry":
                    registry, _lock = manager.get_shm_objects()
                    answer = {"has_entry": command["key"] in registry.keys()}
                elif op == "reconcile":
                    report = manager.reconcile()
                    answer = {"dropped_elsewhere": list(report.dropped_elsewhere), "removed": list(report.removed)}
                elif op == "load":
                    value = manager.load(command["key"])
                    answer = {"weight": value["weight"].tolist(), "bias": value["bias"].tolist(), "step": value["step"]}
                else:
                    answer = {"error": "ValueError", "message": f"unknown op {op!r}"}
            except Exception as exc:  # reported to the test, which decides
                answer = {"error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(answer), flush=True)
    finally:
        manager.close()
        db.close()


if __name__ == "__main__":
    main()
