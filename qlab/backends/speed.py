"""Measured speed: prefill latency, decode throughput, sentences per second, and this machine's read bandwidth.

Every measurement warms up first, repeats, and reports the median with its spread (min and max), the peak
memory above where it started and the thread count, because one timing on a shared 2-core machine means
little; under a ``TimeCap`` it repeats until its fastest runs agree, or its share of the cap is spent. Models are
called the Hugging Face way (``model(ids, past_key_values=..., use_cache=True)``), so torch backends and the
llama.cpp / ONNX Runtime wrappers in ``qlab.backends`` are timed by the same loop.
``cancel()`` returning True stops at the next step with ``qlab.core.errors.Cancelled``.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from qlab.analyses import roofline
from qlab.analyses.verdict import accuracy_loss
from qlab.core.errors import Cancelled, QlabError
from qlab.core.peak_rss import PeakRss
from qlab.core.quant import QuantScheme
from qlab.models import architectures, hardware
from qlab.models.loading import LoadedModel

CancelCheck = Callable[[], bool]
BANDWIDTH_TEST_BYTES = 256 * 2**20
MAX_PROMPT_TOKENS = 4096
MAX_NEW_TOKENS = 2048
MAX_TIMED_RUNS = 200  # a capped loop on a model this fast has long made its point
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"  # results committed with the repository


@dataclass(frozen=True)
class SpeedSpec:
    """What to time: prompt and generated lengths, batch, repetitions (after ``warmup`` untimed runs).

    Embedding models encode ``sentences`` texts of the evaluation text per repetition.
    """

    prompt_tokens: int = 128
    new_tokens: int = 32
    batch: int = 1
    repetitions: int = 3
    warmup: int = 1
    sentences: int = 32

    def __post_init__(self) -> None:
        checks = (("prompt_tokens", 1, MAX_PROMPT_TOKENS), ("new_tokens", 1, MAX_NEW_TOKENS), ("batch", 1, 256),
                  ("repetitions", 1, 50), ("warmup", 0, 10), ("sentences", 1, 1024))
        for name, low, high in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise QlabError(f"{name} must be an integer from {low} to {high}, got {value!r}.")


@dataclass(frozen=True)
class Timing:
    """Median, min and max of repeated measurements of one quantity."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Timing:
        return cls(statistics.median(values), min(values), max(values))

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how much to trust the median on a busy machine."""
        return 100.0 * (self.high - self.low) / self.median if self.median else 0.0


@dataclass(frozen=True)
class SpeedResult:
    """One model's measured speed. LMs fill prefill and decode; embedding models fill sentences per second.

    ``repetitions`` counts the timed runs behind the numbers; ``agreed`` says whether a capped loop's runs agreed
    before its time ran out (None: a fixed number of repetitions).
    """

    device: str
    threads: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    repetitions: int
    peak_memory_bytes: int
    prefill_ms: Timing | None = None
    decode_tokens_per_s: Timing | None = None
    sentences_per_s: Timing | None = None
    agreed: bool | None = None

    def to_record(self) -> dict:
        """Flat JSON fields: each timing as ``x`` (median), ``x_min``, ``x_max`` and ``x_spread_pct``; ``agreed``
        only from a capped loop."""
        record = {k: v for k, v in asdict(self).items() if not isinstance(getattr(self, k), Timing | None)}
        for name in ("prefill_ms", "decode_tokens_per_s", "sentences_per_s"):
            timing = getattr(self, name)
            record[name] = None if timing is None else round(timing.median, 4)
            record[f"{name}_min"] = None if timing is None else round(timing.low, 4)
            record[f"{name}_max"] = None if timing is None else round(timing.high, 4)
            record[f"{name}_spread_pct"] = None if timing is None else round(timing.spread_pct, 2)
        return record


# RSS sampling period where the kernel's peak cannot be reset: each sample takes the GIL and reads /proc, so a 2 ms
# period stole time from the very runs being timed; 20 ms still catches an allocation that lasts a step.
SAMPLE_EVERY_S = 0.02


class PeakMemory:
    """Peak memory while the block runs, above its level at entry: CUDA allocator stats, or the process's peak
    resident set (``qlab.core.peak_rss``: exact on Linux, else sampled every ``SAMPLE_EVERY_S``)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._rss = PeakRss().start()
        if not self._rss.exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._rss.observe()

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._start)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = self._rss.stop()


