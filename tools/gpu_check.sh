#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command, ending in one table:
#
#   bash tools/gpu_check.sh          # in the environment of tools/test.sh (.venv is used when no venv is active)
#
# 1. builds lrp_scratch._C in place for the visible GPU's architecture (TORCH_CUDA_ARCH_LIST from
#    torch.cuda.get_device_capability()) and checks that the CUDA kernels are in it;
# 2. runs the notebooks that have `#| gpu` cells with `nbdev_test --flags gpu`;
# 3. runs the CUDA tests (tests/test_cuda.py -k cuda), then the same under `compute-sanitizer --tool memcheck`
#    when compute-sanitizer is found (PyTorch's caching allocator off, so every allocation has its exact size);
# 4. runs the GPU benchmarks: the kernels (bench/kernels.py --device cuda), LRP on VGG16 (and ResNet50 where
#    bench/lrp.py has that case) at batch 1 and 8 with the CUDA kernels on: images/s and time / gradient time
#    (bench/lrp.py --device cuda), and training images/s in float32 vs float16 autocast (bench/train.py --device cuda).
# Aimed at under 8 minutes on an H100-class GPU. Logs go to $GPU_CHECK_LOGS (default: a new temporary folder).
# Without a CUDA GPU it says so in one line and exits 0. Exits 1 when any check failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}

if ! gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null) || [ -z "$gpu" ]; then
  echo "gpu_check: no CUDA GPU visible here (torch.cuda.is_available() is not True in $PY): nothing to check, exiting 0"
  exit 0
fi

T0=$(date +%s)
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOGS"
: > "$LOGS/steps.tsv"
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
echo "gpu_check: $gpu (compute capability $ARCH); logs in $LOGS"
export LRP_SCRATCH_REQUIRE_C=1 PYTHONUNBUFFERED=1 PY ARCH
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree (and the build in it), also for the scripts in bench/

not_run() {  # not_run NAME WHY: a check that could not run here (neither ok nor failed)
  printf '%s\t%s\t%s\t%s\n' "$1" "not run ($2)" 0 "" >> "$LOGS/steps.tsv"
  printf '\n=== %s\n--- not run: %s\n' "$1" "$2"
}

step() {  # step NAME TIMEOUT_S COMMAND...: run it with a time limit, log its output, record ok/FAILED and the seconds
  local name=$1 limit=$2; shift 2
  local log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9_.-' '_').log" s rc
  s=$(date +%s)
  printf '\n=== %s\n' "$name"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash under the time limit
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" > "$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  fi
  rc=$?
  tail -n 3 "$log"
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAILED (over ${limit} s)"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - s ))" "$log" >> "$LOGS/steps.tsv"
  echo "--- $status: $name ($(( $(date +%s) - s )) s)"
  [ "$status" = ok ]
}

# 1. the extension for this GPU
build() {
  LRP_SCRATCH_BUILD=cuda TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}" \
    "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "
import sys, lrp_scratch.kernels as k
b = k.build_info(); print(b)
ok = b['loaded'] and b['variant'] == 'cuda' and b['cuda_archs'] == '$ARCH' and all('cuda' in d for d in k.OP_DEVICES.values())
sys.exit(0 if ok else 'the CUDA kernels are not in the build for $ARCH')"
}
if ! step "build for sm_${ARCH/./} (TORCH_CUDA_ARCH_LIST=$ARCH)" 900 build; then
  echo "gpu_check: the build failed, see $LOGS; nothing else can run"
  exit 1
fi

