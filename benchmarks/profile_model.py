"""Where the time goes: torch.profiler top operators and per-module forward times for one model and case.

Run with the project venv for ``--model ours`` and with benchmarks/.venv-mace/bin/python for MACE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import CASES, DEFAULT_DATA, case_frames, set_threads
from model_worker import MODELS, make_evaluator

MODULE_PREFIX = "module:"


def label_modules(model: torch.nn.Module, max_depth: int) -> None:
    """Wrap the forward of every submodule up to ``max_depth`` dots deep in a profiler range."""
    for name, module in model.named_modules():
        if not name or name.count(".") >= max_depth:
            continue
        ranges: list[record_function] = []

        def enter(_module, _inputs, label=MODULE_PREFIX + name, ranges=ranges) -> None:
            ranges.append(record_function(label).__enter__())

        def leave(_module, _inputs, _output, ranges=ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="ours")
    parser.add_argument("--case", choices=list(CASES), default="aspirin")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA kernels are then profiled too)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--depth", type=int, default=3, help="label submodules up to this many dots deep")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace (JSON) here")
    args = parser.parse_args()

    set_threads(args.threads)
    evaluate, info, module = make_evaluator(args.model, case_frames(args.case, args.data), args.dtype, "model", args.device)
    for _ in range(3):
        evaluate()
    label_modules(module, args.depth)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(args.reps):
            evaluate()
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.reps
    print(f"# {args.model}, {args.case} ({info['n_atoms']} atoms, {info['n_edges']} edges), {args.dtype}, "
          f"{args.threads} threads: {total_ms:.2f} ms CPU per evaluation under the profiler")  # fmt: skip
    ops = [e for e in events if not e.key.startswith(MODULE_PREFIX)]
    print("\n## top operators by self CPU time (per evaluation)\n\n| op | self ms | % | calls |\n|---|---|---|---|")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = 100 * e.self_cpu_time_total / 1e3 / args.reps / total_ms
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.reps:.3f} | {share:.1f} | {e.count // args.reps} |")
    modules = sorted((e for e in events if e.key.startswith(MODULE_PREFIX)), key=lambda e: -e.cpu_time_total)
    print("\n## forward time by module (inclusive; backward not attributed)\n\n| module | ms |\n|---|---|")
    for e in modules[: args.top]:
        print(f"| {e.key.removeprefix(MODULE_PREFIX)} | {e.cpu_time_total / 1e3 / args.reps:.3f} |")
    if args.device.startswith("cuda"):
        print("\n## top operators by self CUDA time (per evaluation)\n\n| op | self ms | calls |\n|---|---|---|")
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[: args.top]:
            print(f"| {e.key} | {e.self_device_time_total / 1e3 / args.reps:.3f} | {e.count // args.reps} |")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
