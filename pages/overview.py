"""Overview: which format to ship the sidebar's model in on its target hardware, answered on one screen.

The verdict sits on top, four panels below. What the run store holds shows at once; the missing pieces run on a
worker thread, cheapest first, one progress line each, and the page polls them. On a bundled model they start
by themselves, on any other model after one click.
"""

import urllib.parse
import uuid
from pathlib import Path

import streamlit as st

from pages import common
from qlab import views
from qlab.analyses import overview, verdict
from qlab.analyses.sweep import check_schemes
from qlab.backends import format_speed
from qlab.core.errors import QlabError
from qlab.models.evaluate import EvalSpec
from qlab.models.loading import bundled_models, model_sha256, resolve
from qlab.store import Store
from qlab.store import overview as recorded

POLL_S = 0.5  # the progress lines alone rerun this often: cheap, and the finished answer shows sooner
INTRO = ("**qlab answers one question: which precision should you ship this model in, on that hardware?** "
         "Pick the model, the target and the formats in the sidebar: the verdict and the four panels below fill in "
         "as each piece is measured, and every panel links to its full page.")
PANEL_LINKS = {"accuracy": ("pages/quantize.py", "Every metric on the Quantize page", ":material/tune:"),
               "memory": ("pages/memory.py", "Context, batch and every target on the Memory page",
                          ":material/memory_alt:"),
               "speed": ("pages/speed.py", "Every backend on the Speed page", ":material/speed:"),
               "sensitivity": ("pages/sensitivity.py", "The full analysis on the Sensitivity page",
                               ":material/grid_on:")}
PANEL_PIECES = {"accuracy": "sweep", "memory": "memory", "speed": "predicted", "sensitivity": "sensitivity"}
STATE_ICONS = {"waiting": ":material/hourglass_empty:", "done": ":material/check_circle:",
               "cancelled": ":material/stop_circle:", "failed": ":material/error:"}


@st.cache_resource
def overviews() -> dict:
    """Per (model, weights, request): the pieces known so far and the job computing the rest, shared by
    sessions, so a reload or a second tab finds a running job instead of starting another."""
    return {}


def about(seconds: float, lead: str = ", ") -> str:
    return f"{lead}about {seconds:.0f} s" if seconds > overview.ANNOUNCE_AFTER_S else ""


def leave_other_overviews(key=None) -> None:
    """Stops the job this session started for another overview than ``key`` (None: the page shows none now): a
    session that moves on, to another model or to one still waiting for its click, stops the job it left."""
    session = st.session_state.setdefault("overview_session", uuid.uuid4().hex)
    entries = overviews()
    previous = st.session_state.get("overview_key")
    if previous is not None and previous != key and previous in entries:
        old = entries[previous]["job"]
        if old is not None and old.alive and entries[previous]["owner"] == session:
            old.cancel(by_user=False)


common.page_setup()
st.title("Overview")
st.markdown(INTRO)
name = common.model_name()
if not name:
    leave_other_overviews()
    st.info("Type a Hugging Face id or a local directory in the sidebar, or pick a bundled model.")
    st.stop()
bundled = name in bundled_models()
with common.user_errors():
    schemes = tuple(common.schemes())
    if not bundled and (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))):
        resolve(name)  # a local path is checked now (no download); a hub id only after the click
opened = st.session_state.setdefault("overview_opened", [])
if not bundled and name not in opened:
    st.info(f"**{name}** is not a bundled model: loading it may download its weights and measuring it takes "
            "minutes, so nothing starts until you ask.")
    if not st.button("Load it and compute the overview", type="primary", key="overview_open"):
        leave_other_overviews()
        st.stop()
    opened.append(name)

loaded = common.current_model()
common.show_caveat(loaded)
with common.user_errors():
    request = overview.OverviewRequest(schemes, st.session_state["hardware"], EvalSpec(st.session_state["tokens"]))
    key = (loaded.name, model_sha256(loaded), request)
    if key not in overviews():
        check_schemes(loaded, list(schemes), request.spec)  # it sizes every scheme: once per request, not each rerun
target = request.target
loss = verdict.loss_measure(loaded.kind)

answer = st.container()  # filled below, once the bound is read
bound_column, measure_column = st.columns([2, 3])
bound_key = f"overview_bound_{loaded.kind}"
if not st.session_state.get("overview_bound_linked"):  # a shared link's bound, once per session (as the sidebar)
    st.session_state["overview_bound_linked"] = True
    linked = views.params_to_view(st.query_params.to_dict()).get("bound")  # a bad one is said by page_setup
    if linked is not None:
        st.session_state[bound_key] = linked
