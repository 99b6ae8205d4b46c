"""The runs an import accepts, as a pydantic schema: a JSON file from elsewhere is data from outside.

Every field ``insert_runs`` stores and the pages read is typed (strictly: no ``"64"`` for a token budget, no
object for an id), bounded (a seed fits torch's 64 bits, times are ISO 8601) and, where qlab rebuilds something
from it, checked the way it will be rebuilt (a scheme is a ``QuantScheme``). ``validate_runs`` turns the first
violation into one ``QlabError`` that names the run, the field and what to do. Unknown keys are ignored.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlab.core.errors import QlabError
from qlab.store.db import STATUSES

MAX_TEXT = 4096  # a label, model id, hardware id or error message; records and settings are free-form JSON


def _iso_time(value: str) -> str:
    datetime.fromisoformat(value)  # ValueError names what is wrong
    return value


def _known_status(value: str) -> str:
    if value not in STATUSES:
        raise ValueError(f"not a run status; use one of {', '.join(STATUSES)}")
    return value


def _scheme(value: dict[str, Any]) -> dict[str, Any]:
    """A stored scheme is rebuilt with ``QuantScheme.from_dict`` when the run is shown or re-run."""
    from qlab.core.quant import QuantScheme

    try:
        QuantScheme.from_dict(value)
    except (QlabError, TypeError, ValueError) as error:
        raise ValueError(f"not a quantization scheme ({str(error).rstrip('.')})") from None
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


# Record fields the History page, the report and the charts compute with: numbers (or null) in every kind,
# and anything named with a unit (STYLE: ``size_bytes``, ``prefill_ms``, ``decode_tokens_per_s``...).
NUMBERS = frozenset({
    "bits_per_weight", "ppl", "kld_mean", "kld_p99", "top1_agreement", "cosine_mean", "cosine_min",
    "retrieval_agreement", "seconds", "eval_tokens", "tokens", "speedup_vs_fp32", "roofline_fraction",
    "twin_kld_mean", "twin_cosine_mean", "threads", "estimated_delta", "block_delta", "linear_delta",
    "predicted_delta", "relative_mse", "sqnr_db", "weight_kurtosis", "input_outlier_channels", "value", "delta",
    "predicted_error", "context_tokens", "batch", "max_context", "max_batch", "gpus_needed", "unit_index"})
NUMBER_SUFFIXES = ("_bytes", "_ms", "_per_s", "_seconds", "_pct", "_gb")
# Fields drawn as names (axes, legends, table keys).
TEXTS = frozenset({"layer", "layer_type", "metric", "backend", "library", "scheme", "hardware", "hardware_id",
                   "name", "format"})


# Result kinds laid out field by field (a run's closing summary and a ``bench sweep`` timing row are free-form).
LAID_OUT = frozenset({"sweep", "memory", "sensitivity_linear", "sensitivity_block", "mix", "recommendation", "bench"})


def _record(kind: str, record: dict[str, Any], where: str = "record") -> None:
    """Raise ValueError naming the first field of a result record that has the wrong type for what reads it."""
    if kind not in LAID_OUT or (kind == "bench" and "backend" not in record):
        return
    for key, value in record.items():
        numeric = key in NUMBERS or key.endswith(NUMBER_SUFFIXES) or (kind == "mix" and key == "error")
        if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{where}'s {key} is {_short(value)}, not a number")
        if key in TEXTS and value is not None and not isinstance(value, str):
            raise ValueError(f"{where}'s {key} is {_short(value)}, not text")
    if kind == "recommendation" and not (isinstance(record.get("assignment", {}), dict) and all(
            isinstance(v, str) for v in record.get("assignment", {}).values())):
        raise ValueError(f"{where}'s assignment is not a map of layer to scheme")
    if kind == "memory":
        targets = record.get("targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
            raise ValueError(f"{where}'s targets is {_short(targets)}, not a list of targets")
        for target in targets:
            _record(kind, target, f"{where}'s target")


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Time = Annotated[str, Field(max_length=64), AfterValidator(_iso_time)]
Scheme = Annotated[dict[str, Any], AfterValidator(_scheme)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ResultIn(_Strict):
    """One stored result as ``runs export`` writes it."""

    position: Annotated[int, Field(ge=0, le=10**9)] | None = None
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    label: Text
    record: dict[str, Any]
    scheme: Scheme | None = None
    created_at: Time | None = None

    @model_validator(mode="after")
    def _typed_record(self) -> ResultIn:
        _record(self.kind, self.record)
        return self


class SettingsIn(BaseModel):
    """A run's settings: free-form, but the schemes a sweep lists must be schemes."""

    model_config = ConfigDict(strict=True, extra="allow")
    schemes: list[Scheme] = []


class RunIn(_Strict):
    """One run as ``runs export`` writes it (``StoredRun.to_dict``)."""

    id: Annotated[str, Field(pattern=r"^[0-9a-f]{4,64}$")]
    created_at: Time
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    status: Annotated[str, AfterValidator(_known_status)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    model_sha256: Text | None = None
    hardware: Text | None = None
    text_sha256: Text | None = None
    text_name: Text | None = None
    tokens: Annotated[int, Field(ge=0, le=10**9)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None  # torch's seeds are unsigned 64-bit
    finished_at: Time | None = None
    seconds: Annotated[float, Field(ge=0), AfterValidator(_finite)] | None = None
    error: Annotated[str, Field(max_length=100_000)] | None = None
    settings: SettingsIn = SettingsIn()
    environment: dict[str, Any] = {}
    results: list[ResultIn]


def validate_runs(runs: list[Any], source_name: str) -> None:
    """Check each run of an import against ``RunIn``; the first violation is one QlabError naming the run (by
    its id, or its place in the file) and the field."""
    for index, run in enumerate(runs):
        try:
            RunIn.model_validate(run)
        except ValidationError as exc:
            raise _one_line(exc, run, index, source_name) from None


def _one_line(exc: ValidationError, run: Any, index: int, source_name: str) -> QlabError:
    first = exc.errors(include_url=False)[0]
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    run_id = run.get("id") if isinstance(run, dict) else None
    which = f"run {run_id}" if isinstance(run_id, str) and len(run_id) <= 64 else f"run #{index + 1}"
    if first["type"] == "missing":
        return QlabError(f"{source_name}: {which} has no '{field}'; export it again with `python -m qlab runs "
                         "export`.")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and message.startswith("record"):  # a record's own field, named inside
        return QlabError(f"{source_name}: {which}'s {field}.{message}; fix that field or export the run again.")
    return QlabError(f"{source_name}: {which}'s {field} is {_short(first.get('input'))}: {message[:1].lower()}"
                     f"{message[1:]}; fix that field or export the run again.")
