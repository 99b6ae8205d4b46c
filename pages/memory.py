"""Memory page: does it fit? Weights with their scales, KV cache, activations and overhead, per format and runtime:
the prefill peak and the steady decode state, each component with its formula."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses import memory, runtimes
from qlab.backends import speed
from qlab.core.errors import QlabError
from qlab.models import architectures, hardware
from qlab.models.loading import LoadedModel

SOURCES = ("The sidebar's model", "Catalog architecture", "Upload a config.json")
DEFAULT_ARCH = "llama-3.1-8b"
GB = 1e9

common.page_setup()
st.title("Memory")
st.caption("Every component is computed from the model's shapes and the format registry; the formulas and "
           "assumptions are listed at the bottom. GB here is 1e9 bytes, as vendors print memory.")

catalog = architectures.load_catalog()
# The catalog list starts at the sidebar's model when the catalog has it.
st.session_state.setdefault("memory_arch", common.model_name() if common.model_name() in catalog else DEFAULT_ARCH)
st.session_state.setdefault("memory_context", 8192)
st.session_state.setdefault("memory_batch", 1)
st.session_state.setdefault("memory_kv_dtype", "fp16")
st.session_state.setdefault("memory_runtime", "transformers")
st.session_state.setdefault("memory_gguf", ["Q4_K_M", "Q8_0"])
source = st.radio("Model", SOURCES, key="memory_source", horizontal=True, label_visibility="collapsed")
model_column, context_column, batch_column, kv_column = st.columns([3, 2, 1, 1])
with model_column:
    if source == SOURCES[1]:
        st.selectbox("Architecture", list(catalog), key="memory_arch",
                     help="Planned from config.json alone: nothing is downloaded or loaded.")
    elif source == SOURCES[0]:
        st.caption(f"Sidebar model: **{common.model_name() or '(none)'}**, weights counted from its real tensors. "
                   "Pick *Catalog architecture* to plan a model without loading it.")
    else:
        upload = st.file_uploader("A Hugging Face config.json", type=["json"], key="memory_config")
context = context_column.number_input("Context (tokens per sequence)", min_value=1, step=1024,
                                      key="memory_context", help="Prompt plus generated tokens.")
batch = batch_column.number_input("Batch", min_value=1, step=1, key="memory_batch")
runtime_column, gguf_column = st.columns([2, 3])
runtime = runtime_column.selectbox(
    "Runtime", runtimes.runtime_names(), key="memory_runtime",
    format_func=lambda name: runtimes.get_runtime(name).label,
    help="Whose allocation to model. transformers' three caches are measured on a GPU; vLLM's and llama.cpp's "
         "figures reproduce their own formulas.")
kv_choices = runtimes.kv_format_names(runtime)
if st.session_state["memory_kv_dtype"] not in kv_choices:
    st.session_state["memory_kv_dtype"] = kv_choices[0]
kv_dtype = kv_column.selectbox("KV cache", kv_choices, key="memory_kv_dtype",
                               help="The cache formats this runtime stores, scales included.")
if runtime == "llama.cpp":
    gguf_types = gguf_column.multiselect("GGUF file types", runtimes.GGUF_FILE_TYPES, key="memory_gguf",
                                         help="llama.cpp loads GGUF files; each tensor is typed as llama-quantize "
                                              "types it for that file type.")

with st.expander("Assumptions (editable)"):
    left, middle, right = st.columns(3)
    prompt = left.number_input("Prompt (tokens, 0 = the whole context)", 0, step=1024, key="memory_prompt",
                               help="transformers' prefill peak grows with the prompt; the cache with the context.")
    utilization = middle.number_input("vLLM gpu_memory_utilization", 0.05, 1.0, 0.9, 0.05, key="memory_vllm_util")
    block = middle.number_input("vLLM block size (tokens)", 1, 256, 16, key="memory_vllm_block")
    ubatch = right.number_input("llama.cpp ubatch (tokens)", 1, 8192, 512, key="memory_ubatch")
    flash = right.checkbox("llama.cpp flash attention", True, key="memory_flash")
    overhead_gib = left.number_input("GPU runtime overhead (GiB)", 0.0, 16.0, 1.0, 0.25, key="memory_overhead",
                                     help="CUDA context, cuBLAS workspaces, allocator slack; 0 on CPUs.")
    chunk = middle.number_input("Prefill chunk (tokens, 0 = whole prompt)", 0, step=512, key="memory_chunk")
    eager = right.checkbox("Eager attention (materialised scores)", key="memory_eager")
    lm_head = right.checkbox("Quantize an untied lm_head", key="memory_lm_head")
assumptions = memory.Assumptions(runtime=runtime, gpu_overhead_bytes=int(overhead_gib * 2**30),
                                 prefill_chunk_tokens=int(chunk) or None, prompt_tokens=int(prompt) or None,
                                 attention_scores_materialised=eager, quantize_lm_head=lm_head,
                                 gpu_memory_utilization=float(utilization), vllm_block_size=int(block),
                                 llamacpp_ubatch=int(ubatch), llamacpp_flash_attention=flash)

target = common.selected_hardware()
target_ids = list(dict.fromkeys([target.id, *(h.id for h in hardware.catalog())]))
with common.user_errors():
    schemes = ([memory.weight_spec(t) for t in gguf_types] if runtime == "llama.cpp" else common.schemes())
    if not schemes:
        raise QlabError("pick at least one GGUF file type for llama.cpp.")
    if source == SOURCES[1]:
        subject = catalog[st.session_state["memory_arch"]]
    elif source == SOURCES[2]:
        if upload is None:
            st.info("Upload a model's config.json to plan it.")
            st.stop()
        subject = architectures.from_config_json(upload.getvalue(), slug=Path(upload.name).stem)
    elif not common.model_name():
        raise QlabError("type a Hugging Face id or a local directory in the sidebar, or pick a catalog "
                        "architecture here.")
    else:
        subject = common.current_model()
    planner = memory.plan_loaded if isinstance(subject, LoadedModel) else memory.plan
    plans = [planner(subject, scheme, int(context), int(batch), kv_dtype, target_ids, assumptions)
             for scheme in schemes]

records = pd.DataFrame([p.to_record() for p in plans])
first = plans[0]
st.subheader(f"{first.model} on {target.name}")
st.caption(f"Showing **{first.model}**: " + {SOURCES[0]: "the sidebar's model, weights counted from its tensors",
                                             SOURCES[1]: "a catalog architecture, planned from its config alone",
                                             SOURCES[2]: "the uploaded config"}[source] + ".")
st.caption(f"{first.params:,} parameters"
           + (f" ({first.active_params:,} active per token)" if first.active_params != first.params else "")
           + "; tensors the scheme leaves alone (embeddings, norms, biases"
           + ("" if first.arch.tie_word_embeddings else ", lm_head") + ") are stored at "
           + ", ".join(sorted(set(records["unquantized_format"]))) + ".")
for note in first.notes:
    st.info(note)
st.plotly_chart(charts.memory_stack(records, first.primary.budget_bytes, target.name), key="memory_stack")

table = pd.DataFrame({
    "scheme": records["scheme"],
    "bits/weight": records["bits_per_weight"],
    "weights (GB)": records["weights_before_scales_bytes"] / GB,
    "scales (GB)": records["scales_bytes"] / GB,
    **{f"{label} (GB)": records[column] / GB for column, label in charts.MEMORY_ALGORITHM_PARTS.items()
       if column in records and records[column].any()},
    "KV cache (GB)": records["kv_cache_bytes"] / GB,
    "activations (GB)": records["activations_bytes"] / GB,
    "overhead (GB)": records["overhead_bytes"] / GB,
    "prefill peak (GB)": records["total_bytes"] / GB,
    "steady decode (GB)": records["steady_total_bytes"] / GB,
    "fits": records["fits"],
    "max context": records["max_context"],
    "max batch": records["max_batch"],
    "GPUs needed": records["gpus_needed"],
})
common.table(table, column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns
                            if c.endswith("(GB)") or c == "bits/weight"})

st.subheader(f"Prefill peak and steady state: {first.scheme_label}")
st.caption(f"{runtimes.get_runtime(runtime).label}: {runtimes.get_runtime(runtime).description}. The fit verdict "
           "uses the peak.")
peak_column, steady_column = st.columns(2)
for column, state in ((peak_column, first.peak), (steady_column, first.steady)):
    column.markdown(f"**{state.label.capitalize()}: {state.device_bytes / GB:.2f} GB on the device**"
                    + (f" (+ {state.host_bytes / GB:.2f} GB in CPU memory)" if state.host_bytes else ""))
    column.dataframe(pd.DataFrame({
        "component": [c.name + ("" if c.on_device else " (CPU memory)") for c in state.components],
        "GB": [c.bytes / GB for c in state.components],
        "formula": [c.formula for c in state.components],
    }), hide_index=True, width="stretch", column_config={"GB": st.column_config.NumberColumn(format="%.3f")})

st.subheader("Total memory against context length")
model_max = first.arch.max_context_tokens or 2**17
contexts = sorted({*(2**k for k in range(7, 18) if 2**k <= model_max), model_max, int(context)})
curve = pd.DataFrame([row for p in plans for row in memory.context_curve(p, contexts)])
st.plotly_chart(charts.memory_vs_context(curve, target.memory_bytes, target.name), key="memory_curve")

st.subheader("Every target")
chosen = st.selectbox("Scheme", [p.scheme_label for p in plans], key="memory_table_scheme")
fits = pd.DataFrame([vars(t) for t in next(p for p in plans if p.scheme_label == chosen).targets])
common.table(pd.DataFrame({
    "target": fits["hardware_name"], "memory (GB)": fits["memory_bytes"] / GB, "fits": fits["fits"],
    "headroom (GB)": fits["headroom_bytes"] / GB, "max context": fits["max_context"],
    "max batch": fits["max_batch"], "GPUs needed (TP)": fits["gpus_needed"],
    "per GPU (GB)": fits["per_gpu_bytes"] / GB, "format native": fits["runs_natively"],
}), column_config={c: st.column_config.NumberColumn(format="%.2f")
                    for c in ("memory (GB)", "headroom (GB)", "per GPU (GB)")})
st.caption("GPUs needed: the smallest tensor-parallel degree (dividing the attention heads) whose per-GPU share "
           "fits; CPUs and SoCs are one device. Format native: the target runs the format in hardware or "
           "with mainstream kernels (qlab's hardware catalog, sources per entry).")

st.subheader("Quoted memory figures, with what they leave out")
common_claims = pd.DataFrame(memory.seed_facts(group_size=128))
common.table(pd.DataFrame({
    "claim": common_claims["claim"], "scheme": common_claims["scheme"], "claimed (GB)": common_claims["claimed_bytes"] / GB,
    "codes (GB)": common_claims["codes_bytes"] / GB, "scales (GB)": common_claims["scales_bytes"] / GB,
    "with scales (GB)": common_claims["total_bytes"] / GB, "bits/weight": common_claims["bits_per_weight"],
    "real model": common_claims["real_model"], "real model (GB)": common_claims["real_model_bytes"] / GB,
}), column_config={c: st.column_config.NumberColumn(format="%.2f")
                    for c in ("claimed (GB)", "codes (GB)", "scales (GB)", "with scales (GB)", "real model (GB)")})
st.caption("Back-of-envelope figures that guides and users quote. Codes: parameters x bits / 8, the quoted "
           "arithmetic. Scales: one fp16 scale per 128 weights (+0.125 bits). Real model: the catalog "
           "architecture, with embeddings and lm_head kept at fp16.")

st.subheader("Estimate against measured")
measured_rows = speed.bench_results("memory_gpu")
if measured_rows:
    measured = pd.DataFrame(measured_rows)
    measured = measured[measured["measured_peak_allocated_bytes"].notna()]
    st.plotly_chart(charts.memory_estimate_vs_measured(measured.assign(
        estimated_allocated_bytes=measured["estimated_peak_allocated_bytes"], total_error=measured["peak_error"])),
        key="memory_measured")
    common.table(pd.DataFrame({
        "model": measured["model"], "format": measured["format"], "cache": measured["runtime"],
        "context (tokens)": measured["context_tokens"],
        "measured weights (GB)": measured["measured_weights_bytes"] / GB,
        "estimated weights (GB)": measured["estimated_weights_allocated_bytes"] / GB,
        "weights error": measured["weights_error"],
        "measured peak (GB)": measured["measured_peak_allocated_bytes"] / GB,
        "estimated peak (GB)": measured["estimated_peak_allocated_bytes"] / GB,
        "peak error": measured["peak_error"],
        "steady error": measured["steady_error"],
    }), column_config={c: st.column_config.NumberColumn(format="%.2f") for c in (
        "measured weights (GB)", "estimated weights (GB)", "measured peak (GB)", "estimated peak (GB)")}
        | {c: st.column_config.NumberColumn(format="percent") for c in ("weights error", "peak error", "steady error")})
    st.caption("Measured on a GPU by qlab's memory benchmark: random-initialised catalog models run as transformers' "
               "generate does (one prefill, one decode step), torch.cuda.max_memory_allocated for the peak and "
               "what stays allocated after the decode step for the steady state; the CUDA context is outside "
               "both, so the overhead is left out of the estimate too. Goals: weights within 1 %, peak within 3 %.")
else:
    st.info("No GPU measurements yet: qlab's GPU memory benchmark writes them when it runs on a CUDA machine "
            "(the README's GPU section says how).")

with st.expander("Formulas and assumptions"):
    for name, formula in memory.FORMULAS.items():
        st.markdown(f"**{common.header(name)}**: {formula}")
    st.markdown("\n".join(f"- {common.header(name.removesuffix('_bytes'))}: "
                          + (f"{value / GB:.2f} GB" if name.endswith("_bytes") and value is not None
                             else "whole prompt" if value is None and name == "prefill_chunk_tokens"
                             else "as the weights" if value is None else f"{value}")
                          for name, value in vars(assumptions).items()))
