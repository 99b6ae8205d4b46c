"""The Overview's verdict: which format to ship on a target, from measured accuracy, memory plans and speed.

A pure function of plain data (records as the sweep, the memory planner and the roofline produce them, keyed
by scheme label), so the page, the CLI and the HTML export give the same answer for the same inputs.

The rule: among the formats that fit the target's memory and lose at most the accuracy bound, take the one
predicted fastest on the target; predictions within ``TIE_FRACTION`` of the fastest count as a tie, which the
smaller size breaks, then the lower loss. Without predictions, the smallest wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from qlab.core.errors import QlabError

# Predictions this close (relative) are one speed: a roofline is no finer than that.
TIE_FRACTION = 0.02


@dataclass(frozen=True)
class LossMeasure:
    """How accuracy loss against the base model (in its own precision) is measured for a model kind, and its default bound."""

    name: str
    unit: str
    default_bound: float

    @property
    def title(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name


# KLD: llama.cpp's quantization reports use it; 0.01 nats/token is where top-1 agreement stays near 99 %.
# 1 - cosine: a cosine of 0.999 keeps nearest neighbours of sentence embeddings almost always unchanged.
LOSS: dict[str, LossMeasure] = {
    "causal-lm": LossMeasure("KL divergence to the base model", "nats/token", 0.01),
    "embedding": LossMeasure("1 - cosine similarity to the base model", "", 0.001),
}
SPEED_UNIT = {"causal-lm": "tokens/s", "embedding": "sentences/s"}


def loss_measure(kind: str) -> LossMeasure:
    if kind not in LOSS:
        raise QlabError(f"no accuracy measure for a '{kind}' model; qlab handles {', '.join(LOSS)} models.")
    return LOSS[kind]


def accuracy_loss(row: Mapping) -> float | None:
    """A sweep row's loss, lower is better: mean KLD (LMs) or 1 - mean cosine (embedding models)."""
    if row.get("kld_mean") is not None:
        return float(row["kld_mean"])
    if row.get("cosine_mean") is not None:
        return 1.0 - float(row["cosine_mean"])
    return None


