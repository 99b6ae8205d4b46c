"""Shareable views: the dashboard's choices as URL query parameters and back (pure; the pages do the I/O).

A view is a plain mapping: ``model``, ``hardware``, ``formats`` (list), ``granularity``, ``group_size``,
``symmetric``, ``calibration``, ``algorithm``, ``static_groups``, ``sparsity``, ``tokens``, ``page``, ``runs``
(stored run ids, list) and ``bound`` (the Overview's accuracy bound, a number of 0 or more). ``view_to_params``
writes the keys present as short strings; ``params_to_view`` reads them back, keeping only values that are
valid, because a URL is typed, pasted and truncated by people: a bad parameter is dropped, never raised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from qlab.core.formats import FORMATS
from qlab.core.quant import ALGORITHMS, CALIBRATIONS, GRANULARITIES, SPARSITIES

# view key -> URL parameter name (short, since the URL is pasted into chats and documents)
PARAMS: dict[str, str] = {
    "model": "model", "hardware": "hw", "formats": "formats", "granularity": "gran", "group_size": "group",
    "symmetric": "sym", "calibration": "calib", "algorithm": "algo", "static_groups": "static",
    "sparsity": "sparse", "tokens": "tokens", "page": "page", "runs": "runs", "bound": "bound",
}
_CHOICES = {"granularity": GRANULARITIES, "calibration": CALIBRATIONS, "algorithm": ALGORITHMS,
            "sparsity": SPARSITIES}
LIST_KEYS = ("formats", "runs")
MAX_TOKENS = 65_536  # as qlab.models.evaluate caps the budget
_SAFE = re.compile(r"[A-Za-z0-9/~.][A-Za-z0-9._/~@:+-]{0,199}")  # model ids, paths, hardware ids, page names
_RUN_ID = re.compile(r"[0-9a-f]{4,64}")
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def view_to_params(view: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters for the keys of ``view`` that are set (None and empty lists are left out)."""
    params: dict[str, str] = {}
    for key, name in PARAMS.items():
        value = view.get(key)
        if value is None or (key in LIST_KEYS and not value):
            continue
        if key in LIST_KEYS:
            params[name] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            params[name] = "1" if value else "0"
        elif isinstance(value, float):
            params[name] = repr(value)  # the shortest text that reads back as the same number
        else:
            params[name] = str(value)
    return params


def params_to_view(params: Mapping[str, Any]) -> dict[str, Any]:
    """The valid part of a URL's query parameters as a view; unknown or malformed values are dropped.

    Values may be strings or lists of strings (Streamlit gives the last value of a repeated key).
    """
    view: dict[str, Any] = {}
    for key, name in PARAMS.items():
        raw = _last(params, name)
        if raw is None:
            continue
        value = _parse(key, str(raw).strip())
        if value is not None:
            view[key] = value
    return view


def _last(params: Mapping[str, Any], name: str) -> Any:
    """The parameter's value; of a repeated key (a list), the last one, as Streamlit gives it."""
    raw = params.get(name)
    if isinstance(raw, list | tuple):
        return raw[-1] if raw else None
    return raw


def ignored_params(params: Mapping[str, Any]) -> list[str]:
    """``name=value`` for each known parameter that ``params_to_view`` drops wholly or in part, so a page can
    say what a hand-edited link lost. Values are cut to 40 characters with anything unusual shown as '?'."""
    view = params_to_view(params)
    ignored = []
    for key, name in PARAMS.items():
        raw = _last(params, name)
        if raw is None:
            continue
        text = str(raw).strip()
        if key in view and key in LIST_KEYS:
            kept = {str(v) for v in view[key]}
            text = ",".join(v.strip() for v in text.split(",") if v.strip() and v.strip().lower() not in kept)
            if not text:
                continue
        elif key in view:
            continue
        ignored.append(f"{name}={_SHOWN.sub('?', text[:40])}")
    return ignored


_SHOWN = re.compile(r"[^A-Za-z0-9._,/~@:+-]")  # what a message may echo from a URL (no markup, no backticks)


def _parse(key: str, text: str) -> Any:
    if key == "formats":
        names = [n.strip().lower() for n in text.split(",")]
        valid = [n for n in dict.fromkeys(names) if n in FORMATS]
        return valid or None
    if key == "runs":
        ids = [i.strip().lower() for i in text.split(",")]
        return [i for i in dict.fromkeys(ids) if _RUN_ID.fullmatch(i)] or None
    if key in ("group_size", "tokens"):
        if not text.isdigit():
            return None
        number = int(text)
        upper = MAX_TOKENS if key == "tokens" else 1 << 16
        return number if 1 <= number <= upper else None
    if key == "bound":
        number = float(text) if _NUMBER.fullmatch(text) else math.nan  # no sign, nan, inf, hex or underscores
        return number if math.isfinite(number) else None
    if key in ("symmetric", "static_groups"):
        return {"1": True, "true": True, "0": False, "false": False}.get(text.lower())
    if key in _CHOICES:
        return text if text in _CHOICES[key] else None
    return text if _SAFE.fullmatch(text) else None
