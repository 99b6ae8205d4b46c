"""What a run records: ``RunMeta`` (model, weights hash, hardware, settings, versions, text, seed) and the
helpers that build it for each kind of run.

An analysis owns how its settings look (``qlab.analyses.sensitivity.sensitivity_settings``,
``qlab.backends.speed.bench_settings``); the helpers here only wrap them in a ``RunMeta``.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qlab.models.loading import model_sha256


def environment() -> dict[str, Any]:
    """Versions and the machine a run executes on (what makes two runs comparable or not)."""
    import torch
    import transformers

    from qlab import __version__
    from qlab.models.hardware import detect_this_machine

    machine = detect_this_machine()
    return {"qlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": machine.name, "host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class RunMeta:
    """Everything needed to compare a run with another and to replay it.

    ``settings`` holds the inputs in full: for a sweep ``{"schemes": [QuantScheme.to_dict(), ...]}`` plus
    any options; ``environment`` defaults to this process's versions and machine.
    """

    kind: str
    model: str
    settings: dict = field(hash=False)
    model_sha256: str | None = None
    hardware: str = "this-machine"
    text_sha256: str | None = None
    text_name: str | None = None
    tokens: int | None = None
    seed: int | None = None
    environment: dict = field(default_factory=environment, hash=False)


def placement(loaded) -> dict[str, Any]:
    """Where and in which precision a LoadedModel runs, as every run stores it (History re-runs it there)."""
    return {"device": loaded.device, "device_map": "auto" if loaded.device == "auto" else None,
            "dtype": str(loaded.dtype).removeprefix("torch.")}


def run_meta(kind: str, loaded, spec=None, hardware: str = "this-machine", **settings: Any) -> RunMeta:
    """RunMeta for any run on a LoadedModel (sensitivity, bench, ...), with its EvalSpec when it evaluates;
    keyword settings are stored as given (JSON-ready values), over the model's ``placement``."""
    import torch

    return RunMeta(kind=kind, model=loaded.name, settings=placement(loaded) | settings,
                   model_sha256=model_sha256(loaded), hardware=hardware, text_sha256=spec.text_sha256 if spec else None,
                   text_name=spec.text_name if spec else None, tokens=spec.tokens if spec else None,
                   # The process's torch seed, so anything that draws random numbers can be replayed.
                   seed=torch.initial_seed())


def sweep_meta(loaded, schemes: Sequence, spec, hardware: str = "this-machine", **settings: Any) -> RunMeta:
    """RunMeta of a sweep of ``schemes`` on a LoadedModel with an EvalSpec; extra keyword settings are kept."""
    return run_meta("sweep", loaded, spec, hardware, schemes=[s.to_dict() for s in schemes], **settings)


def sensitivity_meta(kind: str, loaded, schemes: Sequence, spec, baseline, *, unit: str, view: str = "forward",
                     blocks: bool = True, predict: bool = True, hardware: str = "this-machine",
                     **settings: Any) -> RunMeta:
    """RunMeta of a ``sensitivity`` (or ``recommend``) run: what ``stored_sensitivity`` needs to rebuild it."""
    from qlab.analyses.sensitivity import sensitivity_settings

    return run_meta(kind, loaded, spec, hardware, **sensitivity_settings(
        loaded, schemes, baseline, unit=unit, view=view, blocks=blocks, predict=predict), **settings)


def bench_meta(loaded, spec, backends: Sequence[str], accuracy_tokens: int | None, device: str = "cpu",
               **settings: Any) -> RunMeta:
    """RunMeta of a speed run (``qlab.backends.speed.run_bench``): the SpeedSpec, backends and accuracy token budget."""
    from qlab.backends.speed import bench_settings
    from qlab.models.evaluate import EvalSpec

    accuracy = EvalSpec(tokens=accuracy_tokens) if accuracy_tokens else None
    return run_meta("bench", loaded, accuracy, **bench_settings(spec, backends, accuracy_tokens, device),
                    **settings)
