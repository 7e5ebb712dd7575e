"""The demo's int8 export: the trained LV-ViT quantized by ``lvvit-export --precision int8``
(calibrated on the training shards, accuracy-gated on the held-out shards), then the fp32
and int8 graphs timed side by side on one CPU thread.

A refusal by the accuracy gate is an outcome the demo reports, not a crash: the fp32
export is what the demo serves, and the gate's message says by how much int8 missed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from lvvit import onnxrt
from lvvit.bench.infer import throughput

GATE_REFUSAL = "int8 accuracy gate"
BATCHES = (1, 32)


def export_int8(cmd: list[str], out: Path, log: Path, env: dict[str, str]) -> dict:
    """Run ``cmd`` (an ``lvvit-export --precision int8`` line writing ``out``); returns the
    gate's figures, or ``{"refused": message}`` when the gate refused the graph."""
    print("  $ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("lvvit-export: error:")]
        if errors and GATE_REFUSAL in errors[-1]:
            print("    " + errors[-1], flush=True)
            return {"refused": errors[-1].removeprefix("lvvit-export: error: ")}
        raise RuntimeError(f"`{cmd[0]}` exited with {done.returncode} (full output: {log})")
    return json.loads((out / "parity.json").read_text())["int8_accuracy"]


def images_per_second(graphs: dict[str, Path], img_size: int, seconds: float = 0.5) -> dict[str, dict[str, float]]:
    """Images/s of each ONNX graph on the CPU provider, one thread, keyed by batch size."""
    result: dict[str, dict[str, float]] = {}
    for name, path in graphs.items():
        session = onnxrt.session(path, threads=1)
        result[name] = {}
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size), np.float32)
            result[name][str(batch)] = throughput(lambda s=session, x=x: s.run(None, {"images": x}), batch, seconds)
    return result
