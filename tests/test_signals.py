"""The one signals module (lvvit/train/preemption.py): one fork guard for the set-up handler
and the preemption handler. A real Python process per case, signalled for real."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENDS_WITHIN = 60

# The parent installs the handler, forks a child that signals itself, then signals itself.
# The child's exit says what the guard did there; the parent's line says what it did here.
FORK_SCRIPT = """
import os, signal, sys, time
from lvvit.train import preemption
{install}
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    os._exit(7)  # the signal was ignored: the child carried on
_, status = os.waitpid(child, 0)
print("child", "signal" if os.WIFSIGNALED(status) else "exit", os.WTERMSIG(status) if os.WIFSIGNALED(status)
      else os.WEXITSTATUS(status), flush=True)
{parent}
"""


def run(install: str, parent: str) -> subprocess.CompletedProcess:
    script = FORK_SCRIPT.format(install=install, parent=parent)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=ENDS_WITHIN)


def test_sigterm_in_setup_raises_terminated_here_and_a_forked_child_dies_of_it():
    done = run("preemption.raise_on_sigterm()", """
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except preemption.Terminated as err:
    print("parent", preemption.end_status(err))
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == [f"child signal {int(signal.SIGTERM)}", "parent KILLED"]


def test_a_preemption_signal_sets_the_flag_here_and_a_forked_child_carries_on():
    done = run("p = preemption.Preemption((), 60.0)  # no signals: no process group needed\n"
               "preemption.install((signal.SIGTERM,), p.handle, forked_dies=False)", """
os.kill(os.getpid(), signal.SIGTERM)
print("parent", p.signal_name, p.seconds_left() <= 60.0)
signal.setitimer(signal.ITIMER_REAL, 0)
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["child exit 7", "parent SIGTERM True"]

