"""Widgets and cached loaders shared by every page; the sidebar's choices live in session state."""

from __future__ import annotations

import contextlib
import numbers
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from qlab import views
from qlab.core.errors import Cancelled, QlabError
from qlab.core.formats import FORMATS
from qlab.core.quant import ALGORITHMS, CALIBRATIONS, SPARSITIES, QuantScheme
from qlab.models import hardware
from qlab.models import loading as models
from qlab.models.evaluate import Baseline, EvalSpec, Progress, compute_baseline
from qlab.store import Recorder, RunMeta

OTHER_MODEL = "Other: Hugging Face id or local directory"
GROUP_SIZES = (32, 64, 128, 256)
MAX_UI_TOKENS = 8192  # the dashboard's budget cap; the CLI allows more on purpose
SPARSITY_LABELS = {"none": "None (dense)", "2:4": "2:4, by magnitude", "2:4-sparsegpt": "2:4, SparseGPT"}
DEFAULTS = {
    "model_choice": "smollm2-135m",
    "custom_model": "",
    "hardware": hardware.THIS_MACHINE_ID,
    "formats": ["fp32", "fp16", "int8", "int4", "nf4"],
    "granularity": "group",
    "group_size": 64,
    "symmetric": True,
    "calibration": "minmax",
    "algorithm": "rtn",
    "static_groups": False,
    "sparsity": "none",
    "tokens": 512,
    "device": models.default_device(),
}


# The sidebar's choices a shared link carries.
SHARED_CHOICES = ("hardware", "formats", "granularity", "group_size", "symmetric", "calibration", "algorithm",
                  "static_groups", "sparsity", "tokens")


def init_state() -> None:
    """Set every shared choice once per session, before any widget reads it.

    Re-assigning an existing key takes it out of Streamlit's widget clean-up, which otherwise drops the
    sidebar's values when the user switches pages (the documented way to keep widget state across pages).
    """
    for key, value in DEFAULTS.items():
        st.session_state[key] = st.session_state.get(key, value)


def page_setup() -> None:
    """First call of every page: shared state (restored from a shared URL once), the sidebar, and the URL
    updated to match it (pages also run standalone in AppTest)."""
    _leave_pages_directory_mode()
    if not st.session_state.pop("_widths_rerun", False):  # said again on the rerun current_model() may ask for
        st.session_state.pop("_link_warning", None)
    restore_view()
    if st.session_state.get("_link_warning"):
        st.warning(st.session_state["_link_warning"], icon="🔗")
    init_state()
    sidebar()
    publish_view()


def _leave_pages_directory_mode() -> None:
    """Route a deep link through app.py's navigation.

    Streamlit serves the first request after start-up in its old "pages/ directory" mode (it sees a folder
    named pages/ next to app.py and has not yet run st.navigation), so a shared link such as /memory would
    run this page alone, with the folder's files as the menu. Clearing that flag and rerunning makes the
    same URL go through app.py, whose st.navigation then opens the requested page.
    """
    from streamlit.runtime.pages_manager import PagesManager

    # Once per session: Streamlit's test harness re-arms the flag on every run, and a rerun there would
    # swallow the click that started the run.
    if PagesManager.uses_pages_directory and not st.session_state.get("_left_pages_directory_mode"):
        st.session_state["_left_pages_directory_mode"] = True
        PagesManager.uses_pages_directory = False
        st.rerun()


def restore_view() -> None:
    """Apply a shared URL's choices once per session; invalid parameters are dropped, never raised."""
    if st.session_state.get("_view_restored"):
        return
    st.session_state["_view_restored"] = True
    params = st.query_params.to_dict()
    view = views.params_to_view(params)
    ignored = views.ignored_params(params)
    model = view.pop("model", None)
    if model:
        if model in models.bundled_models():
            st.session_state["model_choice"] = model
        else:
            st.session_state["model_choice"], st.session_state["custom_model"] = OTHER_MODEL, model
            st.session_state["_link_model"] = model  # a link alone never downloads it: current_model asks
    if "hardware" in view and view["hardware"] not in {hardware.THIS_MACHINE_ID, *(h.id for h in hardware.catalog())}:
        ignored.append(f"hw={view.pop('hardware')}")
    if "group_size" in view and view["group_size"] not in GROUP_SIZES:
        ignored.append(f"group={view.pop('group_size')}")
    if view.get("tokens", 0) > MAX_UI_TOKENS:
        ignored.append(f"tokens={view.pop('tokens')}")
    if ignored:
        st.session_state["_link_warning"] = (
            f"Ignored from the link: {', '.join(f'`{i}`' for i in ignored)} (not a valid choice here: tokens "
            f"16-{MAX_UI_TOKENS}, group sizes {', '.join(map(str, GROUP_SIZES))}, formats and hardware as listed in "
            "the sidebar); the sidebar shows what is used.")
    for key in SHARED_CHOICES:
        if key in view:
            st.session_state[key] = view[key]


