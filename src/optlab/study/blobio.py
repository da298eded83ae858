"""A lost wake-up in pygit2's blob reader, through which DVC reads every file of a git revision,
made harmless in optlab's own processes.

DVC reads a revision's ``params.yaml``, ``dvc.lock`` and metrics with scmrepo's pygit2 backend,
which streams each blob through ``pygit2.blob._BlobIO``: a writer thread fills a queue and sets
an Event, ``_ready``; the reader waits on it. The reader clears ``_ready`` after finding the
queue empty and the writer not yet closed, so when the writer closes in between, its last
``set()`` is cleared and the reader waits for ever (``readinto`` and ``close`` alike). It is rare
per read, but ``optlab sweep`` and ``optlab study`` read every experiment every two seconds: the
suite's study on digits hung there, in CI and in two of three runs here (stack:
``_BlobIO.readinto`` in ``Event.wait``, no writer thread left). A second way to the same hang: the
writer thread ends without marking itself closed, and the reader waits on an empty queue for ever.
:func:`install` gives each new reader a ``_ready`` whose untimed ``wait()`` wakes every
:data:`WAKE_S` to look again (a lost wake-up costs 20 ms instead of the process), and that marks
the writer closed once its thread has ended. pygit2's logic is left as it is.

The same reader also swallows Ctrl-C: ``readinto`` and ``close`` catch KeyboardInterrupt and
return (``readinto`` 0, end of file). The supervisor of a sweep spends much of its time in them,
so a Ctrl-C of ``optlab sweep`` or ``optlab study run`` was often lost (the suite's study test
saw its SIGINT ignored and the study run to its end). :func:`install` wraps both so that a
SIGINT that arrives during them is raised again as KeyboardInterrupt once pygit2 returns.

Private pygit2 attribute (``_BlobIO`` and its ``_ready``), checked against pygit2 1.20.1 and
1.21.0, whose reader is the same: tests/test_blobio.py fails if the race is gone (then
remove this module) or if the attributes change. The ``dvc`` commands themselves (queue
workers, ``dvc exp show``) run in DVC's own processes, without it.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading

log = logging.getLogger(__name__)

WAKE_S = 0.02


class WakingEvent(threading.Event):
    """An Event whose ``wait()`` without a timeout returns every :data:`WAKE_S` (its callers in
    pygit2 look at the queue and the writer's state again whatever ``wait`` returns). Given the
    reader's writer thread and its closed flag, it also marks the writer closed once that thread
    has ended without saying so: the reader then reads what came, to its end, instead of waiting."""

    writer: threading.Thread | None = None
    closed: threading.Event | None = None

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        woke = super().wait(WAKE_S)
        if not woke and self.writer is not None and self.closed is not None and not self.writer.is_alive():
            if not self.closed.is_set():
                log.warning("pygit2's blob writer thread ended without closing its stream; reading what it wrote")
                self.closed.set()
            self.set()
            woke = True
        return woke


def install() -> None:
    """Make every ``_BlobIO`` created from now on wait with a :class:`WakingEvent`, and every
    ``_BlobIO`` pass a Ctrl-C on (idempotent)."""
    from pygit2 import blob

    init = blob._BlobIO.__init__
    if getattr(init, "optlab_waking", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # The writer thread holds this very object and only ever calls set(): it keeps its state.
        self._ready.__class__ = WakingEvent
        self._ready.writer, self._ready.closed = self._thread, self._writer_closed

    __init__.optlab_waking = True
    blob._BlobIO.__init__ = __init__
    blob._BlobIO.readinto = keeping_ctrl_c(blob._BlobIO.readinto)
    blob._BlobIO.close = keeping_ctrl_c(blob._BlobIO.close)


def keeping_ctrl_c(method):
    """``method`` with a SIGINT that arrives while it runs raised after it returns, whatever it
    catches (in the main thread, where Python handles signals, while Python's own handler is set)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return method(*args, **kwargs)
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # ignored, or someone else's handler: theirs
            return method(*args, **kwargs)
        hit = []

        def note(signum, frame):
            hit.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note)
        try:
            result = method(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)
        if hit:
            raise KeyboardInterrupt
        return result

    return wrapper
