"""Backend set-up: a lean Keras import on JAX that still leaves every library importable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from optlab.training import backend as backend_module
from optlab.training.backend import KERAS_EXTRAS


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_keras_starts_without_its_optional_integrations_or_tensorflow():
    out = _python(
        "import sys; from optlab.training.backend import configure; configure('jax'); import keras\n"
        f"print(sorted(m for m in {KERAS_EXTRAS + ('tensorflow',)!r} if m in sys.modules))"
    )
    assert out == "[]"


def test_hidden_libraries_import_normally_afterwards():
    out = _python(
        "from optlab.training.backend import configure; configure('jax')\n"
        "import sklearn.metrics, pandas, matplotlib, PIL\n"
        "print(sklearn.metrics.accuracy_score([0, 1], [0, 0]), pandas.Series([1, 2]).sum())"
    )
    assert out == "0.5 3"


def test_dvclive_starts_without_pandas_and_logs_as_before(tmp_path):
    # dvclive guards its pandas import (pandas is optional to it); a train process logs numbers only.
    live = tmp_path / "live"
    out = _python(
        "import sys; from optlab.training.record import TrainLog\n"
        f"log = TrainLog({str(live)!r}, {{}}); log.live.log_metric('loss', 0.5); log.live.next_step()\n"
        "loaded = 'pandas' in sys.modules; import pandas; from dvclive import utils\n"
        "print(loaded, utils.pd is None, pandas.Series([1, 2]).sum())"
    )
    assert out == "False True 3"
    assert (live / "plots/metrics/loss.tsv").read_text().split()[-1] == "0.5"


def test_a_library_imported_before_is_left_in_place():
    # The evaluate stage imports pandas first: Keras must then see it as it is.
    out = _python(
        "import pandas; from optlab.training.backend import configure; configure('jax')\n"
        "from keras.src.trainers.data_adapters import array_slicing\n"
        "print(array_slicing.pandas is pandas)"
    )
    assert out == "True"


def test_saving_a_model_on_jax_does_not_import_tensorflow(tmp_path):
    # Guards the one private Keras attribute optlab sets (checked against Keras 3.15): Keras's
    # lazy `tensorflow` module caches its availability in `_available`, and saving a model asks it.
    out = _python(
        "import sys; from optlab.training.backend import configure; configure('jax'); import keras\n"
        "from keras.src.utils import module_utils\n"
        "assert type(module_utils.tensorflow).__name__ == 'LazyModule', type(module_utils.tensorflow)\n"
        "assert module_utils.tensorflow._available is False and module_utils.tensorflow.available is False\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        f"m.save({str(tmp_path / 'm.keras')!r}); keras.saving.load_model({str(tmp_path / 'm.keras')!r})\n"
        "print('tensorflow' in sys.modules)"
    )
    assert out == "False"


def test_importing_a_keras_module_before_choosing_a_backend_is_refused():
    env_free = "import os; os.environ.pop('KERAS_BACKEND', None)\n"
    proc = subprocess.run(
        [sys.executable, "-c", env_free + "import optlab.training.models"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in __import__("os").environ.items() if k != "KERAS_BACKEND"},
    )
    assert proc.returncode != 0
    assert "imported before a Keras backend was chosen" in proc.stderr, proc.stderr[-2000:]
    assert "keras" not in proc.stderr.split("Traceback")[0]  # refused before Keras itself was imported


def test_every_module_that_computes_with_keras_takes_it_from_the_backend_module():
    # One module chooses the backend and imports Keras for the others (no `import keras` after a
    # check, module by module, each with its E402 exemption).
    for path in sorted((REPO / "src" / "optlab").rglob("*.py")):
        text = path.read_text()
        assert "noqa: E402" not in text, path
        top = [line for line in text.splitlines() if line.startswith(("import keras", "from keras"))]
        assert not top, (path, top)


def test_configure_refuses_a_keras_already_loaded_with_another_backend():
    out = _python(
        "import os; os.environ['KERAS_BACKEND'] = 'jax'; import keras\n"
        "from optlab.training.backend import configure\n"
        "from optlab.core.errors import OptlabError\n"
        "try:\n    configure('tensorflow')\nexcept OptlabError as e:\n    print(str(e)[:60])"
    )
    assert out.startswith("Keras was already imported with the 'jax' backend"), out


# --- train.backend / train.loop: auto -------------------------------------------------------------
@pytest.mark.parametrize(
    "backend, loop, model, gpu, expected",
    [
        ("auto", "auto", "mlp", False, ("jax", "compiled")),
        ("auto", "auto", "cnn", False, ("tensorflow", "keras")),  # oneDNN convolutions on a CPU
        ("auto", "auto", "cnn", True, ("jax", "compiled")),  # XLA's GPU convolutions are fast
        ("auto", "compiled", "cnn", False, ("jax", "compiled")),  # the compiled loop implies JAX
        ("auto", "keras", "mlp", False, ("jax", "keras")),
        ("jax", "auto", "cnn", False, ("jax", "compiled")),  # set by hand: no rule applies
        ("tensorflow", "auto", "mlp", False, ("tensorflow", "keras")),
    ],
)
def test_auto_picks_the_engine_by_a_stated_rule(monkeypatch, backend, loop, model, gpu, expected):
    monkeypatch.setattr(backend_module, "_jax_sees_an_accelerator", lambda: gpu)
    engine = backend_module.choose_engine(backend, loop, model)
    assert (engine.backend, engine.loop) == expected
    if backend == "auto":
        assert engine.rule.startswith("backend auto: ") and engine.backend in engine.rule
    else:
        assert "backend auto" not in engine.rule


@pytest.mark.slow
def test_a_program_loaded_from_the_compilation_cache_trains_the_same_numbers(tmp_path):
    # The second run loads every compiled program from JAX's persistent cache instead of compiling it:
    # the first epoch is far shorter, the results are the very same bytes.
    from conftest import prepared_digits, repo_params, run_stage, stage_args, write_params

    data = prepared_digits(tmp_path / "prepared")
    raw = repo_params(**{"dataset": "digits", "train.epochs": 2, "model.hidden": [32], "train.backend": "jax"})
    runs = {}
    for tag in ("compiled", "loaded"):
        root = tmp_path / tag
        root.mkdir()
        write_params(root / "params.yaml", raw)
        args = [a if a != "data/prepared" else str(data) for a in stage_args("train")]
        proc = run_stage("train", *args, cwd=root, env={"OPTLAB_COMPILATION_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr
        runs[tag] = root
    assert any((tmp_path / "cache").iterdir()), "nothing was cached"
    for rel in ("metrics/train/plots/metrics/val/loss.tsv", "models/model.keras"):
        got = [(runs[t] / rel).read_bytes() for t in runs]
        assert got[0] == got[1] or rel.endswith(".tsv") and _values(got[0]) == _values(got[1]), rel
    first = [
        json.loads((runs[t] / "metrics/train/run.json").read_text())["timings"]["first_epoch_seconds"] for t in runs
    ]
    print(f"\n[record] first epoch: {first[0]:.2f} s compiled, {first[1]:.2f} s loaded from the cache")


def _values(tsv: bytes) -> list[str]:
    return [line.split(b"\t", 1)[1] for line in tsv.splitlines()]  # without dvclive's timestamps
