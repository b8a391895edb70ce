"""``rapidfire-state ic``: interactive control of the running experiment from any terminal.

    rapidfire-state ic stop RUN                       stop a run (NEW or ONGOING)
    rapidfire-state ic resume RUN                     resume a STOPPED run
    rapidfire-state ic kill RUN                       end a run for good (NEW, ONGOING or STOPPED)
    rapidfire-state ic clone RUN --config JSON [--warm]
                                                      a new run: RUN's config with these keys changed

Each command checks the request against the database and queues it as a
controller task in one transaction (an invalid request is one line on stderr,
exit 2, and nothing is queued); then it waits for the controller to apply it,
at most ``--timeout`` seconds, and prints the outcome in one line.  Exit status:
0 done, 1 the controller refused it (the task FAILED: its error is printed),
3 not applied in time (the request stays queued), 2 invalid request.
``--no-wait`` returns once the request is queued.

It writes only rows, so it works against PostgreSQL from another machine (with
the same ``RF_PAYLOAD_KEY`` as the controller, for a clone's config).  Like the
rest of the console, it imports neither torch nor mlflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

#: exit statuses of a queued request that was not applied ok
EXIT_REFUSED_BY_CONTROLLER = 1
EXIT_NOT_APPLIED_IN_TIME = 3
#: how long a waiting command sleeps between reads of its task
POLL_SECONDS = 0.1
DEFAULT_TIMEOUT = 60.0

_HELP = {
    "stop": "stop a run (NEW or ONGOING) at its next task boundary",
    "resume": "resume a STOPPED run from its own next chunk",
    "kill": "end a run for good (NEW, ONGOING or STOPPED): KILLED",
    "clone": "start a new run from RUN's config with the keys of --config changed",
}


_DESCRIPTION = (
    "Queue a request for the controller of the RUNNING experiment (or -e ID) and wait for its outcome.\n"
    "An invalid request is refused at once (exit 2) and nothing is queued. Exit status once queued:\n"
    "0 done, 1 refused by the controller (its error is printed), 3 not applied within --timeout\n"
    "(the request stays queued). --no-wait returns once the request is queued."
)


def _json_object(value: str) -> dict:
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        parsed = json.loads(value, parse_constant=refuse_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"{value!r} is a JSON {type(parsed).__name__}; a JSON object is required, e.g. '{{\"lr\": 0.01}}'"
        )
    return parsed


def add_ic_parser(
    commands: Any, writer: Callable[[argparse.Namespace], Any], seconds: Callable[[str], float]
) -> None:
    """Register ``ic`` and its actions on the console's subcommands.

    ``writer(args)`` opens the database for writing (a context manager);
    ``seconds`` parses ``--timeout``.
    """
    ic = commands.add_parser(
        "ic", help="stop, resume, kill or clone a run of the running experiment",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = ic.add_subparsers(dest="ic_action", metavar="ACTION")
    actions.required = True
    for action in ("stop", "resume", "kill", "clone"):
        sub = actions.add_parser(action, help=_HELP[action])
        sub.add_argument("run_id", type=int, metavar="RUN", help="the run's id")
        sub.add_argument("-e", "--experiment", type=int, default=None, help="experiment id (default: the RUNNING one)")
        if action == "clone":
            sub.add_argument(
                "--config", type=_json_object, required=True, metavar="JSON",
                help="a JSON object: the keys of RUN's config to change, e.g. '{\"lr\": 0.01}'",
            )
            sub.add_argument("--warm", action="store_true", help="start from RUN's current weights")
        sub.add_argument("--no-wait", action="store_true", help="return once the request is queued")
        sub.add_argument(
            "--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="S",
            help=f"wait at most S seconds for the controller (default {DEFAULT_TIMEOUT:g})",
        )
        sub.set_defaults(func=lambda args: cmd_ic(args, writer))


def cmd_ic(args: argparse.Namespace, writer: Callable[[argparse.Namespace], Any]) -> int:
    """Queue one request; unless ``--no-wait``, wait for its outcome and print it."""
    action = args.ic_action
    label = f"ic {action} {args.run_id}"
    with writer(args) as database:
        task = database.request_run_control(
            args.run_id, action, experiment_id=args.experiment,
            config=getattr(args, "config", None), warm=bool(getattr(args, "warm", False)),
        )
        where = f"controller task {task.task_id} of experiment {task.experiment_id}"
        if args.no_wait:
            print(f"{label}: queued ({where})")
            return 0
        try:
            return _wait(database, task.task_id, label, where, args.timeout)
        except KeyboardInterrupt:
            print(f"{label}: interrupted; the request stays queued as {where}", file=sys.stderr)
            return 130


def _wait(database: Any, task_id: int, label: str, where: str, timeout: float) -> int:
    """Poll the task until the controller finished it or ``timeout`` passed; print the outcome."""
    deadline = time.monotonic() + timeout
    while True:
        current = database.get_task("controller", task_id)
        if current.status.value == "COMPLETED":
            print(f"{label}: done ({_completed_outcome(database, task_id)})")
            return 0
        if current.status.value == "FAILED":
            print(f"{label}: failed: {current.error or 'no error recorded'}", file=sys.stderr)
            return EXIT_REFUSED_BY_CONTROLLER
        if time.monotonic() >= deadline:
            print(
                f"{label}: not applied within {timeout:g} s; still {current.status.value} as {where} "
                f"(it stays queued: the controller applies it when it next reaches the run)",
                file=sys.stderr,
            )
            return EXIT_NOT_APPLIED_IN_TIME
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _completed_outcome(database: Any, task_id: int) -> str:
    """The controller's outcome: the reason of the task's change to COMPLETED."""
    for change in reversed(database.history("controller_task", task_id)):
        if change.to_status.value == "COMPLETED":
            return change.reason or "applied"
    return "applied"
