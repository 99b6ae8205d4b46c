"""Fixtures for end-to-end tests: a real Streamlit server driven by Debian's Chromium.

Usage in a test module under tests/e2e/::

    import pytest
    from tests.e2e.conftest import assert_no_exception, wait_for_app_idle, wait_for_element

    pytestmark = pytest.mark.e2e

    def test_home(streamlit_server, browser_page):
        browser_page.goto(streamlit_server)
        wait_for_app_idle(browser_page)
        assert_no_exception(browser_page)

Playwright never downloads a browser here: it launches /usr/bin/chromium
(``apt-get install chromium chromium-driver``; ``make test`` does that).
Without it the browser tests skip locally and fail under CI=true.
Server log, and a screenshot of every failed browser test, land in tests/e2e/artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_FILE = "app.py"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

CHROMIUM = os.environ.get("QLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_TIMEOUT_S = 120.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_healthy(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    health = f"{base_url}/_stcore/health"
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"streamlit exited with code {proc.returncode} before answering {health}\n"
                f"--- {log_path} (tail) ---\n{_log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                body = resp.read().decode(errors="replace").strip()
                if resp.status == 200 and body == "ok":
                    return
                last_error = f"HTTP {resp.status}: {body!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last_error = repr(exc)
        time.sleep(0.25)
    pytest.fail(
        f"streamlit did not answer 'ok' on {health} within {timeout_s:.0f}s ({last_error})\n"
        f"--- {log_path} (tail) ---\n{_log_tail(log_path)}"
    )


@pytest.fixture(scope="session")
def streamlit_server() -> Iterator[str]:
    """Start ``streamlit run app.py`` on a free loopback port; yield its base URL."""
    with run_server("streamlit.log") as base_url:
        yield base_url


@contextlib.contextmanager
def run_server(log_name: str, env_overrides: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh ``streamlit run app.py`` process for the duration of the block; yields its base URL.

    The Hugging Face libraries are put offline unless ``env_overrides`` says otherwise."""
    app = REPO_ROOT / APP_FILE
    if not app.is_file():
        pytest.fail(f"{app} does not exist; the e2e tests need the dashboard entry point")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / log_name
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
        STREAMLIT_LOGGER_ENABLE_RICH="false",  # plain tracebacks in streamlit.log
    )
    env.update(env_overrides or {})
    cmd = [
        sys.executable, "-m", "streamlit", "run", APP_FILE,
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}  (cwd={REPO_ROOT})\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_healthy(base_url, proc, log_path, SERVER_START_TIMEOUT_S)
            yield base_url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)


def _browser_unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI is set: browser tests must run, not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _chromium():
    """One headless Debian Chromium for the whole session (pages are per test)."""
    if not Path(CHROMIUM).exists():
        _browser_unavailable(
            f"{CHROMIUM} not found: apt-get install chromium chromium-driver (or `make test`)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_unavailable("playwright is not installed: pip install -r requirements-test.txt")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item so fixtures can see whether the test failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def browser_page(_chromium, request):
    """A fresh 1400x1000 page; a screenshot is saved to artifacts/ if the test fails."""
    context = _chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        yield page
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            except Exception as exc:  # the page may be gone; the failure itself matters more
                print(f"screenshot failed: {exc!r}")
        context.close()


# --- helpers for tests -------------------------------------------------------------------------

_APP_STATE_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return {
    script: app ? app.getAttribute('data-test-script-state') : null,
    connection: app ? app.getAttribute('data-test-connection-state') : null,
    running: !!document.querySelector(
      '[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]'),
    skeleton: !!document.querySelector('[data-testid="stAppSkeleton"]'),
  };
}"""


def wait_for_app_idle(page, timeout_ms: int = 60_000, settle_ms: int = 500) -> None:
    """Wait until the Streamlit script run has finished and the app has stayed idle.

    Idle means: the ``stApp`` root reports ``data-test-script-state="notRunning"`` while
    ``CONNECTED``, and no running indicator (``stStatusWidgetRunningIcon``) is shown. The state
    must hold for ``settle_ms``, so a rerun that a click triggers a moment later is not missed.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    idle_since: float | None = None
    state: dict = {}
    while True:
        state = page.evaluate(_APP_STATE_JS)
        idle = (
            state["script"] == "notRunning"
            and state["connection"] == "CONNECTED"
            and not state["running"]
            and not state["skeleton"]
        )
        now = time.monotonic()
        if idle:
            idle_since = idle_since if idle_since is not None else now
            if (now - idle_since) * 1000 >= settle_ms:
                return
        else:
            idle_since = None
            if state["script"] == "compilationError":
                raise AssertionError("Streamlit reports a compilation error in the app script")
        if now > deadline:
            raise AssertionError(f"Streamlit app not idle after {timeout_ms} ms (last state: {state})")
        page.wait_for_timeout(100)


def wait_for_element(page, selector: str, timeout_ms: int = 120_000):
    """Wait until ``selector`` is on the page and return its first match: what an assertion needs, rather than
    a moment of idleness (a page that reruns, or draws a spinner first, is idle in between). An exception box
    ends the wait at once, with its text."""
    page.locator(f'{selector}, [data-testid="stException"]').first.wait_for(timeout=timeout_ms)
    assert_no_exception(page)
    return page.locator(selector).first


def assert_no_exception(page) -> None:
    """Fail if the page shows any Streamlit exception box (``stException``)."""
    boxes = page.locator('[data-testid="stException"]')
    n = boxes.count()
    if n:
        texts = [boxes.nth(i).inner_text()[:2000] for i in range(n)]
        raise AssertionError(f"{n} exception(s) shown on the page:\n" + "\n---\n".join(texts))