def _check(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled; finished measurements are kept.")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompt_ids(loaded: LoadedModel, tokens: int, batch: int = 1) -> torch.Tensor:
    """The same prompt for every backend: the first ``tokens`` tokens of the evaluation text, ``batch`` times."""
    from qlab.models.evaluate import default_text

    ids = loaded.tokenizer(default_text()[: tokens * 16], return_tensors="pt", add_special_tokens=False,
                           verbose=False).input_ids[0][:tokens]
    if ids.numel() < tokens:
        raise QlabError(f"the evaluation text yields only {ids.numel()} tokens; ask for fewer prompt tokens.")
    return ids.repeat(batch, 1)


@dataclass(frozen=True)
class Until:
    """When a timed loop stops past ``SpeedSpec.repetitions`` runs: once its fastest that many runs (at least two)
    agree, their spread under ``spread_pct``, or once ``clock()`` passes ``deadline``.

    The fastest, because on a shared machine other work only ever slows a run down: the least disturbed runs
    agree first, and their median is the format's own speed rather than the neighbours' load."""

    deadline: float
    spread_pct: float
    clock: Callable[[], float] = time.perf_counter


class TimeCap:
    """``seconds`` on ``clock``, from now, shared by timed loops that run one after another (one per backend):
    each loop gets an equal share of what is left, so a loop that agrees early leaves its time to the next ones.
    The ``SpeedSpec``'s warm-up and repetitions always run; the cap bounds the repeating beyond them."""

    def __init__(self, seconds: float, spread_pct: float = 10.0, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
                math.isfinite(seconds) and seconds > 0):
            raise QlabError(f"the speed measurement's time cap must be a positive number of seconds, got {seconds!r}.")
        self.seconds, self.spread_pct, self.clock = float(seconds), spread_pct, clock
        self.deadline = clock() + self.seconds

    def share(self, loops_left: int) -> Until:
        """The next loop's stopping rule, when it and ``loops_left - 1`` more loops share what is left."""
        now = self.clock()
        return Until(now + max(0.0, self.deadline - now) / max(1, loops_left), self.spread_pct, self.clock)


def _repeat(run_once: Callable[[], tuple[float, ...]], spec: SpeedSpec, device: str,
            cancel: CancelCheck | None, progress: Callable[[float, str], None] | None,
            until: Until | None = None, speed: Callable[[tuple[float, ...]], float] | None = None
            ) -> tuple[list[tuple], int, bool | None]:
    """Call ``run_once`` ``spec.warmup`` untimed then ``spec.repetitions`` timed times, under inference mode; with
    ``until``, go on until the fastest runs agree on ``speed(measurement)`` or the deadline passes.

    Returns the measurements behind the result (the agreeing runs, or every timed run of a loop that never
    agreed), the peak memory above the start, and whether they agreed (None without ``until``). ``run_once``
    times itself (synchronised).
    """
    timed: list[tuple] = []
    window = max(2, spec.repetitions)
    runs = spec.warmup + spec.repetitions
    agreed = None if until is None else False
    with PeakMemory(device) as memory, torch.inference_mode():
        for run in range(spec.warmup + MAX_TIMED_RUNS):
            _check(cancel)
            measured = run_once()
            if run >= spec.warmup:
                timed.append(measured)
            if progress:
                progress(min(1.0, (run + 1) / runs), f"run {run + 1}/{runs}" if run < runs else
                         f"run {run + 1}, repeating until the fastest {window} agree within {until.spread_pct:g} %")
            if len(timed) < spec.repetitions:
                continue
            if until is None:
                break
            fastest = sorted(timed, key=speed, reverse=True)[:window]
            if len(fastest) == window and Timing.of([speed(m) for m in fastest]).spread_pct < until.spread_pct:
                timed, agreed = fastest, True
                break
            if until.clock() >= until.deadline:
                break
    return timed, memory.peak_bytes, agreed


def measure_lm(model: torch.nn.Module, ids: torch.Tensor, spec: SpeedSpec, device: str = "cpu",
               cancel: CancelCheck | None = None,
               progress: Callable[[float, str], None] | None = None, until: Until | None = None) -> SpeedResult:
    """Prefill ``ids`` (batch x prompt), then greedily decode ``spec.new_tokens`` steps; time both, repeatedly
    (with ``until``: until the decode rates agree, timed on its clock)."""
    ids = ids.to(device)
    clock = until.clock if until is not None else time.perf_counter

    def prefill_and_decode() -> tuple[float, float]:
        _sync(device)
        started = clock()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(dim=-1)
        _sync(device)
        prefilled = clock()
        past = out.past_key_values
        for _ in range(spec.new_tokens):
            _check(cancel)
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(dim=-1)
        _sync(device)
        finished = clock()
        return 1000.0 * (prefilled - started), ids.shape[0] * spec.new_tokens / (finished - prefilled)

    timed, peak_bytes, agreed = _repeat(prefill_and_decode, spec, device, cancel, progress, until,
                                        speed=lambda measured: measured[1])
    prefill_ms, decode_rates = (list(values) for values in zip(*timed, strict=True))
    return SpeedResult(device, torch.get_num_threads(), ids.shape[0], ids.shape[1], spec.new_tokens,
                       len(timed), peak_bytes, prefill_ms=Timing.of(prefill_ms),
                       decode_tokens_per_s=Timing.of(decode_rates), agreed=agreed)


def embedding_batch(loaded: LoadedModel, sentences: int) -> dict[str, torch.Tensor]:
    """``sentences`` paragraphs of the evaluation text, tokenized as the embedding evaluation does."""
    from qlab.models.evaluate import EMBED_MAX_TOKENS, _paragraphs, default_text

    texts = _paragraphs(default_text())[:sentences]
    return dict(loaded.tokenizer(texts, padding=True, truncation=True, max_length=EMBED_MAX_TOKENS,
                                 return_tensors="pt"))


def measure_embedding(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: SpeedSpec,
                      device: str = "cpu", cancel: CancelCheck | None = None,
                      progress: Callable[[float, str], None] | None = None, until: Until | None = None
                      ) -> SpeedResult:
    """Encode the batch repeatedly: sentences per second, and the batch's latency as ``prefill_ms`` (with
    ``until``: until the rates agree, timed on its clock)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    n = batch["input_ids"].shape[0]
    clock = until.clock if until is not None else time.perf_counter

    def encode() -> tuple[float]:
        _sync(device)
        started = clock()
        model(**batch)
        _sync(device)
        return (clock() - started,)

    timed, peak_bytes, agreed = _repeat(encode, spec, device, cancel, progress, until,
                                        speed=lambda measured: n / measured[0])
    latencies = [seconds for (seconds,) in timed]
    return SpeedResult(device, torch.get_num_threads(), n, batch["input_ids"].shape[1], 0, len(timed),
                       peak_bytes, prefill_ms=Timing.of([1000.0 * s for s in latencies]),
                       sentences_per_s=Timing.of([n / s for s in latencies]), agreed=agreed)


@dataclass(frozen=True)
class Bandwidth:
    """Measured memory read bandwidth: summing a tensor far larger than the caches, several times."""

    bytes_per_s: Timing
    test_bytes: int
    threads: int
    device: str

    def to_record(self) -> dict:
        return {"bandwidth_bytes_per_s": round(self.bytes_per_s.median),
                "bandwidth_bytes_per_s_max": round(self.bytes_per_s.high),
                "bandwidth_spread_pct": round(self.bytes_per_s.spread_pct, 2),
                "bandwidth_test_bytes": self.test_bytes, "threads": self.threads, "device": self.device}


@functools.cache
def this_machine_bandwidth() -> float:
    """Read bandwidth of this machine in bytes/s, measured once per process (about a second)."""
    return measure_bandwidth().bytes_per_s.median


def measure_bandwidth(test_bytes: int = BANDWIDTH_TEST_BYTES, repetitions: int = 5, device: str = "cpu",
                      cancel: CancelCheck | None = None) -> Bandwidth:
    """Read bandwidth of this machine (what bounds decode): a reduction streams every byte once per pass."""
    data = torch.ones(test_bytes // 4, dtype=torch.float32, device=device)
    data.sum()  # page the buffer in and warm the kernel
    rates = []
    for _ in range(repetitions):
        _check(cancel)
        _sync(device)
        started = time.perf_counter()
        data.sum()
        _sync(device)
        rates.append(data.numel() * 4 / (time.perf_counter() - started))
    return Bandwidth(Timing.of(rates), data.numel() * 4, torch.get_num_threads(), device)


def run_bench(loaded: LoadedModel, backends: list, spec: SpeedSpec, device: str = "cpu",
              accuracy_tokens: int | None = 512, bandwidth: Bandwidth | None = None,
              progress: Callable[[float, str], None] | None = None,
              cancel: CancelCheck | None = None, cap: TimeCap | None = None):
    """Build each backend's model, time it, score it against FP32 and against its simulated twin; yield rows.

    Every backend gets the same prompt, token counts and evaluation tokens; under ``cap`` each backend's timing
    repeats until its runs agree or its share of the cap is spent. A backend that is unavailable
    yields a row with ``available=False`` and the reason; one that fails yields its ``error``; neither stops
    the run. Rows hold the fields listed in ``BENCH_FIELDS`` (see ``bench_row``).
    """
    import gc

    from qlab.backends import evaluate_model
    from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate

    baseline = compute_baseline(loaded, EvalSpec(tokens=accuracy_tokens), cancel=cancel) if accuracy_tokens else None
    arch = architectures.from_config(loaded.model.config.to_dict(), slug=loaded.name)
    target = hardware.detect_this_machine()
    inputs = (prompt_ids(loaded, spec.prompt_tokens, spec.batch) if loaded.kind == "causal-lm"
              else embedding_batch(loaded, spec.sentences))
    for index, backend in enumerate(backends):
        _check(cancel)
        row = bench_row(loaded, backend, device, spec)
        if progress:
            progress(index / len(backends), f"{backend.slug}: building")
        ok, reason = backend.available(device)
        if ok and loaded.kind not in backend.kinds:
            ok, reason = False, f"{backend.slug} handles {' and '.join(backend.kinds)} models only."
        if not ok:
            row.update(available=False, reason=reason)
            yield row
            continue
        gc.collect()
        try:
            started = time.perf_counter()
            model = backend.apply(loaded, device)
            row["apply_seconds"] = round(time.perf_counter() - started, 3)
            until = cap.share(len(backends) - index) if cap is not None else None
            timing = (lambda fraction, message, index=index, slug=backend.slug: progress(
                (index + 0.5 * fraction) / len(backends), f"{slug}: {message}")) if progress else None
            measure = measure_lm if loaded.kind == "causal-lm" else measure_embedding
            result = measure(model, inputs, spec, device, cancel, timing, until)
            row.update(result.to_record())
            row.update(_sizes(loaded, backend, model))
            if baseline is not None:
                if progress:
                    progress((index + 0.5) / len(backends), f"{backend.slug}: accuracy")
                metrics = evaluate_model(model, baseline, cancel=cancel)
                twin = evaluate(backend.twin_model(loaded, model), baseline, cancel=cancel)
                row.update(metrics)
                row.update({f"twin_{k}": v for k, v in twin.items()})
                row["agrees_with_twin"] = backend.tolerance.agrees(metrics, twin)
            if loaded.kind == "causal-lm" and bandwidth is not None:
                predicted = twin_prediction(arch, backend, loaded.model, target, spec, bandwidth.bytes_per_s.median,
                                            dense_format="bf16" if backend.compute_dtype == "bf16" else "fp32")
                bound = predicted.decode_bound_tokens_per_s
                if hasattr(model, "file_bytes"):
                    # llama.cpp streams its file's tensors as stored (its quantized tied head too) and keeps an
                    # F16 KV cache, so the file, not the twin's scheme, sets the bytes per token.
                    kv = roofline.kv_bytes_read(arch, spec.prompt_tokens + spec.new_tokens, spec.batch, "fp16")
                    bound = spec.batch * bandwidth.bytes_per_s.median / (model.file_bytes + kv)
                row["roofline_decode_tokens_per_s"] = round(bound, 3)
                row["roofline_fraction"] = round(row["decode_tokens_per_s"] / bound, 4)
                row["native"] = predicted.native
            del model
        except Cancelled:
            raise
        except Exception as error:  # one backend's failure is a result to show, not a reason to stop the run
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        gc.collect()
        yield row
    if progress:
        progress(1.0, "done")


def twin_prediction(arch: architectures.Architecture, backend, model: torch.nn.Module, target: hardware.Hardware,
                    spec: SpeedSpec, bandwidth_bytes_per_s: float | None = None,
                    dense_format: str | None = None) -> roofline.Prediction:
    """The roofline of a backend's twin scheme (a per-layer plan's first scheme) on ``target``, for the prompt,
    decode length and batch of ``spec``; ``bandwidth_bytes_per_s`` overrides the catalog's (a measured one)."""
    plan = backend.twin(model)
    scheme = plan if isinstance(plan, QuantScheme) else next(iter(plan.values()))
    return roofline.predict(
        arch, scheme, target, compute_dtype=None if backend.compute_dtype == "activation" else backend.compute_dtype,
        dense_format=dense_format, context_tokens=spec.prompt_tokens + spec.new_tokens,
        prompt_tokens=spec.prompt_tokens, batch=spec.batch, bandwidth_bytes_per_s=bandwidth_bytes_per_s)


