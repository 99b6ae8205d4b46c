"""Markdown, HTML and CSV injection through stored strings (issue 17, family 3): an imported run whose labels,
model, hardware, text name, versions and backend notes hold images, links, scripts and spreadsheet formulas is
shown by the History page and the HTML report as the characters it is (no image fetched, no link made), and
exported to CSV with formula cells neutralised; the stored strings themselves are never changed."""

from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from qlab.cli import main
from qlab.store import Store
from qlab.store.report import FORMULA_PREFIXES, csv_cell, csv_text, markdown_text, render_html

PIXEL = "![p](http://127.0.0.1:9/pixel.png)"
LINK = "[click me](http://evil.example/x)"
IMG_TAG = "<img src=http://127.0.0.1:9/i.png onerror=alert(1)>"
SCRIPT = "</script><script>alert(1)</script>"
ANCHOR = "<a href='http://evil.example'>plotly link</a>"
FORMULA = '=HYPERLINK("http://evil.example","x")'
DDE = "+cmd|' /C calc'!A0"
AT = "@SUM(1+1)*cmd|' /C calc'!A0"
MINUS = "-2+3+cmd|' /C calc'!A0"
TAB = "\t=1+1"
CR = "\r=1+1"
CR_INSIDE = "harmless\r=HYPERLINK(\"http://evil.example\")"  # a spreadsheet starts a row at a bare CR
DIRECTIVES = ":red[alert] $x^2$ **bold** www.evil.example <http://evil.example> :material/home:"
MULTILINE = "line one\n\n# a heading\n- a list\n![p](http://127.0.0.1:9/second.png)"
HOSTILE = [PIXEL, LINK, IMG_TAG, SCRIPT, ANCHOR, FORMULA, DDE, AT, MINUS, TAB, CR, CR_INSIDE, DIRECTIVES, MULTILINE]
ENV = {"qlab": PIXEL, "torch": LINK, "transformers": "5.0", "python": DIRECTIVES, "machine": IMG_TAG}
SCHEME = {"format": "int8", "granularity": "channel", "group_size": 64, "symmetric": True,
          "calibration": "minmax", "percentile": 99.9, "scale_dtype": "auto", "algorithm": "rtn"}


def hostile_run(run_id: str, model: str, labels: list[str]) -> dict:
    """A sweep run as `runs export` writes it, every free-text field hostile."""
    results = [{"position": i, "kind": "sweep", "label": label, "created_at": "2025-01-01T00:00:01+00:00",
                "record": {"label": label, "model": model, "format": "int8", "bits_per_weight": 8.5 - i,
                           "size_bytes": 1_000_000 - 1000 * i, "kld_mean": 0.01 * (i + 1),
                           "top1_agreement": 0.9, "seconds": 0.1, label: "a key that is hostile too"},
                "scheme": SCHEME} for i, label in enumerate(labels)]
    results.append({"position": len(labels), "kind": "bench", "label": "fp32", "created_at": None,
                    "record": {"backend": "fp32", "available": False, "reason": PIXEL, "error": None}})
    results.append({"position": len(labels) + 1, "kind": "recommendation", "label": LINK, "created_at": None,
                    "record": {"label": LINK, "bits_per_weight": 4.5, "size_bytes": 10,
                               "assignment": {"l0": IMG_TAG}}})
    return {"id": run_id, "kind": "sweep", "status": "finished", "created_at": "2025-01-01T00:00:00+00:00",
            "finished_at": "2025-01-01T00:00:02+00:00", "seconds": 2.0, "error": None, "model": model,
            "model_sha256": None, "hardware": ANCHOR, "text_sha256": "0" * 64, "text_name": PIXEL, "tokens": 64,
            "seed": 0, "settings": {"schemes": [SCHEME], "note": FORMULA}, "environment": ENV, "results": results}


