"""Speed / trade-offs: real backends measured on this machine, roofline predictions for the target, verdicts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import common
from qlab import backends, charts
from qlab.analyses import roofline
from qlab.backends import export, gpu_bench, gpu_recipe, speed
from qlab.core.errors import QlabError
from qlab.models import hardware
from qlab.models.evaluate import Progress
from qlab.models.loading import device_label, model_sha256
from qlab.store import Recorder, Store, bench_meta, run_meta

REFERENCES = Path(__file__).resolve().parent.parent / "assets" / "speed_references.json"
DEFAULT_BACKENDS = ("fp32", "bf16", "torch-dynamic-int8", "torchao-int8wo", "quanto-int8", "onnxruntime-fp32",
                    "onnxruntime-int8", "llamacpp-q8_0", "llamacpp-q4_0")

common.page_setup()
st.title("Speed and trade-offs")
st.caption("Simulation tells accuracy; only real kernels tell speed. Each point is one (format, backend): a real "
           "kernel library run on this machine (filled) or the roofline prediction for the target (hollow: "
           "bandwidth / bytes read per token). A format the target has no kernel for is *smaller, not faster*.")

loaded = common.current_model()
common.show_caveat(loaded)
target = common.selected_hardware()
is_lm = loaded.kind == "causal-lm"

for_kind = [b for b in backends.all_backends() if loaded.kind in b.kinds]
status = {b.slug: b.available("cpu") for b in for_kind}
usable = [b.slug for b in for_kind if status[b.slug][0]]
with st.expander(f"Backends for a {loaded.kind} model: {len(usable)} of {len(for_kind)} run here"):
    common.table(pd.DataFrame([{"backend": b.slug, "library": b.library, "what": b.title,
                                "available here": status[b.slug][0], "why not": None if status[b.slug][0]
                                else status[b.slug][1], "speed fact": b.note} for b in for_kind]))

st.session_state.setdefault("speed_backends", [s for s in DEFAULT_BACKENDS if s in usable])
st.multiselect("Backends to measure on this machine", usable, key="speed_backends",
               help="Every backend gets the same prompt, token counts and evaluation tokens.")
cols = st.columns(4)
prompt_tokens = cols[0].number_input("Prompt tokens", 8, 2048, 128, step=32, key="speed_prompt", disabled=not is_lm)
new_tokens = cols[1].number_input("Decode tokens", 4, 512, 32, step=8, key="speed_new", disabled=not is_lm)
batch = cols[2].number_input("Batch", 1, 32, 1, key="speed_batch", disabled=not is_lm,
                             help="llama.cpp's Python binding decodes one sequence at a time.")
repetitions = cols[3].number_input("Repetitions", 1, 10, 3, key="speed_reps",
                                   help="Timed runs after one warm-up; the median and spread are shown.")

spec = speed.SpeedSpec(prompt_tokens=int(prompt_tokens), new_tokens=int(new_tokens), batch=int(batch),
                       repetitions=int(repetitions))
tokens = int(st.session_state["tokens"])
run_key = (loaded.name, spec, tokens)
store = st.session_state.setdefault("speed_rows", {})
if run_key not in store:  # a reload or a shared link: the last measurement stored for these settings
    store[run_key] = {}
    try:
        stored = Store().latest_run("bench", loaded.name, model_sha256(loaded),
                                    {key: value for key, value in speed.bench_settings(spec, [], tokens, "cpu")
                                     .items() if key != "backends"}, holding="bench")
    except QlabError as error:
        st.warning(f"Run history unavailable: {error}")
        stored = None
    if stored is not None:
        store[run_key] = {row["backend"]: row for row in stored.records("bench")}
        st.caption(f"Shown from the measurement stored {stored.created_at[:16].replace('T', ' ')} UTC (History); "
                   "pick more backends to measure them too.")
finished: dict[str, dict] = store[run_key]
chosen = st.session_state["speed_backends"]
todo = [backends.get_backend(s) for s in chosen if s not in finished]


def format_words(slugs: pd.Series) -> pd.Series:
    """The GPU benchmark's format names as the page shows them: the weights and whose kernel."""
    return slugs.map({slug: gpu_format.label for slug, gpu_format in gpu_recipe.FORMATS.items()}).fillna(slugs)


def path_words(paths: pd.Series) -> pd.Series:
    """The GPU benchmark's code paths as the page shows them."""
    return paths.map(gpu_recipe.PATH_LABEL).fillna(paths)