def roofline_predictions(loaded: LoadedModel, rows: list[dict], target: hardware.Hardware, spec: SpeedSpec,
                         bandwidth_bytes_per_s: float | None = None) -> list[roofline.Prediction]:
    """The twin's roofline on ``target`` for each bench row of a causal LM, in the rows' order (the Speed page's
    hollow points)."""
    from qlab.backends import get_backend

    arch = architectures.from_config(loaded.model.config.to_dict(), slug=loaded.name)
    return [twin_prediction(arch, get_backend(row["backend"]), loaded.model, target, spec, bandwidth_bytes_per_s)
            for row in rows]


def gpu_target(gpu_name: str, fallback: hardware.Hardware) -> hardware.Hardware:
    """The catalog entry of the GPU a benchmark ran on, by the name torch gave it (an H100, SXM or PCIe), else
    ``fallback``."""
    if "H200" in gpu_name:
        return hardware.get("h200-sxm-141gb")
    if "H100" not in gpu_name:
        return fallback
    return hardware.get("h100-pcie-80gb" if "PCIe" in gpu_name else "h100-sxm-80gb")


def gpu_roofline(rows: list[dict], target: hardware.Hardware) -> list[dict]:
    """The bandwidth bound of each weight-only format the GPU benchmark measured (``bench/gpu_speed.py``'s rows,
    one model) on ``target`` at the context the rows used: ``{"format_slug", "decode_tokens_per_s"}`` per format,
    none when ``target`` is not a GPU. A model outside the catalog (``qlab bench --device cuda --model DIR``, the
    user's own) is bounded by the bytes its rows say a decode step read."""
    from qlab.backends.gpu_recipe import FORMATS

    if target.kind != "gpu" or not target.bandwidth_bytes_per_s or not rows or any(
            row.get(key) is None for row in rows for key in ("model", "prompt_tokens", "new_tokens")):
        return []
    measured = {row["format_slug"] for row in rows}
    try:
        arch = architectures.get(rows[0]["model"])
    except QlabError:
        step_bytes = {row["format_slug"]: row["weight_bytes_per_token"] + (row.get("kv_cache_bytes") or 0)
                      for row in rows if row.get("weight_bytes_per_token")}
        return [{"format_slug": fmt, "decode_tokens_per_s": target.bandwidth_bytes_per_s / step_bytes[fmt]}
                for fmt, gpu_format in FORMATS.items() if gpu_format.bytes_bound and fmt in step_bytes]
    context = int(rows[0]["prompt_tokens"] + max(row["new_tokens"] for row in rows))
    return [{"format_slug": fmt, "decode_tokens_per_s":
             roofline.predict(arch, gpu_format.scheme, target, context_tokens=context).decode_bound_tokens_per_s}
            for fmt, gpu_format in FORMATS.items() if gpu_format.bytes_bound and fmt in measured]


