"""Memory page: does it fit? Weights with their scales, KV cache, activations and overhead, per format."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses import memory
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
kv_dtype = kv_column.selectbox("KV cache", memory.KV_DTYPES, key="memory_kv_dtype",
                               help="int8/int4 store an fp16 scale and a zero-point per 32 values.")

with st.expander("Assumptions (editable)"):
    left, middle, right = st.columns(3)
    overhead_gib = left.number_input("GPU runtime overhead (GiB)", 0.0, 16.0, 1.0, 0.25, key="memory_overhead",
                                     help="CUDA context, cuBLAS workspaces, allocator slack; 0 on CPUs.")
    chunk = middle.number_input("Prefill chunk (tokens, 0 = whole prompt)", 0, step=512, key="memory_chunk")
    eager = right.checkbox("Eager attention (materialised scores)", key="memory_eager")
    lm_head = right.checkbox("Quantize an untied lm_head", key="memory_lm_head")
assumptions = memory.Assumptions(gpu_overhead_bytes=int(overhead_gib * 2**30),
                                 prefill_chunk_tokens=int(chunk) or None,
                                 attention_scores_materialised=eager, quantize_lm_head=lm_head)

target = common.selected_hardware()
target_ids = list(dict.fromkeys([target.id, *(h.id for h in hardware.catalog())]))
with common.user_errors():
    schemes = common.schemes()
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
st.plotly_chart(charts.memory_stack(records, target.memory_bytes, target.name), key="memory_stack")

table = pd.DataFrame({
    "scheme": records["scheme"],
    "bits/weight": records["bits_per_weight"],
    "weights (GB)": records["weights_before_scales_bytes"] / GB,
    "scales (GB)": records["scales_bytes"] / GB,
    "KV cache (GB)": records["kv_cache_bytes"] / GB,
    "activations (GB)": records["activations_bytes"] / GB,
    "overhead (GB)": records["overhead_bytes"] / GB,
    "total (GB)": records["total_bytes"] / GB,
    "fits": records["fits"],
    "max context": records["max_context"],
    "max batch": records["max_batch"],
    "GPUs needed": records["gpus_needed"],
})
common.table(table, column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns
                            if c.endswith("(GB)") or c == "bits/weight"})

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
seeds = pd.DataFrame(memory.seed_facts(group_size=128))
common.table(pd.DataFrame({
    "claim": seeds["claim"], "scheme": seeds["scheme"], "claimed (GB)": seeds["claimed_bytes"] / GB,
    "codes (GB)": seeds["codes_bytes"] / GB, "scales (GB)": seeds["scales_bytes"] / GB,
    "with scales (GB)": seeds["total_bytes"] / GB, "bits/weight": seeds["bits_per_weight"],
    "real model": seeds["real_model"], "real model (GB)": seeds["real_model_bytes"] / GB,
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
    st.plotly_chart(charts.memory_estimate_vs_measured(measured), key="memory_measured")
    common.table(pd.DataFrame({
        "model": measured["model"], "format": measured["format"], "context (tokens)": measured["context_tokens"],
        "measured weights (GB)": measured["measured_weights_bytes"] / GB,
        "estimated weights (GB)": measured["estimated_weights_bytes"] / GB,
        "weights error": measured["weights_error"],
        "measured peak allocated (GB)": measured["measured_peak_allocated_bytes"] / GB,
        "estimated allocated (GB)": measured["estimated_allocated_bytes"] / GB,
        "total error": measured["total_error"],
    }), column_config={c: st.column_config.NumberColumn(format="%.2f") for c in (
        "measured weights (GB)", "estimated weights (GB)", "measured peak allocated (GB)",
        "estimated allocated (GB)")} | {c: st.column_config.NumberColumn(format="percent")
                                         for c in ("weights error", "total error")})
    st.caption("Measured by qlab's GPU memory benchmark: random-initialised catalog models, one prefill, "
               "torch.cuda.max_memory_allocated (which excludes the CUDA context, so the overhead is left out "
               "of the estimate too). Goals: weights within 3%, total within 10%.")
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
