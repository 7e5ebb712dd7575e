"""Resumable named stages: each finished stage leaves a small JSON record, so a re-run
skips what is done and a failure says which stage broke and what to look at."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lvvit import atomic
from lvvit.errors import LvvitError


class StageFailed(LvvitError, RuntimeError):
    def __init__(self, stage: str, reason: str, hint: str) -> None:
        super().__init__(f"stage '{stage}' failed: {reason}\n  what to check: {hint}")
        self.stage = stage


def run_command(cmd: list[str], log: Path, env: dict[str, str] | None = None, hint: str = "") -> None:
    """Run a CLI with its output shown live and kept in ``log``; raise on a non-zero exit."""
    print("  $ " + shlex.join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            sys.stdout.write("    " + line)
            sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"`{cmd[0]}` exited with {code} (full output: {log}){hint and '; ' + hint}")


class StageRunner:
    """Runs stages in order, recording ``{"seconds": ..., **result}`` per finished stage."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records_dir = out / "stages"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict] = {}

    def run(self, name: str, title: str, fn: Callable[[], dict], hint: str) -> dict:
        record = self.records_dir / f"{name}.json"
        if record.exists():
            self.results[name] = json.loads(record.read_text())
            print(f"[{name}] {title}: done in an earlier run, reused ({record})", flush=True)
            return self.results[name]
        print(f"\n[{name}] {title}", flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            raise StageFailed(name, str(exc), hint) from exc
        result = {"seconds": round(time.perf_counter() - start, 1), **result}
        atomic.write_json(record, result)
        self.results[name] = result
        print(f"[{name}] done in {result['seconds']:.1f} s", flush=True)
        return result