def bench_results(name: str) -> list[dict]:
    """The rows of a benchmark result committed with the repository, ``bench/results/<name>.json`` (a list of
    rows, or an object holding them under ``rows``); none when the file is not there."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


class _GpuRow(BaseModel):
    """A measured (format, code path) step of ``bench/gpu_speed.py``: the fields the Speed page groups by; the rest
    pass through as they are."""

    model_config = ConfigDict(extra="allow")
    format_slug: str
    path: str
    model: str | None = None
    gpu: str | None = None
    decode_tokens_per_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None


class _GpuRun(BaseModel):
    model_config = ConfigDict(extra="allow")
    rows: list[_GpuRow]
    date: str | None = None
    label: str | None = None


class _GpuRunsFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    runs: list[_GpuRun]
    date: str | None = None


# A results file: the rows a run of the benchmark writes, a committed run ({"rows": ...}), or several ({"runs": ...}).
_GPU_RESULTS = TypeAdapter(list[_GpuRow] | _GpuRunsFile | _GpuRun)


def _result_files(pattern: str, adapter: TypeAdapter, order: Callable[[Path], Any] | None = None
                  ) -> tuple[list[tuple[Path, Any, str]], list[str]]:
    """The files of ``bench/results`` matching ``pattern`` (in ``order``, else by name) that ``adapter`` accepts, each
    as (path, validated data, the day it was written: rows the benchmark wrote itself carry no date), and the names
    of the others with why."""
    files, unreadable = [], []
    for path in sorted(RESULTS_DIR.glob(pattern), key=order):
        try:
            data = adapter.validate_json(path.read_bytes())
        except (OSError, ValidationError) as error:
            unreadable.append(f"{path.name} ({'not valid' if isinstance(error, ValidationError) else 'unreadable'})")
            continue
        files.append((path, data, time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))))
    return files, unreadable


def gpu_speed_runs() -> tuple[list[dict], list[str]]:
    """Every GPU decode run in ``bench/results/gpu_speed*.json`` (committed, or written there by ``qlab bench
    --device cuda --json``): ``gpu_speed.json``'s first, each ``{"label", "gpu", "date", "rows"}``, one per GPU
    and date of a file, so layouts measured one after the other on one machine stay together. The second list
    names the files that could not be read."""
    runs: dict[tuple[str, str], dict] = {}
    files, unreadable = _result_files("gpu_speed*.json", _GPU_RESULTS,
                                      order=lambda p: (p.name != "gpu_speed.json", p.name))
    for path, data, written in files:
        parts = ([_GpuRun(rows=data)] if isinstance(data, list) else
                 data.runs if isinstance(data, _GpuRunsFile) else [data])
        for part in parts:
            date = part.date or getattr(data, "date", None) or written
            # A step that failed before it reached the GPU names none; it belongs to its run's GPU.
            gpu = next((row.gpu for row in part.rows if row.gpu), "GPU")
            # Runs repeated on one machine and day keep their own label; layouts measured one after the other
            # share a run (their paths tell them apart).
            label = ", ".join(filter(None, (gpu, date, part.label)))
            run = runs.setdefault((path.name, label), {"label": label, "gpu": gpu, "date": date, "rows": []})
            run["rows"].extend(row.model_dump() for row in part.rows)
    labels = [run["label"] for run in runs.values()]
    for (name, _), run in runs.items():
        if labels.count(run["label"]) > 1:
            run["label"] += f" ({Path(name).stem})"
    return list(runs.values()), unreadable


class _CeilingRow(BaseModel):
    """One format of ``bench/layer_ceiling.py``: its weight matmuls of a decode step, each timed alone."""

    model_config = ConfigDict(extra="allow")
    format_slug: str
    kernel: str | None = None
    step_matmul_ms: float | None = None
    step_read_gbps: float | None = None
    step_matmul_speedup_over_bf16: float | None = None
    error: str | None = None


class _CeilingRun(BaseModel):
    model_config = ConfigDict(extra="allow")
    gpu: str
    model_config_name: str = Field(alias="model_config")
    layout: str | None = None
    date: str | None = None
    label: str | None = None
    rows: list[_CeilingRow]


class _CeilingRunsFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    runs: list[_CeilingRun]


# A ceilings file: the program's output as it wrote it, or several runs of it kept together.
_CEILING_RESULTS = TypeAdapter(_CeilingRunsFile | _CeilingRun)


def layer_ceilings() -> tuple[list[dict], list[str]]:
    """Every per-layer ceiling in ``bench/results/layer_ceiling*.json`` (``bench/layer_ceiling.py``'s output, alone
    or as ``{"runs": [...]}``): ``{"gpu", "model", "layout", "date", "label", "rows"}`` per run, the rows as
    stored. The second list names the files that could not be read."""
    ceilings = []
    files, unreadable = _result_files("layer_ceiling*.json", _CEILING_RESULTS)
    for _, data, written in files:
        for run in data.runs if isinstance(data, _CeilingRunsFile) else [data]:
            layouts = {row.model_dump().get("layout") for row in run.rows} - {None}
            ceilings.append({"gpu": run.gpu, "model": run.model_config_name,
                             "layout": run.layout or (layouts.pop() if len(layouts) == 1 else None),
                             "date": run.date or written, "label": run.label,
                             "rows": [row.model_dump() for row in run.rows]})
    return ceilings, unreadable


def ceilings_of(ceilings: list[dict], gpu: str, model: str) -> dict[str, list[dict]]:
    """The ceilings measured on ``gpu`` for ``model``, by layout ("fused", "separate"), in the order stored."""
    by_layout: dict[str, list[dict]] = {}
    for ceiling in ceilings:
        if ceiling["gpu"] == gpu and ceiling["model"] == model and ceiling["layout"]:
            by_layout.setdefault(ceiling["layout"], []).append(ceiling)
    return by_layout


def latest_ceiling(repeats: list[dict]) -> dict:
    """Repeated ceilings of one GPU, model and layout as one: each format's latest measured row (a later run may
    have measured only some formats), in the order the formats first appear; the latest run's date."""
    rows: dict[str, dict] = {}
    for ceiling in repeats:
        for row in ceiling["rows"]:
            if row.get("step_matmul_ms") is not None or row["format_slug"] not in rows:
                rows[row["format_slug"]] = row
    return {**repeats[-1], "rows": list(rows.values())}


