"""Service overhead: aspirin MD steps in-process vs through a local `mlip serve` (WebSocket, HTTP msgpack, HTTP JSON).

One `mlip serve` subprocess (same thread count and dtype as the in-process calculator), and beside it
``minimal_server.py``: uvicorn, one model thread and msgpack frames with none of the service around them,
so that "above minimal" separates what our layers cost from what any such server pays on this machine
(loopback transport, thread hand-offs, waking idle cores). Each round runs
``--steps`` velocity Verlet steps from the same start with every transport in turn (order rotated
per round); overhead is a transport's median ms/step minus the in-process one, paired round by round.
The forward pass itself varies by milliseconds between rounds on a shared CPU, so the headline figure
subtracts it step by step instead: mean ms/step minus mean ms of the forward pass (timed in-process
around ``Potential.evaluate_graphs``, in the server by its /metrics, which time the same call), paired with
in-process round by round. The server's /metrics also split its share: time per request, and of that,
time outside the forward pass (decoding, validation, neighbour list, queue hand-offs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from common import (
    Server,
    aspirin_frames,
    machine_info,
    markdown_table,
    md_parser,
    md_step_times_ms,
    require_checkpoint,
    set_threads,
    settings_of,
    start_md,
    summarize_ms,
    write_json,
)

TRANSPORTS = {
    "in-process": "mlip.MLIPCalculator in the benchmark process",
    "ws": "RemoteCalculator(transport='ws'): one WebSocket session, msgpack frames, positions only per step",
    "ws-minimal": "RemoteCalculator(transport='ws') against benchmarks/minimal_server.py: the floor for a WebSocket server with a model thread",
    "http-msgpack": "RemoteCalculator(transport='http'): POST /v1/calculate, msgpack body, persistent connection",
    "http-json": "plain httpx loop: POST /v1/calculate with a JSON body (nested lists), persistent connection",
}


class JsonHTTPCalculator(Calculator):
    """What a client without msgpack does: JSON POST /v1/calculate per evaluation over one httpx.Client."""

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, url: str, **kwargs: Any):
        import httpx

        super().__init__(**kwargs)
        self.client = httpx.Client(base_url=url, timeout=60.0)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        from mlip.ase_properties import ase_results, wanted_properties

        super().calculate(atoms, properties, system_changes)
        structure = {
            "numbers": self.atoms.numbers.tolist(),
            "positions": self.atoms.positions.tolist(),
            "cell": self.atoms.cell.array.tolist(),
            "pbc": [bool(p) for p in self.atoms.pbc],
        }
        payload = {"structures": [structure], "properties": wanted_properties(properties, bool(self.atoms.pbc.any()))}
        response = self.client.post("/v1/calculate", json=payload)
        response.raise_for_status()
        (result,) = response.json()["results"]
        self.results = ase_results(result)


class ForwardTimer:
    """Wraps a Potential's ``evaluate_graphs`` (the call the server's mlip_compute_seconds times): (sum s, count)."""

    def __init__(self, potential) -> None:
        self.seconds, self.calls = 0.0, 0
        evaluate_graphs = potential.evaluate_graphs

        def timed(*args: Any, **kwargs: Any):
            start = time.perf_counter()
            try:
                return evaluate_graphs(*args, **kwargs)
            finally:
                self.seconds, self.calls = self.seconds + time.perf_counter() - start, self.calls + 1

        potential.evaluate_graphs = timed

    def sums(self) -> tuple[float, float]:
        return self.seconds, float(self.calls)


def calculator_factories(
    checkpoint: Path, url: str, minimal_url: str, dtype: str, device: str, cuda_graphs: bool
) -> tuple[dict[str, Callable[[], Calculator]], ForwardTimer]:
    """A fresh calculator per transport (the in-process model is loaded once and shared), and the timer of
    the in-process forward passes."""
    from mlip import MLIPCalculator, Potential
    from mlip.remote import RemoteCalculator

    potential = Potential.load(checkpoint, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
    timer = ForwardTimer(potential)
    return {
        "in-process": lambda: MLIPCalculator(potential),
        "ws": lambda: RemoteCalculator(url, transport="ws"),
        "ws-minimal": lambda: RemoteCalculator(minimal_url, transport="ws"),
        "http-msgpack": lambda: RemoteCalculator(url, transport="http"),
        "http-json": lambda: JsonHTTPCalculator(url),
    }, timer


SERVER_METRICS = {"server_ms": "mlip_request_seconds", "compute_ms": "mlip_compute_seconds"}


def run_rounds(
    factories: dict[str, Callable[[], Calculator]], timer: ForwardTimer, atoms, args: argparse.Namespace,
    servers: dict[str, Server],
) -> tuple[dict[str, list], dict[str, dict[str, list]]]:
    """ABAB rounds: every transport runs ``--steps`` MD steps per round. Returns step times (ms) per round,
    and per transport and round the mean ms per request and per forward pass (the server's /metrics; for
    in-process, ``timer``) and forward passes per step."""
    names = list(args.transports)
    times: dict[str, list] = {name: [] for name in names}
    inside: dict[str, dict[str, list]] = {
        name: {key: [] for key in [*SERVER_METRICS, "forward_passes_per_step"]} for name in names
    }
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            calc = factories[name]()
            dyn = start_md(atoms, calc, args.timestep_fs, seed=args.seed)
            md_step_times_ms(dyn, args.warmup_steps)
            sources = {"compute_ms": timer.sums} if name == "in-process" else {
                key: functools.partial(servers[name].metric_sums, metric) for key, metric in SERVER_METRICS.items()
            }
            before = {key: sums() for key, sums in sources.items()}
            times[name].append(md_step_times_ms(dyn, args.steps))
            for key, sums in sources.items():
                (s0, n0), (s1, n1) = before[key], sums()
                inside[name][key].append(1e3 * (s1 - s0) / max(n1 - n0, 1))
                if key == "compute_ms":
                    inside[name]["forward_passes_per_step"].append((n1 - n0) / len(times[name][-1]))
            if hasattr(calc, "close"):
                calc.close()
    return times, inside


def summarize(times: dict[str, list], inside: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """Per transport: step-time statistics, the overhead over in-process (paired by round) and where the
    server's share of it goes: its time per request outside the forward pass (mean over rounds)."""
    def outside_forward(name: str) -> list[float]:  # per round: mean ms/step minus mean ms per forward pass
        return [float(np.mean(t)) - c for t, c in zip(times[name], inside[name]["compute_ms"])]

    base = [np.median(t) for t in times.get("in-process", [])]
    base_outside = outside_forward("in-process") if "in-process" in times else []
    minimal_outside = outside_forward("ws-minimal") if "ws-minimal" in times else []
    rows = []
    for name, rounds in times.items():
        stats = summarize_ms([t for r in rounds for t in r])
        medians = [float(np.median(t)) for t in rounds]
        overheads = [m - b for m, b in zip(medians, base)] if base else []
        paired = [o - b for o, b in zip(outside_forward(name), base_outside)] if base_outside else []
        above_minimal = [o - m for o, m in zip(outside_forward(name), minimal_outside)]
        server = {key: float(np.mean(v)) if v else None for key, v in inside[name].items()}
        outside_model = server["server_ms"] - server["compute_ms"] if server["server_ms"] is not None else None
        rows.append({"transport": name, **stats, "round_median_ms": medians,
                     "overhead_ms": float(np.median(overheads)) if overheads else None,
                     "overhead_rounds_ms": overheads, "steps_per_s": 1e3 / stats["median_ms"],
                     "outside_forward_ms": float(np.mean(outside_forward(name))),
                     "overhead_outside_forward_ms": float(np.median(paired)) if paired else None,
                     "overhead_outside_forward_rounds_ms": paired,
                     "above_minimal_ms": float(np.median(above_minimal)) if above_minimal else None,
                     "above_minimal_rounds_ms": above_minimal,
                     **server, "server_outside_model_ms": outside_model})  # fmt: skip
    return rows


