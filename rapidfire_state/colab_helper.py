"""Running RapidFire in Google Colab, Kaggle and other restricted notebooks.

The services (dispatcher, MLflow, front end) listen on localhost ports; in a hosted
notebook the browser cannot reach them directly.  This module opens *tunnels* for
the browser:

* ``'native'``: Colab's own port forwarding (``google.colab.kernel.proxyPort``);
  only inside Colab, and only when called from a notebook cell.
* ``'cloudflare'``: a free Cloudflare quick tunnel through the ``cloudflared``
  binary; no account needed.
* ``'ngrok'``: an ngrok tunnel (needs a free account's auth token), through
  ``pyngrok`` when it is installed, else the ``ngrok`` binary and its local API.

**Tunnel URLs are for the browser only.**  This module never sets
``RF_DISPATCHER_URL`` / ``RF_MLFLOW_URL`` / ``RF_FRONTEND_URL`` to a tunnel URL, and
neither should its callers: a service that called another through its tunnel URL
would route *Colab -> tunnel provider -> the same Colab machine*, a loop that fails
(HTTP 502).  Services on the same host talk to each other on
``http://127.0.0.1:<port>``, the default of :mod:`rapidfire_state.constants`::

    Browser -> Frontend tunnel -> Frontend:8853 -> 127.0.0.1:8852 (MLflow, direct)
    Browser -> MLflow tunnel   -> MLflow:8852

Only the standard library is imported at module import; ``google.colab``,
``IPython`` and ``pyngrok`` are imported where they are used.  The tunnel
processes are started without a new process group or session (Colab forbids
``setpgrp``); every tunnel this process opened is kept in a registry and closed by
:func:`close_tunnels`, which also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import collections
import importlib
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterable

from rapidfire_state import constants
from rapidfire_state.exceptions import ConfigError, RapidFireError
from rapidfire_state.validation import check_int, check_positive_number


class TunnelError(RapidFireError):
    """A tunnel could not be opened (binary missing, timeout, provider error)."""


#: The tunnelling methods of :func:`expose_rapidfire_services`.
METHODS = ("native", "cloudflare", "ngrok")

#: Service name -> its configuration class in :mod:`rapidfire_state.constants`.
SERVICES: dict[str, type] = {
    "dispatcher": constants.DispatcherConfig,
    "mlflow": constants.MLFlowConfig,
    "frontend": constants.FrontendConfig,
}

_SERVICE_DESCRIPTIONS = {
    "dispatcher": "RapidFire dispatcher API",
    "mlflow": "MLflow tracking UI",
    "frontend": "RapidFire dashboard",
}

# A quick-tunnel URL: random words on trycloudflare.com.  cloudflared also logs the
# control-plane endpoint (https://api.trycloudflare.com/tunnel) in its errors; that is
# not a tunnel, hence the exclusion.
_CLOUDFLARE_URL_RE = re.compile(r"https://(?!api\.)[a-z0-9][a-z0-9-]*\.trycloudflare\.com\b", re.IGNORECASE)

_CLOUDFLARED_INSTALL = (
    "install cloudflared: on Debian/Ubuntu/Colab `wget -q "
    "https://github.com/cloudflare/cloudflared/releases/latest/download/cloudflared-linux-amd64.deb "
    "&& dpkg -i cloudflared-linux-amd64.deb`, on macOS `brew install cloudflared`, or see "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-networks/downloads/"
)
_NGROK_INSTALL = (
    "install pyngrok (`pip install pyngrok`, it downloads ngrok itself) or the ngrok agent "
    "(https://ngrok.com/download), and get an auth token at "
    "https://dashboard.ngrok.com/get-started/your-authtoken"
)

#: Where an ngrok agent serves its local API (it takes the next port if 4040 is busy).
NGROK_API_URL = "http://127.0.0.1:4040/api/tunnels"

# Lines of a tunnel process's output kept for error messages.
_OUTPUT_LINES_KEPT = 50


# --- environment ---------------------------------------------------------------------


def _module_available(name: str) -> bool:
    """Whether ``name`` is loaded or importable, without importing it (or its parent)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    parent, _, child = name.rpartition(".")
    try:
        if parent and parent not in sys.modules:
            # find_spec("a.b") would import package "a"; look in a's directories instead.
            parent_spec = importlib.util.find_spec(parent)
            if parent_spec is None or not parent_spec.submodule_search_locations:
                return False
            return any(
                os.path.isfile(os.path.join(location, child, "__init__.py"))
                or os.path.isfile(os.path.join(location, child + ".py"))
                for location in parent_spec.submodule_search_locations
            )
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # parent package missing / odd __spec__
        return False


