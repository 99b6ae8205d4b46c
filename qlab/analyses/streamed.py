"""Layer-streamed evaluation of a scheme plan: the model's blocks run one at a time over cached hidden states.

``qlab.core.plan.quantized_copy`` builds a shadow whose quantized linears dequantize in every forward. Here each
block's linears are quantized once, materialised as plain weights in the compute dtype, run for every token of
the evaluation, then freed: no second copy of the model and no dequantization per forward, so a scheme costs
about one evaluation of the base model and holds one block's weights beside it. What enters the first block
(and what every block takes besides its hidden state: masks, rotary tables) is captured once per model and
text and kept with the baseline; the model's head and metrics then run on the last block's output exactly as
``evaluate`` runs them. The metrics equal ``quantized_copy`` + ``evaluate``'s to rounding (tests/test_streamed.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from qlab.analyses.sensitivity import BlockStack, block_stack
from qlab.core.algorithms import ReusedBuffers, dequantized_weights, dequantized_weights_unchecked
from qlab.core.errors import QlabError
from qlab.core.formats import Format, get_format
from qlab.core.plan import SchemePlan, layer_schemes, quantizable_linears, unquantized_format, weights_dtype
from qlab.core.quant import QuantScheme, fake_quantize_unchecked
from qlab.models.evaluate import (
    Baseline,
    CancelCheck,
    ComputeLinear,
    Progress,
    _check_cancel,
    compute_view,
    evaluate,
    input_batches,
    input_device,
    run_batch,
)
from qlab.models.loading import LoadedModel

# Block lists whose model runs them as a plain loop, each block taking the previous one's hidden state:
# Llama/Mistral/Qwen/Gemma/Phi-3 (…ForCausalLM's "model.layers", a bare decoder's "layers") and BERT encoders.
STREAMED_STACKS = ("model.layers", "layers", "encoder.layer")


def streamable_stack(model: torch.nn.Module) -> BlockStack | None:
    """The model's block stack when it can be streamed, else None (the sweep then uses the shadow copy)."""
    try:
        stack = block_stack(model)
    except QlabError:
        return None
    if stack.path not in STREAMED_STACKS:
        return None
    # Weights accelerate offloaded to disk or CPU sit on the meta device and appear only inside its hooks.
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    return stack


class _Stop(Exception):
    """Raised by the last recorder: everything after the blocks is not needed to capture their inputs."""


