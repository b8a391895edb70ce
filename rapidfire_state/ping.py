"""Are the RapidFire servers up?  ``python -m rapidfire_state.ping``

Sends one HTTP GET with a short timeout to each service at its configured URL
(:mod:`rapidfire_state.constants`: ``RF_<SERVICE>_URL``, else
``http://RF_<SERVICE>_HOST:RF_<SERVICE>_PORT/``) and prints one line per service::

    dispatcher  http://127.0.0.1:8851/         up     3.1 ms  HTTP 200
    mlflow      http://127.0.0.1:8852/health   up     2.4 ms  HTTP 200
    frontend    http://127.0.0.1:8853/         down   connection refused

Exit status 0 when every requested service is up, 1 otherwise (2 for bad arguments).

A service is *up* when it answers HTTP: for MLflow its ``/health`` endpoint must
answer 2xx; for the others any status below 500 counts (a 404 on ``/`` still
proves a server is listening and serving).  The services are pinged in parallel,
so the whole check takes about one timeout at most.  Standard library only, so it
runs in seconds even where torch and mlflow are slow to import.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from rapidfire_state import constants
from rapidfire_state.exceptions import ConfigError
from rapidfire_state.validation import check_positive_number

#: Service name -> (configuration class, path appended to its URL, highest healthy status).
SERVICES: dict[str, tuple[type, str, int]] = {
    "dispatcher": (constants.DispatcherConfig, "", 499),
    "mlflow": (constants.MLFlowConfig, "health", 299),
    "frontend": (constants.FrontendConfig, "", 499),
}

DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True)
class PingResult:
    """The outcome of one ping.

    Attributes:
        name: The service name (or the URL when pinged by URL alone).
        url: The URL requested.
        up: Whether the server answered with a healthy status.
        status: The HTTP status, or None when there was no HTTP answer.
        latency_ms: Time to the response headers, or None when there was no answer.
        error: Why the service counts as down (None when up).
    """

    name: str
    url: str
    up: bool
    status: int | None = None
    latency_ms: float | None = None
    error: str | None = None

    def line(self) -> str:
        """One human-readable line (the CLI's output)."""
        if self.up:
            detail = f"{self.latency_ms:7.1f} ms  HTTP {self.status}"
        elif self.status is not None:
            detail = f"{self.error} ({self.latency_ms:.1f} ms)"
        else:
            detail = str(self.error)
        return f"{self.name:<11} {self.url:<36} {'up' if self.up else 'down':<5} {detail}"


def _describe(exc: BaseException, timeout: float) -> str:
    reason = getattr(exc, "reason", exc)  # URLError wraps the socket error
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason})"
    return f"{type(reason).__name__}: {reason}"


def ping_service(
    url: str, timeout: float = DEFAULT_TIMEOUT, *, name: str | None = None, max_status: int = 499
) -> PingResult:
    """GET ``url`` once and report whether a server answered.

    Args:
        url: An ``http://`` or ``https://`` URL.
        timeout: Seconds to wait for the connection and the response headers.
        name: The label of the result (default: the URL).
        max_status: The highest HTTP status that counts as up.

    Never raises for network errors (they make a *down* result); raises
    :class:`~rapidfire_state.exceptions.ConfigError` for a bad URL or timeout.
    """
    timeout = check_positive_number("timeout", timeout)
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"url={url!r} is not an http(s) URL")
    label = name or url
    # The services are local; an HTTP proxy from the environment (common in notebooks
    # and behind corporate networks) would answer for them or refuse localhost.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "rapidfire-state-ping"})
    start = time.perf_counter()
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:  # an answer, with a 4xx/5xx status
        status = int(exc.code)
        exc.close()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return PingResult(label, url, False, error=_describe(exc, timeout))
    latency = (time.perf_counter() - start) * 1000.0
    if status <= max_status:
        return PingResult(label, url, True, status, latency)
    return PingResult(label, url, False, status, latency, error=f"HTTP {status}")


def service_url(service: str) -> str:
    """The URL pinged for ``service`` (its configured URL, plus ``health`` for MLflow)."""
    try:
        config, path, _ = SERVICES[service]
    except KeyError:
        raise ConfigError(f"service={service!r} is unknown; use one of {', '.join(SERVICES)}") from None
    base = str(config.URL)
    if not path:
        return base
    return base.rstrip("/") + "/" + path


def ping_all(services: Iterable[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[PingResult]:
    """Ping ``services`` (default: dispatcher, mlflow, frontend) in parallel, in that order."""
    timeout = check_positive_number("timeout", timeout)
    names = list(dict.fromkeys(SERVICES if services is None else services))
    if not names:
        raise ConfigError(f"no service to ping; use one or more of {', '.join(SERVICES)}")
    urls = [service_url(name) for name in names]  # validates the names before any request
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = [
            pool.submit(ping_service, url, timeout, name=name, max_status=SERVICES[name][2])
            for name, url in zip(names, urls)
        ]
        return [future.result() for future in futures]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m rapidfire_state.ping",
        description="Check whether the RapidFire dispatcher, MLflow and frontend servers answer.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per request (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--service",
        action="append",
        choices=list(SERVICES),
        help="a service to check (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    try:
        results = ping_all(args.service, args.timeout)
    except ConfigError as exc:  # e.g. RF_MLFLOW_PORT=abc
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=2))
    else:
        for result in results:
            print(result.line())
    return 0 if all(result.up for result in results) else 1


__all__ = ["PingResult", "SERVICES", "DEFAULT_TIMEOUT", "ping_service", "ping_all", "service_url", "main"]


if __name__ == "__main__":
    sys.exit(main())