@dataclass(frozen=True)
class Candidate:
    """One format's facts on the target, joined by scheme label; None where a piece is not known yet."""

    label: str
    format: str
    loss: float | None = None
    weights_bytes: int | None = None  # the model as stored, scales included
    scales_bytes: int | None = None
    kv_bytes: int | None = None
    total_bytes: int | None = None  # weights + KV + activations + overhead on the target
    fits: bool | None = None
    predicted_speed: float | None = None  # on the target (roofline)
    native: bool | None = None  # the target has a kernel for the format
    measured_speed: float | None = None  # on this machine
    measured_backend: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The answer: recommended format, runner-up and why, what does not fit, warnings, and the rule."""

    kind: str
    target: str
    memory_bytes: int | None
    bound: float
    loss: LossMeasure
    rule: str
    recommended: Candidate | None
    runner_up: Candidate | None
    runner_up_why: str | None
    does_not_fit: tuple[Candidate, ...]
    over_bound: tuple[Candidate, ...]
    not_measured: tuple[str, ...]
    warnings: tuple[str, ...]
    headline: str
    baseline_predicted: float | None = None  # the 16-bit baseline's speed on the target
    baseline_measured: float | None = None  # and here
    baseline_name: str = "16-bit"

    @property
    def speed_unit(self) -> str:
        return SPEED_UNIT.get(self.kind, "per s")

    def to_record(self) -> dict:
        """JSON-ready form (the CLI's ``--json`` and the stored summary)."""
        record = asdict(self)
        record["loss"] = {"name": self.loss.name, "unit": self.loss.unit}
        record["details"] = details(self)
        return record


def candidates(rows: Sequence[Mapping], plans: Mapping[str, Mapping] | None = None,
               predicted: Mapping[str, float] | None = None, measured: Mapping[str, Mapping] | None = None,
               native: Mapping[str, bool] | None = None, formats: Mapping[str, str] | None = None
               ) -> list[Candidate]:
    """Join the pieces by scheme label, in the order labels first appear (sweep rows, then plans).

    ``rows``: sweep records; ``plans``: memory records for the target; ``predicted``: speed on the target;
    ``measured``: ``{"speed": ..., "backend": ...}`` here; ``native``: whether the target has the format's
    kernel; ``formats``: label -> format for labels that have no sweep row yet.
    """
    plans, predicted, measured, native = plans or {}, predicted or {}, measured or {}, native or {}
    by_label = {str(r["label"]): r for r in rows}
    labels = list(dict.fromkeys([*by_label, *plans, *(formats or {})]))
    found = []
    for label in labels:
        row, plan, here = by_label.get(label, {}), plans.get(label, {}), measured.get(label, {})
        fmt = row.get("format") or (formats or {}).get(label) or (plan.get("formats") or [label.split()[0]])[0]
        found.append(Candidate(
            label=label, format=str(fmt), loss=accuracy_loss(row),
            weights_bytes=plan.get("weights_bytes", row.get("size_bytes")),
            scales_bytes=plan.get("scales_bytes", row.get("scale_bytes")),
            kv_bytes=plan.get("kv_cache_bytes"), total_bytes=plan.get("total_bytes"), fits=plan.get("fits"),
            predicted_speed=predicted.get(label), native=native.get(label),
            measured_speed=here.get("speed"), measured_backend=here.get("backend")))
    return found


def decide(found: Sequence[Candidate], *, bound: float, kind: str, target: str, memory_bytes: int | None = None,
           baseline_predicted: float | None = None, baseline_measured: float | None = None,
           baseline_name: str = "16-bit") -> Verdict:
    """Apply the rule (module docstring) to ``candidates(...)``; ``bound`` is in the kind's loss measure."""
    if bound < 0:
        raise QlabError(f"the accuracy bound must be 0 or more, got {bound:g}; set a non-negative bound.")
    loss = loss_measure(kind)
    measured = [c for c in found if c.loss is not None]
    does_not_fit = tuple(c for c in found if c.fits is False)
    fitting = [c for c in measured if c.fits is not False]
    within = [c for c in fitting if c.loss <= bound]
    over = tuple(c for c in fitting if c.loss > bound)
    ranked = _ranked(within)
    recommended = ranked[0] if ranked else None
    runner_up, why = _runner_up(recommended, ranked[1:], over, bound, target)
    rule = (f"Among the formats that fit {target}'s memory and lose at most {bound:g}{_unit(loss)} of "
            f"{loss.name}, the one predicted fastest there (within {TIE_FRACTION:.0%}), then the smaller, then "
            "the more accurate.")
    verdict = Verdict(kind=kind, target=target, memory_bytes=memory_bytes, bound=bound, loss=loss, rule=rule,
                      recommended=recommended, runner_up=runner_up, runner_up_why=why, does_not_fit=does_not_fit,
                      over_bound=over, not_measured=tuple(c.label for c in found if c.loss is None),
                      warnings=_warnings(found, target), headline="", baseline_predicted=baseline_predicted,
                      baseline_measured=baseline_measured, baseline_name=baseline_name)
    return _with_headline(verdict, found, measured, fitting)


def _ranked(within: Sequence[Candidate]) -> list[Candidate]:
    """The rule's order: fastest predicted (ties within TIE_FRACTION), then smallest, then most accurate;
    formats without a prediction come after those with one."""
    remaining, order = list(within), []
    while remaining:
        fastest = max((c.predicted_speed for c in remaining if c.predicted_speed is not None), default=None)
        tied = remaining if fastest is None else [c for c in remaining if c.predicted_speed is not None
                                                  and c.predicted_speed >= fastest * (1 - TIE_FRACTION)]
        best = min(tied, key=lambda c: (c.weights_bytes if c.weights_bytes is not None else float("inf"),
                                        c.loss, c.label))
        order.append(best)
        remaining.remove(best)
    return order


def _runner_up(recommended: Candidate | None, others: Sequence[Candidate], over: Sequence[Candidate],
               bound: float, target: str) -> tuple[Candidate | None, str | None]:
    if recommended is None:
        return None, None
    if others:
        second = others[0]
        reasons = []
        if second.predicted_speed and recommended.predicted_speed:
            ratio = recommended.predicted_speed / second.predicted_speed
            if ratio > 1 + TIE_FRACTION:
                reasons.append(f"{ratio:.1f}x slower predicted on {target}")
            elif second.weights_bytes and recommended.weights_bytes:
                reasons.append(f"as fast on {target} but {second.weights_bytes / recommended.weights_bytes:.1f}x "
                               "larger")
        elif second.weights_bytes and recommended.weights_bytes:
            reasons.append(f"{second.weights_bytes / recommended.weights_bytes:.1f}x larger")
        if second.loss < recommended.loss:
            reasons.append(f"more accurate ({_number(second.loss)} against {_number(recommended.loss)}): "
                           "take it if accuracy matters more than speed and size")
        return second, "; ".join(reasons) or "next by the rule"
    if over:
        closest = min(over, key=lambda c: c.loss)
        return closest, (f"loses {_number(closest.loss)}, over the bound of {bound:g}; raise the bound to "
                         "consider it")
    return None, None


def _warnings(found: Sequence[Candidate], target: str) -> tuple[str, ...]:
    """"Smaller but not faster here" for each quantized format the target has no kernel for."""
    return tuple(f"{c.label} is smaller but not faster on {target}: there is no {c.format} kernel there, so the "
                 "weights are expanded to the dense format before every matmul."
                 for c in found if c.native is False)


def _with_headline(verdict: Verdict, found: Sequence[Candidate], measured: Sequence[Candidate],
                   fitting: Sequence[Candidate]) -> Verdict:
    v, unit = verdict, _unit(verdict.loss)
    if v.recommended is not None:
        r = v.recommended
        text = f"Ship {r.label} on {v.target}: it loses {_number(r.loss)}{unit} (bound {v.bound:g})"
        if r.total_bytes is not None and v.memory_bytes:
            text += f" and needs {size_words(r.total_bytes)} of {size_words(v.memory_bytes)}"
        if r.predicted_speed and v.baseline_predicted:
            text += f"; predicted {r.predicted_speed / v.baseline_predicted:.1f}x the {v.baseline_name} speed there"
        return replace(v, headline=text + ".")
    if found and all(c.fits is False for c in found):
        smallest = min(found, key=lambda c: c.total_bytes or 0)
        need = f" needs {size_words(smallest.total_bytes)}" if smallest.total_bytes is not None else " does not fit"
        return replace(v, headline=f"No chosen format fits {v.target}: the smallest, {smallest.label},{need}"
                                   + (f" of {size_words(v.memory_bytes)}" if v.memory_bytes else "")
                                   + "; pick a larger target or a smaller format.")
    if not measured:
        return replace(v, headline="No accuracy measured yet: the verdict appears when the sweep has run.")
    if not fitting:
        return replace(v, headline="No measured format fits " + v.target + "; pick a larger target or a smaller "
                                   "format.")
    closest = min(fitting, key=lambda c: c.loss)
    return replace(v, headline=f"No format that fits loses at most {v.bound:g}{unit}: the most accurate, "
                               f"{closest.label}, loses {_number(closest.loss)}; raise the bound or add a wider "
                               "format (int8, fp16).")


def details(verdict: Verdict) -> list[str]:
    """The verdict's supporting lines in words: sizes, speeds, runner-up, what does not fit, warnings."""
    lines = []
    r, speed_unit = verdict.recommended, verdict.speed_unit
    if r is not None:
        if r.weights_bytes is not None:
            size = f"Size: {size_words(r.weights_bytes)} of weights"
            if r.scales_bytes:
                size += f" (scales and zero-points {size_words(r.scales_bytes)} of it)"
            if r.kv_bytes is not None:
                size += f", KV cache {size_words(r.kv_bytes)}"
            if r.total_bytes is not None:
                size += f", {size_words(r.total_bytes)} in all"
                if verdict.memory_bytes:
                    size += f" of {verdict.target}'s {size_words(verdict.memory_bytes)}"
            lines.append(size + ".")
        speeds = []
        if r.predicted_speed is not None:
            text = f"predicted {r.predicted_speed:,.0f} {speed_unit} on {verdict.target}"
            if verdict.baseline_predicted:
                text += f" ({r.predicted_speed / verdict.baseline_predicted:.2f}x {verdict.baseline_name})"
            speeds.append(text)
        if r.measured_speed is not None:
            text = f"measured {r.measured_speed:,.1f} {speed_unit} on this machine"
            if r.measured_backend:
                text += f" with {r.measured_backend}"
            if verdict.baseline_measured:
                text += f" ({r.measured_speed / verdict.baseline_measured:.2f}x {verdict.baseline_name} here)"
            speeds.append(text)
        if speeds:
            lines.append("Speed: " + "; ".join(speeds) + ".")
    if verdict.runner_up is not None:
        lines.append(f"Runner-up: {verdict.runner_up.label}: {verdict.runner_up_why}.")
    if verdict.does_not_fit:
        lines.append("Does not fit " + verdict.target + ": " + ", ".join(
            c.label + (f" ({size_words(c.total_bytes)})" if c.total_bytes is not None else "")
            for c in verdict.does_not_fit) + ".")
    if verdict.over_bound and verdict.recommended is not None:
        lines.append(f"Over the bound of {verdict.bound:g}: "
                     + ", ".join(f"{c.label} ({_number(c.loss)})" for c in verdict.over_bound) + ".")
    if verdict.not_measured:
        lines.append("Accuracy not measured yet: " + ", ".join(verdict.not_measured) + ".")
    return lines + list(verdict.warnings)


def _unit(loss: LossMeasure) -> str:
    return f" {loss.unit}" if loss.unit else ""


def _number(value: float | None) -> str:
    """A loss as people read it: 3 significant digits, scientific notation below 1e-3 (no micro prefixes)."""
    if value is None:
        return "not measured"
    return f"{value:.3g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def size_words(size_bytes: int | float | None) -> str:
    """Bytes as MB or GB (1e6, 1e9), never a raw count."""
    if size_bytes is None:
        return "unknown"
    return f"{size_bytes / 1e9:.2f} GB" if size_bytes >= 1e9 else f"{size_bytes / 1e6:.1f} MB"
