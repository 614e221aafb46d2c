"""serve.ingress: what ppg sets for a local cluster's HAProxy, and the wrapper that keeps HAProxy's
stats and metrics on loopback (ppg/serve/ingress.py). That the served app really goes through
HAProxy, on 127.0.0.1 only, is checked on a running server in tests/test_serve_openai.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from ppg.serve import ingress
from ppg.serve.ingress import prepare_local_cluster

# Ray's template (ray/serve/_private/haproxy_templates.py) as of Ray 2.60: the exporter, the front
# end (serve.host), the stats page; and a server line of a backend, which must not change.
TEMPLATE_BINDS = """frontend prometheus
    bind :9101
frontend http_frontend
    bind 0.0.0.0:8000
backend b
    server r1 127.0.0.1:30000 check
listen stats
  bind *:8404
"""


@pytest.fixture
def environ():
    """os.environ as it was, whatever the test sets (the session's Ray cluster reads it too)."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_the_wrapper_moves_stats_and_metrics_to_loopback_and_runs_the_binary(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(TEMPLATE_BINDS)
    args = tmp_path / "args"
    fake = tmp_path / "fake-haproxy"  # stands for the binary: records what it was run with
    fake.write_text(f'#!/bin/sh\necho "$@" > {args}\n')
    fake.chmod(0o755)
    wrapper = ingress.loopback_wrapper(str(fake))
    assert ingress.loopback_wrapper(str(fake)) == wrapper  # one per binary, reused

    subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], check=True, timeout=30)
    assert config.read_text() == TEMPLATE_BINDS.replace("bind :9101", "bind 127.0.0.1:9101").replace(
        "bind *:8404", "bind 127.0.0.1:8404"
    )
    assert args.read_text().split() == ["-db", "-f", str(config), "-sf", "123"]


def test_a_wrapper_whose_config_cannot_be_rewritten_fails_before_haproxy_runs(tmp_path):
    ran = tmp_path / "ran"
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
    fake.chmod(0o755)
    done = subprocess.run(
        [str(ingress.loopback_wrapper(str(fake))), "-db", "-f", str(tmp_path / "missing.cfg")],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode != 0 and not ran.exists()


def test_haproxy_ingress_sets_fresh_ports_and_proxy_takes_ppgs_variables_back(environ):
    for key in [k for k in environ if k.startswith("RAY_SERVE_") or k == "PPG_SERVE_INGRESS_SET"]:
        del environ[key]
    assert prepare_local_cluster("haproxy") == "haproxy"
    first = {k: v for k, v in environ.items() if k.startswith("RAY_SERVE_")}
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert first["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"  # the driver is not in asyncio
    ports = [first[f"RAY_SERVE_{name}"] for name in ("HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT")]
    assert "8404" not in ports and "9101" not in ports and len(set(ports)) == 2
    assert os.access(first["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)

    # the next local cluster (in this process, or in a child that inherited them) gets new ports
    assert prepare_local_cluster("haproxy") == "haproxy"
    assert environ["RAY_SERVE_HAPROXY_STATS_PORT"] != first["RAY_SERVE_HAPROXY_STATS_PORT"]

    assert prepare_local_cluster("proxy") == "proxy"
    assert not [k for k in environ if k.startswith("RAY_SERVE_")]


def test_the_users_own_variables_win(environ):
    for key in [k for k in environ if k.startswith("RAY_SERVE_") or k == "PPG_SERVE_INGRESS_SET"]:
        del environ[key]
    environ["RAY_SERVE_HAPROXY_STATS_PORT"] = "18404"
    assert prepare_local_cluster("haproxy") == "haproxy"
    assert environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    prepare_local_cluster("proxy")
    assert environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"  # not ppg's to take back

    environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    assert prepare_local_cluster("haproxy").startswith("proxy (RAY_SERVE_ENABLE_HA_PROXY=0")


def test_without_a_haproxy_binary_serving_falls_back_to_the_proxy_and_says_why(environ, monkeypatch):
    for key in [k for k in environ if k.startswith("RAY_SERVE_") or k == "PPG_SERVE_INGRESS_SET"]:
        del environ[key]
    monkeypatch.setattr(ingress, "haproxy_binary", lambda: None)
    assert "no HAProxy binary" in prepare_local_cluster("haproxy")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in environ


def test_serve_ingress_is_validated():
    from ppg.config import ConfigError, load_config

    assert load_config(None, []).serve.ingress == "haproxy"
    assert load_config(None, ["serve.ingress=proxy"]).serve.ingress == "proxy"
    with pytest.raises(ConfigError, match="serve.ingress"):
        load_config(None, ["serve.ingress=nginx"])
