"""Model page: what is loaded, how big it is, and which tensors a weight-only scheme quantizes."""

import pandas as pd
import streamlit as st

from pages import common
from qlab.analyses.verdict import size_words
from qlab.models.loading import layer_table

common.page_setup()
st.title("Model")
st.caption("Pick a model in the sidebar: a bundled one works offline; a Hugging Face id needs the network.")
loaded = common.current_model()

layers = pd.DataFrame([vars(layer) for layer in layer_table(loaded)])
quantized = layers[layers["quantized"]]
columns = st.columns(4)
columns[0].metric("Parameters", f"{loaded.num_params / 1e6:.2f} M")
columns[1].metric(f"Size as loaded ({loaded.dtype_label})", size_words(loaded.weight_bytes),
                  help=f"Tied tensors once. In FP32 it would take {size_words(loaded.fp32_bytes)}.")
columns[2].metric("Quantized by a scheme", f"{quantized['params'].sum() / loaded.num_params:.0%}",
                  help="Share of parameters in linear layers; embeddings, norms and biases stay at 16 bits.")
columns[3].metric("Kind", loaded.kind)
st.write(f"**{loaded.source.title or loaded.name}** from `{loaded.source.path}`"
         + (f" (GGUF `{loaded.source.gguf_file}`, dequantized to FP32)" if loaded.source.gguf_file else ""))
if loaded.source.caveat:  # the explanation the other pages' one-line caveat links to
    st.info(f"**About this model's baseline.** {loaded.source.caveat} Every accuracy figure in qlab compares a "
            "scheme with this dequantized model, so read its losses as the cost of re-quantizing those weights.",
            icon="ℹ️")

st.subheader("Parameters by tensor")
common.table(
    layers.assign(shape=layers["shape"].map(lambda s: " x ".join(map(str, s))), MB=layers["bytes"] / 1e6)
    [["name", "module_type", "shape", "dtype", "params", "MB", "quantized", "note"]], height=420,
    column_config={"MB": st.column_config.NumberColumn("size (MB)", format="%.3f"), "params": "parameters",
                   "quantized": "quantized by a scheme"},
)
