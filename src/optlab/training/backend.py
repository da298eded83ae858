"""Choose and configure the Keras backend before Keras is imported; the one module that
imports Keras for the others.

Keras reads ``KERAS_BACKEND`` once, at import, so stages call :func:`configure` right after
loading params and before importing anything that computes with Keras. Those modules take
Keras from here (``from optlab.training.backend import keras``): imported before a backend was
chosen, they stop with a message instead of letting Keras silently load its default backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from optlab.core.errors import OptlabError

THREADS_ENV = "OPTLAB_THREADS"  # cap on CPU threads per training process (0 or unset: all cores)


def threads() -> int:
    raw = os.environ.get(THREADS_ENV, "0")
    try:
        n = int(raw)
    except ValueError:
        raise OptlabError(f"{THREADS_ENV}={raw!r} is not a number; set it to a thread count such as 1") from None
    if n < 0:
        raise OptlabError(f"{THREADS_ENV}={n} must be 0 (all cores) or a positive thread count")
    return n


# Keras imports these at start-up only for integrations optlab never uses (scikit-learn
# wrappers, pandas inputs, image files, model diagrams, image galleries, RemoteMonitor). Keeping
# them out of Keras's import saves about 110 MB of memory and 1.8 s per training process; each
# is still imported normally by the code that needs it (evaluate's metrics, the plot stage).
KERAS_EXTRAS = ("sklearn", "pandas", "matplotlib", "PIL", "pydot", "requests")


@contextlib.contextmanager
def hidden(modules: tuple[str, ...]) -> Iterator[None]:
    """Make ``import m`` raise ImportError inside the block, for each m not imported yet."""
    absent = [m for m in modules if m not in sys.modules]
    for m in absent:
        sys.modules[m] = None  # type: ignore[assignment]  # the import system's "not importable"
    try:
        yield
    finally:
        for m in absent:
            if sys.modules.get(m, ...) is None:
                del sys.modules[m]


@contextlib.contextmanager
def _native_stderr_kept_unless_failing() -> Iterator[None]:
    """Hold back what native code writes to stderr inside the block, and show it only if the block
    fails. TensorFlow 2.21 logs start-up notes ("oneDNN custom operations are on", "Could not find
    cuda drivers") before its log level applies, on every import: noise in every stage's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_keras() -> None:
    """Import Keras without its optional integrations (Keras guards each with ImportError)."""
    with hidden(KERAS_EXTRAS):
        import keras  # noqa: F401


def _skip_tensorflow_probe() -> None:
    """Stop Keras from importing TensorFlow on the JAX backend.

    Keras checks ``tensorflow.available`` while saving and loading models (for TF-only types),
    and that check imports TensorFlow when it is installed: about 9 s and 400 MB per process,
    which doubled the train stage's peak memory. On the JAX backend no model holds TF types,
    so the answer is "not available". Code that really uses TensorFlow (the TensorBoard
    callback) still imports it on first use through the same lazy module.
    """
    if "tensorflow" in sys.modules:
        return
    from keras.src.utils import module_utils  # imports Keras, after KERAS_BACKEND is set

    # Private Keras attribute, checked against Keras 3.15: LazyModule caches its import result
    # in `_available`. tests/test_backend.py fails if the attribute or its meaning changes.
    module_utils.tensorflow._available = False


def require_chosen() -> None:
    """Refuse to import Keras before a backend was chosen.

    Keras falls back to TensorFlow when ``KERAS_BACKEND`` is unset, so a stage that imported a
    Keras-using module before :func:`configure` would train on the wrong backend, silently.
    """
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        raise OptlabError(
            "a module that computes with Keras was imported before a Keras backend was chosen: call "
            "optlab.training.backend.configure(engine_for(params).backend) first (every stage does so "
            "right after loading params), or set KERAS_BACKEND"
        )


def __getattr__(name: str):
    """``from optlab.training.backend import keras``: Keras, once a backend is chosen (PEP 562)."""
    if name != "keras":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_chosen()
    import_keras()
    return sys.modules["keras"]


# --- which backend and loop (train.backend / train.loop: auto) --------------------------------
@dataclass(frozen=True)
class Engine:
    """The Keras backend and training loop a run uses, and why (recorded in run.json)."""

    backend: str  # jax | tensorflow
    loop: str  # compiled | keras
    rule: str  # how `auto` was resolved, in words; "" when both were set explicitly


def _jax_sees_an_accelerator() -> bool:
    import jax  # no Keras import: the backend is not chosen yet

    return jax.default_backend() != "cpu"


def choose_engine(backend: str, loop: str, model_name: str) -> Engine:
    """Resolve ``train.backend`` and ``train.loop`` when they say ``auto``.

    The rule: a ``cnn`` trains on TensorFlow with Keras's ``fit`` when TensorFlow is installed and
    JAX sees no GPU, because on a CPU TensorFlow's oneDNN convolutions (and their gradients) run
    3-4x faster than XLA's (benchmarks/train_speed.py --model cnn); everything else, and a CNN on
    a GPU, trains on JAX with the compiled loop. ``train.loop: compiled`` implies JAX.
    """
    rule = []
    if backend == "auto":
        if loop == "compiled":
            backend, why = "jax", "train.loop compiled runs on jax"
        elif model_name == "cnn" and importlib.util.find_spec("tensorflow") and not _jax_sees_an_accelerator():
            backend, why = "tensorflow", "a cnn on a CPU trains on tensorflow (oneDNN convolutions)"
        else:
            backend, why = "jax", f"a {model_name} trains on jax"
        rule.append(f"backend auto: {why}")
    if loop == "auto":
        loop = "compiled" if backend == "jax" else "keras"
        rule.append(f"loop auto: {loop} on {backend}")
    return Engine(backend, loop, "; ".join(rule))


def engine_for(params) -> Engine:
    """The engine an experiment's params (``train.backend``, ``train.loop``, ``model.name``) choose."""
    return choose_engine(params.train.backend, params.train.loop, params.model.name)


CACHE_ENV = "OPTLAB_COMPILATION_CACHE"  # a directory, or "off"


def _compilation_cache() -> None:
    """XLA's compiled programs kept on disk (JAX's persistent compilation cache), so the next run
    of the same program (another seed, another experiment of a study, the next stage) loads it
    instead of compiling it again: seconds per process. The same program gives the same numbers
    whether compiled or loaded (tests/test_backend.py). ``OPTLAB_COMPILATION_CACHE``: its directory
    (default: JAX's own ``JAX_COMPILATION_CACHE_DIR`` if set, else ``jax/`` in optlab's download
    cache, ``$OPTLAB_CACHE_DIR``), or ``off``; it wins over a ``JAX_COMPILATION_CACHE_DIR`` inherited
    from the parent process (a test process that set its own up)."""
    where = os.environ.get(CACHE_ENV) or ""
    if where == "off":
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        return
    if not where:  # JAX's own setting, else beside optlab.data.datasets.cache_dir()'s downloads
        if "JAX_COMPILATION_CACHE_DIR" in os.environ:
            return
        import pooch

        where = os.path.join(os.environ.get("OPTLAB_CACHE_DIR") or str(pooch.os_cache("optlab")), "jax")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = where
    # Every program, however fast it compiled (JAX's default keeps only those over a second).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def configure(backend: str) -> None:
    """Select ``backend`` for Keras and cap its CPU threads to ``OPTLAB_THREADS`` if set.

    Two queued experiments on a 2-core machine each run with OPTLAB_THREADS=1, so they share
    the cores instead of fighting over them. On TensorFlow, ops run deterministically, so the
    same params and seed give the same numbers, as on JAX.
    """
    if "keras" in sys.modules:
        loaded = sys.modules["keras"].backend.backend()
        if loaded != backend:
            raise OptlabError(
                f"Keras was already imported with the {loaded!r} backend, so this process cannot train with "
                f"{backend!r}: call optlab.backend.configure() before anything imports Keras"
            )
    os.environ["KERAS_BACKEND"] = backend
    # TensorFlow's C++ logs, errors included: on a CPU it logs a failed CUDA probe and a tf.data
    # version note as errors on every run. Real failures still raise. Set it to 0 to see them all.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    n = threads()
    if backend == "jax":
        # XLA:CPU runs one thread pool; pin it to n threads.
        flags = os.environ.get("XLA_FLAGS", "")
        if n and "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={n}".strip()
            )
        # JAX grabs no GPU memory up front when a GPU is present (other processes may share it).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        _compilation_cache()
        import_keras()
        _skip_tensorflow_probe()
    elif backend == "tensorflow":
        if n:
            os.environ["TF_NUM_INTRAOP_THREADS"] = str(n)
            os.environ["TF_NUM_INTEROP_THREADS"] = str(n)
        with _native_stderr_kept_unless_failing():
            import tensorflow as tf

        # Same kernels, same order of float additions: bit-identical reruns on one machine.
        tf.config.experimental.enable_op_determinism()
