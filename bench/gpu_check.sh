#!/usr/bin/env bash
# The one-command GPU check (issue 15): set hal up from this checkout, then run bench/gpu_check.py,
# which runs the conformance suite on the GPU targets and `hal bench resnet50` at batch 256 in
# bf16, fp16 and fp32, and writes bench/results/gpu/ (and $OUT when set). Options: see
# `bench/gpu_check.sh --help`; `--dry-run` prints the planned commands.
#
# Works offline: hal is installed without its dependencies and without build isolation (the
# frameworks must already be installed); where pip cannot install it, hal is staged on PYTHONPATH
# (symlinks into this checkout and its entry points). PYTHON picks the interpreter (default:
# .venv/bin/python if there is one, else python3). Exit status: 0 passed, 1 a parity or benchmark
# failure, 2 a wrong use or a failed set-up.
set -euo pipefail
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}  # the time budget counts from here
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi

if ! "$PYTHON" bench/gpu_check.py --check-install 2>/dev/null; then
  echo "gpu_check: installing hal from $(pwd) (pip install --no-deps --no-build-isolation -e .)" >&2
  if ! "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
      && ! "$PYTHON" -m pip install --quiet --user --no-deps --no-build-isolation -e . 2>/dev/null; then
    site="${TMPDIR:-/tmp}/hal-gpu-check-site"
    echo "gpu_check: pip could not install hal; staging it in $site (PYTHONPATH)" >&2
    "$PYTHON" bench/gpu_check.py --stage "$site" || { echo "gpu_check: error: could not stage hal" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" bench/gpu_check.py --check-install || { echo "gpu_check: error: hal set-up failed" >&2; exit 2; }
fi
# NVML (nvidia-ml-py) measures the GPU's energy (hal.energy); without it the energy columns say n/a and why.
case " $* " in *" --dry-run "*|*" --summarize "*|*" -h "*|*" --help "*) ;; *)
  if ! "$PYTHON" -c "import pynvml" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --retries 0 --timeout 5 nvidia-ml-py >/dev/null 2>&1 \
      || echo "gpu_check: nvidia-ml-py is not installed and could not be: energy will not be measured" >&2
  fi;;
esac
exec "$PYTHON" bench/gpu_check.py "$@"
