"""`make demo`: serve the default checkpoint, run a short aspirin NVE MD through RemoteCalculator, report, shut down.

Starts `mlip serve` (GPU if there is one, else CPU) on a free loopback port, waits for /health/ready,
runs velocity Verlet over one WebSocket session and prints the energy drift and steps/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from md_aspirin_remote import DEFAULT_STRUCTURE, print_report, read_structure, run_md

from mlip import RemoteCalculator
from mlip.checkpoint import DEFAULT_CHECKPOINT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its `mlip serve` launcher
from tests.launcher import ServerProcess  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure", nargs="?", type=Path, default=DEFAULT_STRUCTURE)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    args = parser.parse_args(argv)
    atoms = read_structure(args.structure)
    if not args.checkpoint.is_file():
        raise SystemExit(f"checkpoint not found: {args.checkpoint} (train it or pass --checkpoint PATH)")

    start = time.perf_counter()
    with ServerProcess(["--checkpoint", str(args.checkpoint), "--log-level", "warning"]) as server:
        (model,) = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
        print(
            f"mlip serve ready at {server.url} in {time.perf_counter() - start:.1f} s: "
            f"{model['name']} on {model['device']} ({model['dtype']}), sha256 {model['sha256'][:12]}"
        )
        with RemoteCalculator(server.url, transport="ws") as calc:
            report = run_md(atoms, calc, args.steps, args.timestep_fs)
    print_report(report)
    print("server stopped")


if __name__ == "__main__":
    main()