def bench_run():
    if "speed_bandwidth" not in st.session_state:
        st.session_state["speed_bandwidth"] = speed.measure_bandwidth()
    # One stored run per press holding every backend shown, so a reload finds them all in the newest run.
    return bench_meta(loaded, spec, chosen, tokens, "cpu", bandwidth=st.session_state["speed_bandwidth"].to_record())


def measure(progress: Progress, recorder: Recorder) -> None:
    for slug in chosen:
        if slug in finished:
            recorder.save(finished[slug], "bench")
    progress(0.0, "Computing the base model's reference outputs for the accuracy columns...")
    for row in speed.run_bench(loaded, todo, spec, "cpu", tokens, st.session_state["speed_bandwidth"],
                               progress=common.step_names(progress, [b.slug for b in todo])):
        finished[row["backend"]] = row  # kept before the next backend starts
        recorder.save(row, "bench")


def kept() -> str:
    done = [slug for slug in chosen if slug in finished]
    if not done:
        return "No backend had finished, so none was kept."
    return (f"Kept {common.count(done, 'measured backend')} ({', '.join(done)}), shown below and in History; "
            "press **Measure** for the rest.")


common.long_run("Measure", "run_speed", measure, prepare=bench_run, ready=bool(todo), kept=kept,
                start_text="Measuring memory bandwidth...", cancel_key="cancel_speed",
                cancel_help="Stops after the current step; finished backends are kept.",
                nothing_to_do="Every chosen backend is already measured with these settings (shown below).")

rows = speed.add_ratios([finished[s] for s in st.session_state["speed_backends"] if s in finished])
bandwidth = st.session_state.get("speed_bandwidth")
committed = [r for r in speed.bench_results("speed_cpu") if r.get("model") == loaded.name]
if not rows and committed:
    # Nothing measured in this session yet: show the repository's own run, labelled as such.
    rows = committed
    st.info(f"Showing the measurement that comes with qlab ({committed[0].get('cpu_model')}, "
            f"{committed[0].get('threads')} thread(s), {committed[0].get('prompt_tokens')} prompt + "
            f"{committed[0].get('new_tokens')} decoded tokens); press **Measure** to time this machine.")
host = hardware.detect_this_machine().host
st.caption(f"This machine: {host.cpu_model}, {host.usable_cores} usable cores, flags "
           f"{', '.join(sorted(host.cpu_flags)) or 'none readable'}; native formats "
           f"{', '.join(host.cpu_native_formats)}"
           + (f"; measured read bandwidth {bandwidth.bytes_per_s.median / 1e9:.1f} GB/s "
              f"(spread {bandwidth.bytes_per_s.spread_pct:.0f}%)" if bandwidth else "") + ".")

good = [r for r in rows if r.get("available") and not r.get("error")]
problems = [r for r in rows if not r.get("available") or r.get("error")]
for row in problems:
    st.warning(f"{row['backend']}: {row.get('reason') or row.get('error')}")

