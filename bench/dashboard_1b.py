"""A 1B model through the dashboard on this CPU, as a user drives it: wall time and memory of every step.

    python bench/dashboard_1b.py --checkpoint /tmp/qlab-llama-3.2-1b-random --json bench/results/dashboard_1b_cpu.json

The random-initialised Llama-3.2-1B (1.24 B parameters, bf16, ~2.5 GB) is built first by
``bench/random_checkpoint.py`` in a child process (so its memory is not this one's), or reused when ``--checkpoint``
already holds one. Then Streamlit's AppTest runs the real app in this process, with a fresh run database: the
History page (it loads nothing) while the sidebar is set as a user sets it (Other → the checkpoint's directory,
Run on this CPU, formats, 512 tokens), the Model page (the load), the Quantize page and its **Run sweep**, the
Overview (its button for a local model, then its background pieces until done; the sweep is reused from the
store), the Memory page, and the Sensitivity page: its full analysis of the page's default formats, then **Recommend
and measure** at the default budget.

Per step: wall seconds, the process's peak RSS (Linux VmHWM, reset before each step) and that peak minus the
RSS once the libraries were imported, the machine's free RAM before it, the load average, and every exception or
error the page showed. A watchdog stops the run (the JSON says why) before the machine's 24 GiB run out: when
free RAM falls under ``--min-free-gb`` or the process passes ``--max-rss-gb``. The JSON is rewritten after every
step. A smoke run: ``--config`` a small config.json (two layers), ``--checkpoint`` a new directory, ``--tokens 64``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GB = 1e9
POLL_S = 1.0


class Watchdog:
    """Samples free RAM and this process's RSS; past a limit it writes the result so far and ends the process,
    before the machine (shared, 24 GiB) runs out."""

    def __init__(self, result: dict, out: Path | None, min_free_bytes: int, max_rss_bytes: int) -> None:
        import psutil

        self.result, self.out = result, out
        self.min_free, self.max_rss = min_free_bytes, max_rss_bytes
        self.lowest_free = psutil.virtual_memory().available
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            free = psutil.virtual_memory().available
            rss = psutil.Process().memory_info().rss
            self.lowest_free = min(self.lowest_free, free)
            if free < self.min_free or rss > self.max_rss:
                self.result["aborted"] = (f"stopped by the watchdog: {free / GB:.2f} GB free (floor "
                                          f"{self.min_free / GB:.1f}), process RSS {rss / GB:.2f} GB (limit "
                                          f"{self.max_rss / GB:.1f})")
                self.result["lowest_free_ram_bytes"] = self.lowest_free
                write(self.result, self.out)
                print(self.result["aborted"], file=sys.stderr)
                os._exit(3)


def write(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=1, default=str)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.name}.partial-{threading.get_ident()}")  # the watchdog may write at the same time
    partial.write_text(text)
    partial.replace(out)


def ensure_checkpoint(config: str, directory: Path) -> dict:
    """Build the checkpoint with bench/random_checkpoint.py in a child process, unless ``directory`` has one."""
    if (directory / "config.json").is_file() and list(directory.glob("*.safetensors")):
        return {"built": False, "directory": str(directory)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "random_checkpoint.py"), config, str(directory)],
                          check=True, capture_output=True, text=True)
    return {"built": True, "directory": str(directory), "build_s": round(time.perf_counter() - started, 1),
            **json.loads(done.stdout.strip().splitlines()[-1])}


def page_messages(at) -> dict:
    """What a user would read as a failure: exceptions (tracebacks) and error lines."""
    return {"exceptions": [str(e.value)[:500] for e in at.exception], "errors": [e.value[:500] for e in at.error]}


def overview_jobs(job_class: type) -> list:
    """The Overview's jobs alive in this process (``type`` rather than ``isinstance``: the latter wakes lazy
    module proxies such as torch.distributed's, which warn)."""
    return [o for o in gc.get_objects() if type(o) is job_class]


