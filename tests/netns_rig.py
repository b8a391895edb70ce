"""A multi-host test rig: two network namespaces standing for two hosts, made and removed by the test.

``with NetnsRig() as rig:`` (or the ``netns_rig`` fixture) makes, on this machine:

* two network namespaces, "host A" and "host B" (``rfrig-<pid>-a`` / ``-b``), each with
  its loopback up and joined to this machine's namespace by a veth pair
  (``rfr<pid>ao`` here, ``rfr<pid>ai`` inside);
* addresses from the benchmarking range 198.18.0.0/15 only: ``198.18.<n>.1/30`` on this
  side, ``198.18.<n>.2/30`` inside.  A namespace has no route but its own /30, so nothing it
  sends can go further; on this side a ``blackhole`` route (metric 4242) under each /30 keeps
  a cut host's traffic from following this machine's default route out;
* a TCP forwarder, a subprocess of the test, listening on the this-side addresses and
  forwarding each connection to PostgreSQL at 127.0.0.1:5432 (the server listens on
  loopback only, and its configuration is not the test's to change).

``rig.popen(host, argv, env=...)`` runs a command inside a host with a hostname of its own
(``ip netns exec NS unshare --uts sh -c 'hostname NAME; exec ...'``) and ``RF_HOST=NAME``
in its environment; ``rig.cut(host)`` takes the this-side veth down (traffic stops both
ways) and ``rig.restore(host)`` brings it back; ``rig.db_url(host, url)`` is ``url`` as seen
from inside the host (the forwarder's address and port).

Leaving the ``with`` block — normally, on failure, on KeyboardInterrupt — kills every
process the rig started, stops the forwarder and removes namespaces, links and routes.
Names carry the test process's pid, so rigs of parallel test runs do not collide, and
:func:`sweep_leftovers` (run when a rig is made) removes what a rig of a dead pid left.

Needs root, ``ip`` and ``unshare``: :func:`require_netns` skips the test with the reason
otherwise.  Run as ``python netns_rig.py forward ...`` this file is the forwarder.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

#: the benchmarking range (RFC 2544): the only addresses the rig uses
RIG_RANGE = ipaddress.ip_network("198.18.0.0/15")
#: the metric of the blackhole route under each host's /30 (the connected route wins while the link is up)
BLACKHOLE_METRIC = 4242
PG_TARGET = ("127.0.0.1", 5432)
HOSTS = {"a": "rf-host-a", "b": "rf-host-b"}

_NS_NAME = re.compile(r"^rfrig-(\d+)-([a-z])$")
_LINK_NAME = re.compile(r"^rfr(\d+)([a-z])[oi]$")
_LOCK_PATH = "/tmp/rapidfire-netns-rig.lock"


class RigUnavailable(Exception):
    """Network namespaces cannot be made here; the message says why."""


def netns_unavailable_reason() -> Optional[str]:
    """Why this machine cannot make the rig (not root, no ``ip``, no ``unshare``), or None."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (needed for network namespaces)"
    probe = f"rfrig-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    try:
        uts = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--uts", "sh", "-c", "hostname rf-probe && hostname"],
            capture_output=True, text=True,
        )
        if uts.returncode != 0 or uts.stdout.strip() != "rf-probe":
            return f"`unshare --uts` inside a namespace failed: {uts.stderr.strip() or uts.returncode}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_netns() -> None:
    """``pytest.skip`` with the reason when the rig cannot be made here."""
    reason = netns_unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def list_namespaces() -> list[str]:
    """The names in ``ip netns list``."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    """The interface names of this namespace (``ip -o link``)."""
    out = _ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _rig_routes() -> list[str]:
    """This side's blackhole routes inside the rig range (``ip route`` lines)."""
    out = _ip("route", "show", "type", "blackhole", check=False).stdout
    routes = []
    for line in out.splitlines():
        words = line.split()
        # "blackhole 198.18.3.0/30 metric 4242"
        if len(words) >= 2 and f"metric {BLACKHOLE_METRIC}" in line:
            try:
                if ipaddress.ip_network(words[1]).subnet_of(RIG_RANGE):
                    routes.append(words[1])
            except ValueError:
                continue
    return routes