def publish_view() -> None:
    """Mirror the sidebar's choices into the URL, so copying the address shares this view."""
    current = {key: st.session_state[key] for key in SHARED_CHOICES}
    current["model"] = model_name() or None
    for name, value in views.view_to_params(current).items():
        if st.query_params.get(name) != value:
            st.query_params[name] = value


def show_error(error: QlabError) -> None:
    """A QlabError as one red line, starting with a capital."""
    message = str(error)
    st.error(message[:1].upper() + message[1:])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a QlabError as one red line; anything else is a bug and keeps its traceback."""
    try:
        yield
    except QlabError as error:
        show_error(error)
        st.stop()


def long_run(label: str, key: str, work: Callable[[Progress, Recorder | None], object], *, cancel_key: str,
             cancel_help: str, prepare: Callable[[], RunMeta | None] | None = None, ready: bool = True,
             nothing_to_do: str | None = None, start_text: str = "Starting...", primary: bool = True,
             columns: Sequence | None = None, kept: Callable[[], str] | None = None) -> bool:
    """A long job's Run and Cancel buttons, and on a press its run: progress bar, each result recorded as it
    finishes, Cancel, the closing message. Returns whether Run was pressed on this script run.

    The buttons ``label`` (widget key ``key``) and "Cancel" (``cancel_key``, tooltip ``cancel_help``) go side by
    side into ``columns`` (two containers), by default a narrow and a wide column. A press when ``ready`` is
    false shows ``nothing_to_do`` (if given) and runs nothing. Otherwise:

    1. a progress bar opens with ``start_text``: say what starts and, for a long job, how long it should take;
    2. ``prepare()`` does what may fail before anything is stored (e.g. computing the baseline) and returns the
       RunMeta of the run to store, or None to store nothing;
    3. ``work(progress, recorder)`` runs inside that stored run (``recorder`` is None when nothing is stored). It
       reports ``progress(fraction, message)`` naming the step that starts (``step_names`` turns a job's "X:
       done" into the next step's name), and for each result as it finishes keeps it in session state (so a
       Cancel or a reload keeps it) and saves it with ``recorder.save``;
    4. Cancel: its press reruns the page, which stops ``work`` at its next progress update (the stored run ends
       ``stopped``); the rerun then says "Cancelled." and ``kept()``: what was kept (any other widget's rerun
       stops the job the same way, and says so). qlab's ``Cancelled`` shows the same line, any other QlabError of
       steps 2-3 one red line, a run database that cannot be written one warning; then the bar is cleared.

    After the call the page draws from session state, whether the job ran now, earlier, or stopped part-way.
    """
    left, right = columns if columns is not None else st.columns([1, 5])
    start = left.button(label, type="primary" if primary else "secondary", key=key)
    cancelled = right.button("Cancel", key=cancel_key, help=cancel_help)
    running = f"_{key}_running"  # still set on the next script run when this one was stopped mid-job
    if st.session_state.pop(running, False) and not start and kept is not None:
        st.info(("Cancelled. " if cancelled else f"{label} stopped: the page changed while it ran. ") + kept())
    if start and not ready and nothing_to_do:
        st.info(nothing_to_do)
    if not (start and ready):
        return start
    bar = st.progress(0.0, text=start_text)

    def progress(fraction: float, message: str) -> None:
        bar.progress(min(1.0, fraction), message)

    st.session_state[running] = True
    try:
        meta = prepare() if prepare is not None else None
        # strict=False: a database that cannot be written stops the saving, not the work.
        recorder = Recorder(None, meta, strict=False) if meta is not None else None
        try:
            with recorder if recorder is not None else contextlib.nullcontext():
                work(progress, recorder)
        except Cancelled as stop:
            st.info(f"Cancelled. {kept()}" if kept is not None else str(stop)[:1].upper() + str(stop)[1:])
    except Exception as error:  # the job ended (a Streamlit stop or rerun is not an Exception: it keeps the flag)
        st.session_state.pop(running, None)
        if not isinstance(error, QlabError):
            raise
        bar.empty()
        show_error(error)
        st.stop()
    st.session_state.pop(running, None)
    if recorder is not None and recorder.error:
        st.warning(recorder.error[:1].upper() + recorder.error[1:])
    bar.empty()
    return start


def step_names(progress: Progress, steps: Sequence[str]) -> Progress:
    """``progress`` for a job of equal ``steps`` (a sweep's schemes, a benchmark's backends) whose messages name
    a step once it is done ("int8 g64: done"): the label names the step running at that fraction instead."""
    def named(fraction: float, message: str) -> None:
        index = min(int(fraction * len(steps) + 1e-9), len(steps) - 1)
        current = steps[index]
        detail = message if message.startswith(current) and not message.endswith(": done") else current
        progress(fraction, f"{index + 1} of {len(steps)}: {detail}")

    return named


# Headers said in words (with units) for result keys; any other snake_case name is spelled out by ``header``.
HEADERS = {
    "kld_mean": "KLD mean (nats)", "kld_p99": "KLD 99th percentile (nats)", "ppl": "perplexity",
    "top1_agreement": "top-1 agreement", "cosine_mean": "cosine to the base model", "retrieval_agreement":
    "nearest-neighbour agreement", "bits_per_weight": "bits/weight", "sqnr_db": "SQNR (dB)",
    "relative_mse": "relative MSE", "twin_kld_mean": "simulated KLD mean (nats)",
    "twin_cosine_mean": "simulated cosine to the base model", "agrees_with_twin": "agrees with simulation",
    "twin": "simulated as", "speedup_vs_fp32": "speed-up over FP32", "label": "scheme",
}
UNIT_SUFFIXES = (("_tokens_per_s", " tokens/s"), ("_per_s", "/s"), ("_pct", " (%)"), ("_ms", " (ms)"),
                 ("_seconds", " (s)"), ("_s", " (s)"), ("_db", " (dB)"), ("_GB", " (GB)"), ("_MB", " (MB)"))
WORDS = {"mse": "MSE", "kld": "KLD", "fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "sqnr": "SQNR", "kv": "KV",
         "gpu": "GPU", "cpu": "CPU", "ppl": "perplexity", "id": "ID", "absmax": "abs-max"}
MISSING = "–"
SNAKE_WORD = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+")
BYTE_WORD = re.compile(r"(?:(?P<what>[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)_)?bytes(?P<per_s>_per_s)?"
                       r"(?P<tail>(?:_[A-Za-z0-9]+)*)\b")


def header(name: str) -> str:
    """A result key as a column header: ``decode_tokens_per_s`` -> "decode tokens/s"."""
    if name in HEADERS:
        return HEADERS[name]
    unit = ""
    for suffix, spelled in UNIT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name, unit = name[: -len(suffix)], spelled
            break
    return " ".join(WORDS.get(word, word) for word in name.split("_")) + unit


def spelled(name: str) -> str:
    """Every snake_case word of a header in words: ``Δ kld_mean [run]`` -> "Δ KLD mean (nats) [run]"."""
    return SNAKE_WORD.sub(lambda match: header(match.group(0)), name)


def _byte_column(name: str, values: pd.Series) -> tuple[str, pd.Series] | None:
    """A column of byte counts (``size_bytes``, ``Δ size_bytes [run]``, ``bandwidth_bytes_per_s``) in MB, GB
    or GB/s with its header to match; None for any other column."""
    match = BYTE_WORD.search(name)
    numbers_only = pd.to_numeric(values, errors="coerce")
    if match is None or numbers_only.notna().sum() != values.notna().sum() or values.dtype == bool:
        return None
    per_second = bool(match.group("per_s"))
    gigabytes = per_second or numbers_only.abs().max() >= 1e10
    unit = "GB/s" if per_second else "GB" if gigabytes else "MB"
    what = "_".join(part for part in (match.group("what"), match.group("tail").strip("_")) if part)
    what = header(what) if what else "size"
    return (name[:match.start()] + f"{what} ({unit})" + name[match.end():],
            numbers_only / (1e9 if gigabytes else 1e6))


def table(frame: pd.DataFrame, *, column_config: dict | None = None, **kwargs) -> object:
    """``st.dataframe`` for people: snake_case headers in words with units, byte counts in MB (GB when large),
    empty cells as a dash instead of "None". ``column_config`` as st.dataframe's; a label given there wins."""
    shown = frame.copy()
    config: dict = {}
    for column in shown.columns:
        given = (column_config or {}).get(column, {})
        if given is None:  # hidden
            config[column] = None
            continue
        entry = {"label": given} if isinstance(given, str) else dict(given)
        name = str(column)
        converted = None if entry.get("label") else _byte_column(name, shown[column])
        if converted is not None:
            name, shown[column] = converted
            entry["label"] = name
            entry.setdefault("type_config", {"type": "number", "format": "%.3f" if "GB" in name else "%.1f"})
        if not entry.get("label"):
            twice = name == "label" and "scheme" in shown.columns  # two columns would read "scheme"
            entry["label"] = (HEADERS[name] if name in HEADERS and not twice else spelled(name))
        missing = shown[column].isna()
        if missing.any():
            fmt = (entry.get("type_config") or {}).get("format")
            numeric = pd.api.types.is_numeric_dtype(shown[column])
            shown[column] = [MISSING if gap else _cell(value, fmt if numeric else None)
                             for value, gap in zip(shown[column], missing, strict=True)]
            entry["type_config"] = {"type": "text"}
            if numeric and not entry.get("alignment"):  # numbers with a gap still line up on the right
                entry["alignment"] = "right"
        config[column] = entry
    kwargs.setdefault("hide_index", True)
    kwargs.setdefault("width", "stretch")
    return st.dataframe(shown, column_config=config, **kwargs)