def ceiling_spread_pct(repeats: list[dict]) -> dict[str, float]:
    """How far repeated ceilings of one layout disagree, per format: (slowest - fastest) / fastest step matmul
    time, in %, for each format measured more than once."""
    times: dict[str, list[float]] = {}
    for ceiling in repeats:
        for row in ceiling["rows"]:
            if row.get("step_matmul_ms"):
                times.setdefault(row["format_slug"], []).append(row["step_matmul_ms"])
    return {fmt: 100 * (max(ms) - min(ms)) / min(ms) for fmt, ms in times.items() if len(ms) > 1}


def ceiling_beside_run(ceiling: dict, run_rows: list[dict]) -> list[dict]:
    """Each format of a per-layer ceiling beside the same format's compiled decode loop in a GPU run of the same
    model and layout: the run's step time, the part of it that is not the weight matmuls at their ceiling, and
    both speed-ups over BF16. A format the run did not measure keeps only its ceiling."""
    from qlab.backends.gpu_recipe import FUSED

    path = "compiled-loop" + (FUSED if ceiling["layout"] == "fused" else "")
    tokens_per_s = {row["format_slug"]: row["decode_tokens_per_s"] for row in run_rows
                    if row.get("path") == path and row.get("model") == ceiling["model"]
                    and row.get("decode_tokens_per_s")}
    bf16_ms = 1000 / tokens_per_s["bf16"] if "bf16" in tokens_per_s else None
    table = []
    for row in ceiling["rows"]:
        if row.get("step_matmul_ms") is None:
            continue
        step_ms = 1000 / tokens_per_s[row["format_slug"]] if row["format_slug"] in tokens_per_s else None
        table.append({"format_slug": row["format_slug"],
                      "matmul_ms": row["step_matmul_ms"], "matmul_speedup": row.get("step_matmul_speedup_over_bf16"),
                      "step_ms": step_ms, "rest_ms": step_ms - row["step_matmul_ms"] if step_ms else None,
                      "step_speedup": bf16_ms / step_ms if step_ms and bf16_ms else None,
                      "read_tbps": row["step_read_gbps"] / 1000 if row.get("step_read_gbps") else None,
                      "kernel": row.get("kernel")})
    return table