def forwarder_processes(owner_pid: Optional[int] = None) -> list[Any]:
    """The rig forwarders running (of ``owner_pid`` only when given), as psutil processes."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if len(cmdline) >= 4 and cmdline[1].endswith("netns_rig.py") and cmdline[2] == "forward":
            if owner_pid is None or f"--owner={owner_pid}" in cmdline:
                found.append(process)
    return found


def sweep_leftovers() -> list[str]:
    """Remove what rigs of dead pids left: namespaces (and processes in them), links, routes, forwarders.

    Returns what it removed.  A live pid's rig is left alone.
    """
    import psutil

    removed: list[str] = []
    for name in list_namespaces():
        match = _NS_NAME.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                psutil.Process(int(pid)).kill()
            except (psutil.Error, ValueError):
                pass
        _ip("netns", "del", name, check=False)
        removed.append(f"netns {name}")
    for link in list_links():
        match = _LINK_NAME.match(link)
        if match is not None and not _pid_alive(int(match.group(1))):
            _ip("link", "del", link, check=False)
            removed.append(f"link {link}")
    for process in forwarder_processes():
        owners = [arg.split("=", 1)[1] for arg in process.cmdline() if arg.startswith("--owner=")]
        if owners and owners[0].isdigit() and not _pid_alive(int(owners[0])):
            process.kill()
            removed.append(f"forwarder pid {process.pid}")
    # a blackhole route whose /30 no interface here has an address in is a leftover
    used = _used_subnets()
    for route in _rig_routes():
        if ipaddress.ip_network(route) not in used:
            _ip("route", "del", "blackhole", route, "metric", str(BLACKHOLE_METRIC), check=False)
            removed.append(f"route {route}")
    return removed


def _used_subnets() -> set:
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    used = set()
    for line in out.splitlines():
        words = line.split()
        if "inet" in words:
            interface = ipaddress.ip_interface(words[words.index("inet") + 1])
            if interface.network.subnet_of(RIG_RANGE) if interface.network.version == 4 else False:
                used.add(interface.network)
    return used


@dataclass
class Host:
    """One namespace of the rig."""

    key: str  #: "a" or "b"
    hostname: str  #: the host's own hostname (and RF_HOST)
    namespace: str
    outside_link: str  #: this side's end of the veth pair (cut/restore act on it)
    inside_link: str
    network: Any  #: the /30
    outside_ip: str  #: this side's address: the forwarder listens here
    inside_ip: str
    port: Optional[int] = None  #: the forwarder's port on outside_ip
    outside_mac: str = ""
    inside_mac: str = ""
    processes: list = field(default_factory=list)


class NetnsRig:
    """Two hosts (network namespaces) and a PostgreSQL forwarder; removed on exit, whatever happens."""

    def __init__(self, *, target: tuple[str, int] = PG_TARGET, hosts: Mapping[str, str] = HOSTS):
        self.target = target
        self.owner = os.getpid()
        self.hosts: dict[str, Host] = {}
        self._host_names = dict(hosts)
        self.forwarder: Optional[subprocess.Popen] = None
        self._made: list[tuple[str, ...]] = []  # what to undo, in order of making

    # --- making and removing -----------------------------------------------------------

    def __enter__(self) -> "NetnsRig":
        reason = netns_unavailable_reason()
        if reason is not None:
            raise RigUnavailable(reason)
        try:
            with open(_LOCK_PATH, "a") as lock:
                # one rig at a time picks its subnets and names (parallel test runs)
                fcntl.flock(lock, fcntl.LOCK_EX)
                sweep_leftovers()
                for key, hostname in self._host_names.items():
                    self._make_host(key, hostname)
            self._start_forwarder()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _free_subnet(self, index: int) -> Any:
        used = _used_subnets() | {ipaddress.ip_network(r) for r in _rig_routes()}
        used |= {host.network for host in self.hosts.values()}
        subnets = 2 ** (30 - RIG_RANGE.prefixlen)  # /30s in the range
        start = (self.owner * 2 + index) % subnets
        for step in range(subnets):
            candidate = ipaddress.ip_network((int(RIG_RANGE.network_address) + 4 * ((start + step) % subnets), 30))
            if candidate not in used:
                return candidate
        raise RuntimeError("no free /30 left in 198.18.0.0/15")

    def _make_host(self, key: str, hostname: str) -> None:
        network = self._free_subnet(len(self.hosts))
        first, second = list(network.hosts())
        host = Host(
            key=key, hostname=hostname, namespace=f"rfrig-{self.owner}-{key}",
            outside_link=f"rfr{self.owner}{key}o", inside_link=f"rfr{self.owner}{key}i",
            network=network, outside_ip=str(first), inside_ip=str(second),
        )
        self.hosts[key] = host
        _ip("netns", "add", host.namespace)
        self._made.append(("netns", host.namespace))
        _ip("link", "add", host.outside_link, "type", "veth", "peer", "name", host.inside_link)
        self._made.append(("link", host.outside_link))
        _ip("link", "set", host.inside_link, "netns", host.namespace)
        _ip("addr", "add", f"{host.outside_ip}/30", "dev", host.outside_link)
        _ip("link", "set", host.outside_link, "up")
        _ip("route", "add", "blackhole", str(network), "metric", str(BLACKHOLE_METRIC))
        self._made.append(("route", str(network)))
        inside = ("netns", "exec", host.namespace, "ip")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{host.inside_ip}/30", "dev", host.inside_link)
        _ip(*inside, "link", "set", host.inside_link, "up")
        # Fixed neighbours both ways: without them an ARP lookup begun while the host is
        # cut is still failing up to ~1 s after restore() (the lookup's last probe goes
        # unanswered), and what waited on it gets "No route to host" (psycopg: "server
        # closed the connection unexpectedly").  A cut is then a pure link event.
        host.outside_mac = _mac(host.outside_link)
        host.inside_mac = _mac(host.inside_link, host.namespace)
        _pin_neighbours(host)

    def _start_forwarder(self) -> None:
        listen = [f"{host.outside_ip}:0" for host in self.hosts.values()]
        self.forwarder = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "forward", f"--owner={self.owner}",
             f"--target={self.target[0]}:{self.target[1]}", *listen],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.forwarder.stdout.readline().split()  # "READY ip:port ip:port"
        if not line or line[0] != "READY":
            raise RuntimeError(f"the forwarder did not start (exit code {self.forwarder.poll()})")
        ports = dict(item.rsplit(":", 1) for item in line[1:])
        for host in self.hosts.values():
            host.port = int(ports[host.outside_ip])

    def close(self) -> None:
        """Kill the rig's processes, stop the forwarder, remove namespaces, links and routes. Idempotent.

        A second Ctrl+C while it runs is held back until it is done (on the main thread),
        so an impatient interrupt cannot leave half a rig behind.
        """
        import threading

        held = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if held else None
        try:
            self._remove()
        finally:
            if held:
                signal.signal(signal.SIGINT, previous)

    def _remove(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                _kill_tree(process)
            host.processes.clear()
        if self.forwarder is not None:
            _stop_forwarder(self.forwarder)
            self.forwarder = None
        for kind, name in reversed(self._made):
            if kind == "netns":
                # anything still inside (started by something else than popen) goes too
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                _ip("netns", "del", name, check=False)
            elif kind == "link":
                _ip("link", "del", name, check=False)
            elif kind == "route":
                _ip("route", "del", "blackhole", name, "metric", str(BLACKHOLE_METRIC), check=False)
        self._made.clear()

    # --- using it ----------------------------------------------------------------------

    def host(self, host: "str | Host") -> Host:
        if isinstance(host, Host):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this rig; hosts: {', '.join(self.hosts)}") from None

    def db_url(self, host: "str | Host", url: str) -> str:
        """``url`` (a PostgreSQL URL of the server at 127.0.0.1:5432) as seen from inside ``host``."""
        from sqlalchemy.engine import make_url

        found = self.host(host)
        return make_url(url).set(host=found.outside_ip, port=found.port).render_as_string(hide_password=False)

    def command(self, host: "str | Host", argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``host`` under the host's own hostname."""
        found = self.host(host)
        return [
            "ip", "netns", "exec", found.namespace, "unshare", "--uts", "sh", "-c",
            'hostname "$0" && exec "$@"', found.hostname, *argv,
        ]

    def popen(self, host: "str | Host", argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (``RF_HOST`` set to its hostname); killed when the rig closes."""
        found = self.host(host)
        environment = dict(os.environ if env is None else env)
        environment["RF_HOST"] = found.hostname
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(self.command(found, argv), env=environment, **kwargs)
        found.processes.append(process)
        return process

    def run(self, host: "str | Host", argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
            timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host`` to its end; its output captured as text."""
        process = self.popen(host, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            _kill_tree(process)
            self.host(host).processes.remove(process)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def cut(self, host: "str | Host") -> None:
        """Take ``host``'s link down: nothing passes either way until :meth:`restore`."""
        _ip("link", "set", self.host(host).outside_link, "down")

    def restore(self, host: "str | Host", *, timeout: float = 5.0) -> float:
        """Bring ``host``'s link up again (the connected route comes back with it).

        Returns once both ends report operstate UP (the kernel turns a veth's carrier
        on asynchronously), and the seconds that took.
        """
        found = self.host(host)
        _ip("link", "set", found.outside_link, "up")
        started = time.monotonic()
        while True:
            here = _ip("-o", "link", "show", "dev", found.outside_link, check=False).stdout
            there = _ip("-n", found.namespace, "-o", "link", "show", "dev", found.inside_link, check=False).stdout
            if " state UP " in here and " state UP " in there:
                _pin_neighbours(found)
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{found.outside_link}/{found.inside_link} not UP {timeout} s after restore")
            time.sleep(0.01)

    def names(self) -> dict[str, list[str]]:
        """What this rig made, for checks that it is gone: namespaces and links."""
        return {
            "netns": [host.namespace for host in self.hosts.values()],
            "links": [link for host in self.hosts.values() for link in (host.outside_link, host.inside_link)],
        }


def _pin_neighbours(host: Host) -> None:
    """Permanent neighbour entries both ways (taking a link down drops this side's)."""
    _ip("neigh", "replace", host.inside_ip, "lladdr", host.inside_mac, "dev", host.outside_link, "nud", "permanent")
    _ip("-n", host.namespace, "neigh", "replace", host.outside_ip, "lladdr", host.outside_mac,
        "dev", host.inside_link, "nud", "permanent")


def _mac(link: str, namespace: Optional[str] = None) -> str:
    prefix = ("-n", namespace) if namespace else ()
    words = _ip(*prefix, "-o", "link", "show", "dev", link).stdout.split()
    return words[words.index("link/ether") + 1]


def _kill_tree(process: subprocess.Popen) -> None:
    """End ``process`` and its session (SIGTERM, then SIGKILL after 3 s), and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except OSError:
            process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # what it left in its session
    except OSError:
        pass
    if process.poll() is None:
        process.kill()
        process.wait()


def _stop_forwarder(process: subprocess.Popen) -> None:
    try:
        if process.stdin is not None:
            process.stdin.close()  # the forwarder leaves when its stdin closes
    except OSError:
        pass
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


# --- the forwarder (runs as a subprocess: python netns_rig.py forward ...) ------------


def _forward_main(argv: list[str]) -> int:
    """Forward TCP connections from each ``ip:port`` listener to ``--target``.

    Prints ``READY ip:port ...`` once every listener is bound (port 0 picks one),
    then serves until its stdin closes (the rig closed it, or the rig died).
    One thread per direction of each connection; a half-close is passed on.
    """
    import socket
    import threading

    owner = target = None
    listen = []
    for arg in argv:
        if arg.startswith("--owner="):
            owner = int(arg.split("=", 1)[1])
        elif arg.startswith("--target="):
            host, port = arg.split("=", 1)[1].rsplit(":", 1)
            target = (host, int(port))
        else:
            host, port = arg.rsplit(":", 1)
            listen.append((host, int(port)))
    if owner is None or target is None or not listen:
        print("usage: netns_rig.py forward --owner=PID --target=IP:PORT IP:PORT ...", file=sys.stderr)
        return 2
    try:  # also leave when the rig's process dies
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    debug = bool(os.environ.get("RF_RIG_DEBUG"))

    def serve(client: socket.socket) -> None:
        if debug:
            print(f"forwarder: accepted {client.getpeername()}", file=sys.stderr, flush=True)
        try:
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except OSError as exc:
            if debug:
                print(f"forwarder: upstream failed {exc!r}", file=sys.stderr, flush=True)
            client.close()
            return
        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def accept(listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    bound = []
    for host, port in listen:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        bound.append(f"{host}:{listener.getsockname()[1]}")
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
    print("READY " + " ".join(bound), flush=True)
    sys.stdin.read()  # EOF: the rig is done (or gone)
    return 0


def netns_rig_fixture() -> Iterator[NetnsRig]:
    """The body of the ``netns_rig`` fixture: skip without namespaces, else a rig removed afterwards."""
    require_netns()
    with NetnsRig() as rig:
        yield rig


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "forward":
        sys.exit(_forward_main(sys.argv[2:]))
    print("usage: netns_rig.py forward --owner=PID --target=IP:PORT IP:PORT ...", file=sys.stderr)
    sys.exit(2)
