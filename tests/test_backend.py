"""Backend set-up: a lean Keras import on JAX that still leaves every library importable."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from optlab.backend import KERAS_EXTRAS


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_keras_starts_without_its_optional_integrations_or_tensorflow():
    out = _python(
        "import sys; from optlab.backend import configure; configure('jax'); import keras\n"
        f"print(sorted(m for m in {KERAS_EXTRAS + ('tensorflow',)!r} if m in sys.modules))"
    )
    assert out == "[]"


def test_hidden_libraries_import_normally_afterwards():
    out = _python(
        "from optlab.backend import configure; configure('jax')\n"
        "import sklearn.metrics, pandas, matplotlib, PIL\n"
        "print(sklearn.metrics.accuracy_score([0, 1], [0, 0]), pandas.Series([1, 2]).sum())"
    )
    assert out == "0.5 3"


def test_a_library_imported_before_is_left_in_place():
    # The evaluate stage imports pandas first: Keras must then see it as it is.
    out = _python(
        "import pandas; from optlab.backend import configure; configure('jax')\n"
        "from keras.src.trainers.data_adapters import array_slicing\n"
        "print(array_slicing.pandas is pandas)"
    )
    assert out == "True"