def _cell(value: object, fmt: str | None) -> str:
    """One cell of a column that also holds gaps, as text (a column of one type, so it shows as written)."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Real):
        return fmt % value if fmt and "%" in fmt else f"{value:.4g}"
    return str(value)


def count(items: Sequence | int, noun: str) -> str:
    """"1 scheme", "3 schemes"."""
    n = items if isinstance(items, int) else len(items)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def model_name() -> str:
    if st.session_state["model_choice"] == OTHER_MODEL:
        return st.session_state["custom_model"].strip()
    return st.session_state["model_choice"]


def sidebar() -> None:
    """Model, target hardware and scheme choices, shared by every page."""
    with st.sidebar:
        st.subheader("Model")
        st.selectbox("Model", [*models.bundled_models(), OTHER_MODEL], key="model_choice",
                     format_func=lambda slug: models.bundled_models()[slug].title
                     if slug in models.bundled_models() else slug, label_visibility="collapsed")
        if st.session_state["model_choice"] == OTHER_MODEL:
            st.text_input("HF id or local directory", key="custom_model",
                          placeholder="org/name or /path/to/model",
                          help="Safetensors or GGUF weights only; custom code is never run.")
        st.selectbox("Run on", models.device_choices(), key="device", format_func=models.device_label,
                     help="Where the model is loaded and evaluated, in its own precision (bf16 for most "
                          "published checkpoints): this CPU, one GPU, or every GPU with the model spread over them.")
        st.subheader("Target hardware")
        catalog = {h.id: h for h in hardware.catalog()}
        ids = [hardware.THIS_MACHINE_ID, *catalog]
        st.selectbox("Target hardware", ids, key="hardware", label_visibility="collapsed",
                     format_func=lambda i: "This machine" if i == hardware.THIS_MACHINE_ID else catalog[i].name)
        target = selected_hardware()
        if target.memory_bytes:
            st.caption(f"{target.memory_bytes / 1e9:.0f} GB memory"
                       + (f", {target.bandwidth_bytes_per_s / 1e9:.0f} GB/s" if target.bandwidth_bytes_per_s
                          else "") + f"; native: {', '.join(target.native_formats)}")
        st.subheader("Scheme")
        st.multiselect("Formats", list(FORMATS), key="formats",
                       help="Each format is one point of the sweep. fp32/fp16/bf16 are plain casts; the others "
                            "use a scale per tensor, channel or group.")
        st.radio("Granularity", ["tensor", "channel", "group"], key="granularity", horizontal=True,
                 help="One scale for the whole tensor, one per output channel (row), or one per group of "
                      "consecutive weights in a row.")
        if st.session_state["granularity"] == "group":
            group_size_slider()
        st.checkbox("Symmetric (zero-point 0)", key="symmetric",
                    help="Asymmetric adds an integer zero-point per block; integer formats only.")
        st.selectbox("Calibration", CALIBRATIONS, key="calibration",
                     help="minmax covers every weight; percentile clips the top 0.1%; mse searches the clip "
                          "range with the least squared error.")
        st.selectbox("Rounding algorithm", ALGORITHMS, key="algorithm",
                     help="rtn rounds each weight to its nearest level. gptq rounds column by column and "
                          "spreads each error over the columns not yet rounded, using second-order "
                          "statistics of the layer's inputs on the end of the text (slower, more accurate); "
                          "gptq-act-order takes the inputs with the largest statistics first. awq scales each "
                          "input by how large its activations are before rounding. hqq fits each block's scale "
                          "and zero-point without any text (integer formats).")
        if st.session_state["algorithm"] == "gptq-act-order" and st.session_state["granularity"] == "group":
            st.checkbox("Static groups", key="static_groups",
                        help="Group scales from the weights in their stored order, so a serving engine needs no "
                             "group index; act-order then only changes the rounding order.")
        st.selectbox("Sparsity", SPARSITIES, key="sparsity", format_func=SPARSITY_LABELS.get,
                     help="2:4 keeps two of every four consecutive weights of a row, the pattern sparse tensor "
                          "cores run: by magnitude keeps the two largest; SparseGPT (with gptq) chooses from the "
                          "layer's input statistics and compensates. Stored as the kept values plus 2 bits of "
                          "position each.")
        st.number_input("Evaluation tokens", min_value=16, max_value=MAX_UI_TOKENS, step=256, key="tokens",
                        help="Tokens of text the baseline and every scheme are evaluated on.")


def group_size_slider() -> None:
    """The group sizes that divide every quantized layer's input width of the sidebar's model, once this
    session has loaded it (before that, and where none divides, every size: the pages then say which fit)."""
    widths = st.session_state.get("_linear_widths", {}).get(model_name())
    offered = offered_group_sizes(widths)
    if st.session_state["group_size"] not in offered:
        wanted = st.session_state["group_size"]
        st.session_state["group_size"] = max((g for g in offered if g <= wanted), default=offered[0])
        st.session_state["_group_size_note"] = (f"Group size {wanted} does not divide this model's layers; "
                                                f"{st.session_state['group_size']} is used.")
    st.select_slider("Group size", offered, key="group_size",
                     help="Smaller groups track local ranges better but store more scales (16 bits each)."
                          + (f" Offered: the sizes that divide every quantized layer's input width "
                             f"({', '.join(map(str, widths))})." if widths else ""))
    note = st.session_state.pop("_group_size_note", None)
    if note:
        st.caption(note)


def offered_group_sizes(widths: Sequence[int] | None) -> tuple[int, ...]:
    fitting = tuple(g for g in GROUP_SIZES if widths and all(w % g == 0 for w in widths))
    return fitting or GROUP_SIZES


def selected_hardware() -> hardware.Hardware:
    return hardware.get(st.session_state["hardware"])


def schemes() -> list[QuantScheme]:
    """The sidebar's formats as schemes (raises QlabError for invalid combinations)."""
    if not st.session_state["formats"]:
        raise QlabError("pick at least one format in the sidebar.")
    return [scheme_for(f) for f in st.session_state["formats"]]


