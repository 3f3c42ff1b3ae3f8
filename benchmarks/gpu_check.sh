#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the GPU suite (benchmarks/gpu.py) with one
# profiled forward per system (traces.tgz: torch profiler op tables and Chrome traces).
# Python packages the machine lacks (hydra-core, omegaconf, antlr4, diskcache) travel as
# wheels in .whl/ (ignored by git; carry it), made here with
#   pip download --no-deps --only-binary=:all: -d .whl hydra-core==1.3.8 omegaconf==2.3.1 diskcache==5.6.3
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Logs, figures and traces go to $OUT.
#   bash benchmarks/gpu_check.sh [TEST_SECONDS] [BENCH_SECONDS] [gpu.py arguments...]
set -uo pipefail
tests_s=${1:-120}; bench_s=${2:-280}; shift 2 || true
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
echo "== tests"
timeout "$tests_s" python3 -m pytest -p no:cacheprovider -o addopts="-q" -rfE \
  tests/test_cuda.py tests/test_job_placement.py tests/test_dispatch.py tests/test_execution.py tests/test_devices.py \
  tests/test_planner.py tests/test_loading.py tests/test_hf_models.py 2>&1 | tee "$out/pytest.log" | tail -60
if [ -f .diag/disk_pages.py ]; then  # an uncommitted diagnostic, carried when there is one
  echo "== diagnostic"; timeout 90 python3 .diag/disk_pages.py > "$out/diag.log" 2>&1; tail -60 "$out/diag.log"
fi
echo "== benchmark"
timeout "$bench_s" python3 benchmarks/gpu.py --json "$out/gpu.json" --trace "$out/traces" "$@" 2>&1 | tee "$out/gpu.log"
# One profiled forward per system and map: one archive, as only a few files come back from a device call.
if [ -d "$out/traces" ]; then tar czf "$out/traces.tgz" -C "$out" traces && rm -rf "$out/traces"; fi
