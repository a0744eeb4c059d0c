"""quantmill: a declarative factory for quantized LLMs."""

__version__ = "0.1.0"