st.session_state.setdefault(bound_key, loss.default_bound)
bound = bound_column.number_input(f"Accuracy bound: the most {loss.title} you accept", min_value=0.0,
                                  step=loss.default_bound / 10, format="%g", key=bound_key)
if st.query_params.get("bound") != (shared_bound := views.view_to_params({"bound": float(bound)})["bound"]):
    st.query_params["bound"] = shared_bound  # the share link carries the bound the verdict uses
st.session_state.setdefault("overview_measure", True)
measure_here = measure_column.toggle("Also measure speed on this machine", key="overview_measure",
                                     help="One real backend per format, and the 16-bit reference (bf16): short "
                                          "runs, repeated until they agree, at most "
                                          f"{request.speed_cap_s:.0f} s in all.")

# The pieces of this request, shared with other sessions.
leave_other_overviews(key)
session = st.session_state["overview_session"]
entries = overviews()
st.session_state["overview_key"] = key
if key not in entries:
    try:
        restored = recorded.restore(Store(), loaded, request)
    except QlabError as error:
        st.warning(f"Run history unavailable: {error}")
        restored = overview.Pieces()
    entries[key] = {"pieces": restored, "job": None, "owner": None, "held": set()}
entry = entries[key]
pieces, job = entry["pieces"], entry["job"]
recorded.fill_arithmetic(loaded, request, pieces)  # memory plans and roofline: milliseconds, never stale
if job is not None and not job.alive and entry.get("absorbed") is not job:
    # A piece the user cancelled, or one that failed, waits for Resume instead of starting again by itself.
    entry["held"] |= job.cancelled_by_user | {p for p, s in job.state.items() if s == "failed"}
    entry["absorbed"] = job
todo = [] if job is not None and job.alive else [
    s for s in recorded.steps(loaded, request, pieces, measure_here) if s.piece not in entry["held"]]
if todo:
    try:
        fresh = recorded.restore(Store(), loaded, request)  # what other jobs stored meanwhile
        for piece in overview.PIECES:
            for label, record in getattr(fresh, piece).items():
                getattr(pieces, piece).setdefault(label, record)
    except QlabError:
        pass  # said above when the entry was made; the job then saves nothing either
    todo = [s for s in recorded.steps(loaded, request, pieces, measure_here) if s.piece not in entry["held"]]
    if todo:
        job = recorded.OverviewJob(loaded, request, pieces, todo, Store()).start()
        entry.update(job=job, owner=session)
running = job is not None and job.alive
# The answer below is drawn from the results the job had by now; the progress lines (a fragment, polling on its
# own) rerun the whole page only when a result arrives or the job ends, not on every change of state.
st.session_state["overview_drawn"] = (job.results, running) if job is not None else None


@st.fragment(run_every=POLL_S if running else None)
def progress_lines() -> None:
    """One line per piece of the running job; a full rerun redraws the answer when a result arrives."""
    current = entry["job"]
    if current is None:
        return
    if current.alive:
        left = sum(s.seconds for s in current.todo if current.state[s.piece] in ("waiting", "running"))
        st.caption(f"Computing what is not stored yet, cheapest first{about(left)} in all; each piece is "
                   "saved as it finishes.")
        for step in current.todo:
            state = current.state[step.piece]
            text, cancel = st.columns([6, 1])
            if state == "running":
                fraction, message = current.progress.get(step.piece, (0.0, "starting"))
                estimate = f" ({about(step.seconds, '')})" if step.announced else ""
                text.progress(fraction, text=f"{step.title}{estimate}: {message}")
            else:
                note = f" ({current.notes[step.piece]})" if current.notes.get(step.piece) else ""
                text.caption(f"{STATE_ICONS[state]} {step.title}: {state}{note}"
                             + (about(step.seconds) if state == "waiting" else ""))
            if state in ("waiting", "running"):
                cancel.button("Cancel", key=f"overview_cancel_{step.piece}", on_click=current.cancel,
                              args=(step.piece,), help="Stops this piece; what it finished is kept, the other "
                                                       "pieces go on.")
    if (current.results, current.alive) != st.session_state.get("overview_drawn"):
        st.rerun()


progress_lines()

