"""Service addresses as module attributes (``RF_MLFLOW_PORT`` …), as the spec uses them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import rapidfire_state.constants as constants
from rapidfire_state.exceptions import ConfigError

SERVICES = {"DISPATCHER": 8851, "MLFLOW": 8852, "FRONTEND": 8853}


@pytest.fixture(autouse=True)
def _clean_service_env(monkeypatch):
    for service in SERVICES:
        for field in ("HOST", "PORT", "URL"):
            monkeypatch.delenv(f"RF_{service}_{field}", raising=False)


@pytest.mark.parametrize("service, port", sorted(SERVICES.items()))
def test_service_attributes_default_and_follow_the_environment_at_use(monkeypatch, service, port):
    config = {"DISPATCHER": constants.DispatcherConfig, "MLFLOW": constants.MLFlowConfig,
              "FRONTEND": constants.FrontendConfig}[service]
    assert getattr(constants, f"RF_{service}_PORT") == port == config.PORT
    assert getattr(constants, f"RF_{service}_HOST") == "127.0.0.1"
    assert getattr(constants, f"RF_{service}_URL") == f"http://127.0.0.1:{port}/"
    # Set after the module was imported: read when used, never frozen.
    monkeypatch.setenv(f"RF_{service}_PORT", "9123")
    monkeypatch.setenv(f"RF_{service}_HOST", "10.0.0.5")
    assert getattr(constants, f"RF_{service}_PORT") == 9123 == config.PORT
    assert getattr(constants, f"RF_{service}_URL") == "http://10.0.0.5:9123/"
    monkeypatch.setenv(f"RF_{service}_URL", "http://example.invalid:1/")
    assert getattr(constants, f"RF_{service}_URL") == "http://example.invalid:1/"
    assert f"RF_{service}_PORT" in constants.__all__


def test_from_import_reads_the_environment(monkeypatch):
    monkeypatch.setenv("RF_MLFLOW_PORT", "18852")
    from rapidfire_state.constants import RF_MLFLOW_PORT, RF_MLFLOW_URL

    assert (RF_MLFLOW_PORT, RF_MLFLOW_URL) == (18852, "http://127.0.0.1:18852/")


@pytest.mark.parametrize("raw", ["eighty", "0", "70000", "-1", "+80", "1_000", "\u0663\u0660\u0660\u0660", "80.0", "0x50"])
def test_bad_port_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("RF_MLFLOW_PORT", raw)
    with pytest.raises(ConfigError, match=re.escape(f"RF_MLFLOW_PORT={raw!r}")):
        constants.RF_MLFLOW_PORT


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="RF_MLFLOW_PORTS"):
        constants.RF_MLFLOW_PORTS  # noqa: B018


# The spec's start_colab.py, as written there (imports added), against a fake
# cloudflared that records what it was asked to forward.
START_COLAB = """
import os
from rapidfire_state.colab_helper import setup_cloudflare_tunnel
from rapidfire_state.constants import RF_MLFLOW_PORT, MLFlowConfig

# Create tunnels for external access
mlflow_url = setup_cloudflare_tunnel(RF_MLFLOW_PORT, "MLflow Tracking UI")

# DON'T set RF_MLFLOW_URL env var - let frontend use localhost
assert "RF_MLFLOW_URL" not in os.environ
print(mlflow_url)
print(MLFlowConfig.URL)  # what the frontend subprocess uses
"""

FAKE_CLOUDFLARED = r"""#!/bin/sh
echo "$@" >> "$FAKE_DIR/args"
for a in "$@"; do last="$a"; done
echo "INF |  https://spec-example-${last##*:}.trycloudflare.com  |" >&2
exec sleep 300
"""


def test_spec_start_colab_example_runs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cloudflared"
    fake.write_text(FAKE_CLOUDFLARED)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RF_MLFLOW_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_DIR=str(tmp_path), RF_MLFLOW_PORT="9123")
    proc = subprocess.run([sys.executable, "-c", START_COLAB], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["https://spec-example-9123.trycloudflare.com", "http://127.0.0.1:9123/"]
    assert Path(tmp_path / "args").read_text().split() == ["tunnel", "--no-autoupdate", "--url", "http://127.0.0.1:9123"]