def parse_args() -> argparse.Namespace:
    parser = md_parser(__doc__.splitlines()[0], "service_overhead")
    parser.add_argument("--transports", nargs="+", choices=list(TRANSPORTS), default=list(TRANSPORTS))
    parser.add_argument("--steps", type=int, default=200, help="timed MD steps per transport per round")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, in-process and in the server")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and in the server")
    parser.add_argument("--cuda-graphs", action="store_true", help="replayed CUDA graphs in-process and in mlip serve")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    checkpoint = require_checkpoint(args.checkpoint)
    set_threads(args.threads)
    info = machine_info(args.threads)
    (atoms,) = aspirin_frames(args.data, 1)
    minimal = [sys.executable, str(Path(__file__).with_name("minimal_server.py"))]
    with contextlib.ExitStack() as running:
        extra = ["--cuda-graphs"] if args.cuda_graphs else []
        server = running.enter_context(Server(checkpoint, args.threads, args.dtype, extra, args.device))
        minimal_server = server  # started only when its transport runs (it loads a second copy of the model)
        if "ws-minimal" in args.transports:
            minimal_server = running.enter_context(Server(checkpoint, args.threads, args.dtype, device=args.device, program=minimal))
        factories, timer = calculator_factories(
            checkpoint, server.url, minimal_server.url, args.dtype, args.device, args.cuda_graphs
        )
        servers = {name: minimal_server if name == "ws-minimal" else server for name in TRANSPORTS}
        times, inside = run_rounds(factories, timer, atoms, args, servers)
    rows = summarize(times, inside)
    settings = settings_of(args)
    write_json(args.out, {"benchmark": "service_overhead", "machine": info, "settings": settings,
                          "transports": TRANSPORTS, "results": rows})  # fmt: skip
    headers = ["transport", "ms/step (median)", "mean", "p10–p90 ms", "steps/s", "overhead ms/step (median of rounds)",
               "ms/step outside the forward pass", "overhead outside the forward pass (median of rounds)",
               "above ws-minimal outside the forward pass", "server ms/request (mean)", "server ms outside the forward pass"]  # fmt: skip
    print(markdown_table(headers, [[r["transport"], r["median_ms"], r["mean_ms"], f"{r['p10_ms']:.3g}–{r['p90_ms']:.3g}",
                                    r["steps_per_s"], r["overhead_ms"], r["outside_forward_ms"],
                                    r["overhead_outside_forward_ms"], r["above_minimal_ms"], r["server_ms"],
                                    r["server_outside_model_ms"]]
                                   for r in rows]))  # fmt: skip


if __name__ == "__main__":
    main()
