"""rapidfire_state.colab_helper with fake tunnel binaries (real processes, no network)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from rapidfire_state import colab_helper
from rapidfire_state.colab_helper import (
    TunnelError,
    close_tunnels,
    expose_rapidfire_services,
    get_notebook_environment,
    list_tunnels,
    setup_cloudflare_tunnel,
    setup_ngrok_tunnel,
)
from rapidfire_state.exceptions import ConfigError

# A realistic cloudflared quick-tunnel log: the URL sits inside a box, on stderr,
# after a line that names the (non-tunnel) API host.  The fake records its pid and
# arguments, prints a tunnel URL that contains the port it was asked to forward, and
# then keeps running like the real one (exec, so the pid is the process we stop).
FAKE_CLOUDFLARED = r"""#!/bin/sh
echo $$ >> "$FAKE_DIR/pids"
echo "$@" >> "$FAKE_DIR/args"
for a in "$@"; do last="$a"; done
port="${last##*:}"
if [ "$port" = "$FAKE_FAIL_PORT" ]; then
  echo "2024-05-01T10:00:00Z ERR failed to request quick Tunnel: Post \"https://api.trycloudflare.com/tunnel\": dial tcp: no route" >&2
  exit 1
fi
if [ "$port" = "$FAKE_SILENT_PORT" ]; then exec sleep 300; fi
echo "2024-05-01T10:00:00Z INF Thank you for trying Cloudflare Tunnel." >&2
echo "2024-05-01T10:00:00Z INF Requesting new quick Tunnel on trycloudflare.com... (see https://api.trycloudflare.com/tunnel)" >&2
echo "2024-05-01T10:00:01Z INF +--------------------------------------------------------------------------------------------+" >&2
echo "2024-05-01T10:00:01Z INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |" >&2
echo "2024-05-01T10:00:01Z INF |  https://fancy-words-$port.trycloudflare.com                                                 |" >&2
echo "2024-05-01T10:00:01Z INF +--------------------------------------------------------------------------------------------+" >&2
exec sleep 300
"""


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(autouse=True)
def _no_leftover_tunnels():
    yield
    close_tunnels()


@pytest.fixture
def fake_dir(tmp_path, monkeypatch) -> Path:
    """A bin directory first on PATH holding the fake cloudflared."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "cloudflared", FAKE_CLOUDFLARED)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.delenv("FAKE_FAIL_PORT", raising=False)
    monkeypatch.delenv("FAKE_SILENT_PORT", raising=False)
    return tmp_path


def _pids(fake_dir: Path) -> list[int]:
    path = fake_dir / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _rf_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("RF_")}


# --- environment detection -------------------------------------------------------------


