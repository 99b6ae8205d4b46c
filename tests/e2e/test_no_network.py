"""No network calls at start-up: a fresh server, *without* the Hugging Face offline switches, opens the
dashboard on the bundled model while an audit hook records every socket connection and name lookup."""

import pytest

from tests.e2e.conftest import assert_no_exception, run_server, wait_for_app_idle

pytestmark = pytest.mark.e2e

# Installed into the server process through PYTHONPATH: Python imports sitecustomize at start-up.
AUDIT_HOOK = '''
import os, sys

_LOG = os.environ["QLAB_NETWORK_LOG"]


def _record(event, args):
    if event == "socket.connect":
        line = f"connect {args[1]!r}"
    elif event == "socket.getaddrinfo":
        line = f"lookup {args[0]!r}"
    else:
        return
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(line + "\\n")


sys.addaudithook(_record)
with open(_LOG, "a", encoding="utf-8") as log:
    log.write(f"hook installed in process {os.getpid()}\\n")
'''
LOCAL = ("127.0.0.1", "localhost", "::1")


def test_start_up_and_the_bundled_model_touch_no_network(browser_page, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "network.log"
    log.touch()
    with run_server("streamlit-network.log", {"PYTHONPATH": str(tmp_path), "QLAB_NETWORK_LOG": str(log),
                                              "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}) as base_url:
        browser_page.goto(f"{base_url}/model")  # make run's model, the bundled SmolLM2, on its Model page
        browser_page.locator('[data-testid="stMain"] h1', has_text="Model").wait_for(timeout=240_000)
        wait_for_app_idle(browser_page, timeout_ms=240_000)
        assert_no_exception(browser_page)
        browser_page.get_by_role("link", name="Weights", exact=True).click()
        browser_page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=120_000)
    events = log.read_text().splitlines()
    assert any(e.startswith("hook installed") for e in events), events  # the audit ran in the server
    connections = [e for e in events if not e.startswith("hook installed")]
    outside = [e for e in connections if not any(host in e for host in LOCAL) and not e.startswith("connect '/")]
    assert outside == [], outside