def get_notebook_environment() -> str:
    """Where this Python runs: ``'colab'``, ``'kaggle'``, ``'jupyter'`` or ``'unknown'``.

    * ``'colab'``: the ``google.colab`` package is loaded or importable (it exists
      only on Colab runtimes);
    * ``'kaggle'``: the ``KAGGLE_KERNEL_RUN_TYPE`` environment variable is set;
    * ``'jupyter'``: an IPython *kernel* is running (a plain ``ipython`` terminal
      has no ``kernel`` attribute and is not a notebook);
    * ``'unknown'``: anything else, such as a plain ``python`` script.
    """
    if _module_available("google.colab"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    # A kernel has always imported IPython already; importing it here otherwise would
    # only cost time in a plain script.
    if sys.modules.get("IPython") is not None:
        try:
            shell = sys.modules["IPython"].get_ipython()
        except Exception:  # a broken or stub IPython: not a notebook we can use
            shell = None
        if shell is not None and getattr(shell, "kernel", None) is not None:
            return "jupyter"
    return "unknown"


# --- validation ----------------------------------------------------------------------


def _check_port(port: object) -> int:
    return check_int("port", port, minimum=1, maximum=65535)


# --- tunnel registry -----------------------------------------------------------------


@dataclass
class Tunnel:
    """An open tunnel of this process."""

    method: str
    port: int
    url: str
    description: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)
    closer: Callable[[], None] | None = field(default=None, repr=False)
    reader: _OutputReader | None = field(default=None, repr=False)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the tunnel: terminate its process (kill after ``timeout``) or disconnect it."""
        if self.closer is not None:
            try:
                self.closer()
            except Exception:  # best effort: the tunnel may already be gone
                pass
        if self.process is not None:
            _stop_process(self.process, self.reader, timeout)


_registry: list[Tunnel] = []
_registry_lock = threading.Lock()


def list_tunnels() -> list[Tunnel]:
    """The tunnels this process opened and has not closed yet."""
    with _registry_lock:
        return list(_registry)


def close_tunnels(port: int | None = None) -> int:
    """Close the tunnels this process opened (only those to ``port`` if given).

    Returns the number of tunnels closed.  Registered with :mod:`atexit`, so no
    tunnel process outlives the interpreter that started it.
    """
    with _registry_lock:
        chosen = [t for t in _registry if port is None or t.port == port]
        for tunnel in chosen:
            _registry.remove(tunnel)
    for tunnel in chosen:
        tunnel.close()
    return len(chosen)


atexit.register(close_tunnels)


def _register(tunnel: Tunnel) -> None:
    with _registry_lock:
        _registry.append(tunnel)


def _stop_process(process: subprocess.Popen, reader: _OutputReader | None, timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Close the pipe only once its reader has seen EOF: closing a buffered stream that
    # another thread is blocked reading waits for that read, which never ends while a
    # grandchild of the tunnel still holds the pipe open.
    if reader is None or reader.join(1.0):
        if process.stdout is not None:
            try:
                process.stdout.close()
            except Exception:
                pass


def _which(binary: str) -> str | None:
    """Resolve ``binary`` (a name on PATH or a path) to an executable, or None."""
    if os.sep in binary or (os.altsep and os.altsep in binary):
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    return shutil.which(binary)


class _OutputReader:
    """Drains a process's combined output on a thread.

    The tunnel keeps logging after its URL appears; a pipe nobody reads fills up
    (64 KiB) and then blocks the tunnel process, so the pipe is read until EOF.
    While someone waits for the URL (``waiting``), lines are offered on a queue;
    the last few are always kept for error messages.
    """

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES_KEPT)
        self.waiting = True
        self._process = process
        self._thread = threading.Thread(target=self._run, name="tunnel-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._process.stdout
        assert stream is not None
        try:
            for line in stream:
                line = line.rstrip("\r\n")
                self.tail.append(line)
                if self.waiting:  # afterwards, queued lines would only pile up
                    self.lines.put(line)
        except (OSError, ValueError):  # stream closed
            pass
        finally:
            self.lines.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for EOF; True when the reader has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def last_output(self) -> str:
        return "\n".join(self.tail) or "(no output)"


# --- cloudflare ----------------------------------------------------------------------


def setup_cloudflare_tunnel(
    port: int,
    description: str = "",
    *,
    timeout: float = 30.0,
    binary: str = "cloudflared",
) -> str:
    """Open a Cloudflare quick tunnel to ``http://127.0.0.1:<port>``; return its public URL.

    Runs ``cloudflared tunnel --no-autoupdate --url http://127.0.0.1:<port>`` and waits
    up to ``timeout`` seconds for the ``https://<words>.trycloudflare.com`` URL in its
    log.  The process keeps running (see :func:`close_tunnels`).

    Raises:
        ConfigError: bad ``port`` or ``timeout``.
        TunnelError: the binary is missing (the message says how to install it), it
            exited, or no URL appeared in time (the process is then killed).
    """
    port = _check_port(port)
    timeout = check_positive_number("timeout", timeout)
    executable = _which(binary)
    if executable is None:
        raise TunnelError(f"the cloudflared binary {binary!r} was not found on PATH; {_CLOUDFLARED_INSTALL}")
    command = [executable, "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"]
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # cloudflared logs (and prints the URL) on stderr
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:
        raise TunnelError(f"cannot start {executable!r}: {exc}; {_CLOUDFLARED_INSTALL}") from exc

    reader = _OutputReader(process)
    deadline = time.monotonic() + timeout
    url: str | None = None
    try:
        while url is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TunnelError(
                    f"cloudflared printed no trycloudflare.com URL within {timeout:g} s for port {port}; "
                    f"the process was stopped. Its last output:\n{reader.last_output()}"
                )
            try:
                line = reader.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:  # EOF: the process exited
                code = process.wait()
                raise TunnelError(
                    f"cloudflared exited (code {code}) before printing a tunnel URL for port {port}. "
                    f"Its last output:\n{reader.last_output()}"
                )
            match = _CLOUDFLARE_URL_RE.search(line)
            if match:
                url = match.group(0)
    except BaseException:
        _stop_process(process, reader)
        raise
    reader.waiting = False
    _register(Tunnel("cloudflare", port, url, description, process, reader=reader))
    return url


# --- ngrok -----------------------------------------------------------------------------


def _pyngrok_available() -> bool:
    return _module_available("pyngrok")


def setup_ngrok_tunnel(
    port: int,
    auth_token: str,
    description: str = "",
    *,
    timeout: float = 30.0,
    binary: str = "ngrok",
    api_url: str = NGROK_API_URL,
) -> str:
    """Open an ngrok HTTP tunnel to ``port``; return its public ``https://`` URL.

    Uses ``pyngrok`` when it is importable; otherwise runs the ``ngrok`` agent
    (``ngrok http <port>``) with the token in ``NGROK_AUTHTOKEN`` (not on the command
    line, where every user could read it) and polls its local API (``api_url``) for
    the tunnel to this port.

    Raises:
        ConfigError: empty ``auth_token``, bad ``port`` or ``timeout``.
        TunnelError: neither pyngrok nor the binary is available, or no tunnel appeared
            within ``timeout`` (the agent is then stopped).
    """
    port = _check_port(port)
    timeout = check_positive_number("timeout", timeout)
    if not isinstance(auth_token, str) or not auth_token.strip():
        raise ConfigError(
            "auth_token is empty; ngrok needs the auth token of a (free) account: "
            "https://dashboard.ngrok.com/get-started/your-authtoken"
        )
    auth_token = auth_token.strip()

    if _pyngrok_available():
        return _ngrok_with_pyngrok(port, auth_token, description)

    executable = _which(binary)
    if executable is None:
        raise TunnelError(f"neither pyngrok nor the ngrok binary {binary!r} is available; {_NGROK_INSTALL}")
    env = dict(os.environ, NGROK_AUTHTOKEN=auth_token)
    try:
        process = subprocess.Popen(
            [executable, "http", str(port), "--log", "stdout"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            env=env,
        )
    except OSError as exc:
        raise TunnelError(f"cannot start {executable!r}: {exc}; {_NGROK_INSTALL}") from exc
    reader = _OutputReader(process)
    deadline = time.monotonic() + timeout
    try:
        while True:
            url = _ngrok_api_url_for(api_url, port)
            if url is not None:
                break
            if process.poll() is not None:
                raise TunnelError(
                    f"ngrok exited (code {process.returncode}) before opening a tunnel to port {port}. "
                    f"Its last output:\n{reader.last_output()}"
                )
            if time.monotonic() >= deadline:
                raise TunnelError(
                    f"ngrok opened no tunnel to port {port} within {timeout:g} s (polled {api_url}); "
                    f"the agent was stopped. Its last output:\n{reader.last_output()}"
                )
            time.sleep(0.2)
    except BaseException:
        _stop_process(process, reader)
        raise
    reader.waiting = False
    _register(Tunnel("ngrok", port, url, description, process, reader=reader))
    return url


def _ngrok_api_url_for(api_url: str, port: int) -> str | None:
    """The public URL of the tunnel to ``port`` listed by an ngrok agent's API, if any."""
    # The agent's API is local; a configured HTTP proxy must not be used for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(api_url, timeout=2.0) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None  # not up yet
    candidates = []
    for tunnel in data.get("tunnels", []) if isinstance(data, dict) else []:
        addr = str(tunnel.get("config", {}).get("addr", ""))
        public = str(tunnel.get("public_url", ""))
        # addr is "http://localhost:8852", "localhost:8852" or just "8852"
        if re.search(rf"(^|:){port}/?$", addr) and public:
            candidates.append(public)
    https = [u for u in candidates if u.startswith("https://")]
    return (https or candidates or [None])[0]


