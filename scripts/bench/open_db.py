#!/usr/bin/env python
"""Cost of a fresh process that imports rapidfire_state and opens an up-to-date database.

In one run, alternating, ``--n`` (default 15) fresh interpreters each

* ``open``: ``import rapidfire_state``, ``StateDB(path)`` on an up-to-date SQLite
  database created beforehand, and one trivial read (``get_experiment_by_name``);
* ``sqlalchemy``: ``import sqlalchemy`` only (the baseline);
* ``python``: nothing (interpreter start-up, for reference).

Reports the medians and ``ratio_vs_sqlalchemy_import`` = open / sqlalchemy
(target <= 1.5).  When the ratio misses the target (or with ``--profile``), one
``-X importtime`` run of the open process is summarised: the imports that
dominate.  ``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.5

OPEN_CODE = (
    "import rapidfire_state\n"
    "from rapidfire_state import StateDB\n"
    "db = StateDB({path!r})\n"
    "assert db.get_experiment_by_name('bench').name == 'bench'\n"
    "db.close()\n"
)
SQLALCHEMY_CODE = "import sqlalchemy\n"
PYTHON_CODE = "pass\n"


def timed(code: str, env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{result.stderr}")
    return elapsed


def import_profile(code: str, env: dict, min_ms: float = 4.0) -> list[dict]:
    """Imports of one ``-X importtime`` run that cost at least ``min_ms`` (cumulative).

    Top-level imports and their direct children, in import order, so that
    ``rapidfire_state.db.models`` shows what it pulls in (the ORM, dialects).
    """
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
        if match:
            depth = (len(match[3]) - 1) // 2
            rows.append({"module": match[4], "self_us": int(match[1]), "cumulative_us": int(match[2]), "depth": depth})
    # -X importtime prints a module after its children: attach children to the next shallower row
    ordered: list[dict] = []
    pending: list[dict] = []
    for row in rows:
        if row["depth"] == 0:
            ordered.append(row)
            ordered.extend(child for child in pending)
            pending = []
        elif row["depth"] == 1:
            pending.append(row)
    return [r for r in ordered if r["cumulative_us"] >= min_ms * 1000]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=15, help="processes of each kind (default 15)")
    parser.add_argument("--profile", action="store_true", help="always summarise -X importtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rf_bench_open_") as tmp:
        env = dict(os.environ, RF_HOME=str(Path(tmp) / "home"))
        env.pop("RF_DB_URL", None)
        path = str(Path(tmp) / "state.db")
        # the database is created (migrated) beforehand: the measured opens find it at head
        setup = subprocess.run(
            [sys.executable, "-c",
             "from rapidfire_state import StateDB\n"
             f"db = StateDB({path!r})\n"
             f"db.create_experiment('bench', {tmp!r})\n"
             "db.close()\n"],
            env=env, capture_output=True, text=True,
        )
        if setup.returncode != 0:
            raise SystemExit(f"set-up failed:\n{setup.stderr}")
        open_code = OPEN_CODE.format(path=path)
        # warm the page cache once for each kind; not counted
        for code in (open_code, SQLALCHEMY_CODE, PYTHON_CODE):
            timed(code, env)
        times: dict[str, list[float]] = {"open": [], "sqlalchemy": [], "python": []}
        for _ in range(args.n):
            times["open"].append(timed(open_code, env))
            times["sqlalchemy"].append(timed(SQLALCHEMY_CODE, env))
            times["python"].append(timed(PYTHON_CODE, env))
        medians = {kind: statistics.median(values) for kind, values in times.items()}
        ratio = medians["open"] / medians["sqlalchemy"]
        profile = import_profile(open_code, env) if (ratio > TARGET or args.profile) else []

    print(f"fresh processes, {args.n} of each kind, alternating (medians; min..max)")
    for kind, label in (("open", "import rapidfire_state + open db + read"),
                        ("sqlalchemy", "import sqlalchemy"), ("python", "python -c pass")):
        values = times[kind]
        print(f"  {label:<40} {medians[kind] * 1000:8.1f} ms   ({min(values) * 1000:.1f}..{max(values) * 1000:.1f})")
    print(f"  ratio_vs_sqlalchemy_import = {ratio:.2f}  (target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'})")
    above_python = (medians["open"] - medians["python"]) / max(medians["sqlalchemy"] - medians["python"], 1e-9)
    print(f"  beyond interpreter start-up: open costs {above_python:.2f}x the sqlalchemy import")
    if profile:
        print("  imports of the open process costing >= 4 ms (-X importtime, cumulative; children indented):")
        for row in profile:
            print(f"    {row['cumulative_us'] / 1000:8.1f} ms  {'    ' * row['depth']}{row['module']}")

    if args.json:
        print(json.dumps({
            "n": args.n,
            "open_median_s": round(medians["open"], 4),
            "sqlalchemy_import_median_s": round(medians["sqlalchemy"], 4),
            "python_startup_median_s": round(medians["python"], 4),
            "ratio_vs_sqlalchemy_import": round(ratio, 3),
            "target": TARGET,
            "met": ratio <= TARGET,
            "import_profile": [{"module": r["module"], "depth": r["depth"], "cumulative_ms": round(r["cumulative_us"] / 1000, 1)}
                               for r in profile],
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
