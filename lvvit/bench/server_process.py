"""``lvvit-serve`` as a child process on free loopback ports, for benchmarks, tests and
scripts that need a real server for a while: start, wait until ready, scrape its metrics,
stop with SIGTERM. A harness, not part of the server: it lives with the benchmarks that
ship (``lvvit-bench serve``, the demo), and tests import it from here."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lvvit.ports import free_port


def console_script(name: str) -> str:
    """A console script of this environment (beside its Python), whatever PATH says."""
    return str(Path(sys.executable).parent / name)


def scrape(text: str, metric: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition, e.g. ``scrape(t, "x_count", 'model="m"')``."""
    found = re.search(rf"^{re.escape(metric)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    if found is None:
        raise KeyError(f"{metric}{{{labels}}} not in the metrics")
    return float(found.group(1))


class ServerProcess:
    """``lvvit-serve --model-dir DIR`` on fresh ports; output goes to ``log_path``."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str, env: dict | None = None,
                 ready_timeout: float = 180.0) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log_path = Path(log_path)
        cmd = [console_script("lvvit-serve"), "--model-dir", str(model_dir),
               "--http-port", str(self.http), "--grpc-port", str(self.grpc),
               "--metrics-port", str(self.metrics), *flags]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lvvit-serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url("/v2/health/ready"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"lvvit-serve not ready after {timeout:.0f}s:\n{self.output()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def output(self) -> str:
        return self.log_path.read_text()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (in-flight requests finish), then the exit code; kills after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
