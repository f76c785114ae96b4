"""Stop fairseq's background batch producers before the interpreter exits.

fairseq's ``BufferedIterator`` prefetches batches in a daemon thread
(``fairseq.data.iterators.BackgroundConsumer``). When training stops in the
middle of an epoch (``--max-update``, ``--stop-time-hours``...), nothing stops
that thread: it goes on collating the next batches. Python 3.11 ends daemon
threads at exit by calling ``pthread_exit`` in the thread as soon as it tries
to take the GIL again. A thread that is inside a torch operation at that
moment (torch releases the GIL in a C++ guard object) is then unwound through
that object's destructor, which C++ forbids: ``terminate called without an
active exception``, SIGABRT, exit status 134, after ``done training``.

Any fairseq run can hit it; a collater that does tensor work (the top-k
store's) makes it likely. :func:`stop_background_consumers`, registered with
``atexit`` when the plugin is imported, runs before Python ends the daemon
threads: it asks each producer to stop after the batch it is making, empties
its queue so that it is not blocked, and waits for it to finish.
"""

import atexit
import logging
import queue
import threading
import time

logger = logging.getLogger(__name__)

GRACE_SECONDS = 60.0  # longest wait for producers at exit, all together
_POLL_SECONDS = 0.01

_registered = False


def background_consumers():
    """The live fairseq ``BackgroundConsumer`` threads of this process."""
    try:
        from fairseq.data.iterators import BackgroundConsumer
    except ImportError:  # pragma: no cover - fairseq is a dependency
        return []
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, BackgroundConsumer) and t.is_alive()
    ]


def _drain(q):
    """Remove every item waiting in a queue (without blocking)."""
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def stop_background_consumers(timeout=GRACE_SECONDS):
    """Let every fairseq batch producer thread finish, then return.

    Each producer stops after the item it is producing (its ``_max_len`` is
    set to 0, the limit it checks after each item); its queue is emptied so
    that a full queue does not block it. A producer still running after
    ``timeout`` seconds is left alone (with a warning).

    Args:
        timeout: seconds to wait for all producers together.

    Returns:
        The number of producer threads that were stopped.
    """
    deadline = time.monotonic() + timeout
    stopped = 0
    for thread in background_consumers():
        q = getattr(thread, "_queue", None)
        if q is None or not hasattr(thread, "_max_len"):
            continue  # a fairseq version this does not know
        thread._max_len = 0  # checked after each item: stop after this one
        while thread.is_alive() and time.monotonic() < deadline:
            _drain(q)
            thread.join(_POLL_SECONDS)
        _drain(q)
        if thread.is_alive():
            logger.warning(
                f"fairseq's batch producer thread {thread.name} did not stop "
                f"within {timeout:.0f}s of exit"
            )
        else:
            stopped += 1
    return stopped


def register():
    """Run :func:`stop_background_consumers` at interpreter exit (once).

    ``atexit`` handlers run after the non-daemon threads have been joined and
    before Python ends the daemon ones, which is the window needed here.
    """
    global _registered
    if not _registered:
        atexit.register(stop_background_consumers)
        _registered = True
