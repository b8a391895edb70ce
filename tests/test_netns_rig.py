"""The multi-host rig itself (tests/netns_rig.py): hosts reach PostgreSQL, a cut stops them, nothing is left.

Needs root, ``ip`` and ``unshare`` (skips with the reason otherwise); the connection
checks need ``RF_TEST_PG_URL`` (the server at 127.0.0.1:5432; nothing is written).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from netns_rig import (
    HOSTS,
    NetnsRig,
    forwarder_processes,
    list_links,
    list_namespaces,
    netns_rig_fixture,
    netns_unavailable_reason,
    require_netns,
    sweep_leftovers,
    _rig_routes,
)

PG_URL = os.environ.get("RF_TEST_PG_URL")

# one rig at a time per run (with pytest-xdist): rigs choose their subnets from what is in use
pytestmark = pytest.mark.xdist_group("netns")

# Run inside a host: one connection attempt with a short connect_timeout; one JSON line.
PROBE = r"""
import json, os, socket, sys, time
import psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://")
started = time.monotonic()
out = {"hostname": socket.gethostname(), "rf_host": os.environ.get("RF_HOST")}
try:
    with psycopg.connect(url, connect_timeout=2) as conn:
        out["server"] = conn.execute("select current_database()").fetchone()[0]
        out["ok"] = True
except psycopg.Error as exc:
    out["ok"] = False
    out["error"] = f"{type(exc).__name__}: {exc}"
out["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(out))
"""


@pytest.fixture
def rig():
    yield from netns_rig_fixture()


def _probe(rig: NetnsRig, host: str) -> dict:
    url = rig.db_url(host, PG_URL)
    done = rig.run(host, [sys.executable, "-c", PROBE, url], timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_gone(names: dict, owner: int) -> None:
    assert not set(names["netns"]) & set(list_namespaces())
    assert not set(names["links"]) & set(list_links())
    assert forwarder_processes(owner) == []


def test_hosts_have_their_own_names_and_addresses(rig):
    for key, hostname in HOSTS.items():
        host = rig.host(key)
        names = rig.run(key, ["sh", "-c", 'hostname; echo "$RF_HOST"'])
        assert names.stdout.split() == [hostname, hostname], names.stderr
        assert host.network.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
        addresses = rig.run(key, ["ip", "-4", "-o", "addr", "show", "dev", host.inside_link]).stdout
        assert f"inet {host.inside_ip}/30" in addresses
        # the host's only route is its own /30: nothing it sends can go further
        routes = rig.run(key, ["ip", "-4", "route"]).stdout.splitlines()
        assert \
            [r.strip() for r in routes] == [f"{host.network} dev {host.inside_link} proto kernel scope link src {host.inside_ip}"]
    assert rig.host("a").network != rig.host("b").network


@pytest.mark.skipif(not PG_URL, reason="RF_TEST_PG_URL is not set")
def test_b_reaches_postgresql_cut_stops_it_restore_brings_it_back(rig):
    first = _probe(rig, "b")
    assert first["ok"], first
    assert (first["hostname"], first["rf_host"]) == ("rf-host-b", "rf-host-b")

    rig.cut("b")
    cut = _probe(rig, "b")
    assert not cut["ok"], cut
    assert "timeout" in cut["error"].lower(), cut  # no answer at all, not a refusal
    still = _probe(rig, "a")
    assert still["ok"], still

    rig.restore("b")
    # at once: the rig pins the neighbours, so a lookup begun during the cut cannot fail it
    back = _probe(rig, "b")
    assert back["ok"], back


def test_rig_is_removed_after_use():
    require_netns()
    with NetnsRig() as made:
        names = made.names()
        sleeper = made.popen("b", ["sleep", "60"])
        assert set(names["netns"]) <= set(list_namespaces())
        assert set(names["links"][::2]) <= set(list_links())  # the this-side ends
        assert len(forwarder_processes(os.getpid())) == 1
        networks = {str(h.network) for h in made.hosts.values()}
        assert networks <= set(_rig_routes())
    assert sleeper.poll() is not None
    _assert_gone(names, os.getpid())
    assert not networks & set(_rig_routes())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_rig_is_removed_when_the_test_fails(error):
    require_netns()
    names = None
    with pytest.raises(error):
        with NetnsRig() as made:
            names = made.names()
            sleeper = made.popen("a", ["sleep", "60"])
            raise error("boom")
    assert sleeper.poll() is not None
    _assert_gone(names, os.getpid())


def test_sweeper_removes_what_a_dead_pid_left():
    require_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    namespace, link = f"rfrig-{dead.pid}-a", f"rfr{dead.pid}ao"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"rfr{dead.pid}ai"], check=True)
    try:
        # another live process's rig is not touched
        alive_ns = f"rfrig-{os.getpid()}-z"
        subprocess.run(["ip", "netns", "add", alive_ns], check=True)
        removed = sweep_leftovers()
        assert f"netns {namespace}" in removed and f"link {link}" in removed
        assert namespace not in list_namespaces() and link not in list_links()
        assert alive_ns in list_namespaces()
    finally:
        for name in (namespace, f"rfrig-{os.getpid()}-z"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_without_root_the_rig_tests_skip_with_the_reason():
    if os.geteuid() != 0:
        assert netns_unavailable_reason() == f"network namespaces need root (running as uid {os.geteuid()})"
        return
    # a user namespace without a mapping: this process's files stay readable, but it is not root there
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{os.path.basename(__file__)}::test_hosts_have_their_own_names_and_addresses"],
        cwd=here, capture_output=True, text=True, timeout=120,
    )
    assert "1 skipped" in done.stdout, done.stdout + done.stderr
    assert "network namespaces need root (running as uid 65534)" in done.stdout


def test_without_ip_the_reason_names_it():
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", "from netns_rig import netns_unavailable_reason as r; print(r())"],
        cwd=here, capture_output=True, text=True, env={"PATH": "/nonexistent"},
    )
    expected = "`ip` is not installed (needed for network namespaces)"
    if os.geteuid() != 0:
        expected = f"network namespaces need root (running as uid {os.geteuid()})"
    assert done.stdout.strip() == expected, done.stderr
