#!/usr/bin/env bash
# The GPU checks of issue 12 as one call on a lent device machine (not yet run: no session has had a GPU).
#
# That machine has python3 with CUDA torch and e3nn but no registry: carry this project's other
# dependencies as wheels (.whl, git-ignored; see /work/.library/device/README.md), e.g. vesin, ase,
# pyyaml, tqdm, fastapi, uvicorn, msgpack, orjson, prometheus-client, pydantic-settings, httpx,
# cuequivariance, cuequivariance-torch and the cuequivariance-ops-torch-cuXX matching its torch's CUDA.
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT (the tool brings them back): pytest log, model_speed and scaling JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# kernels="cueq" with cuEquivariance's CUDA kernels against e3nn on the GPU (float64, 1e-9)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/pytest.log"

# ms per energy+forces: e3nn vs cuEquivariance vs torch.compile, aspirin and a 1008-atom Cu cell, both dtypes
timeout 200 python3 benchmarks/model_speed.py --device cuda --threads 4 --rounds 3 --round-s 1.0 \
    --models ours-32 ours-32-cueq ours-32-compiled --cases aspirin cu1008 --out "$OUT/model_speed_cuda.json"

# µs per atom per step up to 10 000 atoms, float32 (the issue's ≤ 2 µs/atom/step target)
timeout 120 python3 benchmarks/scaling.py --device cuda --dtype float32 --sizes 1000 3000 10000 --max-atoms 10000 \
    --round-s 2 --out "$OUT/scaling_cuda.json"
