"""Models and what they run on: loading (bundled, Hub id, local directory), the architecture and hardware
catalogs, and evaluation (the baseline once; LM and embedding metrics)."""

from qlab.models.loading import LoadedModel, ModelSource, bundled_models, load, model_sha256, resolve

__all__ = ["LoadedModel", "ModelSource", "architectures", "bundled_models", "config_schema", "evaluate", "hardware",
           "load", "loading", "model_sha256", "resolve"]
