"""qlab: measure which precision to ship a model in, on which hardware."""

__version__ = "0.1.0"