def bench_row(loaded: LoadedModel, backend, device: str, spec: SpeedSpec) -> dict:
    """The identifying fields every bench row starts with."""
    return {"model": loaded.name, "kind": loaded.kind, "backend": backend.slug, "library": backend.library,
            "format": backend.weight_format, "compute_dtype": backend.compute_dtype, "device": device,
            "twin": backend.twin_label(loaded.model) if backend.activations is None
            else f"{backend.twin_label(loaded.model)} + activations {backend.activations.bits}-bit per "
                 f"{backend.activations.granularity}",
            "available": True, "reason": None, "error": None, "threads": torch.get_num_threads(),
            **dict.fromkeys(f"{name}{suffix}" for name in ("prefill_ms", "decode_tokens_per_s", "sentences_per_s")
                            for suffix in ("", "_min", "_max", "_spread_pct")), "peak_memory_bytes": None,
            "batch": spec.batch, "prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens,
            "repetitions": spec.repetitions, "note": backend.note, "tolerance": backend.tolerance.why}


def _sizes(loaded: LoadedModel, backend, model) -> dict:
    from qlab.core.plan import size_report

    size = size_report(loaded.model, backend.twin(loaded.model))
    record = {"size_bytes": size.size_bytes, "bits_per_weight": round(size.bits_per_weight, 4)}
    if hasattr(model, "file_bytes"):
        record["size_bytes"] = model.file_bytes  # the real GGUF file, llama.cpp's own mixture included
        record["bits_per_weight"] = None
    return record


