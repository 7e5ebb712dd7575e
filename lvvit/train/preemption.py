"""Signals: SIGTERM and the preemption signals, and the run status and exit code they give.

The one home of signal handling in training (and in ``lvvit-export``, which unwinds the
same way). Before the first step, SIGTERM raises :class:`Terminated` (nothing is lost; the
run ends as KILLED with the shell's status, 143). From the first step on, a preemption
signal makes every rank stop at the same optimizer step, with a checkpoint (status 75).
A process forked after a handler is installed (a DataLoader worker) inherits it; the one
guard in :func:`install` decides what such a process does.

Schedulers warn before they kill: SLURM sends SIGTERM (or the ``--signal`` of the job),
Kubernetes SIGTERM with a grace period. The handler only sets a flag, since the signal may
land inside a collective or a checkpoint write. The ranks agree on the flag on a CPU (gloo)
process group of their own: at every optimizer-step boundary each rank waits for the
all-reduce (MAX) it started at the previous boundary, which is long done, and starts the
next one with its current flag. The step therefore never waits on the agreement, every
rank reads the same agreed value at the same boundary, and a rank that got the signal
alone stops all of them one or two steps later.

The grace period is enforced by the kernel, not by Python: the first signal arms
``ITIMER_REAL`` and SIGALRM keeps its default action, so a rank that cannot finish (a
peer died mid-save, a file system that hangs) ends at the deadline even when it is blocked
inside C code. ``latest`` is only ever replaced after a complete save, so it still names
the previous complete checkpoint then.

``deepspeed train.py`` on one node is two launcher processes: the ``deepspeed`` runner, which
forwards no signal (a SIGTERM to it alone ends it and nothing else), and the per-node
``deepspeed.launcher.launch`` that starts the ranks. A rank started by the latter watches
both and, when either goes away, sends itself the first preemption signal: the command
users type (and a container's init that signals it) then stops the run like a signal to
the ranks would.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:  # torch is imported when a run starts: the option checks stay light
    import torch
    import torch.distributed as dist

log = logging.getLogger("lvvit.train")

PREEMPTED_EXIT = 75
"""Exit status of a rank that stopped on a preemption signal after its checkpoint was
saved: ``EX_TEMPFAIL`` of sysexits.h, "try again later" (docs/training.md, "Preemption")."""
DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"
DEFAULT_GRACE = 60.0
UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
DEEPSPEED_LAUNCHER = "deepspeed.launcher.launch"
"""The module DeepSpeed's runner starts on each node (its command line names it)."""
WATCH_EVERY = 0.1
"""Seconds between looks at the launcher processes."""
T = TypeVar("T")
_END = object()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run is closed as KILLED."""


def end_status(err: BaseException) -> str:
    """KILLED for an interrupt or SIGTERM, FAILED for anything else that ended the run."""
    return "KILLED" if isinstance(err, KeyboardInterrupt | Terminated) else "FAILED"


def install(signals: Iterable[signal.Signals], action: Callable[[int], None], *, forked_dies: bool) -> None:
    """``action(signum)`` on each of ``signals`` in this process. A process forked later
    inherits the handler: there the signal takes its default action (``forked_dies``, it
    ends as if no handler had been installed) or is ignored (it carries on)."""
    owner = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != owner:
            if forked_dies:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        action(signum)

    for sig in signals:
        signal.signal(sig, handler)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (forked children keep the default)."""
    install((signal.SIGTERM,), _raise_terminated, forked_dies=True)


def _raise_terminated(signum: int) -> None:
    raise Terminated()


