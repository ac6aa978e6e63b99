"""Batching throughput: N concurrent aspirin MD clients (WebSocket) against one `mlip serve`, batching on and off.

For each server mode (batching on: the server's defaults; off: ``--max-batch-atoms 1``, so every
batch holds one structure; on-no-session-wait: ``--session-wait-ms 0``) and each client count, all clients (one process each) warm up, start
together and run velocity Verlet steps for ``--duration-s``. Reports aggregate steps/s, p50/p99 step latency and the
mean batch size over the timed window (from the server's /metrics).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from typing import Any

import numpy as np

from common import (
    Server,
    aspirin_frames,
    machine_info,
    markdown_table,
    md_parser,
    md_step_times_ms,
    require_checkpoint,
    settings_of,
    start_md,
    write_json,
)

# extra `mlip serve` flags per batching mode; on-no-session-wait: batching without waiting for open sessions' steps
MODES = {"on": [], "off": ["--max-batch-atoms", "1"], "on-no-session-wait": ["--session-wait-ms", "0"]}
MAX_STEPS = 10**9  # clients stop at the deadline, not at a step count


def client_process(url: str, atoms, seed: int, args: argparse.Namespace, ready, go, results) -> None:
    """One MD client in its own process (as real clients are: no shared GIL): warm up, wait, run to the deadline."""
    from mlip.remote import RemoteCalculator

    calc = RemoteCalculator(url, transport="ws")
    try:
        dyn = start_md(atoms, calc, args.timestep_fs, seed=seed)
        md_step_times_ms(dyn, args.warmup_steps)
        ready.wait()
        go.wait()
        results.put((seed, md_step_times_ms(dyn, MAX_STEPS, deadline=time.perf_counter() + args.duration_s)))
    except Exception as err:  # report, do not hang the others at the barrier
        ready.abort()
        go.abort()
        results.put((seed, f"{type(err).__name__}: {err}"))
    finally:
        calc.close()


def run_clients(server: Server, atoms, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """``clients`` MD loops, one process each, released together; aggregate rate, latencies and mean batch size."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Barrier(clients + 1), ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=client_process, args=(server.url, atoms, args.seed + i, args, ready, go, results))
             for i in range(clients)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        ready.wait(timeout=300)
        batch_sum0, batch_count0 = server.metric_sums("mlip_batch_structures")
        t0 = time.perf_counter()
        go.wait(timeout=60)
        outcomes = [results.get(timeout=args.duration_s + 120) for _ in procs]
        wall_s = time.perf_counter() - t0
        batch_sum1, batch_count1 = server.metric_sums("mlip_batch_structures")
    except threading.BrokenBarrierError:
        outcomes = [results.get(timeout=10) for _ in range(results.qsize())]
        raise RuntimeError(f"a client failed: {[o for _, o in outcomes if isinstance(o, str)]}") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"client {seed}: {o}" for seed, o in outcomes if isinstance(o, str)]
    if errors:
        raise RuntimeError("; ".join(errors))
    flat = np.concatenate([np.asarray(o) for _, o in outcomes])
    return {
        "clients": clients, "steps": int(flat.size), "wall_s": wall_s, "steps_per_s": flat.size / wall_s,
        "p50_ms": float(np.percentile(flat, 50)), "p99_ms": float(np.percentile(flat, 99)),
        "mean_batch_structures": (batch_sum1 - batch_sum0) / max(batch_count1 - batch_count0, 1),
        "batches": int(batch_count1 - batch_count0),
    }  # fmt: skip


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput relative to 1 client in the same mode, and batching on / off at the same client count."""
    rate = {(r["mode"], r["clients"]): r["steps_per_s"] for r in rows}
    for r in rows:
        one = rate.get((r["mode"], 1))
        off = rate.get(("off", r["clients"]))
        r["vs_1_client"] = r["steps_per_s"] / one if one else None
        r["on_over_off"] = r["steps_per_s"] / off if r["mode"] == "on" and off else None


def parse_args() -> argparse.Namespace:
    parser = md_parser(__doc__.splitlines()[0], "batching_throughput")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--duration-s", type=float, default=15.0, help="timed window per client count")
    parser.add_argument("--warmup-steps", type=int, default=3, help="per client, before the timed window")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--device", default="cpu", help="server device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    checkpoint = require_checkpoint(args.checkpoint)
    info = machine_info(args.threads)
    (atoms,) = aspirin_frames(args.data, 1)
    rows = []
    for mode in args.modes:
        with Server(checkpoint, args.threads, args.dtype, MODES[mode], device=args.device) as server:
            for clients in args.clients:
                print(f"# batching {mode}: {clients} clients", flush=True)
                rows.append({"mode": mode, **run_clients(server, atoms, clients, args)})
    add_ratios(rows)
    settings = settings_of(args)
    write_json(args.out, {"benchmark": "batching_throughput", "machine": info, "settings": settings, "results": rows})
    headers = ["batching", "clients", "steps/s (all clients)", "× 1 client", "on/off", "p50 ms", "p99 ms", "mean batch"]
    print(markdown_table(headers, [[r["mode"], r["clients"], r["steps_per_s"], r["vs_1_client"], r["on_over_off"],
                                    r["p50_ms"], r["p99_ms"], r["mean_batch_structures"]] for r in rows]))  # fmt: skip


if __name__ == "__main__":
    main()