def add_ratios(rows: list[dict], reference: str = "fp32") -> list[dict]:
    """Each row's decode (or sentences/s) speed-up over the reference backend's row, when it ran."""
    ref = next((r for r in rows if r["backend"] == reference and not r.get("error") and r.get("available")), None)
    key = "decode_tokens_per_s" if rows and rows[0].get("kind") == "causal-lm" else "sentences_per_s"
    for row in rows:
        row["speedup_vs_" + reference] = (round(row[key] / ref[key], 3)
                                          if ref and row.get(key) and ref.get(key) else None)
    return rows


BENCH_FIELDS = ("model", "backend", "library", "format", "device", "threads", "batch", "prompt_tokens",
                "new_tokens", "repetitions", "prefill_ms", "prefill_ms_min", "prefill_ms_max",
                "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max",
                "decode_tokens_per_s_spread_pct", "peak_memory_bytes", "available", "reason", "error")


# A row's accuracy loss, lower is better: the Overview's verdict and the speed verdicts read it one way.
error_of = accuracy_loss


def speed_of(row: dict) -> float | None:
    """The row's throughput: decode tokens/s (LMs) or sentences/s (embedding models)."""
    value = row.get("decode_tokens_per_s") if row.get("decode_tokens_per_s") is not None else row.get("sentences_per_s")
    return None if value is None else float(value)