if good:
    speed_key = "decode_tokens_per_s" if is_lm else "sentences_per_s"
    error_title = ("KL divergence to the base model (mean, nats/token)" if is_lm
                   else "1 - cosine to the base model's embeddings")
    points = []
    front = speed.pareto_front(good)
    for row, on_front in zip(good, front):
        points.append({"label": row["backend"], "library": row["library"], "speed": speed.speed_of(row),
                       "error": speed.error_of(row), "size_bytes": row.get("size_bytes") or 0,
                       "source": "measured", "pareto": on_front})
    predictions = []
    measured_bandwidth = (bandwidth.bytes_per_s.median if bandwidth
                          else next((r["bandwidth_bytes_per_s"] for r in good if r.get("bandwidth_bytes_per_s")), None))
    own_bandwidth = measured_bandwidth if target.is_detected else None
    if is_lm and not (own_bandwidth or target.bandwidth_bytes_per_s):
        st.caption("No roofline points: this machine's bandwidth is measured with the first **Measure**.")
    elif is_lm:
        with common.user_errors():
            predicted = speed.roofline_predictions(loaded, good, target, spec, own_bandwidth)
        for row, prediction in zip(good, predicted):
            predictions.append({"backend": row["backend"], **prediction.to_record()})
            points.append({"label": row["backend"], "library": row["library"],
                           "speed": prediction.decode_tokens_per_s, "error": speed.error_of(row),
                           "size_bytes": row.get("size_bytes") or 0, "source": "predicted", "pareto": False})
    st.subheader(f"Accuracy vs {'decode' if is_lm else 'encode'} speed vs size")
    st.plotly_chart(charts.speed_tradeoff(pd.DataFrame(points), speed_key, error_title, target.name),
                    key="speed_tradeoff")

    table = pd.DataFrame(good)
    columns = [c for c in ("backend", "format", "twin", "prefill_ms", "decode_tokens_per_s",
                           "decode_tokens_per_s_spread_pct", "sentences_per_s", "speedup_vs_fp32",
                           "roofline_fraction", "kld_mean", "twin_kld_mean", "ppl", "top1_agreement",
                           "cosine_mean", "twin_cosine_mean", "agrees_with_twin", "size_bytes", "peak_memory_bytes",
                           "threads") if c in table.columns]
    common.table(table[columns], column_config={
        "decode_tokens_per_s_spread_pct": "decode spread (%)", "roofline_fraction": "share of roofline",
        "threads": "threads"})
    st.caption("Simulated as: qlab's simulation of the same scheme (weights, and activations where the backend "
               "quantizes them); 'agrees with simulation' checks the backend's accuracy against it within the "
               "backend's stated tolerance. Share of roofline: measured decode speed over bandwidth / bytes "
               "per token on this machine.")
    if predictions:
        with st.expander(f"Roofline on {target.name}"):
            common.table(pd.DataFrame(predictions))
            st.caption(" ".join(f"{common.header(k)}: {v}." for k, v in roofline.FORMULAS.items()))

    st.subheader("Verdicts")
    bound_col, budget_col = st.columns(2)
    max_error = bound_col.number_input("Accuracy bound (KLD nats, or 1 - cosine)", 0.0, 10.0, 0.01, format="%.4f",
                                       key="speed_bound")
    budget = budget_col.number_input("Latency budget (ms per token)" if is_lm else "Latency budget (ms per "
                                     "sentence)", 0.1, 10_000.0, 50.0, key="speed_budget")
    verdict_rows = speed.verdicts(good, float(max_error), float(budget), target.memory_bytes)
    common.table(pd.DataFrame(verdict_rows), column_config={
        "speed": charts.SPEED_TITLES[speed_key], "error": st.column_config.NumberColumn(
            f"error ({'KLD, nats' if is_lm else '1 - cosine'})", format="%.4g")})

st.subheader("Save a quantized model")
savable = [slug for slug in usable if slug in export.exportable()]
if not savable:
    st.info("None of the backends that run here can save its model (optimum-quanto, torchao and llama.cpp can).")
else:
    backend_column, folder_column = st.columns([1, 2])
    export_slug = backend_column.selectbox("Backend", savable, key="export_backend")
    default_folder = export.default_out_dir(loaded.name, export_slug).name
    folder = folder_column.text_input("Folder name", key="export_dir", placeholder=default_folder,
                                      help=f"Created under {export.exports_root()}, beside the run history; "
                                           "`python -m qlab export --out` saves anywhere.")
    replace = st.checkbox("Replace an earlier export of the same name", key="export_force")
    if st.button("Save quantized model", key="export_model"):
        with common.user_errors(), st.spinner(f"Quantizing with {export_slug} and saving..."):
            out_dir = export.named_out_dir(folder or default_folder)
            saved = export.export_quantized(loaded, export_slug, out_dir, force=replace)
        st.success(f"Saved {saved.weights_file} ({saved.weights_bytes / 1e6:.1f} MB) with config, tokenizer and "
                   f"qlab_scheme.json in `{saved.out_dir}`. Reload it with "
                   f"`qlab.backends.export.load_exported('{saved.out_dir}')`.")
    st.caption("Safetensors (never pickles) plus the scheme that made it; reloading rebuilds the model from "
               "config.json with transformers' own classes. llama.cpp backends copy their GGUF file.")

references = json.loads(REFERENCES.read_text())
st.subheader("Common claims, next to measured ratios")
claims = []
for claim in references["seed_claims"]:
    mine = [r["speedup_vs_fp32"] for r in good if r.get("format") == claim["format"] and r.get("speedup_vs_fp32")]
    published = [p for p in references["published"] if p["format"] == claim["format"]]
    claims.append({"claim": claim["claim"], "claimed speed-up": claim["claimed_speedup"],
                   "best measured here (vs FP32)": max(mine) if mine else None,
                   "published (decode, batch 1)": "; ".join(f"{p['speedup']}x {p['what']} [{p['source']}]"
                                                            for p in published)})
