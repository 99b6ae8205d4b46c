"""Hostile output paths (issue 17, family 5): `--json` / `--out` onto a device, a FIFO, a symlink, a directory,
an empty path or `/`; `export --force` onto a folder that only looks like an export; what a failed or killed
write leaves. Each case: exit status 2 with one line, no traceback, and what the user had is unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qlab.backends import export
from qlab.cli import main
from qlab.cli.common import write_atomic
from qlab.core.errors import QlabError
from qlab.core.files import partial_path, remove_stale_partials
from tests.tiny_models import tiny_bert


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: its kind, and a link's target or a file's content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        detail = os.readlink(path) if stat.S_ISLNK(mode) else (
            hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else None)
        found[str(path.relative_to(folder))] = (stat.S_IFMT(mode), detail)
    return found


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A folder holding what a user may already have where output is asked for."""
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "db" / "runs.sqlite"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    os.mkfifo(home / "fifo")
    (home / "link.json").symlink_to(home / "notes.txt")
    (home / "dangling.json").symlink_to(tmp_path / "elsewhere" / "planted.json")
    (home / "folder").mkdir()
    (home / "folder" / "inside.txt").write_text("mine")
    try:
        os.mknod(home / "device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    except (PermissionError, OSError):
        pass  # not root: the FIFO and the real /dev/null below cover devices
    return home


OUTPUT_CASES = [
    ("json onto a FIFO", ["quantize", "--values=1,2", "--json", "{home}/fifo"], "not a regular file"),
    ("json onto a device node", ["quantize", "--values=1,2", "--json", "{home}/device"], "not a regular file"),
    ("json onto /dev/null", ["quantize", "--values=1,2", "--json", "/dev/null"], "not a regular file"),
    ("json onto a symlink", ["quantize", "--values=1,2", "--json", "{home}/link.json"], "symbolic link"),
    ("json onto a dangling symlink", ["quantize", "--values=1,2", "--json", "{home}/dangling.json"],
     "symbolic link"),
    ("json onto a directory", ["quantize", "--values=1,2", "--json", "{home}/folder"], "a directory"),
    ("json onto /", ["quantize", "--values=1,2", "--json", "/"], "a directory"),
    ("json onto ''", ["quantize", "--values=1,2", "--json", ""], "empty"),
    ("json below a regular file", ["quantize", "--values=1,2", "--json", "{home}/notes.txt/out.json"],
     "cannot write"),
    ("sweep json onto a FIFO before any work", ["sweep", "--model", "minilm-l6", "--json", "{home}/fifo"],
     "not a regular file"),
    ("memory json onto a symlink", ["memory", "--model", "llama-3.1-8b", "--json", "{home}/link.json"],
     "symbolic link"),
    ("report --out ''", ["report", "--run", "abc", "--out", ""], "empty"),
    ("report --out /", ["report", "--run", "abc", "--out", "/"], "a directory"),
    ("report --out a FIFO", ["report", "--run", "abc", "--out", "{home}/fifo"], "not a regular file"),
    ("report --out a symlink", ["report", "--run", "abc", "--out", "{home}/link.json"], "symbolic link"),
    ("scheme json --out ''", ["export", "--scheme-json", "--out", ""], "--out"),
    ("scheme json --out /", ["export", "--scheme-json", "--out", "/"], "a directory"),
    ("scheme json --out a symlink", ["export", "--scheme-json", "--out", "{home}/link.json"], "symbolic link"),
    ("export --out ''", ["export", "--backend", "quanto-int8", "--out", ""], "--out is empty"),
    ("export --out /", ["export", "--backend", "quanto-int8", "--out", "/", "--force"], "filesystem root"),
    ("export --out a FIFO", ["export", "--backend", "quanto-int8", "--out", "{home}/fifo"], "not a directory"),
    ("formats json onto a directory", ["formats", "--json", "{home}/folder"], "a directory"),
]


@pytest.mark.parametrize("case, argv, needle", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_output_path_is_refused_in_one_line_and_nothing_changes(case, argv, needle, places, capsys, monkeypatch):
    if "{home}/device" in argv and not (places / "device").exists():
        pytest.skip("no permission to make a device node here")
    from qlab.models import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: tiny_bert())  # export and scheme-json cases only
    before, null = snapshot(places), os.stat("/dev/null")
    argv = [a.replace("{home}", str(places)) for a in argv]
    assert main(argv) == 2, case
    captured = capsys.readouterr()
    assert captured.err.startswith("qlab: error: ") and captured.err.count("\n") == 1, captured.err
    assert needle.lower() in captured.err.lower() and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    assert snapshot(places) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_ino == null.st_ino
    assert not (places.parent / "elsewhere").exists()  # the dangling link's target was not created


def test_a_real_process_refuses_a_fifo_without_blocking_or_a_traceback(places):
    result = subprocess.run([sys.executable, "-m", "qlab", "quantize", "--values=1,2", "--json", str(places / "fifo")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert stat.S_ISFIFO((places / "fifo").lstat().st_mode)


def test_a_full_disk_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    out.write_text("old")
    real = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real(fd, *a, **k)))
    with pytest.raises(QlabError, match="No space left on device"):
        write_atomic(out, json.dumps({"new": True}))
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_ctrl_c_mid_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    out.write_text("old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, "new")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_what_a_killed_writer_left_is_cleaned_by_the_next_write_and_a_live_one_is_kept(tmp_path):
    out = tmp_path / "out.json"
    stale = out.with_name(f"out.json.partial-{dead_pid()}")
    stale.write_text('{"half": ')
    live = out.with_name(f"out.json.partial-{os.getppid()}")  # a writer that is still running
    live.write_text("in progress")
    mine = tmp_path / "out.json.partial-notes"  # a name qlab never writes
    mine.write_text("mine")
    write_atomic(out, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", live.name, mine.name])


def test_a_planted_link_at_the_partial_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.json"
    partial_path(out).symlink_to(victim)  # someone guessed this process's partial name
    with pytest.raises(QlabError, match="cannot write"):
        write_atomic(out, "overwritten?")
    assert victim.read_text() == "precious" and not out.exists() and partial_path(out).is_symlink()


def test_a_private_file_stays_private_when_rewritten(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    out.chmod(0o600)
    write_atomic(out, "new")
    assert out.read_text() == "new" and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_stale_partials_of_other_names_and_live_writers_are_never_touched(tmp_path):
    out = tmp_path / "out.json"
    other = tmp_path / f"other.json.partial-{dead_pid()}"
    other.write_text("another file's leftover")
    assert remove_stale_partials(out) == [] and other.exists()


# --- export --force: only a directory qlab itself wrote is ever replaced ---


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A real earlier export, to copy look-alikes from."""
    out = tmp_path_factory.mktemp("earlier") / "export"
    export.export_quantized(tiny_bert(seed=3), "quanto-int8", out)
    return out


def look_alike(folder: Path, earlier: Path, weights: bytes | None = b"my own model, not the export's") -> Path:
    folder.mkdir()
    (folder / export.SCHEME_FILE).write_bytes((earlier / export.SCHEME_FILE).read_bytes())
    if weights is not None:
        (folder / export.WEIGHTS_FILE).write_bytes(weights)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("build", [
    lambda tmp, earlier: look_alike(tmp / "models", earlier),  # a user's model folder + a copied scheme
    lambda tmp, earlier: look_alike(tmp / "scheme-only", earlier, weights=None),
    lambda tmp, earlier: (look_alike(tmp / "project", earlier, (earlier / export.WEIGHTS_FILE).read_bytes()),
                          (tmp / "project" / "src").mkdir(), (tmp / "project" / "src" / "main.py").write_text("x"))[0],
    lambda tmp, earlier: (look_alike(tmp / "edited", earlier), (tmp / "edited" / export.SCHEME_FILE).write_text(
        json.dumps({"format": export.EXPORT_FORMAT, "library": "optimum-quanto"})))[0],
], ids=["own weights", "scheme only", "a real export plus a folder", "a minimal hand-written scheme"])
def test_force_never_deletes_a_folder_that_only_looks_like_an_export(build, earlier, tmp_path, capsys, monkeypatch):
    folder = build(tmp_path, earlier)
    before = snapshot(folder)
    monkeypatch.setattr("qlab.models.loading.load", lambda *a, **k: tiny_bert())
    assert main(["export", "--backend", "quanto-int8", "--out", str(folder), "--force"]) == 2
    err = capsys.readouterr().err
    assert "holds no qlab export" in err and err.count("\n") == 1
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no partial directory left


def test_force_still_replaces_a_real_earlier_export_and_cleans_what_a_killed_export_left(earlier, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    for item in earlier.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    killed = tmp_path / f".export.partial-{dead_pid()}"  # an export killed mid-write
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".export.partial-{os.getppid()}"
    live.mkdir()
    result = export.export_quantized(tiny_bert(seed=4), "quanto-int4", out, force=True)
    assert export.read_scheme(out)["backend"] == "quanto-int4" and result.out_dir == out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