@dataclass(frozen=True)
class _Capture:
    """Per batch: the first block's hidden-state input, and every block's other arguments (masks, rotary)."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]  # [batch][block] -> (args after the hidden state, kwargs)


class _Recorder(torch.nn.Module):
    """Stands in for block ``index`` during the capture: notes its arguments and hands its input on."""

    def __init__(self, index: int, last: bool, calls: list[tuple[tuple, dict]], hidden: list[torch.Tensor]):
        super().__init__()
        self.index, self.last, self.calls, self.hidden = index, last, calls, hidden

    def forward(self, *args, **kwargs):
        hidden, args, kwargs = _split(args, kwargs)
        if self.index == 0:
            self.hidden.append(hidden)
        self.calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return hidden


class _Feed(torch.nn.Module):
    """Stands in for the first block during the tail: returns the streamed last block's output, batch by batch."""

    def __init__(self, outputs: list[torch.Tensor], returns_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.returns_tuple, self.cursor = outputs, returns_tuple, 0

    def forward(self, *args, **kwargs):
        hidden, _, _ = _split(args, kwargs)
        output = self.outputs[self.cursor]
        if output.shape != hidden.shape:
            raise RuntimeError(f"streamed output {tuple(output.shape)} does not match the batch "
                               f"{tuple(hidden.shape)}; the evaluation inputs changed since the capture")
        self.cursor += 1
        return (output,) if self.returns_tuple else output


class _PassThrough(torch.nn.Module):
    """Stands in for every later block during the tail: the streamed output already went through it."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        hidden, _, _ = _split(args, kwargs)
        return (hidden,) if self.returns_tuple else hidden


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


# Other tensors of up to this many values (norms, biases) are copied at the plan's format without asking whether
# that changed them: the answer would wait for the device, and the wait would keep a GPU from running one block
# while the next block's weights are rounded.
COPIED_UNCHECKED_VALUES = 1 << 20


def _copies_little(param: torch.nn.Parameter, rounded: torch.nn.Parameter) -> bool:
    """Whether keeping ``rounded`` for the next scheme keeps no large copy of ``param`` beside the model."""
    return rounded is param or param.numel() <= COPIED_UNCHECKED_VALUES


def _rounded(param: torch.nn.Parameter, rest: Format, cache: dict | None = None, name: str = ""
             ) -> torch.nn.Parameter:
    """A tensor the plan leaves unquantized, stored at the plan's format for everything else (as
    ``quantized_copy`` stores it); a large one is the tensor itself when that changes no value, so nothing large
    is copied. On a CPU a large one's result is kept in ``cache`` (the baseline's) under ``name``: every scheme
    of a sweep rounds the embedding to the same format, and a 1B model's took 0.5 s (a GPU does it in
    milliseconds, and its memory is the scarcer)."""
    if rest.bits >= 32 or rest.cast_dtype == param.dtype:
        return param
    large = param.numel() > COPIED_UNCHECKED_VALUES
    cache = cache if param.device.type == "cpu" else None
    key = ("rounded outside the plan", name, rest.name)
    if large and cache is not None and key in cache:
        base, version, rounded = cache[key]
        if base is param and version == param._version:
            return rounded
    rounded, _ = fake_quantize_unchecked(param.detach(), QuantScheme(rest.name))
    rounded = param if large and torch.equal(rounded, param) else torch.nn.Parameter(rounded, requires_grad=False)
    if large and cache is not None:
        cache[key] = (param, param._version, rounded)
    return rounded


class _Clock:
    """The time spent applying the plan. On a GPU: the device's time between events recorded around that work,
    read once at the end, so that timing never makes the host wait (then the GPU runs one block while the host
    queues the rounding of the next); elsewhere wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def timing(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            started = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        yield
        end.record(torch.cuda.current_stream(device))
        self.events.append((start, end))

    def total(self) -> float:
        for start, end in self.events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000
        self.events.clear()
        return self.seconds


def _hessian(hessians: Mapping | None, name: str):
    return None if hessians is None else hessians.get(name)


@dataclass
class _Outer:
    """The model without its blocks (an empty list in their place), kept for every scheme of a sweep that rounds
    the other tensors alike: its other tensors at the plan's format, its linears outside the blocks (an untied
    head) computing in the compute dtype with each scheme's weights set in turn. Copying an 8B model's outside
    and walking its modules for it took the host 10-20 ms of every scheme while the GPU waited."""

    shell: _Shell
    untouched: bool  # every tensor before the blocks is still the base's own (then the base's capture applies)

    def take_back(self, stack: BlockStack) -> None:
        """Drops what a scheme set in: its weights (an 8B model's head is 1 GB) and its blocks' outputs."""
        self.shell.take_back()
        self.shell.runnable.set_submodule(stack.path, torch.nn.ModuleList())


def _outer(model: torch.nn.Module, stack: BlockStack, names: list[str], rest: Format, dtype: torch.dtype,
           cache: dict) -> tuple[_Outer, bool]:
    """``_Outer`` of ``model`` whose linears ``names`` (outside the blocks) take the plan's weights, and whether it
    may be kept for the next scheme: not where a large tensor was copied at the plan's format on a GPU (a bf16
    model's embedding rounded to fp16), which would stay beside the model for the rest of a sweep."""
    prefix = stack.path + "."
    modules = dict(model.named_modules())
    quantized = {id(modules[name].weight) for name in names}
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    memo[id(model.get_submodule(stack.path))] = torch.nn.ModuleList()  # blocks are never copied
    untouched = keep = True
    for name, param in model.named_parameters():  # tied tensors once: a tied head keeps sharing
        if name.startswith(prefix) or id(param) in quantized:
            continue
        memo[id(param)] = rounded = _rounded(param, rest, cache, name)
        untouched &= rounded is param
        keep &= _copies_little(param, rounded) or param.device.type == "cpu"  # a CPU's is the baseline's cache
    outer = copy.deepcopy(model, memo)
    for name in names:
        outer.set_submodule(name, ComputeLinear(modules[name].weight, outer.get_submodule(name).bias, dtype))
    view = compute_view(outer, dtype)
    return _Outer(_Shell(view, [view.get_submodule(name) for name in names]), untouched), keep


def _capture(outer: torch.nn.Module, stack: BlockStack, baseline: Baseline, cancel: CancelCheck | None
             ) -> _Capture:
    """One pass that runs everything before the blocks and records what each block would be called with."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    count = len(stack.linears)
    for _, batch in input_batches(baseline.kind, baseline.inputs):
        _check_cancel(cancel)
        calls.append([])
        outer.set_submodule(stack.path, torch.nn.ModuleList(
            _Recorder(index, index == count - 1, calls[-1], hidden) for index in range(count)))
        try:
            run_batch(outer, baseline.kind, batch)
        except _Stop:
            pass
    return _Capture(hidden, calls)


@dataclass
class _Shell:
    """A block made runnable once and lent to every scheme of a sweep: the base block's structure, its other
    tensors at the plan's format, its linears computing in the compute dtype with each scheme's weights set in
    turn. Copying a Llama block's modules and rounding its norms took 1.5-2.8 ms of the host's time per block
    and scheme on the GPU machine, more than the GPU spent evaluating the block (2.2 ms for an 8B model)."""

    runnable: torch.nn.Module
    linears: list[ComputeLinear]

    def lend(self, weights: list[torch.Tensor]) -> torch.nn.Module:
        for linear, weight in zip(self.linears, weights, strict=True):
            linear._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
        return self.runnable

    def take_back(self) -> None:
        """Drops the weights: a shell kept for the next scheme holds none of this one's."""
        for linear in self.linears:
            linear._parameters["weight"] = None


def _module_tree(module: torch.nn.Module, tensors: dict[int, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module``'s tree: each module a new object with its own lists of submodules, parameters and
    buffers, so any of them can be replaced, and everything else (configs, tensors, functions) shared; each
    parameter is ``tensors[id(parameter)]`` where given. An 8B model's block took ``copy.deepcopy`` 1.5-2.8 ms of
    the host's time, most of it copying the config and every plain attribute, which nothing here changes."""
    tree = copy.copy(module)  # a new instance __dict__ whose lists (below) are still the original's
    tree._parameters = {key: None if param is None else tensors.get(id(param), param)
                        for key, param in module._parameters.items()}
    tree._buffers = dict(module._buffers)
    for key, value in module.__dict__.items():  # hooks registered on the base later (another session's) stay its own
        if "hook" in key and isinstance(value, dict):
            tree.__dict__[key] = type(value)(value)
    tree._modules = {key: None if child is None else _module_tree(child, tensors)
                     for key, child in module._modules.items()}
    return tree


def _bound_to_itself(block: torch.nn.Module) -> bool:
    """Whether some module of ``block`` holds a callable bound to it in its own attributes (accelerate's hooks
    replace ``forward`` by one, for a model spread over devices): a tree sharing the attributes would call the
    base module, so only ``copy.deepcopy``, which rebinds them, copies such a block."""
    return any("forward" in module.__dict__ or "_old_forward" in module.__dict__ for module in block.modules())


def _shell(block: torch.nn.Module, names: list[str], rest: Format, dtype: torch.dtype) -> tuple[_Shell, bool]:
    """A shell of ``block`` whose linears ``names`` take the plan's weights, and whether it may be kept for the
    next scheme: not where a large tensor was copied at the plan's format (an unquantized linear of a mixed plan
    rounded to fp16), since kept for every block that would be a second copy of the model."""
    base_modules = dict(block.named_modules())
    quantized = {id(base_modules[name].weight) for name in names}
    memo = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    keep = True
    for param in block.parameters():
        if id(param) not in quantized:
            memo[id(param)] = rounded = _rounded(param, rest)
            keep &= _copies_little(param, rounded)
    runnable = copy.deepcopy(block, memo) if _bound_to_itself(block) else _module_tree(block, memo)
    for name in names:
        runnable.set_submodule(name, ComputeLinear(base_modules[name].weight, runnable.get_submodule(name).bias,
                                                   dtype))
    view = compute_view(runnable, dtype)
    return _Shell(view, [view.get_submodule(name) for name in names]), keep


@dataclass
class _Pass:
    """What one pass of ``evaluate_streamed`` applies and keeps: the plan per linear, the format of everything
    else, the compute dtype, whether weights are checked as made, the sweep's shells, and each block's flag of
    untrusted weights (``suspects``)."""

    loaded: LoadedModel
    baseline: Baseline
    assignment: dict[str, QuantScheme]
    rest: Format
    dtype: torch.dtype
    hessians: Mapping | None
    progress: Progress | None
    cancel: CancelCheck | None
    clock: _Clock
    checked: bool
    shells: dict
    suspects: list[torch.Tensor]

    def weights(self, layers: list[tuple], buffers: ReusedBuffers) -> list[torch.Tensor]:
        """``layers``' weights materialised in the compute dtype (into ``buffers``); unless checked, not waited
        for, their flag of untrusted values kept in ``suspects``."""
        if self.checked:
            return dequantized_weights(layers, self.dtype, buffers)
        weights, suspect = dequantized_weights_unchecked(layers, self.dtype, buffers)
        if suspect is not None:
            self.suspects.append(suspect)
        return weights


def _block(this_pass: _Pass, block: torch.nn.Module, prefix: str, buffers: ReusedBuffers
           ) -> tuple[_Shell, torch.nn.Module]:
    """One block with the plan applied, run through its shell (kept in ``shells`` for the next scheme where it
    can be): its linears' weights materialised in ``dtype`` (into ``buffers``), its other tensors at the plan's
    format; the base block is only read. The caller gives the shell back (``take_back``) once the block has
    run."""
    names = [name for name, _ in block.named_modules() if f"{prefix}.{name}" in this_pass.assignment]
    key = (prefix, this_pass.rest.name, this_pass.dtype, tuple(names))
    shell = this_pass.shells.get(key)
    if shell is None:
        shell, keep = _shell(block, names, this_pass.rest, this_pass.dtype)
        if keep:
            this_pass.shells[key] = shell
    layers = [(block.get_submodule(name).weight, this_pass.assignment[f"{prefix}.{name}"],
               _hessian(this_pass.hessians, f"{prefix}.{name}")) for name in names]
    return shell, shell.lend(this_pass.weights(layers, buffers))


def _to(value, device: torch.device):
    """Tensors inside arguments moved to ``device`` (a model spread over GPUs has blocks on each)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def evaluate_streamed(loaded: LoadedModel, plan: SchemePlan, baseline: Baseline,
                      hessians: Mapping | None = None, progress: Progress | None = None,
                      cancel: CancelCheck | None = None, timings: dict[str, float] | None = None,
                      shells: dict | None = None) -> dict[str, float]:
    """Metrics of ``loaded`` with ``plan`` applied, block by block; the same numbers as
    ``evaluate(quantized_copy(loaded.model, plan, hessians), baseline)``, without the copy.

    ``timings``, when given, receives ``quantize_s``: the part of the time spent applying the plan (quantizing,
    materialising, rounding the other tensors; on a GPU the device's time for it). ``shells``, a dict the caller
    keeps for the schemes it evaluates one after another on this model (never shared between threads), holds the
    blocks made runnable, so that the next scheme does not make them again.
    """
    timings = {} if timings is None else timings
    shells = {} if shells is None else shells
    metrics, suspects = _evaluate(loaded, plan, baseline, hessians, progress, cancel, timings, False, shells)
    if any(bool(suspect) for suspect in suspects):  # the device is idle by now: these are cheap to read
        # Some weight's unchecked values cannot be trusted (rare): evaluate again, each block's checked as made,
        # which gives the exact values or quantize's error.
        metrics, _ = _evaluate(loaded, plan, baseline, hessians, progress, cancel, timings, True, shells)
    return metrics


@dataclass(frozen=True)
class _Structure:
    """What a pass reads of the base model's structure, found once per baseline (the model is never changed)."""

    model: torch.nn.Module
    stack: BlockStack
    dtype: torch.dtype  # its weights' (``weights_dtype``)
    linears: tuple[str, ...]  # its quantizable linears


def _structure(loaded: LoadedModel, baseline: Baseline) -> _Structure:
    structure = baseline.cache.get(("streamed model structure",))
    if structure is None or structure.model is not loaded.model:
        stack = streamable_stack(loaded.model)
        if stack is None:
            raise QlabError(f"{loaded.name} has no block list the streamed sweep knows; use the shadow copy "
                            "(qlab.core.plan.quantized_copy) for it.")
        structure = _Structure(loaded.model, stack, weights_dtype(loaded.model),
                               tuple(name for name, _ in quantizable_linears(loaded.model)))
        baseline.cache[("streamed model structure",)] = structure
    return structure


def _evaluate(loaded: LoadedModel, plan: SchemePlan, baseline: Baseline, hessians: Mapping | None,
              progress: Progress | None, cancel: CancelCheck | None, timings: dict[str, float], checked: bool,
              shells: dict) -> tuple[dict[str, float], list[torch.Tensor]]:
    """``evaluate_streamed``'s one pass, and (unless ``checked``) each block's flag of untrusted weights."""
    model = loaded.model
    structure = _structure(loaded, baseline)
    stack = structure.stack
    this_pass = _Pass(loaded=loaded, baseline=baseline, assignment=layer_schemes(model, plan, structure.linears),
                      rest=get_format(unquantized_format(plan, structure.dtype)), dtype=baseline.compute_dtype,
                      hessians=hessians, progress=progress, cancel=cancel, clock=_Clock(), checked=checked,
                      shells=shells, suspects=[])
    names = [name for name in stack.outside if name in this_pass.assignment]
    key = ("outside the blocks", this_pass.rest.name, this_pass.dtype, tuple(names))
    with this_pass.clock.timing(input_device(model)):
        outer = shells.get(key)
        if outer is None:
            outer, keep = _outer(model, stack, names, this_pass.rest, this_pass.dtype, baseline.cache)
            if keep:
                shells[key] = outer
    try:
        if names:
            with this_pass.clock.timing(input_device(model)):
                layers = [(model.get_submodule(name).weight, this_pass.assignment[name], _hessian(hessians, name))
                          for name in names]
                # Lent buffers, so that a scheme that leaves the head's values unchanged lends the head itself.
                outer.shell.lend(this_pass.weights(layers, ReusedBuffers()))
        hidden, returns_tuple = _blocks(this_pass, stack, outer)
        outer.shell.runnable.set_submodule(stack.path, torch.nn.ModuleList(
            [_Feed(hidden, returns_tuple)] + [_PassThrough(returns_tuple) for _ in range(len(stack.linears) - 1)]))
        units = len(stack.linears) + 1
        tail = None if progress is None else (lambda fraction, message: progress((units - 1 + fraction) / units,
                                                                                 f"head: {message}"))
        metrics = evaluate(outer.shell.runnable, baseline, tail, cancel)
    finally:
        outer.take_back(stack)
    timings["quantize_s"] = this_pass.clock.total()
    return metrics, this_pass.suspects


def _blocks(this_pass: _Pass, stack: BlockStack, outer: _Outer) -> tuple[list[torch.Tensor], bool]:
    """Every block with the plan applied over the captured inputs: the last block's output per batch, and whether
    blocks return tuples."""
    key = ("streamed block inputs", stack.path)
    if outer.untouched and key in this_pass.baseline.cache:
        capture = this_pass.baseline.cache[key]
    else:
        capture = _capture(outer.shell.runnable, stack, this_pass.baseline, this_pass.cancel)
        if outer.untouched:  # the base's own inputs: valid for every plan that leaves the tensors before the blocks
            this_pass.baseline.cache[key] = capture
    blocks = this_pass.loaded.model.get_submodule(stack.path)
    spread = this_pass.loaded.device == "auto"  # else every block and everything captured is on one device
    units = len(blocks) + 1
    hidden = list(capture.hidden)
    returns_tuple = False
    buffers = ReusedBuffers()
    for index, block in enumerate(blocks):
        _check_cancel(this_pass.cancel)
        device = next(itertools.chain(block.parameters(), block.buffers())).device
        with this_pass.clock.timing(device):
            shell, runnable = _block(this_pass, block, f"{stack.path}.{index}", buffers)
        try:
            with torch.inference_mode():
                for row, (args, kwargs) in enumerate(calls[index] for calls in capture.calls):
                    if spread:
                        hidden[row], args, kwargs = _to((hidden[row], args, kwargs), device)
                    output = runnable(hidden[row], *args, **kwargs)
                    returns_tuple = isinstance(output, tuple)
                    hidden[row] = output[0] if returns_tuple else output
        finally:
            shell.take_back()
        del runnable
        buffers.take_back()  # this block's materialised weights are overwritten by the next block's
        if this_pass.progress:
            this_pass.progress((index + 1) / units, f"block {index + 1}/{len(blocks)}")
    return hidden, returns_tuple