def _ngrok_with_pyngrok(port: int, auth_token: str, description: str) -> str:
    try:
        from pyngrok import ngrok  # type: ignore[import-not-found]

        ngrok.set_auth_token(auth_token)
        tunnel = ngrok.connect(port, "http")
    except Exception as exc:
        raise TunnelError(f"pyngrok could not open a tunnel to port {port}: {exc}") from exc
    url = str(tunnel.public_url)
    if url.startswith("http://"):
        url = "https://" + url[len("http://") :]
    public_url = str(tunnel.public_url)
    _register(Tunnel("ngrok", port, url, description, closer=lambda: ngrok.disconnect(public_url)))
    return url


# --- Colab native forwarding -----------------------------------------------------------


def setup_native_forwarding(port: int, description: str = "") -> str:
    """The URL at which Colab's own proxy serves ``port`` (Colab only, from a notebook cell)."""
    port = _check_port(port)
    environment = get_notebook_environment()
    if environment != "colab":
        raise TunnelError(
            f"method='native' uses Google Colab's port forwarding, but this is not Colab "
            f"(environment: {environment!r}); use method='cloudflare' or 'ngrok'"
        )
    try:
        output = importlib.import_module("google.colab.output")
        url = output.eval_js(f"google.colab.kernel.proxyPort({port})")
    except Exception as exc:
        raise TunnelError(
            f"Colab port forwarding failed for port {port} ({exc}); it works only when called "
            "from a notebook cell. Use method='cloudflare' or 'ngrok' otherwise"
        ) from exc
    url = str(url)
    _register(Tunnel("native", port, url, description))
    return url


