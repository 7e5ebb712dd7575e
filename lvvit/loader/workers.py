"""DataLoader workers that end with their rank, on every exit path.

Training starts its loaders' workers with the preemption signals blocked
(``Preemption.shielded``): launchers and schedulers signal the whole process tree, and a
worker killed by that SIGTERM would fail its rank's next batch. A blocked SIGTERM, though,
also shuts out the rank's own ``Process.terminate()``: torch's iterator shutdown and
multiprocessing's exit handler terminate the workers and then join them, forever, so a rank
whose loader failed (an eval shard that cannot be read) printed its error and hung.

``worker_init`` (the loaders' ``worker_init_fn``) makes a worker end with its rank:

- the kernel kills it (SIGKILL, ``PR_SET_PDEATHSIG``) when the rank's process is gone,
  however it went (``os._exit``, SIGKILL, a crash);
- a blocked SIGTERM is taken by a thread that tells the senders apart by the pid the
  kernel records (``sigwaitinfo``): the rank's own ends the worker at once, anyone else's
  is dropped, so the worker keeps serving its rank up to the agreed step. torch's worker
  handler makes the same distinction, but reacts to another sender by dying.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training and eval loaders (see the module docstring)."""
    rank = os.getppid()
    die_with_parent()
    if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        threading.Thread(target=_end_on_sigterm_from, args=(rank,), name="lvvit-worker-sigterm",
                         daemon=True).start()


def die_with_parent() -> None:
    """SIGKILL from the kernel when the parent process ends (Linux; elsewhere nothing). The
    parent may have ended before the call: then the process ends now."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _end_on_sigterm_from(rank: int) -> None:
    """Wait for SIGTERM (blocked in every thread of the worker); exit on the rank's."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == rank:
            os._exit(0)


__all__ = ["die_with_parent", "worker_init"]
