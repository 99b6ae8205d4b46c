"""Shared fixtures: bundled models load once per test session (they are read-only everywhere)."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Runs that tests store (CLI sweeps, the Quantize page) go to a throwaway database, not the user's.
os.environ.setdefault("QLAB_DB", os.path.join(tempfile.mkdtemp(prefix="qlab-tests-"), "runs.sqlite"))


@pytest.fixture(scope="session", autouse=True)
def _private_run_db(tmp_path_factory):
    """Runs stored during tests (dashboard, CLI, browser) go to a throwaway database, never the user's."""
    os.environ["QLAB_DB"] = str(tmp_path_factory.mktemp("runs") / "runs.sqlite")


@pytest.fixture(scope="session")
def minilm():
    from qlab.models import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def smollm():
    from qlab.models import load

    return load("smollm2-135m")
