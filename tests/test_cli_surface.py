"""The CLI's ``--help`` texts and quick commands' JSON schemas stay as recorded (a deliberate change
regenerates the snapshot with ``python -m tests.cli_surface``)."""

import json

import pytest

from tests.cli_surface import SNAPSHOT, surface


@pytest.fixture(scope="module")
def current():
    return surface()


@pytest.fixture(scope="module")
def recorded():
    return json.loads(SNAPSHOT.read_text())


def test_every_command_has_the_recorded_help(current, recorded):
    assert sorted(current["help"]) == sorted(recorded["help"])
    for path, text in recorded["help"].items():
        assert current["help"][path] == text, path


def test_quick_commands_keep_their_json_schema(current, recorded):
    assert current["json"] == recorded["json"]