common.table(pd.DataFrame(claims), column_config={
    "best measured here (vs FP32)": st.column_config.NumberColumn(format="%.2f")})

st.subheader("Measured on a GPU")
gpu_runs, unreadable_runs = speed.gpu_speed_runs()
if unreadable_runs:
    st.warning(f"Stored GPU results that could not be read: {', '.join(unreadable_runs)}.")
device = st.session_state.get("device", "cpu")
if is_lm and device.startswith("cuda"):
    st.multiselect("Formats to measure on this GPU", list(gpu_recipe.FORMATS), key="gpu_formats",
                   default=gpu_bench.fastest_formats(), format_func=lambda slug: gpu_recipe.FORMATS[slug].label,
                   help="Each through its own kernel, named in the table below; the defaults are the fastest "
                        "measured that are installed here.")
    fuse = st.checkbox("q/k/v and gate/up as one matmul each (gpt-fast's layout)", value=True, key="gpu_fuse")
    gpu_formats = st.session_state["gpu_formats"]
    gpu_settings = {"gpu_benchmark": {"formats": gpu_formats, "fuse_projections": fuse, "device": device}}
    gpu_key = (loaded.name, device, tuple(gpu_formats), fuse)
    gpu_store = st.session_state.setdefault("gpu_speed_rows", {})
    if gpu_key not in gpu_store:  # a reload: the last measurement stored for these choices
        try:
            stored_gpu = Store().latest_run("bench", loaded.name, model_sha256(loaded), gpu_settings,
                                            holding="bench")
        except QlabError as error:
            st.warning(f"Run history unavailable: {error}")
            stored_gpu = None
        gpu_store[gpu_key] = stored_gpu.records("bench") if stored_gpu is not None else []
    gpu_rows: list[dict] = gpu_store[gpu_key]

    def measure_gpu(progress: Progress, recorder: Recorder | None) -> None:
        gpu_rows.clear()

        def keep(row: dict) -> None:
            gpu_rows.append(row)  # kept before the next format is timed
            if recorder is not None:
                recorder.save(row, "bench")

        with tempfile.TemporaryDirectory(prefix="qlab-gpu-bench-") as scratch:
            gpu_bench.run_compiled(common.model_name(), device, gpu_formats, Path(scratch), fuse_projections=fuse,
                                   on_row=keep, progress=progress)

    measured_now = common.long_run(
        "Measure on this GPU", "run_gpu_speed", measure_gpu, ready=bool(gpu_formats),
        prepare=lambda: run_meta("bench", loaded, None, **gpu_settings),
        kept=lambda: f"Kept {common.count(len(gpu_rows), 'measured format')}, shown below and in History.",
        start_text=f"Building random weights in your model's shapes and compiling "
                   f"{common.count(len(gpu_formats), 'format')} side by side (one to four minutes, longer for "
                   "large models), then timing each alone...",
        cancel_key="cancel_gpu_speed", cancel_help="Stops the benchmark; formats already timed are kept.",
        nothing_to_do="Pick at least one format.")
    if gpu_rows:
        label = f"your model on {device_label(device)}, measured here"
        gpu_runs.insert(0, {"label": label, "rows": gpu_rows,
                            "gpu": next((r.get("gpu") for r in gpu_rows if r.get("gpu")), "GPU")})
        if measured_now:  # show what was just measured, not the run picked before
            st.session_state["gpu_run"] = label
runs_by_label = {run["label"]: run for run in gpu_runs}
gpu_run = (runs_by_label[st.selectbox("GPU run", list(runs_by_label), key="gpu_run",
                                      help="Each run measured every format on one GPU, one step at a time.")]
           if len(gpu_runs) > 1 else gpu_runs[0] if gpu_runs else {"rows": []})
measured_gpu = [r for r in gpu_run["rows"] if r.get("decode_tokens_per_s")]
if not measured_gpu:
    st.info("No GPU results yet: `python -m qlab bench --device cuda --model YOUR_MODEL --json "
            "bench/results/gpu_speed_mine.json` on a CUDA machine measures them for this page.")
