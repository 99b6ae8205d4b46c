"""Weight accounting for the planner: which scheme, layout or GGUF type each matrix gets, and its exact bytes.

A plan's weights are a ``QuantScheme`` (qlab's simulated formats), a library layout (``qlab.core.layouts``),
a ``{glob: scheme or layout}`` mix, or a whole GGUF file type; every one ends in a ``SizeReport``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

from qlab.analyses import runtimes
from qlab.analyses.runtimes import GGUFFile
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.layouts import LAYOUTS, Layout, get_layout
from qlab.core.plan import SizeReport, unquantized_format
from qlab.core.quant import QuantScheme, check_group_sizes
from qlab.models import architectures
from qlab.models.architectures import Architecture

Matrices = list[tuple[str, tuple[int, ...], int]]  # (name or glob, (out, in), how many)

Spec = QuantScheme | Layout
SchemeSpec = Spec | Mapping[str, Spec] | GGUFFile


def weight_spec(name: str) -> QuantScheme | Layout | GGUFFile:
    """The weights a name stands for: a library layout (``gptq-int4-g128``), a GGUF file type (``Q4_K_M``) or a
    plain cast (``bf16``); quantized registry formats need a ``QuantScheme`` with their granularity."""
    key = str(name).strip()
    if key.lower() in LAYOUTS:
        return get_layout(key)
    if key.upper() in runtimes.GGUF_FILE_TYPES:
        return GGUFFile(key.upper())
    fmt = get_format(key)
    if fmt.scaled:
        raise QlabError(f"'{name}' needs a granularity; give a QuantScheme, or a layout ({', '.join(LAYOUTS)}) or a "
                        f"GGUF type ({', '.join(runtimes.GGUF_FILE_TYPES)}).")
    return QuantScheme(fmt.name)


def assign(spec: SchemeSpec, names: list[str], model: str) -> dict[str, Spec]:
    """The scheme (or layout) of each matrix name: one for all, or the first matching glob of a mix."""
    if isinstance(spec, QuantScheme | Layout):
        return dict.fromkeys(names, spec)
    if not isinstance(spec, Mapping) or not spec:
        raise QlabError("give a QuantScheme, a layout or a non-empty {glob: QuantScheme} mix for the weights.")
    bad = [key for key, value in spec.items() if not isinstance(value, QuantScheme | Layout)]
    if bad:
        raise QlabError(f"mix entry '{bad[0]}' is not a QuantScheme or layout; map each glob to one.")
    chosen, used = {}, set()
    for name in names:
        pattern = next((p for p in spec if fnmatch.fnmatchcase(name, p)), None)
        if pattern is None:
            raise QlabError(f"no glob of the mix matches '{name}' of {model}; add a '*' entry for the rest.")
        chosen[name] = spec[pattern]
        used.add(pattern)
    unused = [p for p in spec if p not in used]
    if unused:
        raise QlabError(f"mix glob '{unused[0]}' matches no matrix of {model} (they are named like "
                        f"'{names[0]}'); fix or drop it.")
    return chosen


def weights(arch: Architecture, model: str, spec: SchemeSpec, matrices: Matrices,
             total_params: int) -> tuple[SizeReport, str, str, tuple[str, ...], dict[str, Spec]]:
    """Exact weight bytes, the label, the unquantized format, the formats used and each matrix's scheme."""
    if isinstance(spec, GGUFFile):
        sizes = runtimes.gguf_bytes(arch, spec.ftype)
        quantized = sum(math.prod(shape) * count for _, shape, count, kind in runtimes.gguf_tensor_types(
            arch, spec.ftype) if kind not in ("F32", "F16"))
        rest = sizes.get("F32", 0) + sizes.get("F16", 0)
        report = SizeReport(quantized, sizes["total"] - rest, 0, total_params - quantized, rest)
        kinds = tuple(k for k in sizes if k not in ("total", "F32", "F16"))
        return report, spec.label, "fp32", tuple(dict.fromkeys("int8" if k == "Q8_0" else "int4" for k in kinds)), {}
    chosen = assign(spec, [m[0] for m in matrices], model)
    check_group_sizes({n: s for n, s in chosen.items() if isinstance(s, QuantScheme)},
                      {m[0]: m[1][-1] for m in matrices}, model)
    schemes = list(dict.fromkeys(chosen.values()))
    rest_formats = {s.rest_format if isinstance(s, Layout) else unquantized_format(s) for s in schemes}
    # A mix of casts and scaled formats keeps the other tensors at fp16, as a single scaled scheme does.
    rest = rest_formats.pop() if len(rest_formats) == 1 else "fp16"
    single = isinstance(spec, QuantScheme | Layout)
    label = schemes[0].label if single else "mixed: " + ", ".join(s.label for s in schemes)
    other_params = total_params - sum(math.prod(shape) * count for _, shape, count in matrices)
    report = SizeReport.from_parts(((math.prod(shape), chosen[name].storage_bytes(shape), count)
                                    for name, shape, count in matrices),
                                   other_params, other_params * get_format(rest).bits // 8)
    return report, label, rest, tuple(dict.fromkeys(s.format for s in schemes)), chosen


def tensor_sizes(arch: Architecture, chosen: Mapping[str, Spec], rest: str,
                  weights: SizeReport) -> tuple[tuple[int, int], ...]:
    """(bytes, count) of every tensor a freshly loaded 16/32-bit model is stored in, as transformers builds it
    (the experts of a layer in one 3-D tensor); empty for quantized weights, whose tensors a quantizer makes
    from freed blocks."""
    if not chosen or any(isinstance(s, Layout) or s.fmt.scaled for s in chosen.values()):
        return ()
    rest_bits = get_format(rest).bits
    sizes: dict[int, int] = {}
    for t in architectures.stored_tensors(arch):
        if t.part in ("mtp", "fp8_scales"):
            continue
        spec = chosen.get(t.name)
        fused = arch.num_experts if t.part == "experts.routed" else 1
        parts = spec.storage_bytes(t.shape).values() if spec is not None else [math.prod(t.shape) * rest_bits // 8]
        for size in parts:
            if size:
                sizes[size * fused] = sizes.get(size * fused, 0) + t.count // fused
    return tuple(sizes.items()) if sum(s * n for s, n in sizes.items()) == weights.size_bytes else ()


def largest_matrix(chosen: Mapping[str, Spec], matrices: Matrices,
                    layout: str) -> tuple[int, int]:
    shapes = [shape for name, shape, _ in matrices if isinstance(chosen.get(name), Layout)
              and chosen[name].name == layout]
    return max(shapes, key=math.prod, default=(0, 0))