class Preempted(Terminated):
    """Every rank stopped at ``step`` on a preemption signal; the checkpoint ``tag`` is saved.
    A :class:`Terminated`, so the MLflow run is closed as KILLED."""

    def __init__(self, step: int, tag: str | None) -> None:
        super().__init__(step, tag)
        self.step = step
        self.tag = tag


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``"TERM,USR1"``) as signals; ``"none"`` as none.
    Raises ``ValueError`` naming the item at fault."""
    if text.strip().lower() == "none":
        return ()
    found = []
    for item in (part.strip() for part in text.split(",")):
        name = item.upper() if item.upper().startswith("SIG") else f"SIG{item.upper()}"
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise ValueError(f"{item!r} is not a signal name (e.g. SIGTERM, SIGUSR1, or 'none')") from None
        if sig in UNCATCHABLE or sig == signal.SIGALRM:
            raise ValueError(f"{item!r} cannot be used: it cannot be caught or it enforces the grace period")
        found.append(sig)
    return tuple(dict.fromkeys(found))


class Preemption:
    """The flag, its agreement across ranks, and the grace deadline.

    ``poll`` and ``settle`` are collectives on the control group: every rank calls them at
    the same points of the loop (each step boundary; each epoch end).
    """

    def __init__(self, signals: tuple[signal.Signals, ...], grace: float) -> None:
        import torch.distributed as dist

        self.signals = signals
        self.grace = grace
        self.signal_name: str | None = None
        self.signalled_at: float | None = None  # time.time() of this rank's first signal
        # collective: every rank creates it (or, with no signals, none does)
        self.group = dist.new_group(backend="gloo") if signals else None
        self.pending: dist.Work | None = None
        self.box: torch.Tensor | None = None

    def install(self) -> None:
        """From here on the signals only set the flag (the run is past its setup), and the end
        of DeepSpeed's launcher processes raises the first of them."""
        if self.signals:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            watch_launcher(self.signals[0])
        install(self.signals, self.handle, forked_dies=False)  # a forked process carries on too

    def shielded(self, items: Iterable[T]) -> Iterator[T]:
        """``items`` with the signals blocked while the first one is fetched: a DataLoader forks
        its workers then, and they inherit the mask. Launchers and schedulers signal the whole
        process tree, and torch's workers die of SIGTERM (which fails their rank's next batch);
        these keep serving their rank up to the agreed step. A signal that arrives meanwhile
        is delivered when the first item is there."""
        iterator = iter(items)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            first = next(iterator, _END)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if first is _END:
            return
        yield first
        yield from iterator

    def handle(self, signum: int) -> None:
        if self.signalled_at is not None:
            return
        self.signalled_at = time.time()
        self.signal_name = signal.Signals(signum).name
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.001))

    def poll(self) -> bool:
        """At an optimizer-step boundary: whether the ranks agreed to stop here (on the flags
        of the previous boundary); starts the agreement on the current flags otherwise."""
        import torch.distributed as dist

        if self.group is None:
            return False
        agreed = self._wait()
        if not agreed:
            self.box = self._flag()
            self.pending = dist.all_reduce(self.box, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def settle(self) -> bool:
        """Whether any rank has the flag now (blocking; at epoch ends, where a wait costs nothing)."""
        import torch.distributed as dist

        if self.group is None:
            return False
        if self._wait():
            return True
        box = self._flag()
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
        return box.item() > 0

    def _flag(self) -> torch.Tensor:
        import torch

        return torch.tensor([0.0 if self.signalled_at is None else 1.0])

    def _wait(self) -> bool:
        if self.pending is None:
            return False
        self.pending.wait()
        self.pending = None
        return self.box.item() > 0

    def seconds_left(self) -> float:
        """Of the grace period since this rank's signal (the full period without one)."""
        if self.signalled_at is None:
            return self.grace
        return self.grace - (time.time() - self.signalled_at)

    def report(self, step: int, tag: str | None, save_seconds: float) -> None:
        """One line per rank: what it received, where it stopped, how long it took."""
        if self.signalled_at is None:
            got = "no signal here (another rank's)"
        else:
            got = f"{self.signal_name} {time.time() - self.signalled_at:.2f} s ago"
        log.warning("preempted: %s; stopped at step %d, checkpoint %s saved in %.2f s; exiting with %d "
                    "(resume with --resume auto)", got, step, tag, save_seconds, PREEMPTED_EXIT)


def watch_launcher(signum: signal.Signals) -> None:
    """When this rank was started by ``deepspeed.launcher.launch``: a thread that sends
    ``signum`` to this process once that launcher, or the process that started it (the
    ``deepspeed`` runner), has ended. Other launchers (torchrun, srun, none) are not watched:
    they pass signals on themselves, and a shell that ends is no reason to stop."""
    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        if DEEPSPEED_LAUNCHER not in launcher.cmdline():
            return
        runner = launcher.ppid()
    except psutil.Error:
        return
    threading.Thread(target=_signal_when_gone, args=(launcher, runner, signum), name="lvvit-launcher-watch",
                     daemon=True).start()


def _signal_when_gone(launcher, runner: int, signum: signal.Signals) -> None:
    while (gone := _launcher_gone(launcher, runner)) is None:
        time.sleep(WATCH_EVERY)
    log.warning("%s has ended: stopping the run as on %s", gone, signum.name)
    os.kill(os.getpid(), signum)


def _launcher_gone(launcher, runner: int) -> str | None:
    """Which of the two launcher processes has ended (the launcher is then no longer this
    rank's parent; the runner, no longer the launcher's), if one has."""
    import psutil

    if os.getppid() != launcher.pid:
        return f"{DEEPSPEED_LAUNCHER} (pid {launcher.pid})"
    try:
        if launcher.ppid() != runner:
            return f"the deepspeed runner (pid {runner})"
    except psutil.NoSuchProcess:
        return f"{DEEPSPEED_LAUNCHER} (pid {launcher.pid})"
    return None


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the logs are flushed, skipping the interpreter's
    teardown: collecting the heap of torch, DeepSpeed and MLflow takes seconds (measured
    2-10 s here) of the grace period and does nothing a preempted rank needs (its
    checkpoint is saved, the MLflow run closed, the train loader's workers shut down)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["DEFAULT_GRACE", "DEFAULT_SIGNALS", "PREEMPTED_EXIT", "Preempted", "Preemption", "Terminated",
           "end_status", "exit_now", "install", "parse_signals", "raise_on_sigterm", "watch_launcher"]
