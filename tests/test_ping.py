"""rapidfire_state.ping against real HTTP servers on localhost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from rapidfire_state import ping
from rapidfire_state.exceptions import ConfigError


class _Handler(BaseHTTPRequestHandler):
    """/ and /health answer 200, /missing and /other/health 404, /broken 503; paths are recorded."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        status = {"/missing": 404, "/other/health": 404, "/broken": 503}.get(self.path, 200)
        body = b"OK"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _url(server: ThreadingHTTPServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture
def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_server(server):
    result = ping.ping_service(_url(server), timeout=2.0)
    assert result.up is True
    assert result.status == 200
    assert result.error is None
    assert result.latency_ms is not None and 0 < result.latency_ms < 2000
    assert result.name == _url(server)
    assert "up" in result.line() and "HTTP 200" in result.line()


def test_closed_port_is_down(closed_port):
    result = ping.ping_service(f"http://127.0.0.1:{closed_port}/", timeout=1.0)
    assert result.up is False
    assert result.status is None
    assert result.error == "connection refused"
    assert "down" in result.line()


def test_404_counts_as_up_unless_a_healthy_status_is_required(server):
    assert ping.ping_service(_url(server, "/missing")).up is True
    strict = ping.ping_service(_url(server, "/missing"), max_status=299)
    assert strict.up is False and strict.status == 404 and strict.error == "HTTP 404"


def test_5xx_is_down(server):
    result = ping.ping_service(_url(server, "/broken"))
    assert result.up is False
    assert result.status == 503


def test_silent_server_times_out():
    # Listens (the kernel completes the handshake) but never answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = ping.ping_service(f"http://127.0.0.1:{port}/", timeout=0.3)
    assert result.up is False
    assert result.error == "timed out after 0.3 s"


def test_environment_proxy_is_not_used(server, closed_port, monkeypatch):
    # A proxy that refuses everything: the ping would fail if it went through it.
    proxy = f"http://127.0.0.1:{closed_port}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert ping.ping_service(_url(server)).up is True


@pytest.mark.parametrize("url", ["", "127.0.0.1:8851", "ftp://127.0.0.1/", None])
def test_bad_url(url):
    with pytest.raises(ConfigError, match="http"):
        ping.ping_service(url)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, "2", True])
def test_bad_timeout(server, timeout):
    with pytest.raises(ConfigError, match="timeout"):
        ping.ping_service(_url(server), timeout=timeout)  # type: ignore[arg-type]


def test_service_urls_follow_the_environment(monkeypatch):
    monkeypatch.setenv("RF_DISPATCHER_URL", "http://10.0.0.1:1/")
    monkeypatch.delenv("RF_MLFLOW_URL", raising=False)
    monkeypatch.setenv("RF_MLFLOW_HOST", "127.0.0.2")
    monkeypatch.setenv("RF_MLFLOW_PORT", "9999")
    monkeypatch.setenv("RF_FRONTEND_URL", "http://h:3/prefix")
    assert ping.service_url("dispatcher") == "http://10.0.0.1:1/"
    assert ping.service_url("mlflow") == "http://127.0.0.2:9999/health"
    assert ping.service_url("frontend") == "http://h:3/prefix"
    with pytest.raises(ConfigError, match="dispatcher, mlflow, frontend"):
        ping.service_url("database")


def test_ping_all(server, closed_port, monkeypatch):
    monkeypatch.setenv("RF_DISPATCHER_URL", _url(server))
    monkeypatch.setenv("RF_MLFLOW_URL", _url(server))
    monkeypatch.setenv("RF_FRONTEND_URL", f"http://127.0.0.1:{closed_port}/")
    server.paths.clear()
    results = ping.ping_all(timeout=1.0)
    assert [r.name for r in results] == ["dispatcher", "mlflow", "frontend"]
    assert [r.up for r in results] == [True, True, False]
    assert results[1].url == _url(server, "/health")
    assert sorted(server.paths) == ["/", "/health"]

    only = ping.ping_all(["mlflow", "mlflow"], timeout=1.0)
    assert [r.name for r in only] == ["mlflow"]
    with pytest.raises(ConfigError):
        ping.ping_all([], timeout=1.0)


def test_mlflow_health_must_be_2xx(server, monkeypatch):
    # Something on MLflow's URL that answers 404 at /health is not a healthy MLflow,
    # while a 404 from the dispatcher's root still proves the dispatcher is serving.
    monkeypatch.setenv("RF_MLFLOW_URL", _url(server, "/other/"))
    monkeypatch.setenv("RF_DISPATCHER_URL", _url(server, "/missing"))
    dispatcher, mlflow = ping.ping_all(["dispatcher", "mlflow"], timeout=1.0)
    assert mlflow.url == _url(server, "/other/health")
    assert (mlflow.up, mlflow.status) == (False, 404)
    assert (dispatcher.up, dispatcher.status) == (True, 404)


def _cli(args: list[str], **urls: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RF_")}
    env.update({f"RF_{name.upper()}_URL": url for name, url in urls.items()})
    return subprocess.run(
        [sys.executable, "-m", "rapidfire_state.ping", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_all_up_exits_0(server):
    url = _url(server)
    proc = _cli(["--timeout", "1"], dispatcher=url, mlflow=url, frontend=url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    assert [line.split()[0] for line in lines] == ["dispatcher", "mlflow", "frontend"]
    assert all(" up " in line for line in lines)


def test_cli_one_down_exits_1(server, closed_port):
    url = _url(server)
    down = f"http://127.0.0.1:{closed_port}/"
    proc = _cli(["--timeout", "1"], dispatcher=url, mlflow=url, frontend=down)
    assert proc.returncode == 1
    frontend = [line for line in proc.stdout.splitlines() if line.startswith("frontend")]
    assert frontend and "down" in frontend[0] and "connection refused" in frontend[0]


def test_cli_service_filter_and_json(server, closed_port):
    down = f"http://127.0.0.1:{closed_port}/"
    proc = _cli(
        ["--service", "mlflow", "--service", "dispatcher", "--json", "--timeout", "1"],
        dispatcher=_url(server),
        mlflow=_url(server),
        frontend=down,  # not requested, so it does not count
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert [d["name"] for d in data] == ["mlflow", "dispatcher"]
    assert all(d["up"] and d["status"] == 200 for d in data)


def test_cli_bad_arguments_exit_2():
    assert _cli(["--service", "nope"]).returncode == 2
    assert _cli(["--timeout", "0"]).returncode == 2
    env_error = subprocess.run(
        [sys.executable, "-m", "rapidfire_state.ping"],
        env={**os.environ, "RF_MLFLOW_URL": "", "RF_MLFLOW_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert env_error.returncode == 2
    assert "RF_MLFLOW_PORT" in env_error.stderr


def test_import_is_stdlib_only():
    code = (
        "import sys, rapidfire_state.ping; "
        "bad = [m for m in ('mlflow', 'torch', 'sqlalchemy', 'requests') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
