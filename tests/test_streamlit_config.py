"""The dashboard's Streamlit settings that performance and safety depend on."""

import tomllib
from pathlib import Path

CONFIG = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())


def test_no_full_garbage_collection_after_every_script_run():
    # A gen-2 collection holds the GIL ~230 ms with torch and transformers loaded; after every fragment rerun it
    # starved the Overview's background measurement.
    assert CONFIG["runner"]["postScriptGC"] is False


def test_local_first_and_no_reload_on_save():
    assert CONFIG["server"]["address"] == "127.0.0.1"
    assert CONFIG["server"]["fileWatcherType"] == "none" and CONFIG["server"]["runOnSave"] is False
