"""A real ``mlflow server`` for tests: start, SIGKILL, restart on the same port.

Tests import it as ``from mlflow_server import ...`` (the tests directory is on
``sys.path``, as for ``worker_targets``).  A test module that wants the fixture
imports :func:`mlflow_server_factory` into its namespace.

The server runs with ``--workers 1`` on 127.0.0.1, its tracking data in a SQLite
file and its artifacts under the server's directory, so a restart on the same
port sees everything stored before the kill.  Starting one takes ~15-20 s on a
busy two-core machine; keep the number of starts per test small.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

#: how long a server may take to answer /health after it was started
START_TIMEOUT_SECONDS = 60.0
#: how long the port may keep accepting connections after the tree was killed
KILL_TIMEOUT_SECONDS = 15.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_cli() -> Optional[Path]:
    """The ``mlflow`` command next to this Python, or None when it is not installed."""
    path = Path(sys.executable).with_name("mlflow")
    return path if path.exists() else None


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class MLflowServerError(RuntimeError):
    """The server did not start, or did not go away when killed (the log tail is in the message)."""


class MLflowServer:
    """One ``mlflow server`` process tree, its state kept in ``directory``.

    ``port`` None picks a free one, which stays the server's port across
    :meth:`kill` / :meth:`start`, as does the backend database
    (``directory/server.db``), so clients keep their URL and their runs.
    """

    def __init__(self, directory: Path, port: Optional[int] = None):
        cli = mlflow_cli()
        if cli is None:
            raise MLflowServerError("the mlflow command is not installed next to this Python")
        self._cli = cli
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.log_path = self.directory / "server.log"
        self._process: Optional[subprocess.Popen] = None
        self._log = None
        #: /dev/shm directories named in any of this server's processes' environments
        self.huey_dirs: set[str] = set()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.directory / 'server.db'}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        return f"MLflowServer({self.url}, running={self.running})"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> "MLflowServer":
        """Start the server and wait until ``/health`` answers 200; returns self."""
        if self.running:
            return self
        if port_accepts(self.port):
            raise MLflowServerError(f"port {self.port} is taken by another process; cannot start the server there")
        env = dict(os.environ)
        # The job runner (huey) is not needed, and it is what makes the server
        # create a directory in /dev/shm that it never removes.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self._log = self.log_path.open("a")
        self._log.write(f"--- start {self.starts + 1} ---\n")
        self._log.flush()
        self._process = subprocess.Popen(
            [
                str(self._cli), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.directory / "server-artifacts"),
            ],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._release()
                raise MLflowServerError(f"mlflow server exited early (rc {code}):\n{self.log_tail()}")
            if self.healthy(timeout=1.0):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise MLflowServerError(f"mlflow server not healthy within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.huey_dirs |= _huey_dirs(self._process.pid)
        return self

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether ``/health`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process tree at once (a crash), then wait until the port refuses."""
        self._end(graceful=False)

    def stop(self) -> None:
        """Terminate the tree (SIGTERM, SIGKILL what is left after a grace period)."""
        self._end(graceful=True)

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> "MLflowServer":
        """Kill the server (if running) and start it again on the same port and backend."""
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove the /dev/shm directories it made, if any."""
        try:
            self.stop()
        finally:
            for path in self.huey_dirs:
                if path.startswith("/dev/shm/"):
                    shutil.rmtree(path, ignore_errors=True)

    def _end(self, graceful: bool) -> None:
        import psutil

        process = self._process
        if process is None:
            return
        try:
            root = psutil.Process(process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        # The environment of each process names its /dev/shm directory; it cannot
        # be read once the process is gone.
        self.huey_dirs |= _huey_dirs(process.pid)
        if graceful:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            for proc in tree[1:]:
                try:
                    proc.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(tree, timeout=5)
        else:
            alive = tree
        for proc in alive:  # by pid (psutil checks the creation time): only this server's processes
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            pass
        self._release()
        deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
        while port_accepts(self.port, timeout=0.2):
            if time.monotonic() > deadline:
                raise MLflowServerError(f"port {self.port} still accepts connections after the server was killed")
            time.sleep(0.05)

    def _release(self) -> None:
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _huey_dirs(pid: int) -> set[str]:
    import psutil

    found: set[str] = set()
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return found
    for proc in processes:
        try:
            value = proc.environ().get("_MLFLOW_HUEY_STORAGE_PATH")
        except psutil.Error:
            continue
        if value:
            found.add(value)
    return found


@pytest.fixture
def mlflow_server_factory(tmp_path) -> Iterator[Callable[..., MLflowServer]]:
    """A function that starts an :class:`MLflowServer` under ``tmp_path``; all are closed after the test.

    Skips the test when the ``mlflow`` command is not installed.
    """
    if mlflow_cli() is None:
        pytest.skip("the mlflow command is not installed next to this Python")
    servers: list[MLflowServer] = []

    def make(name: str = "server", port: Optional[int] = None) -> MLflowServer:
        server = MLflowServer(tmp_path / name, port)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.close()
