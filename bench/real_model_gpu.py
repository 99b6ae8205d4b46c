"""Proof at size on one GPU: the calls the pages and the CLI make, on random-initialised 8B-class checkpoints.

    python bench/real_model_gpu.py --json OUT/real_model_gpu.json        # on the GPU machine (a few minutes)
    python bench/real_model_gpu.py --models /tmp/tiny.json --overview-model /tmp/tiny.json --device cpu \
        --sweep-tokens 64 --tokens 64 --json /tmp/real_model_smoke.json   # a tiny config: checks every step

Per model (a catalog name under ``assets/model_configs/`` or a config.json path), each step timed, with the peak
of ``torch.cuda.max_memory_allocated`` (reset before each step):

- ``build``: ``bench/random_checkpoint.py`` writes a bf16 checkpoint (all models at once, in parallel processes);
- ``sweep``: ``qlab.analyses.sweep_benchmark.bench_sweep`` (what ``python -m qlab bench sweep --device cuda``
  runs): load, baseline, one evaluation of the base model, then each scheme with its cost over that evaluation;
- ``load``: ``qlab.models.loading.load(dir, device)``, as the pages' model cache loads it;
- ``baseline``, ``quick sensitivity``, ``full sensitivity`` (``analyze``, blocks replayed end to end) and
  ``recommend`` (``choices_from`` + ``compare`` at ``--budget-bits``), as the Sensitivity page calls them;
- ``speed``: ``qlab.backends.speed.run_bench`` on the GPU, one row per backend with the kernel library named
  (bitsandbytes' NF4 only where its wheel is installed);
- ``overview`` (``--overview-model`` only): ``python -m qlab overview --device ... --json`` as a subprocess when
  the CLI has ``--device``, else the same job through its API with the model loaded on the GPU.

The JSON is rewritten after every step, and a step that fails records its error and the next one runs, so a
run cut short keeps what it measured. ``--budget-s`` skips (and says so) the steps that would start too late.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SPEED_BACKENDS = ("bf16", "torchao-int8wo", "torchao-int4wo", "torchao-float8wo", "bnb-nf4")
TOP = 5  # most sensitive layers kept per analysis


class Run:
    """The result file and the clock: ``step`` times one call, records its peak GPU memory, rewrites the JSON."""

    def __init__(self, out: Path, device: str, budget_s: float, header: dict, skip: set[str] = frozenset()) -> None:
        self.out, self.device, self.skip = out, device, skip
        self.deadline = time.monotonic() + budget_s
        self.result = {**header, "models": {}}

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(partial, self.out)

    def step(self, model: str, name: str, call, min_left_s: float = 0.0):
        """Run ``call()`` as step ``name`` of ``model``; its return value (a dict) is stored; None on failure."""
        steps = self.result["models"].setdefault(model, {"steps": {}})["steps"]
        if name in self.skip:  # measured in an earlier run (``--skip``): nothing recorded here
            return None
        left = self.deadline - time.monotonic()
        if left < min_left_s:
            steps[name] = {"skipped": f"{left:.0f} s of the time budget left, the step needs about {min_left_s:.0f}"}
            self.write()
            return None
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        record: dict = {}
        value = None
        try:
            value = call()
            if cuda:
                torch.cuda.synchronize()
        except Exception as error:  # one step's failure is a result; the next step still runs
            record["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            record["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
        record["seconds"] = round(time.perf_counter() - started, 2)
        if cuda:  # since this step began, unless the call resets the peak itself (bench_sweep does, per scheme)
            record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if isinstance(value, dict):
            record.update(value)
        steps[name] = record
        self.write()
        print(f"{model} {name}: {record['seconds']} s{' ' + record['error'] if 'error' in record else ''}",
              file=sys.stderr, flush=True)
        return None if "error" in record else value


def schemes_of(formats: str) -> list:
    """The schemes the CLI makes of ``--formats`` with its default scheme options (groups of 64, symmetric)."""
    from qlab.analyses.sweep import parse_formats
    from qlab.cli.common import add_scheme_arguments, scheme_from_args

    parser = argparse.ArgumentParser()
    add_scheme_arguments(parser, granularity="group")
    options = parser.parse_args([])
    return [scheme_from_args(options, fmt) for fmt in parse_formats(formats)]


def build_all(models: list[str], root: Path, device: str) -> dict[str, dict]:
    """Write every checkpoint at once (one ``random_checkpoint.py`` process each); what each build reports."""
    procs = {}
    for model in models:
        target = root / (Path(model).stem if model.endswith(".json") else model)  # "llama-3.1-8b" has no suffix
        procs[model] = (target, time.perf_counter(), subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "random_checkpoint.py"), model, str(target), "--device", device],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    built = {}
    for model, (target, started, proc) in procs.items():
        out, err = proc.communicate()
        seconds = round(time.perf_counter() - started, 1)
        if proc.returncode == 0:
            built[model] = {**json.loads(out.strip().splitlines()[-1]), "dir": str(target), "wall_seconds": seconds,
                            "built_in_parallel_with": len(procs)}
        else:
            built[model] = {"error": err.strip().splitlines()[-1][:400] if err.strip() else f"exit {proc.returncode}",
                            "wall_seconds": seconds}
    return built


def sweep_summary(result: dict) -> dict:
    keep = ("label", "bits_per_weight", "seconds", "cost_over_eval", "peak_memory_bytes", "kld_mean",
            "top1_agreement", "quantize_seconds")
    summary = {k: v for k, v in result.items() if k != "rows"}
    summary["rows"] = [{k: row.get(k) for k in keep if k in row} for row in result["rows"]]
    return summary


def analyses(run: Run, name: str, path: str, ns: argparse.Namespace) -> None:
    """Load once, then the Sensitivity page's calls and the GPU speed rows on that loaded model."""
    from qlab.analyses.mixed import Budget, choices_from, compare, recommendation_record
    from qlab.analyses.sensitivity import analyze
    from qlab.analyses.sensitivity_quick import quick_sensitivity
    from qlab.models.evaluate import EvalSpec, compute_baseline
    from qlab.models.loading import load

    state: dict = {}
    spec = EvalSpec(tokens=ns.tokens)
    schemes = schemes_of(ns.sensitivity_formats)

    def do_load() -> dict:
        state["loaded"] = loaded = load(path, device=ns.device)
        return {"device": loaded.device, "dtype": str(loaded.dtype).removeprefix("torch."),
                "parameters": loaded.num_params, "weight_bytes": loaded.weight_bytes}

    if run.step(name, "load", do_load) is None:
        return
    loaded = state["loaded"]

    def do_baseline() -> dict:
        state["baseline"] = compute_baseline(loaded, spec)
        return {"tokens": state["baseline"].tokens, "reference_dtype": state["baseline"].reference_dtype}

    run.step(name, "baseline", do_baseline)

    def do_quick() -> dict:
        result = quick_sensitivity(loaded, schemes, spec, baseline=state.get("baseline"))
        return {"formats": [s.label for s in schemes], "records": len(result.records), "tokens": result.tokens,
                "parts_seconds": result.seconds,
                "top": [{k: r.get(k) for k in ("layer", "scheme", "score")} for r in result.top(TOP)]}

    run.step(name, "quick sensitivity", do_quick, min_left_s=10)

    def do_full() -> dict:
        state["report"] = report = analyze(loaded, schemes, state["baseline"], blocks=True, unit="block")
        rows = sorted(report.rows(), key=lambda r: r.get("estimated_delta") or 0.0, reverse=True)
        return {"formats": [s.label for s in schemes], "tokens": report.tokens, "linears": len(report.linears),
                "blocks": len(report.blocks), "parts_seconds": report.seconds,
                "top": [{k: r.get(k) for k in ("layer", "label", "estimated_delta")} for r in rows[:TOP]]}

    run.step(name, "full sensitivity", do_full, min_left_s=30)

    def do_recommend() -> dict:
        report = state["report"]
        choices = choices_from(loaded, report)
        mixes, rows = compare(loaded, choices, [Budget(bits_per_weight=ns.budget_bits)], state["baseline"])
        record = recommendation_record(loaded, report, choices, mixes[0], rows)
        counts: dict[str, int] = {}
        for fmt in record["assignment"].values():
            counts[fmt] = counts.get(fmt, 0) + 1
        return {"budget_bits": ns.budget_bits, "bits_per_weight": record["bits_per_weight"],
                "size_bytes": record["size_bytes"], "layers_per_format": counts,
                "measured": [{k: r.get(k) for k in ("label", "bits_per_weight", "size_bytes", report.metric)}
                             for r in rows]}

    if "report" in state:
        run.step(name, "recommend", do_recommend, min_left_s=10)

    def do_speed() -> dict:
        from qlab import backends
        from qlab.backends import speed

        spec_speed = speed.SpeedSpec(prompt_tokens=128, new_tokens=ns.speed_new_tokens, repetitions=3)
        chosen = [backends.get_backend(slug) for slug in SPEED_BACKENDS]
        rows = []
        for row in speed.run_bench(loaded, chosen, spec_speed, "cuda" if ns.device.startswith("cuda") else "cpu",
                                   accuracy_tokens=None):
            backend = backends.get_backend(row["backend"])
            rows.append({"backend": row["backend"], "format": row.get("format"), "kernel": backend.title,
                         "library": backend.library, "decode_tokens_per_s": row.get("decode_tokens_per_s"),
                         "prefill_ms": row.get("prefill_ms"), "apply_seconds": row.get("apply_seconds"),
                         "peak_memory_bytes": row.get("peak_memory_bytes"),
                         "error": row.get("error") or (row.get("reason") if row.get("available") is False
                                                       else None)})
        return {"path": "HF generate, eager (the Speed page's run_bench)", "new_tokens": ns.speed_new_tokens,
                "rows": rows}

    run.step(name, "speed", do_speed, min_left_s=30)
    state.clear()  # the loaded model goes with this frame; free() then returns its GPU memory