@pytest.fixture
def hostile_db(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    payload = {"format": "qlab-runs", "schema_version": 1, "runs": [
        hostile_run("a1a1a1a1a1a1", PIXEL, HOSTILE[:7]), hostile_run("b2b2b2b2b2b2", LINK, HOSTILE[5:])]}
    (tmp_path / "hostile.json").write_text(json.dumps(payload))
    assert main(["runs", "import", str(tmp_path / "hostile.json")]) == 0
    return Store(), payload


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").render(markdown)


def assert_inert(markdown: str) -> None:
    """Streamlit markdown that fetches nothing and links nowhere."""
    html_out = rendered(markdown)
    assert "<img" not in html_out and "<a " not in html_out, (markdown, html_out)
    # GFM's autolink literals (which CommonMark lacks) start at "www." or "scheme://"
    assert not re.search(r"(?i)www\.|[a-z]://|\w@\w", markdown), markdown


MARKDOWN_ONLY = ["12. an ordered item", "# a heading", "- a list", "> a quote", "mail@evil.example", "`code`",
                 "~~struck~~", "&lt;img src=x&gt;", "WWW.EVIL.EXAMPLE", "mailto:me@evil.example", "a\\[x](y)"]


@pytest.mark.parametrize("text", HOSTILE + MARKDOWN_ONLY,
                         ids=[f"hostile {i}" for i in range(len(HOSTILE))] + MARKDOWN_ONLY)
def test_markdown_text_shows_the_characters_and_makes_nothing(text):
    escaped = markdown_text(text)
    assert_inert(escaped)
    assert rendered(escaped).count("<p>") == 1  # one paragraph: no heading, list, quote or code block
    plain = re.sub(r"<[^>]+>", "", rendered(escaped)).strip()
    import html as html_module

    assert html_module.unescape(plain) == " ".join(text.split())  # what the reader sees is what was stored


@pytest.mark.parametrize("text", [FORMULA, DDE, AT, MINUS, TAB, CR, "=1", "+", "-", "@"])
def test_csv_cells_that_start_like_a_formula_are_neutralised(text):
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["-0.5", "+3", "1e-5", "-.25", "int4 g64", 3, -2.0, None, "a=b"])
def test_numbers_and_plain_text_are_written_as_they_are(value):
    assert csv_cell(value) == value


def cells(text: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text)))
    return [cell for row in rows for cell in row]


def test_runs_export_csv_neutralises_every_formula_and_keeps_the_store_unchanged(hostile_db, capsys, tmp_path):
    store, payload = hostile_db
    capsys.readouterr()
    assert main(["runs", "export", "--csv", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", newline="") as handle:
        found = cells(handle.read())
    assert CR_INSIDE in found  # one quoted cell, not a second row starting with '='

    dangerous = [c for c in found if c.startswith(FORMULA_PREFIXES) and not re.fullmatch(r"-?[\d.e+-]+", c)]
    assert not dangerous, dangerous
    assert "'" + FORMULA in found and "'" + DDE in found and "'" + TAB in found
    # the database keeps what was imported, byte for byte
    stored = {r["id"]: r for r in store.export()["runs"]}
    for run in payload["runs"]:
        assert [r["label"] for r in stored[run["id"]]["results"]] == [r["label"] for r in run["results"]]
        assert stored[run["id"]]["model"] == run["model"] and stored[run["id"]]["environment"] == ENV


def test_the_csv_of_the_history_page_neutralises_headers_and_cells(hostile_db):
    from qlab.store.report import results_frame

    store, _ = hostile_db
    text = csv_text(results_frame(store.runs(), kind=None))
    header = next(csv.reader(io.StringIO(text)))
    assert "'" + FORMULA in header and FORMULA not in header  # an imported record key is a header
    assert not [c for c in cells(text) if c.startswith(("=", "@", "+cmd", "\t", "\r"))]


class Tags(HTMLParser):
    """The elements a browser would build from a page, and the text of its scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_html_report_escapes_every_string_and_its_charts_make_no_links(hostile_db):
    store, _ = hostile_db
    page = render_html(store.runs(), title=SCRIPT)
    parsed = Tags()
    parsed.feed(page)
    assert {tag for tag, _ in parsed.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3",
                                              "p", "b", "div", "table", "thead", "tbody", "tr", "th", "td",
                                              "figure", "figcaption", "script"}
    assert not [attrs for tag, attrs in parsed.tags if tag == "script" and attrs.get("src")]
    assert not [s for s in parsed.scripts if "alert(1)" in s and "Plotly.newPlot" not in s]  # no script of ours
    figures = [s for s in parsed.scripts if "Plotly.newPlot" in s]
    assert figures and not any("<a href" in f or "\\u003ca href" in f or "<img" in f for f in figures)
    assert "&lt;img src=http://127.0.0.1:9/i.png" in page  # shown as text


def markdown_sources(at: AppTest) -> list[str]:
    found = [e.value for kind in ("markdown", "caption", "subheader", "warning", "info", "success", "error")
             for e in getattr(at, kind)]
    return found + [e.label for e in at.expander]


@pytest.mark.slow
@pytest.mark.parametrize("selection", [["a1a1a1a1a1a1"], ["a1a1a1a1a1a1", "b2b2b2b2b2b2"]], ids=["one", "two"])
def test_history_page_renders_hostile_strings_as_text(hostile_db, selection):
    store, _ = hostile_db
    before = json.dumps(store.export()["runs"], sort_keys=True)
    at = AppTest.from_file("../pages/history.py", default_timeout=120)
    at.query_params["runs"] = ",".join(selection)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    sources = markdown_sources(at)
    assert any("pixel" in s for s in sources)  # the hostile strings are shown, not dropped
    for source in sources:
        assert_inert(source)
    for chart in at.get("plotly_chart"):
        spec = chart.proto.spec
        assert "<a href" not in spec and "<img" not in spec and "&lt;" in spec
    assert json.dumps(store.export()["runs"], sort_keys=True) == before
