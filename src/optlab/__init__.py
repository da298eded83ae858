"""optlab: a DVC pipeline for studying how an image classifier learns."""
