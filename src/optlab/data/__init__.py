"""The data: the dataset registry (sources, checksums, parsers), scaling and the split, and the
raw and prepared data's files. NumPy only, no Keras."""
