"""The core: number formats, the frozen ``QuantScheme``, ``quantize`` -> ``QTensor``, GGUF block formats, size
accounting of a plan, and the rounding algorithms. Pure tensor code: imports torch, never a model or a page."""

from qlab.core.errors import Cancelled, QlabError
from qlab.core.formats import Format, get_format
from qlab.core.quant import QTensor, QuantScheme, quantize

__all__ = ["Cancelled", "Format", "QTensor", "QlabError", "QuantScheme", "get_format", "quantize"]