def overview(run: Run, name: str, path: str, ns: argparse.Namespace, scratch: Path) -> None:
    """The whole Overview on the GPU: the CLI when it takes ``--device``, else its job through the API."""
    has_device = "--device" in subprocess.run([sys.executable, "-m", "qlab", "overview", "--help"], cwd=REPO,
                                              capture_output=True, text=True).stdout
    out = scratch / "overview.json"
    command = [sys.executable, "-m", "qlab", "overview", "--model", path, "--hardware", ns.hardware, "--formats",
               ns.formats, "--tokens", str(ns.tokens), "--db", str(scratch / "runs.sqlite"), "--quiet",
               "--json", str(out)]

    def by_cli() -> dict:
        done = subprocess.run([*command, "--device", ns.device], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-400:]}")
        return summary(json.loads(out.read_text()), " ".join(command + ["--device", ns.device]))

    def by_api() -> dict:
        from qlab.analyses import overview as pieces_api
        from qlab.analyses.sweep import check_schemes
        from qlab.analyses.verdict import loss_measure
        from qlab.cli.overview import payload
        from qlab.models.evaluate import EvalSpec
        from qlab.models.loading import load
        from qlab.store import Store
        from qlab.store import overview as recorded

        schemes = tuple(schemes_of(ns.formats))
        request = pieces_api.OverviewRequest(schemes, ns.hardware, EvalSpec(tokens=ns.tokens))
        loaded = load(path, device=ns.device)
        check_schemes(loaded, list(schemes))
        store = Store(scratch / "runs-api.sqlite")
        pieces = recorded.restore(store, loaded, request)
        recorded.fill_arithmetic(loaded, request, pieces)
        todo = recorded.steps(loaded, request, pieces, measure_here=True)
        job = recorded.OverviewJob(loaded, request, pieces, todo, store)
        job.run()
        answer = pieces_api.decide(pieces, request, loaded.kind, loss_measure(loaded.kind).default_bound)
        record = payload(loaded, request, pieces, answer, job)
        del loaded, job
        free()
        return summary(record, "API: load(dir, device) + qlab.store.overview.OverviewJob (the CLI has no --device)")

    def summary(record: dict, how: str) -> dict:
        return {"how": how, "verdict": record["verdict"].get("headline"), "steps": record["steps"],
                "pieces_skipped": record.get("skipped"), "formats": record["formats"], "tokens": record["tokens"],
                "measured_speed": [{k: r.get(k) for k in ("label", "backend", "speed", "speed_unit", "reason")}
                                   for r in record["measured"]],
                "goal_seconds": 180.0}

    run.step(name, "overview", by_cli if has_device else by_api, min_left_s=60)
    steps = run.result["models"][name]["steps"]
    if "seconds" in steps.get("overview", {}):
        steps["overview"]["goal_met"] = "error" not in steps["overview"] and steps["overview"]["seconds"] <= 180.0
        run.write()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-3.1-8b,qwen2.5-7b",
                        help="catalog names or config.json paths, comma-separated")
    parser.add_argument("--overview-model", default="llama-3.1-8b", help="the model the whole Overview runs on")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formats", default="bf16,fp8_e4m3,int8,int4,nf4", help="the sweep's and Overview's")
    parser.add_argument("--sensitivity-formats", default="int8,int4", help="sensitivity and recommend (CLI default)")
    parser.add_argument("--sweep-tokens", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512, help="sensitivity, recommend, Overview (pages' default)")
    parser.add_argument("--budget-bits", type=float, default=4.5)
    parser.add_argument("--hardware", default="h200-sxm-141gb", help="the Overview's target")
    parser.add_argument("--speed-new-tokens", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="skip steps that would start after this")
    parser.add_argument("--skip", default="", help="steps not to run this time, e.g. sweep,speed")
    parser.add_argument("--json", required=True)
    ns = parser.parse_args(argv)
    from qlab.analyses.sweep_benchmark import bench_sweep

    scratch = Path(ns.dir or tempfile.mkdtemp(prefix="real-model-gpu-"))
    models = [m.strip() for m in ns.models.split(",") if m.strip()]
    gpu = torch.cuda.get_device_name(0) if ns.device.startswith("cuda") else None
    versions = {}
    for package in ("torch", "transformers", "accelerate", "torchao"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    run = Run(Path(ns.json), ns.device, ns.budget_s, {
        "what": "Random-initialised bf16 checkpoints at real size: the calls the pages and the CLI make, each "
                "timed with its peak GPU memory (torch.cuda.max_memory_allocated, reset per step). Random "
                "weights: accuracy numbers say nothing about the real models; time and memory do not depend "
                "on the values.",
        "command": " ".join(["python", "bench/real_model_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "gpu": gpu, "software": versions, "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: v for k, v in vars(ns).items() if k not in ("json", "dir")}},
        skip={s.strip() for s in ns.skip.split(",") if s.strip()})
    started = time.perf_counter()
    built = build_all(models, scratch, ns.device)
    for model in models:
        run.result["models"].setdefault(model, {"steps": {}})["steps"]["build"] = built[model]
    run.write()
    for model in models:
        if "error" in built[model]:
            continue
        path = built[model]["dir"]
        run.step(model, "sweep", lambda path=path: sweep_summary(
            bench_sweep(path, schemes_of(ns.formats), ns.sweep_tokens, device=ns.device)), min_left_s=30)
        free()
        if model == ns.overview_model:  # the headline goal first, while the time budget is whole
            overview(run, model, path, ns, scratch)
        analyses(run, model, path, ns)
        free()
    run.result["wall_seconds"] = round(time.perf_counter() - started, 1)
    run.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
