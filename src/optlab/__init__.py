"""optlab: a DVC pipeline for studying how an image classifier learns."""

__version__ = "0.1.0"