def test_kaggle_from_environment(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert get_notebook_environment() == "unknown"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert get_notebook_environment() == "kaggle"


def test_unknown_in_plain_python_and_no_heavy_imports():
    env = {k: v for k, v in os.environ.items() if k != "KAGGLE_KERNEL_RUN_TYPE"}
    code = (
        "import sys; from rapidfire_state.colab_helper import get_notebook_environment as g; "
        "print(g()); "
        "print([m for m in ('mlflow', 'torch', 'IPython', 'google', 'pyngrok') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["unknown", "[]"]


def test_colab_detected_without_importing_it(tmp_path):
    package = tmp_path / "site" / "google" / "colab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "KAGGLE_KERNEL_RUN_TYPE"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = (
        "import sys; from rapidfire_state.colab_helper import get_notebook_environment as g; "
        "print(g(), 'google.colab' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "colab False"


def test_jupyter_needs_a_kernel(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    shell = types.SimpleNamespace()
    fake_ipython = types.ModuleType("IPython")
    fake_ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    assert get_notebook_environment() == "unknown"  # a terminal IPython
    shell.kernel = object()
    assert get_notebook_environment() == "jupyter"
    fake_ipython.get_ipython = lambda: None  # type: ignore[attr-defined]
    assert get_notebook_environment() == "unknown"


# --- cloudflare --------------------------------------------------------------------------


def test_cloudflare_tunnel_url_and_close(fake_dir):
    before = _rf_env()
    url = setup_cloudflare_tunnel(8852, "MLflow Tracking UI", timeout=20)
    assert url == "https://fancy-words-8852.trycloudflare.com"
    assert (fake_dir / "args").read_text().split() == [
        "tunnel",
        "--no-autoupdate",
        "--url",
        "http://127.0.0.1:8852",
    ]
    (tunnel,) = list_tunnels()
    assert (tunnel.method, tunnel.port, tunnel.url, tunnel.description) == (
        "cloudflare",
        8852,
        url,
        "MLflow Tracking UI",
    )
    (pid,) = _pids(fake_dir)
    time.sleep(0.2)
    assert _alive(pid), "the tunnel process must keep running after the URL is returned"
    assert _rf_env() == before

    assert close_tunnels() == 1
    assert not _alive(pid)
    assert tunnel.process is not None and tunnel.process.poll() is not None
    assert list_tunnels() == []
    assert close_tunnels() == 0


def test_close_tunnels_by_port(fake_dir):
    setup_cloudflare_tunnel(1111, timeout=20)
    setup_cloudflare_tunnel(2222, timeout=20)
    assert close_tunnels(port=1111) == 1
    assert [t.port for t in list_tunnels()] == [2222]


def test_binary_missing(fake_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_dir / "empty"))
    with pytest.raises(TunnelError, match="(?s)not found.*install cloudflared"):
        setup_cloudflare_tunnel(8852)
    with pytest.raises(TunnelError, match="install cloudflared"):
        setup_cloudflare_tunnel(8852, binary=str(fake_dir / "no-such-binary"))
    assert list_tunnels() == []


def test_timeout_kills_the_process(fake_dir, monkeypatch):
    monkeypatch.setenv("FAKE_SILENT_PORT", "8852")
    started = time.monotonic()
    with pytest.raises(TunnelError, match="within 0.5 s"):
        setup_cloudflare_tunnel(8852, timeout=0.5)
    assert time.monotonic() - started < 10
    (pid,) = _pids(fake_dir)
    assert not _alive(pid)
    assert list_tunnels() == []


def test_early_exit_reports_output_and_ignores_the_api_url(fake_dir, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_PORT", "8852")
    with pytest.raises(TunnelError, match=r"(?s)exited \(code 1\).*failed to request quick Tunnel"):
        setup_cloudflare_tunnel(8852, timeout=20)
    assert list_tunnels() == []


@pytest.mark.parametrize("port", [0, -1, 65536, "8852", 8852.0, True, None])
def test_bad_port(fake_dir, port):
    with pytest.raises(ConfigError, match="1-65535"):
        setup_cloudflare_tunnel(port)  # type: ignore[arg-type]
    assert _pids(fake_dir) == []


@pytest.mark.parametrize("timeout", [0, -1, "30"])
def test_bad_timeout(fake_dir, timeout):
    with pytest.raises(ConfigError, match="timeout"):
        setup_cloudflare_tunnel(8852, timeout=timeout)  # type: ignore[arg-type]


# --- expose_rapidfire_services -----------------------------------------------------------


def test_expose_all_services_leaves_rf_urls_alone(fake_dir, monkeypatch):
    for name in ("DISPATCHER", "MLFLOW", "FRONTEND"):
        monkeypatch.delenv(f"RF_{name}_URL", raising=False)
        monkeypatch.delenv(f"RF_{name}_PORT", raising=False)
    monkeypatch.setenv("RF_FRONTEND_PORT", "9853")
    before = _rf_env()
    urls = expose_rapidfire_services("cloudflare", timeout=20)
    assert urls == {
        "dispatcher": "https://fancy-words-8851.trycloudflare.com",
        "mlflow": "https://fancy-words-8852.trycloudflare.com",
        "frontend": "https://fancy-words-9853.trycloudflare.com",
    }
    # Inter-service traffic must stay on localhost: no RF_* variable may change.
    assert _rf_env() == before
    from rapidfire_state.constants import MLFlowConfig

    assert MLFlowConfig.URL == "http://127.0.0.1:8852/"
    assert sorted(t.port for t in list_tunnels()) == [8851, 8852, 9853]


def test_expose_selected_services(fake_dir, monkeypatch):
    monkeypatch.delenv("RF_MLFLOW_PORT", raising=False)
    assert expose_rapidfire_services(services=["mlflow"], timeout=20) == {
        "mlflow": "https://fancy-words-8852.trycloudflare.com"
    }


def test_expose_failure_closes_what_it_opened(fake_dir, monkeypatch):
    for name in ("DISPATCHER", "MLFLOW", "FRONTEND"):
        monkeypatch.delenv(f"RF_{name}_PORT", raising=False)
    earlier = setup_cloudflare_tunnel(8851, "opened before", timeout=20)
    monkeypatch.setenv("FAKE_FAIL_PORT", "8853")  # the frontend, opened last
    with pytest.raises(TunnelError, match="exited"):
        expose_rapidfire_services("cloudflare", timeout=20)
    # The tunnels of the failed call are closed; the earlier one is untouched.
    assert [t.url for t in list_tunnels()] == [earlier]
    pids = _pids(fake_dir)
    assert len(pids) == 4
    assert _alive(pids[0]) and not any(_alive(pid) for pid in pids[1:])


def test_expose_bad_method():
    with pytest.raises(ConfigError, match="native, cloudflare, ngrok"):
        expose_rapidfire_services("ssh")


def test_expose_bad_services():
    with pytest.raises(ConfigError, match="dispatcher, mlflow, frontend"):
        expose_rapidfire_services("cloudflare", services=["database"])
    with pytest.raises(ConfigError):
        expose_rapidfire_services("cloudflare", services=[])


def test_expose_bad_port_from_environment(fake_dir, monkeypatch):
    monkeypatch.setenv("RF_MLFLOW_PORT", "70000")
    with pytest.raises(ConfigError, match="RF_MLFLOW_PORT"):
        expose_rapidfire_services("cloudflare", timeout=20)
    assert _pids(fake_dir) == []  # validated before any tunnel is started


def test_native_outside_colab(fake_dir, monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    with pytest.raises(TunnelError, match="only in Google Colab"):
        expose_rapidfire_services("native")
    with pytest.raises(TunnelError, match="not Colab"):
        colab_helper.setup_native_forwarding(8852)


def test_native_in_fake_colab(monkeypatch):
    calls = []
    output = types.ModuleType("google.colab.output")
    output.eval_js = lambda js: calls.append(js) or f"https://proxy-{len(calls)}.colab.dev/"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    urls = expose_rapidfire_services("native", services=["mlflow", "frontend"])
    assert urls == {"mlflow": "https://proxy-1.colab.dev/", "frontend": "https://proxy-2.colab.dev/"}
    assert calls == ["google.colab.kernel.proxyPort(8852)", "google.colab.kernel.proxyPort(8853)"]


# --- ngrok ---------------------------------------------------------------------------------

# A fake ngrok agent: serves the local API listing one tunnel to the port it was asked
# for, and records its arguments and whether it got the token through the environment.
FAKE_NGROK = """#!{python}
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = sys.argv[sys.argv.index("http") + 1]
with open(os.path.join(os.environ["FAKE_DIR"], "ngrok.json"), "w") as fh:
    json.dump({{"argv": sys.argv[1:], "token": os.environ.get("NGROK_AUTHTOKEN")}}, fh)
body = json.dumps({{"tunnels": [
    {{"public_url": "http://other.ngrok.app", "config": {{"addr": "http://localhost:1"}}}},
    {{"public_url": "https://abc-" + port + ".ngrok-free.app", "config": {{"addr": "http://localhost:" + port}}}},
]}}).encode()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
print("t=2024 lvl=info msg=\\"starting web service\\"", flush=True)
HTTPServer(("127.0.0.1", int(os.environ["FAKE_NGROK_API_PORT"])), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ngrok_binary_with_local_api(fake_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyngrok", None)  # force the binary path
    binary = _write_executable(fake_dir / "bin" / "ngrok", FAKE_NGROK.format(python=sys.executable))
    api_port = _free_port()
    monkeypatch.setenv("FAKE_NGROK_API_PORT", str(api_port))
    url = setup_ngrok_tunnel(
        8852, "secret-token", "MLflow", binary=str(binary), api_url=f"http://127.0.0.1:{api_port}/api/tunnels", timeout=30
    )
    assert url == "https://abc-8852.ngrok-free.app"
    record = json.loads((fake_dir / "ngrok.json").read_text())
    assert record["token"] == "secret-token"
    assert "secret-token" not in " ".join(record["argv"])  # never on the command line
    (tunnel,) = list_tunnels()
    assert tunnel.method == "ngrok" and tunnel.port == 8852
    assert close_tunnels() == 1
    assert tunnel.process is not None and tunnel.process.poll() is not None


def test_ngrok_empty_token():
    for token in ("", "   ", None):
        with pytest.raises(ConfigError, match="auth token"):
            setup_ngrok_tunnel(8852, token)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="auth_token"):
        expose_rapidfire_services("ngrok")


def test_ngrok_neither_pyngrok_nor_binary(fake_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyngrok", None)
    monkeypatch.setenv("PATH", str(fake_dir / "empty"))
    with pytest.raises(TunnelError, match="(?s)neither pyngrok nor.*pip install pyngrok"):
        setup_ngrok_tunnel(8852, "token")


def test_ngrok_uses_pyngrok_when_available(monkeypatch):
    connected, disconnected = [], []
    fake = types.ModuleType("pyngrok")
    fake_ngrok = types.SimpleNamespace(
        set_auth_token=lambda token: connected.append(("token", token)),
        connect=lambda port, proto: connected.append((port, proto)) or types.SimpleNamespace(public_url=f"https://p-{port}.ngrok.app"),
        disconnect=lambda url: disconnected.append(url),
    )
    fake.ngrok = fake_ngrok  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyngrok", fake)
    monkeypatch.setitem(sys.modules, "pyngrok.ngrok", fake_ngrok)
    assert setup_ngrok_tunnel(8853, "tok") == "https://p-8853.ngrok.app"
    assert connected == [("token", "tok"), (8853, "http")]
    assert close_tunnels() == 1
    assert disconnected == ["https://p-8853.ngrok.app"]