def run(args: argparse.Namespace) -> dict:
    import psutil

    checkpoint_dir = Path(args.checkpoint).resolve()
    result: dict = {"benchmark": "dashboard on this CPU (Streamlit AppTest, one process)", "config": args.config,
                    "formats": args.formats, "tokens": args.tokens, "overview_speed": args.overview_speed,
                    "free_ram_before_bytes": psutil.virtual_memory().available,
                    "total_ram_bytes": psutil.virtual_memory().total,
                    "usable_cores": len(os.sched_getaffinity(0)), "load_average_before": os.getloadavg(),
                    "steps": []}
    out = Path(args.json).resolve() if args.json else None
    result["checkpoint"] = ensure_checkpoint(args.config, checkpoint_dir)
    write(result, out)

    # The libraries every page needs, imported before the baseline is read: what remains is the dashboard's.
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import streamlit  # noqa: F401
    import torch
    import transformers
    from streamlit.testing.v1 import AppTest

    import qlab.analyses.sweep  # noqa: F401
    import qlab.store  # noqa: F401
    from qlab import __version__
    from qlab.core.peak_rss import PeakRss
    from qlab.models import checkpoint, hardware, loading
    from qlab.store.overview import OverviewJob

    source = loading.resolve(str(checkpoint_dir))
    found = checkpoint.inspect_checkpoint(source)
    result["checkpoint"].update(parameters=found.params, dtype=str(found.dtype).removeprefix("torch."),
                                weight_bytes=found.bytes_in(found.dtype),
                                refusal_threshold_bytes=checkpoint.memory_needed(found, found.dtype))
    result["versions"] = {"qlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                          "streamlit": streamlit.__version__, "python": platform.python_version()}
    result["torch_threads"] = torch.get_num_threads()
    result["cpu"] = hardware.detect_this_machine().host.cpu_model
    baseline_rss = psutil.Process().memory_info().rss
    result["libraries_rss_bytes"] = baseline_rss
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=args.step_timeout_s)

    def step(name: str, action) -> dict:
        """Run one user action, timed and measured; the JSON is rewritten after it."""
        free_before = psutil.virtual_memory().available
        load_before = os.getloadavg()[0]
        stretch = PeakRss().start()
        started = time.perf_counter()
        try:
            detail = action() or {}
        except Exception as error:  # the page did not offer what a user would click next: said in the JSON
            detail = {"bench_error": f"{type(error).__name__}: {error}"[:500]}
        seconds = time.perf_counter() - started
        peak = stretch.start_bytes + stretch.stop()  # the kernel's peak: exact, however short
        record = {"step": name, "seconds": round(seconds, 2), "peak_rss_bytes": peak,
                  "peak_rss_over_libraries_bytes": peak - baseline_rss, "free_ram_before_bytes": free_before,
                  "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
                  **page_messages(at), **detail}
        record["ok"] = not (record["exceptions"] or record["errors"] or "bench_error" in record)
        result["steps"].append(record)
        result["lowest_free_ram_bytes"] = watchdog.lowest_free
        write(result, out)
        print(f"{name}: {seconds:.1f} s, peak RSS {peak / GB:.2f} GB, ok={record['ok']}", file=sys.stderr)
        return record

    def choose_model() -> dict:
        # A page that loads nothing, so that setting the sidebar costs no model load (the Overview, the landing
        # page, would start measuring the bundled default at once).
        at.switch_page("pages/history.py").run()
        at.selectbox(key="model_choice").select("Other: Hugging Face id or local directory").run()
        at.text_input(key="custom_model").input(str(checkpoint_dir)).run()
        at.selectbox(key="device").select("cpu").run()
        at.multiselect(key="formats").set_value(formats).run()
        at.number_input(key="tokens").set_value(args.tokens).run()
        return {"run_on_options": list(at.selectbox(key="device").options)}

    def model_page() -> dict:
        at.switch_page("pages/model.py").run()
        return {"metrics": {m.label: m.value for m in at.metric}}

    def quantize_page() -> dict:
        at.switch_page("pages/quantize.py").run()
        return {}

    def sweep() -> dict:
        at.button(key="run_sweep").click().run()
        table = at.dataframe[0].value if len(at.dataframe) else None
        columns = [c for c in ("label", "bits_per_weight", "kld_mean", "top1_agreement", "seconds")
                   if table is not None and c in table.columns]
        return {"rows": table[columns].to_dict("records") if table is not None else []}

    def overview() -> dict:
        if not args.overview_speed:  # the toggle shows only after the click below, which starts the job
            at.session_state["overview_measure"] = False
        at.switch_page("pages/overview.py").run()
        at.button(key="overview_open").click().run()
        pieces: dict[str, float] = {}
        states: dict = {}
        started = time.perf_counter()
        # The job the click started (the only one in this fresh process), polled here rather than by rerunning the
        # page, so that what is timed is the work.
        for job in overview_jobs(OverviewJob):
            while job.alive and time.perf_counter() - started < args.step_timeout_s:
                for piece, state in list(job.state.items()):
                    if state not in ("waiting", "running") and piece not in pieces:
                        pieces[piece] = round(time.perf_counter() - started, 2)
                time.sleep(POLL_S)
            states |= {piece: {"state": state, "note": job.notes.get(piece)} for piece, state in job.state.items()}
            for piece in job.state:
                pieces.setdefault(piece, round(time.perf_counter() - started, 2))
        at.run()  # the page as it looks once every piece is in
        headline = at.subheader[0].value if len(at.subheader) else None
        return {"pieces_done_after_s": pieces, "pieces": states, "verdict": headline,
                "job_still_running": any(job.alive for job in overview_jobs(OverviewJob))}

    def memory_page() -> dict:
        at.switch_page("pages/memory.py").run()
        return {"charts": len(at.get("plotly_chart"))}

    def sensitivity() -> dict:
        at.switch_page("pages/sensitivity.py").run()
        formats_analysed = at.multiselect(key="sensitivity_schemes").value
        at.button(key="run_sensitivity").click().run()
        table = at.dataframe[0].value if len(at.dataframe) else None
        return {"formats_analysed": formats_analysed, "rows": 0 if table is None else len(table),
                "blocks_measured": 0 if table is None else int(table["block_delta"].notna().sum())}

    def recommend() -> dict:
        at.button(key="run_mix").click().run()
        mixes = [frame.value for frame in at.dataframe if "bits_per_weight" in frame.value.columns]
        return {"budget_bits": at.slider(key="mix_budget_bits").value,
                "mixes": mixes[-1].to_dict("records") if mixes else []}

    with tempfile.TemporaryDirectory(prefix="qlab-dashboard-1b-") as folder, \
            Watchdog(result, out, int(args.min_free_gb * GB), int(args.max_rss_gb * GB)) as watchdog:
        os.environ["QLAB_DB"] = str(Path(folder) / "runs.sqlite")  # a fresh history: everything is measured
        for name, action in (("choose the model in the sidebar", choose_model), ("Model page", model_page),
                             ("Quantize page", quantize_page), ("Quantize: Run sweep", sweep),
                             ("Overview", overview), ("Memory page", memory_page),
                             ("Sensitivity: Analyse", sensitivity), ("Sensitivity: Recommend and measure", recommend)):
            if not step(name, action)["ok"] and not args.keep_going:
                break
        result["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in result["steps"])
        result["peak_rss_over_libraries_bytes"] = result["peak_rss_bytes"] - baseline_rss
        result["all_ok"] = all(s["ok"] for s in result["steps"]) and len(result["steps"]) == 8
        result["load_average_after"] = os.getloadavg()
        result["lowest_free_ram_bytes"] = watchdog.lowest_free
    write(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama-3.2-1b", help="catalog name or config.json path to build from")
    parser.add_argument("--checkpoint", default="/tmp/qlab-llama-3.2-1b-random",
                        help="the checkpoint's directory: reused when it holds one, else built there")
    parser.add_argument("--formats", default="fp16,int8,int4,nf4", help="the sidebar's formats")
    parser.add_argument("--tokens", type=int, default=512, help="the sidebar's evaluation tokens")
    parser.add_argument("--no-overview-speed", dest="overview_speed", action="store_false",
                        help="turn off the Overview's 'Also measure speed on this machine' (on by default, as in "
                             "the dashboard)")
    parser.add_argument("--min-free-gb", type=float, default=1.0, help="watchdog: stop when free RAM falls below")
    parser.add_argument("--max-rss-gb", type=float, default=20.0, help="watchdog: stop when this process passes")
    parser.add_argument("--step-timeout-s", type=float, default=3600.0, help="the longest one step may take")
    parser.add_argument("--keep-going", action="store_true", help="go on after a step that showed an error")
    parser.add_argument("--json", default=None, help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    result = run(args)
    return 0 if result.get("all_ok") else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The JSON is written: skip the interpreter's teardown, where the app's leftover daemon threads (AppTest,
    # the Overview's job) can abort the process and turn a finished run's exit status into a crash's.
    os._exit(code)
