#!/usr/bin/env bash
# The GPU checks of issue 12 as one call on a lent device machine (about 9 minutes).
#
# That machine has python3 with CUDA torch but no package registry, and ../shared does not travel.
# Here, in the repository root (both folders are git-ignored through .git/info/exclude):
#   .whl/  wheels of the dependencies the image lacks (python 3.12, manylinux x86_64): ase, vesin, e3nn,
#          setuptools, fastapi, starlette, pydantic(-core, -settings), annotated-types, typing-inspection,
#          python-dotenv, orjson, uvicorn, websockets, httptools, ipi, cuequivariance(-torch), and
#          cueq.tar.xz: cuequivariance-ops-cu13 + cuequivariance-ops-torch-cu13 unpacked and xz-compressed
#          (74 MB as wheels, over the 64 MB a call may carry; 27 MB so)
#   .gpu/aspirin_train.xyz  a copy of ../shared/data/rmd17/aspirin_train.xyz
#          opentelemetry-api (fastapi >= 0.16x imports it), platformdirs (cuequivariance-ops needs it),
# Then: run(command="bash benchmarks/gpu_check.sh [SECTION...]", carry=[".whl", ".gpu"], timeout_s=590)
# SECTIONs (default: all, in this order): gpu_tests speed profile batching overhead train suite.
# Every result lands in $OUT (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DATA=.gpu/aspirin_train.xyz
BUDGET_S=${BUDGET_S:-570}
exec > >(tee "$OUT/gpu_check.log") 2>&1
step() { echo; echo "=== [$SECONDS s] $*"; }

setup() {
    step install
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    tar xJf .whl/cueq.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, e3nn, fastapi, cuequivariance_ops_torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'e3nn', e3nn.__version__, 'cueq ops ok')" || exit 1
}

gpu_tests() {
    step "GPU-only tests: cuEquivariance CUDA kernels = e3nn (float64), replayed CUDA graphs = eager, a real CUDA out-of-memory in the server"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_cuda_graphs.py \
        "tests/test_server.py::test_real_cuda_out_of_memory_splits_batch_and_keeps_serving" 2>&1 | tee "$OUT/pytest_gpu_only.log"
}

speed() {
    step "ms per energy+forces (prebuilt graph): e3nn vs cuEquivariance vs replayed CUDA graphs, aspirin, Cu 1008, Cu 10976, both dtypes"
    timeout 240 python3 benchmarks/model_speed.py --device cuda --threads 4 --rounds 3 --round-s 1.0 --warmup 3 \
        --data $DATA --models ours-32 ours-32-cueq ours-32-cudagraphs --cases aspirin cu1008 cu10976 \
        --out "$OUT/model_speed_cuda.json"
}

profile() {
    step "where the time goes on the GPU: e3nn and cuEquivariance, Cu 1008, float32"
    for model in ours-32 ours-32-cueq; do
        timeout 60 python3 benchmarks/profile_model.py --device cuda --model $model --case cu1008 --dtype float32 \
            --threads 4 --reps 5 --top 12 --data $DATA
    done 2>&1 | tee "$OUT/profile_cuda.md"
}

batching() {
    step "aggregate MD steps/s at 1, 16 and 64 WebSocket clients (one process each), with and without the session wait, float32"
    timeout 200 python3 benchmarks/batching_throughput.py --device cuda --dtype float32 --threads 4 --clients 1 16 64 \
        --modes on on-no-session-wait --duration-s 5 --data $DATA --out "$OUT/batching_cuda.json"
}

overhead() {
    step "per-step overhead of the service on a GPU: in-process vs WebSocket vs HTTP (float32)"
    timeout 80 python3 benchmarks/service_overhead.py --device cuda --dtype float32 --threads 4 --steps 100 --rounds 2 \
        --data $DATA --out "$OUT/service_overhead_cuda.json"
    timeout 80 python3 benchmarks/service_overhead.py --device cuda --dtype float32 --threads 4 --steps 100 --rounds 2 \
        --cuda-graphs --transports in-process ws --data $DATA --out "$OUT/service_overhead_cuda_graphs.json"
}

train() {
    step "training throughput on the GPU: the shipped aspirin recipe for 60 s (epoch time only)"
    timeout 100 python3 -m mlip.cli train training/configs/aspirin-rmd17.yaml --train-file $DATA --device cuda \
        --max-time 60 --output /tmp/train/aspirin-gpu.safetensors 2>&1 | grep -v Warning | tail -n 15
    cp /tmp/train/aspirin-gpu.metrics.jsonl "$OUT/train_cuda.metrics.jsonl" 2>/dev/null
}

suite() {
    local left=$((BUDGET_S - SECONDS))
    step "the suite with every Potential and server on CUDA (MLIP_TEST_DEVICE=cuda), ${left} s left"
    MLIP_TEST_DEVICE=cuda timeout $((left > 30 ? left : 30)) python3 -m pytest -q -p no:cacheprovider -n 6 -rfEs \
        --timeout 150 ${SUITE_TESTS:-} 2>&1 | tee "$OUT/pytest_suite_cuda.log" | tail -n 60
}

setup
for section in "${@:-gpu_tests speed profile batching overhead train suite}"; do
    for s in $section; do $s; done
done
step done