for piece in overview.PIECES:
    if piece in entry["held"] and pieces.missing(piece, request):
        note = job.notes.get(piece, "") if job is not None else ""
        text, resume = st.columns([6, 1])
        if job is not None and job.state.get(piece) == "failed":
            text.error(f"{overview.TITLES[piece]} failed: {note}")
        else:
            text.caption(f"{STATE_ICONS['cancelled']} {overview.TITLES[piece]}: {note or 'cancelled'}.")
        resume.button("Resume", key=f"overview_resume_{piece}", on_click=entry["held"].discard, args=(piece,))
if job is not None and job.save_error and not job.alive:
    st.warning(job.save_error[:1].upper() + job.save_error[1:])

result = overview.decide(pieces, request, loaded.kind, float(bound))
with answer:
    title, _, reason = result.headline.partition(": ")
    st.subheader(title)
    if reason:
        st.markdown(f"**{reason[:1].upper() + reason[1:]}**")
    lines = verdict.details(result)
    st.markdown("\n".join(f"- {line}" for line in lines if line not in result.warnings))
    for warning in result.warnings:
        st.markdown(f"⚠️ {warning}")
    st.caption(f"Rule: {result.rule}")

# The histogram's data and the figures are kept beside the pieces, for every session and rerun that shows them.
layer = overview.most_sensitive_layer(pieces, request)
grids_by_layer = entry.setdefault("grids", {})
if layer and layer not in grids_by_layer:
    grids_by_layer[layer] = overview.layer_grids(loaded, layer, request.schemes, request.spec)
grids = grids_by_layer.get(layer) if layer else None
figures = recorded.panel_figures(pieces, request, result, grids, cache=entry.setdefault("figures", {}))
waiting = {"accuracy": "the accuracy sweep", "memory": "the memory plans", "speed": "the speed predictions",
           "sensitivity": "the per-layer sensitivity"}
top, bottom = st.columns(2), st.columns(2)
for column, panel in zip([*top, *bottom], ("accuracy", "memory", "speed", "sensitivity"), strict=True):
    with column.container(border=True):
        if figures[panel] is None:
            skipped = pieces.skipped.get(PANEL_PIECES[panel])
            st.info(f"{overview.TITLES[PANEL_PIECES[panel]]}: {skipped[:1].lower() + skipped[1:]}" if skipped
                    else f"Waiting for {waiting[panel]}.")
        else:
            st.plotly_chart(figures[panel], key=f"overview_{panel}")
        if panel == "speed" and figures["speed"] is not None:
            noisy = [r["label"] for s in request.schemes if (r := pieces.measured.get(s.label)) and r.get("noisy")]
            here = "CPU" if format_speed.device_of(loaded) == "cpu" else "GPU"
            runs, agree = format_speed.QUICK_SPEC.repetitions, f"{format_speed.NOISY_SPREAD_PCT:g} %"
            st.caption(f"Predicted: roofline on {target.name} at {request.context_for(loaded):,} tokens of context, "
                       "batch 1 (bandwidth / bytes read per token; a format without a kernel there runs at the "
                       f"dense speed). Measured: one backend per format on this {here}, the median of the "
                       f"{runs} fastest runs once they agree within {agree} (at most {request.speed_cap_s:.0f} s for all "
                       "formats), whiskers min to max"
                       + (f"; noisy (its runs never agreed within {agree}: the median of all of them): "
                          f"{', '.join(noisy)}" if noisy else "")
                       + ".")
        if panel == "sensitivity" and figures["histogram"] is not None:
            st.plotly_chart(figures["histogram"], key="overview_histogram")
            st.caption(f"{grids.layer}: {grids.where}; each line is a value the format can store there.")
        page, label, icon = PANEL_LINKS[panel]
        st.page_link(page, label=label, icon=icon)
        if panel == "sensitivity":
            st.page_link("pages/weights.py", label="Any layer's weights and grids on the Weights page",
                         icon=":material/bar_chart:")

share, download = st.columns([3, 2])
if st.context.url:
    link = st.context.url + "?" + urllib.parse.urlencode(st.query_params.to_dict(), safe=",/:")
    share.caption("Share this answer (model, target, formats, evaluation settings and the accuracy bound):")
    share.code(link, language=None)
download.download_button(
    "Download this overview (HTML)", key="overview_download", mime="text/html",
    file_name=f"qlab-overview-{loaded.name.replace('/', '_')}-{target.id}.html",
    data=lambda: recorded.overview_html(loaded.name, request, result, figures,
                                        [loaded.source.caveat] if loaded.source.caveat else []))