def scheme_for(fmt: str) -> QuantScheme:
    symmetric = st.session_state["symmetric"] or FORMATS[fmt].kind != "integer"
    algorithm = st.session_state["algorithm"]
    return QuantScheme(fmt, st.session_state["granularity"], st.session_state["group_size"], symmetric,
                       st.session_state["calibration"], algorithm=algorithm,
                       static_groups=st.session_state["static_groups"] and algorithm == "gptq-act-order",
                       sparsity=st.session_state["sparsity"])


def load_model(name: str) -> models.LoadedModel:
    """The model on the sidebar's "Run on" device, one copy per model and device for all sessions: never
    mutate it (the sweep works block by block or on shadows)."""
    return _cached_model(name, st.session_state.get("device", "cpu"))


@st.cache_resource(show_spinner="Loading the model (the first load of SmolLM2 converts its GGUF, ~20 s)...",
                   max_entries=2)
def _cached_model(name: str, device: str) -> models.LoadedModel:
    return models.load(name, device=device)


def baseline(loaded: models.LoadedModel, model: str, spec: EvalSpec, text_sha256: str) -> Baseline:
    """The model's reference outputs in its own precision for an evaluation spec, shared by all sessions."""
    return _cached_baseline(loaded, model, loaded.device, spec, text_sha256)