else:
    frame = pd.DataFrame(measured_gpu)
    config = frame["model"].iloc[0]
    gpu_name = str(frame["gpu"].dropna().iloc[0]) if frame["gpu"].notna().any() else "GPU"
    gpu_target = speed.gpu_target(gpu_name, target)
    predicted_rows = speed.gpu_roofline(measured_gpu, gpu_target)
    frame["format"] = format_words(frame["format_slug"])
    frame["code path"] = path_words(frame["path"])
    predicted = pd.DataFrame(predicted_rows)
    if len(predicted):
        predicted["format"] = format_words(predicted["format_slug"])
    st.plotly_chart(charts.gpu_decode_bars(frame, predicted), key="gpu_bars")
    bf16 = frame[(frame["format_slug"] == "bf16")].set_index("path")["decode_tokens_per_s"]
    # A variant path (``compiled-loop:subclass-weights``) without a BF16 row of its own compares with its base path.
    frame["vs bf16 same path"] = [
        r["decode_tokens_per_s"] / bf16[path] if (path := r["path"] if r["path"] in bf16 else
                                                  r["path"].split(":")[0]) in bf16 else None
        for _, r in frame.iterrows()]
    if "achieved_weight_gbps" in frame.columns:
        frame["weight read TB/s"] = frame["achieved_weight_gbps"] / 1000
    # The numbers first: at 1280 pixels the long kernel names would push them out of view.
    common.table(frame[[c for c in ("format", "code path", "decode_tokens_per_s", "vs bf16 same path",
                                    "weight read TB/s", "decode_tokens_per_s_spread_pct", "prefill_ms",
                                    "compile_seconds", "kernel", "backend", "gpu", "torch", "torchao")
                        if c in frame.columns]],
                 column_config={# Wide enough for the longest path's words at 1280 pixels; the table scrolls.
                                "code path": st.column_config.TextColumn("code path", width=270),
                                "kernel": "kernel doing the weight matmuls",
                                "decode_tokens_per_s": st.column_config.NumberColumn(
                                    "decode tokens/s", format="%.1f"),
                                "vs bf16 same path": st.column_config.NumberColumn("speed-up over BF16, same path",
                                                                                   format="%.2f"),
                                "weight read TB/s": st.column_config.NumberColumn(
                                    "weights read (TB/s)", format="%.2f",
                                    help="Weight bytes of one decode step over the step's time."),
                                "decode_tokens_per_s_spread_pct": "decode spread (%)", "prefill_ms": "prefill (ms)",
                                "compile_seconds": st.column_config.NumberColumn("compile (s)", format="%.0f"),
                                "gpu": "GPU", "torch": "torch",
                                "torchao": "torchao"})
    compared = frame[(frame["format_slug"] != "bf16") & frame["vs bf16 same path"].notna()]
    ratios = "; ".join(f"{path}: " + ", ".join(f"{r['format']} {r['vs bf16 same path']:.2f}x"
                                                for _, r in part.iterrows())
                       for path, part in compared.groupby("code path", sort=False))
    bound = {r["format_slug"]: r["decode_tokens_per_s"] for r in predicted_rows}
    compiled_bf16 = bf16.get("compiled-loop")
    fraction = (f" BF16 compiled reaches {compiled_bf16 / bound['bf16']:.0%} of its catalog roofline."
                if compiled_bf16 and bound.get("bf16") else "")
    measured_copy = frame[(frame["format_slug"] == "bf16") & (frame["path"] == "compiled-loop")]
    if compiled_bf16 and {"hbm_copy_gbps", "weight_bytes_per_token"} <= set(frame.columns) \
            and measured_copy["hbm_copy_gbps"].notna().any():
        row = measured_copy.iloc[0]
        copy_bound = row["hbm_copy_gbps"] * 1e9 / (row["weight_bytes_per_token"] + row.get("kv_cache_bytes", 0))
        fraction += (f" Against the copy bandwidth measured on that GPU ({row['hbm_copy_gbps'] / 1000:.2f} TB/s) "
                     f"it reaches {compiled_bf16 / copy_bound:.0%}.")
    paths = set(frame["path"])
    eager = (" Through eager `generate`, each quantized matmul is a dequantize kernel plus a BF16 matmul among "
             "hundreds of small kernel launches per token, so fewer bytes do not make it faster; on the compiled "
             "static-cache path the dequantization fuses into the matmul and decode follows the bytes read. "
             "That gap is the 'quantized model slower than FP16' trap." if "hf-generate" in paths else "")
    kept_weights, fused_path = "compiled-loop" + gpu_recipe.KEPT_WEIGHTS, "compiled-loop" + gpu_recipe.FUSED
    wrapped = (f" '{gpu_recipe.PATH_LABEL[kept_weights]}' is the same compiled loop with torchao's quantized "
               "weight objects handed to torch.compile as they are; each step then waits about 7 ms on the host "
               "and INT8/INT4 fall below BF16. Unwrapping them first (`torchao.utils.unwrap_tensor_subclass`) "
               "removes it." if any(gpu_recipe.KEPT_WEIGHTS in path for path in paths) else "")
    fused = (f" '{gpu_recipe.PATH_LABEL[fused_path]}' builds each block as gpt-fast does: q/k/v as one matmul "
             "and gate/up as another, four weight matmuls a block instead of seven, with the same rounding."
             if any(gpu_recipe.FUSED in path for path in paths) else "")
    st.caption(f"{config}, random weights, batch 1, measured on {gpu_name}; roofline markers: {gpu_target.name} "
               f"bandwidth / bytes read per token. Speed-up over BF16 on the same path: {ratios}.{fraction}"
               f"{eager}{wrapped}{fused} A format whose weights are read slower than BF16's (the weights-read "
               "column) gains less than its smaller bytes promise: its kernel, not the memory, sets the pace.")
    ceilings, unreadable_ceilings = speed.layer_ceilings()
    if unreadable_ceilings:
        st.warning(f"Stored per-layer ceilings that could not be read: {', '.join(unreadable_ceilings)}.")
    layouts_run = {"fused" if path.endswith(gpu_recipe.FUSED) else "separate"
                   for path in frame["path"] if path.startswith("compiled-loop")}
    for layout, repeats in speed.ceilings_of(ceilings, gpu_name, config).items():
        if layout not in layouts_run:
            continue
        ceiling = speed.latest_ceiling(repeats)
        layout_words = {"fused": "q/k/v and gate/up fused", "separate": "q/k/v and gate/up separate"}[layout]
        st.subheader(f"Each kernel's ceiling on this GPU, {layout_words}")
        table = pd.DataFrame(speed.ceiling_beside_run(ceiling, measured_gpu))
        spread = speed.ceiling_spread_pct(repeats)
        if spread:
            table["repeat_spread_pct"] = table["format_slug"].map(spread)
        table.insert(0, "format", format_words(table.pop("format_slug")))
        common.table(table, column_config={
            "kernel": "kernel",
            "matmul_ms": st.column_config.NumberColumn(
                "matmuls alone (ms)", format="%.2f", help="A decode step's weight matmuls, each timed alone."),
            "matmul_speedup": st.column_config.NumberColumn("vs BF16, alone", format="%.2fx"),
            "step_ms": st.column_config.NumberColumn("step in this run (ms)", format="%.2f"),
            "rest_ms": st.column_config.NumberColumn(
                "rest of the step (ms)", format="%.2f", help="This run's step time minus the matmuls alone."),
            "step_speedup": st.column_config.NumberColumn("vs BF16, end to end", format="%.2fx"),
            "read_tbps": st.column_config.NumberColumn("weights read alone (TB/s)", format="%.2f"),
            "repeat_spread_pct": st.column_config.NumberColumn(
                f"spread over {len(repeats)} runs (%)", format="%.1f")}, key=f"ceiling_{layout}")
        repeated = (f" Each format's latest of {len(repeats)} runs of the program is shown." if len(repeats) > 1
                    else "")
        st.caption(f"Measured on {ceiling['gpu']} on {ceiling['date']}: each weight matmul of one block of "
                   f"{config} and its output head, timed alone from CUDA graphs with the L2 cache emptied before "
                   "every call, summed over the layers. That is the shortest time a decode step's weight matmuls "
                   "can take with the kernel. The rest of the step is this run's step time minus it: attention, "
                   "norms, rotary and residual adds, and whatever the kernel gains or loses inside the model. A "
                   f"format whose end-to-end speed-up stays under its ceiling's is held back by that rest.{repeated}")
failed_gpu = [r for r in gpu_run["rows"] if not r.get("decode_tokens_per_s")]
if failed_gpu:
    with st.expander(f"{len(failed_gpu)} GPU step(s) without a measurement"):
        failed = pd.DataFrame(failed_gpu)
        common.table(pd.DataFrame({"format": format_words(failed["format_slug"]),
                                   "code path": path_words(failed["path"]),
                                   "error": failed["error"]}))
