"""Peak memory per neighbour pair: what the edge limits (MLIP_MAX_EDGES_PER_STRUCTURE, Potential.max_edges) buy.

Each size runs in a fresh process (so its peak RSS is its own): a diamond-carbon supercell through the
shipped aspirin checkpoint, energy + forces + stress in one pass. Reported: edges, peak RSS and the
increase over the RSS before the evaluation, per edge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import default_out, machine_info, markdown_table, peak_rss_mb, set_threads, write_json

DEFAULT_CHECKPOINT = "checkpoints/aspirin-rmd17.safetensors"


def measure(checkpoint: str, repeat: int, dtype: str, threads: int) -> dict:
    """One evaluation of a repeat³ diamond cell in this process (called in a child process)."""
    set_threads(threads)
    from ase.build import bulk

    from mlip import Potential, Structure

    potential = Potential.load(checkpoint, dtype=dtype)
    potential.max_edges = 10**8  # measure beyond the limits, do not refuse
    atoms = bulk("C", "diamond", a=3.57, cubic=True) * (repeat, repeat, repeat)
    graph = potential.graph(Structure.from_atoms(atoms))
    before = peak_rss_mb()
    start = time.perf_counter()
    potential.evaluate_graphs([graph], ["energy", "forces", "stress"])
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    edges = int(graph.edge_index.shape[1])
    return {"atoms": len(atoms), "edges": edges, "peak_rss_mb": peak, "eval_mb": peak - before,
            "kB_per_edge": (peak - before) * 1024 / edges, "eval_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--repeats", type=int, nargs="+", default=[2, 4, 7], help="diamond supercell sizes (8 atoms each cube)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(default_out("edge_memory")))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.child, args.dtype, args.threads)))
        return
    rows = []
    for repeat in args.repeats:
        command = [sys.executable, __file__, "--child", str(repeat), "--checkpoint", args.checkpoint,
                   "--dtype", args.dtype, "--threads", str(args.threads)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print(markdown_table(
        ["atoms", "edges", "peak RSS MB", "evaluation MB", "kB/edge", "s"],
        [[r["atoms"], r["edges"], f"{r['peak_rss_mb']:.0f}", f"{r['eval_mb']:.0f}", f"{r['kB_per_edge']:.1f}", f"{r['eval_s']:.1f}"] for r in rows],
    ))
    write_json(args.out, {"machine": machine_info(args.threads), "settings": vars(args), "results": rows})


if __name__ == "__main__":
    main()