def pareto_front(rows: list[dict]) -> list[bool]:
    """Which rows no other row beats on speed, error and size at once (higher speed, lower error, smaller)."""
    points = [(speed_of(r), error_of(r), r.get("size_bytes")) for r in rows]

    def dominates(a, b) -> bool:
        return (a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]) and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])

    complete = [None not in p for p in points]
    return [ok and not any(complete[j] and dominates(points[j], p) for j in range(len(points)) if j != i)
            for i, (p, ok) in enumerate(zip(points, complete))]


def verdicts(rows: list[dict], max_error: float, latency_budget_ms: float | None = None,
             memory_bytes: int | None = None) -> list[dict]:
    """The three answers the Speed page gives, each with the row that wins and why.

    - fastest within the accuracy bound (``error_of <= max_error``);
    - smallest that fits ``memory_bytes`` within the bound (the faster of equal sizes);
    - most accurate whose latency per token or sentence (1000 / throughput) is within ``latency_budget_ms``.
    """
    measured = [r for r in rows if speed_of(r) is not None and error_of(r) is not None]
    accurate = [r for r in measured if error_of(r) <= max_error]
    fitting = [r for r in accurate if memory_bytes is None or (r.get("size_bytes") or 0) <= memory_bytes]
    in_budget = [r for r in measured if latency_budget_ms is None or 1000.0 / speed_of(r) <= latency_budget_ms]
    answers = [
        ("fastest within the accuracy bound", max(accurate, key=speed_of, default=None),
         f"error <= {max_error:g}; highest measured throughput"),
        ("smallest that fits", min(fitting, key=lambda r: (r.get("size_bytes") or 0, -speed_of(r)), default=None),
         "within the accuracy bound" + (f" and {memory_bytes / 1e9:.1f} GB" if memory_bytes else "")),
        ("best under the latency budget", min(in_budget, key=error_of, default=None),
         "lowest error" + (f" at <= {latency_budget_ms:g} ms/token" if latency_budget_ms else "")),
    ]
    return [{"question": question, "backend": row["backend"] if row else None,
             "format": row.get("format") if row else None, "speed": speed_of(row) if row else None,
             "error": error_of(row) if row else None, "size_bytes": row.get("size_bytes") if row else None,
             "rule": rule if row else f"no measured backend meets it ({rule})"}
            for question, row, rule in answers]


def bench_settings(spec: SpeedSpec, backends: list[str], accuracy_tokens: int | None, device: str = "cpu") -> dict:
    """The JSON-ready settings a stored speed run keeps: backends, device, accuracy token budget, the SpeedSpec."""
    return {"backends": list(backends), "device": device, "accuracy_tokens": accuracy_tokens, **asdict(spec)}
