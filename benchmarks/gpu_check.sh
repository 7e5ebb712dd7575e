#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md) on a bare GPU machine: CUDA torch, timm and onnx are
# there, our other dependencies are not and nothing can be fetched. `make gpu-wheels` puts
# our wheel and the missing ones in .whl/ here; this installs them into a scratch folder and
# writes one markdown table. Usage, from the repository root:
#   benchmarks/gpu_check.sh [OUT_FILE] [-- extra flags, e.g. --dry-run]
set -euo pipefail
wheels="$(pwd)/.whl"
out="$(realpath -m "${1:-${OUT:-.}/gpu_check.md}")"
shift $(( $# > 0 ? 1 : 0 ))
[[ "${1:-}" == "--" ]] && shift
ls "$wheels"/lvvit-*.whl >/dev/null 2>&1 || { echo "no lvvit wheel in $wheels: run 'make gpu-wheels' first" >&2; exit 2; }
site="$(mktemp -d /tmp/lvvit-site.XXXXXX)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$site"  # the installed package, not the checkout
timeout 480 python3 -m lvvit.bench.gpu_check --out "$out" "$@"
