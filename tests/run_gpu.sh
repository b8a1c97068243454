#!/usr/bin/env bash
# The GPU tests (`pytest -m gpu`) file by file, several pytest workers on the one GPU (kernel
# compiles are the slow part), within a time budget - for a lent GPU machine with a per-call limit.
#   DEADLINE=560 bash tests/run_gpu.sh [test files]   # default: every tests/*_gpu.py
# Env: DEADLINE seconds in all (560), NW workers (6), KT extra pytest args, OUT the log folder
# (one log per file; default /tmp/attncc-gpu). Wheels in .whl/ (lark) are installed first if present.
set -u
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-/tmp/attncc-gpu}; mkdir -p "$out"
start=$(date +%s); deadline=${DEADLINE:-560}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
files=("$@"); [ ${#files[@]} -gt 0 ] || files=(tests/*_gpu.py)
for f in "${files[@]}"; do
  left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -le 10 ]; then echo "== $f: not run (time)"; continue; fi
  log="$out/$(basename "$f" .py).log"
  # shellcheck disable=SC2086
  timeout "$left" python3 -m pytest -m gpu "$f" -p no:cacheprovider -n "${NW:-6}" --dist load -v -rf ${KT:-} > "$log" 2>&1
  echo "== $f rc=$? t=$(( $(date +%s) - start ))s"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$log" | tail -15
done
