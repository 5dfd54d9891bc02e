#!/usr/bin/env bash
# The README's test command: from a fresh clone, set up everything and run every check and test.
#
#   bash tools/test.sh            # create .venv if missing, install, build the kernels, run all checks
#   bash tools/test.sh --fresh    # delete .venv first
#
# Installs torch + torchvision from PyPI, then the package in editable mode without build isolation, so the
# kernels/ extension is compiled against that torch: with CUDA (one arch, TORCH_CUDA_ARCH_LIST, default 9.0)
# when nvcc is found, so the CUDA code is compiled on every run, CPU-only otherwise. Then: notebooks clean,
# library in sync with the notebooks, README current, the docs build's processing of every notebook
# (tools/check_docs.py), nbdev_test, pytest. Ends with one summary line and exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${LRP_SCRATCH_VENV:-.venv}
PY=${PYTHON:-python3}
T0=$(date +%s)

say() { printf '\n=== %s\n' "$*"; }
die() { printf '\nsummary: setup failed: %s\n' "$*"; exit 1; }

[ "${1:-}" = "--fresh" ] && rm -rf "$VENV"

say "environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || die "could not create a virtual environment with $PY"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || die "Python 3.10+ is needed"
python -m pip install -q --upgrade pip setuptools wheel ninja || die "pip could not install the build tools"
python -m pip install -q torch torchvision || die "pip could not install torch and torchvision"
python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' || die "torch/torchvision do not import"

say "install and build the extension"
if [ -z "${LRP_SCRATCH_BUILD:-}" ]; then
  if command -v nvcc >/dev/null 2>&1 && python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    export LRP_SCRATCH_BUILD=cuda
  else
    export LRP_SCRATCH_BUILD=cpu
  fi
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
echo "LRP_SCRATCH_BUILD=$LRP_SCRATCH_BUILD TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
B0=$(date +%s)
python -m pip install -q -e ".[dev,analysis]" --no-build-isolation || die "pip install -e .[dev,analysis] failed (see above)"
echo "build and install took $(( $(date +%s) - B0 )) s"
python -c 'from lrp_scratch.kernels import build_info; print(build_info())' || die "lrp_scratch does not import"
python -c "
import sys; from lrp_scratch.kernels import build_info; b = build_info()
want = '$LRP_SCRATCH_BUILD'
sys.exit(0 if b['loaded'] and b['variant'] == want else f'expected the {want} variant of lrp_scratch._C, got {b}')
" || die "the extension was not built as asked"

# From here on every check runs, and the summary counts them.
export LRP_SCRATCH_REQUIRE_C=1  # no silent fallback to the references in the notebooks and tests
passed=0; failed=0; failures=()
check() {
  local name=$1; shift
  say "$name"
  local s=$(date +%s)
  if "$@"; then passed=$((passed+1)); echo "--- ok: $name ($(( $(date +%s) - s )) s)"
  else failed=$((failed+1)); failures+=("$name"); echo "--- FAILED: $name ($(( $(date +%s) - s )) s)"; fi
}
snapshot() { find "$@" -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }
unchanged_by() {  # unchanged_by "<command>" <paths...>: the command leaves the files under paths as they were
  local cmd=$1; shift
  local before after; before=$(snapshot "$@")
  $cmd || return 1
  after=$(snapshot "$@")
  if [ "$before" != "$after" ]; then
    diff <(echo "$before") <(echo "$after")
    echo "$cmd changed the files above: run it, review and commit the result"
    return 1
  fi
}

check "notebooks are clean (nbdev_clean changes nothing)" unchanged_by nbdev_clean nbs
check "library in sync with notebooks (nbdev_export changes nothing)" unchanged_by nbdev_export lrp_scratch
check "README.md is current with nbs/index.ipynb" python tools/make_readme.py --check
check "docs processing (nbdev's processors, as nbdev_docs runs them)" python tools/check_docs.py
check "notebook tests (nbdev_test)" nbdev_test --n_workers 1
check "pytest" python -m pytest -q tests

total=$(( $(date +%s) - T0 ))
echo
[ "$failed" -gt 0 ] && printf 'failed checks: %s\n' "${failures[*]}"
echo "total time ${total} s"
echo "summary: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