@st.cache_resource(show_spinner="Computing the baseline (the model in its own precision)...", max_entries=4)
def _cached_baseline(_loaded: models.LoadedModel, model: str, device: str, spec: EvalSpec,
                     text_sha256: str) -> Baseline:
    return compute_baseline(_loaded, spec)


def current_model() -> models.LoadedModel:
    """Load (or fetch from cache) the sidebar's model, showing a clear error on failure.

    The first load in a session also tells the sidebar which group sizes fit the model's layers: the page then
    reruns once, so the slider offers only those before any button can be pressed.
    """
    linked = st.session_state.get("_link_model")
    if linked and linked == model_name() and models.would_download(linked):
        st.info(f"This link names `{linked}`, which is not on this machine: loading it downloads its weights from "
                "the Hugging Face Hub (its size is checked against free disk and memory first).", icon="🔗")
        if not st.button("Download and load it", key="link_download", type="primary"):
            st.stop()
    st.session_state.pop("_link_model", None)  # a click, a cached or local model, or another model typed since
    with user_errors():
        loaded = load_model(model_name())
    known = st.session_state.setdefault("_linear_widths", {})
    if model_name() not in known:
        widths = tuple(sorted({module.in_features for _, module in models.quantizable_linears(loaded.model)}))
        known[model_name()] = widths
        if (st.session_state["granularity"] == "group"
                and offered_group_sizes(widths) != GROUP_SIZES):
            st.session_state["_widths_rerun"] = True
            st.rerun()
    return loaded