# 2. the notebooks' #| gpu cells (each notebook runs whole, with its gpu cells)
mapfile -t NBS < <(grep -l '^ *"#| gpu' nbs/*.ipynb | xargs -n1 basename | sed 's/\.ipynb$//')
NB_NAME="notebooks with gpu cells (${#NBS[@]}): nbdev_test --flags gpu"
if ! command -v nbdev_test >/dev/null 2>&1; then
  not_run "$NB_NAME" "nbdev_test is not installed: pip install -e \".[dev]\" --no-build-isolation"
elif [ "${#NBS[@]}" -gt 0 ]; then
  re="^($(IFS='|'; echo "${NBS[*]}"))\\.ipynb\$"
  step "$NB_NAME" 600 \
    nbdev_test --path nbs --flags gpu --file_re "$re" --n_workers "${GPU_CHECK_NB_WORKERS:-4}" --timing
fi

# 3. the CUDA tests, then under the memory checker
step "CUDA tests (tests/test_cuda.py -k cuda)" 300 "$PY" -m pytest -q tests/test_cuda.py -k cuda -p no:cacheprovider
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")"; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SANITIZER="$d/bin/compute-sanitizer" && break
  done
fi
MC_NAME="memcheck: compute-sanitizer --tool memcheck on the CUDA tests"
if [ -z "$SANITIZER" ]; then
  not_run "$MC_NAME" "compute-sanitizer not found"
elif ! "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" -c 'import torch; torch.ones(1, device="cuda").sum().item()' > "$LOGS/memcheck_probe.log" 2>&1; then
  # some sandboxed runtimes refuse the device to the sanitizer ("Device not supported"): that says nothing of our kernels
  not_run "$MC_NAME" "compute-sanitizer cannot check a trivial torch program on this machine: $(grep -m1 -o 'Device not supported\|ERROR SUMMARY: [0-9]* error[s]*' "$LOGS/memcheck_probe.log" || echo "see $LOGS/memcheck_probe.log")"
else
  step "$MC_NAME" 600 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" -m pytest -q -x tests/test_cuda.py -k cuda -p no:cacheprovider
fi

# 4. the benchmarks
step "bench: kernels vs PyTorch on the GPU (bench/kernels.py --device cuda)" 300 "$PY" bench/kernels.py --device cuda --reps 20
LRP_CASES=(vgg16)
"$PY" bench/lrp.py --help 2>/dev/null | grep -q resnet50 && LRP_CASES+=(resnet50)
for c in "${LRP_CASES[@]}"; do
  for bs in 1 8; do
    step "bench: LRP $c batch $bs (bench/lrp.py --device cuda)" 300 env LRP_SCRATCH_CUDA_KERNELS=1 \
      "$PY" bench/lrp.py --device cuda --case "$c" --batch "$bs" --reps 10 --warmup 2 --json "$LOGS/lrp_${c}_b$bs.json"
  done
done
step "bench: training fp32 vs fp16 (bench/train.py --device cuda)" 300 \
  "$PY" bench/train.py --device cuda --only throughput --vgg-batches 30 --vgg-reps 5

# the table
"$PY" - "$LOGS" "$gpu" "$ARCH" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, re, sys
from pathlib import Path
logs, gpu, arch, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

def read(p):
    try: return Path(p).read_text(errors='replace')
    except OSError: return ''

def numbers(name, log):
    "The few numbers of a step worth a table cell."
    text = read(log)
    if name.startswith('bench: kernels'):
        op, out = None, []
        for l in text.splitlines():
            m = re.match(r'(stabilized_div|relevance_filter|filtered_stabilized_div|mul_sum_channels)\b', l)
            if m: op = m.group(1)
            elif l.startswith('geometric mean:') and op: out.append(f"{op}: {l.split(':', 1)[1].strip()}")
        return '; '.join(out)
    if name.startswith('bench: LRP'):
        case, bs = re.search(r'LRP (\w+) batch (\d+)', name).groups()
        try: rows = json.loads(read(logs / f'lrp_{case}_b{bs}.json'))[case]
        except (ValueError, KeyError): return ''
        keep = ['gradient', 'ours EpsilonPlusFlat', 'ours EpsilonPlusFlat (ref)', 'ours classic top_k=0.02', 'zennit EpsilonPlusFlat']
        return '; '.join(f"{n.replace('ours ', '')} {r['img_s']:.1f} img/s {r['x_gradient']:.2f}x grad" for n, r in rows.items() if n in keep)
    if name.startswith('bench: training'):
        got = re.findall(r'^\s+(Trainer \(float32\)|MPTrainer \([^)]*\))\s*: ([\d.]+) images/s', text, re.M)
        ratio = re.search(r'ratio MPTrainer / Trainer = ([\d.]+)', text)
        return '; '.join(f"{n} {v} img/s" for n, v in got) + (f"; ratio {ratio.group(1)}" if ratio else '')
    if name.startswith('memcheck'):
        m = re.findall(r'ERROR SUMMARY: (\d+ errors?)', text)
        return f"memcheck: {m[-1]}" if m else ''
    if 'tests' in name:
        m = re.findall(r'^=*\s*(\d+ (?:passed|failed|skipped|error)[^=\n]*)', text, re.M)
        return m[-1].strip() if m else ''
    if name.startswith('notebooks'):
        return 'Success.' if 'Success.' in text else ' '.join(l for l in text.splitlines() if '.ipynb' in l)[:200]
    return ''

rows = [l.rstrip('\n').split('\t') for l in read(logs / 'steps.tsv').splitlines() if l.strip()]
table = [(n, s, t, numbers(n, log) if log else '') for n, s, t, log in rows]
print(f"\ngpu_check: {gpu}, sm_{arch.replace('.', '')}, {total} s in all; logs in {logs}\n")
print('| check | result | s | numbers |')
print('|---|---|---:|---|')
for n, s, t, x in table: print(f"| {n} | {s} | {t} | {x} |")
bad = [n for n, s, _, _ in table if s.startswith('FAILED')]
skipped = [n for n, s, _, _ in table if s.startswith('not run')]
print(f"\nsummary: {sum(s == 'ok' for _, s, _, _ in table)} ok, {len(bad)} failed, {len(skipped)} not run"
      + (f"; failed: {'; '.join(bad)}" if bad else '') + (f"; not run: {'; '.join(skipped)}" if skipped else ''))
sys.exit(1 if bad else 0)
EOF