# --- all services ------------------------------------------------------------------------


def expose_rapidfire_services(
    method: str = "cloudflare",
    *,
    auth_token: str | None = None,
    services: Iterable[str] | None = None,
    timeout: float = 30.0,
) -> dict[str, str]:
    """Open a browser tunnel to each RapidFire service; return ``{service: public URL}``.

    Args:
        method: ``'native'`` (Colab only), ``'cloudflare'`` or ``'ngrok'``.
        auth_token: The ngrok auth token (``method='ngrok'`` only).
        services: Names among ``'dispatcher'``, ``'mlflow'``, ``'frontend'``
            (default: all three).  Ports come from :mod:`rapidfire_state.constants`
            (``RF_<SERVICE>_PORT``).
        timeout: Seconds to wait for each tunnel.

    The ``RF_*_URL`` environment variables are deliberately left alone: services on
    this machine must keep calling each other on localhost (see the module notes on
    the routing loop).  If one tunnel fails, the tunnels this call opened are closed
    before the error propagates.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not a tunnelling method; use one of {', '.join(METHODS)}")
    names = list(SERVICES) if services is None else list(services)
    unknown = [name for name in names if name not in SERVICES]
    if unknown or not names:
        raise ConfigError(f"services={names!r}: unknown or empty; choose from {', '.join(SERVICES)}")
    if method == "ngrok" and (not isinstance(auth_token, str) or not auth_token.strip()):
        raise ConfigError(
            "method='ngrok' needs auth_token (https://dashboard.ngrok.com/get-started/your-authtoken)"
        )
    if method == "native" and get_notebook_environment() != "colab":
        # Fail before opening anything.
        raise TunnelError(
            f"method='native' works only in Google Colab (environment: {get_notebook_environment()!r}); "
            "use method='cloudflare' or 'ngrok'"
        )

    ports = {name: _check_port(SERVICES[name].PORT) for name in dict.fromkeys(names)}
    urls: dict[str, str] = {}
    opened_before = {id(tunnel) for tunnel in list_tunnels()}
    try:
        for name, port in ports.items():
            description = _SERVICE_DESCRIPTIONS[name]
            if method == "cloudflare":
                urls[name] = setup_cloudflare_tunnel(port, description, timeout=timeout)
            elif method == "ngrok":
                assert auth_token is not None
                urls[name] = setup_ngrok_tunnel(port, auth_token, description, timeout=timeout)
            else:
                urls[name] = setup_native_forwarding(port, description)
    except BaseException:
        _close_new_tunnels(opened_before)
        raise
    return urls


def _close_new_tunnels(opened_before: set[int]) -> None:
    """Close the tunnels registered since the snapshot ``opened_before`` (of ids)."""
    with _registry_lock:
        new = [tunnel for tunnel in _registry if id(tunnel) not in opened_before]
        for tunnel in new:
            _registry.remove(tunnel)
    for tunnel in new:
        tunnel.close()


__all__ = [
    "TunnelError",
    "Tunnel",
    "METHODS",
    "SERVICES",
    "NGROK_API_URL",
    "get_notebook_environment",
    "setup_cloudflare_tunnel",
    "setup_ngrok_tunnel",
    "setup_native_forwarding",
    "expose_rapidfire_services",
    "list_tunnels",
    "close_tunnels",
]
