"""``lvvit-bench {data,train,infer,serve,label}``: each benchmark measures ours against its
baseline in the same run and prints the ratio last, so noisy shared machines compare
like with like. Results are recorded in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib

from lvvit.errors import exits_on_error

BENCHMARKS = {
    "data": "decode + crop + flip pipeline vs the naive PIL path; label-map bytes vs official",
    "train": "DeepSpeed ZeRO-2 step time vs plain PyTorch, same model and optimizer",
    "infer": "ONNX Runtime (fp32 and int8) vs PyTorch eager, images/s at batch 1, 8, 32",
    "serve": "lvvit-serve with 16 concurrent clients vs offline ONNX Runtime at max batch",
    "label": "lvvit-label images/s, same small CNN as torch and as ONNX teacher; label bytes vs official",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lvvit-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"lvvit.bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    with exits_on_error():
        importlib.import_module(f"lvvit.bench.{args.bench}").run(args)