def show_caveat(loaded: models.LoadedModel) -> None:
    """A model's baseline caveat in one short line linking to its explanation on the Model page (which shows
    it in full); call it once per page, after the page has said what it is for."""
    if not loaded.source.caveat:
        return
    short = loaded.source.caveat.split(". ")[0].rstrip(".") + "."
    st.info(short, icon="ℹ️")
    try:
        st.page_link("pages/model.py", label="Why this matters for the numbers here (Model page)",
                     icon=":material/info:")
    except StreamlitPageNotFoundError:  # run standalone (AppTest, `streamlit run pages/...`): no navigation
        st.caption("The Model page explains why this matters for the numbers here.")


def stored_sweep(loaded: models.LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec, state_key: str,
                 where_kept: str) -> tuple[dict, Callable[[], RunMeta], Callable[[Progress, Recorder], None],
                                           Callable[[], str]]:
    """A sweep of ``schemes`` for ``long_run``: the records finished so far (restored from the run history after a
    reload), and the prepare / work / kept callables that measure the rest, each row saved as it finishes."""
    from qlab.analyses.sweep import run_sweep
    from qlab.models.loading import model_sha256
    from qlab.store import Store, sweep_meta

    measured = st.session_state.setdefault(state_key, {})  # (model, weights, budget) -> {scheme: record}
    key = (loaded.name, model_sha256(loaded), spec.tokens)
    if key not in measured:  # a reload: what the run history holds for these schemes (any sweep of them)
        try:
            measured[key] = Store().stored_schemes(loaded.name, key[1], spec.text_sha256, spec.tokens)
        except QlabError as error:
            measured[key] = {}
            st.warning(f"Run history unavailable: {error}")
    finished = measured[key]

    def prepare() -> RunMeta:
        baseline(loaded, loaded.name, spec, spec.text_sha256)  # a failing baseline stores no run
        return sweep_meta(loaded, list(schemes), spec, st.session_state["hardware"])

    def work(progress: Progress, recorder: Recorder) -> None:
        reference = baseline(loaded, loaded.name, spec, spec.text_sha256)
        named = step_names(progress, [s.label for s in schemes])
        for row in run_sweep(loaded, list(schemes), spec, baseline=reference, progress=named):
            finished[row.scheme] = row.to_record()  # kept (and stored) before the next scheme starts
            recorder.save(row)

    def kept() -> str:
        done = [s.label for s in schemes if s in finished]
        return (f"Kept {count(done, 'finished scheme')} ({', '.join(done)}), {where_kept}."
                if done else "No scheme had finished, so none was kept.")

    return finished, prepare, work, kept
