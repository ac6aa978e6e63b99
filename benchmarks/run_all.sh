#!/usr/bin/env bash
# Every benchmark with the shipped checkpoints, 2 threads (about 20 min on 2 idle cores).
set -x
cd "$(dirname "$0")/.." && . .venv/bin/activate
export PYTHONUNBUFFERED=1
python benchmarks/energy_conservation.py --steps 20000
python benchmarks/service_overhead.py --threads 2
python benchmarks/model_speed.py --threads 2 --rounds 3 --round-s 1.5 --models ours mace-small
python benchmarks/model_speed.py --threads 2 --rounds 3 --round-s 1.5 --cases aspirin --models ours ours-compiled mace-medium --out benchmarks/results/model_speed_compiled.json
python benchmarks/server_load.py --threads 2 --seconds 4 --clients 1 8 32
python benchmarks/batching_throughput.py --threads 2 --duration-s 8
python benchmarks/scaling.py --threads 2 --element Cu --max-atoms 10000
