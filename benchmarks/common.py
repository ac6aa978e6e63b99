"""Shared helpers for the benchmark scripts: machine info, timing, tables, JSON, structures, workers.

Importable from both the project venv and the MACE venv (stdlib, numpy and ase only at import time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "rmd17" / "aspirin_train.xyz"
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "aspirin-rmd17.safetensors"
MACE_PYTHON = BENCH_DIR / ".venv-mace" / "bin" / "python"
SPECIES = [1, 6, 7, 8, 29]  # H C N O Cu: every structure in the model-speed cases


# ---------------------------------------------------------------- machine and run metadata


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Short HEAD commit of the repository, with '+dirty' when benchmarks run on uncommitted code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_info(threads: int) -> dict[str, Any]:
    """Date, machine, software versions and load: the header of every result file."""
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def set_threads(threads: int) -> None:
    """Pin intra-op threads (torch and the BLAS/OpenMP pools) for this process."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def thread_env(threads: int, retain_host_memory: bool = True) -> dict[str, str]:
    """Environment for a child process pinned to ``threads`` threads.

    With ``retain_host_memory`` every child, MACE's too, keeps freed host memory for reuse (glibc's
    thresholds as ``mlip.host_memory`` sets them for ours), so no model pays page faults the other
    does not; without it every child, ours too, uses glibc's defaults.
    """
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if retain_host_memory:
        from mlip.host_memory import glibc_environment  # the driver's venv; workers (MACE's) need not import mlip

        env.update(glibc_environment())
    else:
        env["MLIP_RETAIN_HOST_MEMORY"] = "0"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB), from getrusage (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb() -> dict[str, float]:
    """Peak RSS (MB) and, where torch has used a GPU in this process, its peak allocated memory (MB)."""
    peaks = {"peak_rss_mb": peak_rss_mb()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


# ---------------------------------------------------------------- timing and statistics


def time_calls_ms(fn: Callable[[], Any], reps: int, budget_s: float = float("inf")) -> list[float]:
    """Wall time of each call of ``fn`` (ms): ``reps`` calls, or fewer once ``budget_s`` is spent (>= 1)."""
    times_ms: list[float] = []
    start = time.perf_counter()
    while len(times_ms) < reps:
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start >= budget_s:
            break
    return times_ms


def summarize_ms(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, mean, p10/p90 percentiles, min and count of a list of times (ms)."""
    a = np.asarray(times_ms, dtype=float)
    return {
        "median_ms": float(np.median(a)),
        "mean_ms": float(a.mean()),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Slope of log(y) against log(x): 1.0 means cost linear in x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


# ---------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant figures (at least one decimal below 100)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (through a .tmp file, so a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def default_out(name: str, suffix: str = ".json") -> Path:
    """benchmarks/results/NAME.json (or another suffix)."""
    return RESULTS_DIR / f"{name}{suffix}"


# ---------------------------------------------------------------- structures


def aspirin_frames(data: str | Path, count: int) -> list:
    """``count`` aspirin structures spread evenly over the rMD17 file (ase.Atoms, positions only)."""
    from ase.io import read

    path = Path(data)
    if not path.is_file():
        raise SystemExit(f"aspirin data not found: {path} (pass --data PATH to aspirin_train.xyz)")
    frames = read(path, index=":")
    if len(frames) < count:
        raise SystemExit(f"{path} holds {len(frames)} frames, fewer than {count}")
    picked = [frames[i] for i in np.linspace(0, len(frames) - 1, count).astype(int)]
    for atoms in picked:
        atoms.info.clear()
        atoms.arrays = {k: v for k, v in atoms.arrays.items() if k in ("numbers", "positions")}
        atoms.calc = None
    return picked


def crystal(element: str, repeat: tuple[int, int, int], rattle_A: float = 0.05, seed: int = 0):
    """Rattled periodic supercell: fcc Cu (a = 3.6 Å) or diamond Si (a = 5.43 Å) conventional cells."""
    from ase.build import bulk

    lattice = {"Cu": ("fcc", 3.6), "Si": ("diamond", 5.43)}[element]
    atoms = bulk(element, lattice[0], a=lattice[1], cubic=True) * repeat
    atoms.rattle(rattle_A, seed=seed)
    return atoms


CASES = {
    "aspirin": "aspirin, 21 atoms (first rMD17 frame)",
    "cu1008": "periodic fcc Cu, 6x6x7 cubic cells = 1008 atoms, rattled 0.05 Å",
    "aspirin32": "batch of 32 aspirin structures (672 atoms)",
    "cu10976": "periodic fcc Cu, 14x14x14 cubic cells = 10976 atoms, rattled 0.05 Å (for GPUs)",
}
CU_REPEATS = {"cu1008": (6, 6, 7), "cu10976": (14, 14, 14)}


def case_frames(case: str, data: Path) -> list:
    """The structures of one benchmark case (one batch)."""
    if case == "aspirin":
        return aspirin_frames(data, 1)
    if case == "aspirin32":
        return aspirin_frames(data, 32)
    return [crystal("Cu", CU_REPEATS[case])]


# ---------------------------------------------------------------- worker processes (JSON lines)


def claim_stdout() -> TextIO:
    """Send everything printed from now on to stderr; returns the real stdout (the protocol channel)."""
    out = sys.stdout
    sys.stdout = sys.stderr
    return out


def worker_loop(evaluate: Callable[[], Any], ready: dict[str, Any], out: TextIO) -> None:
    """Worker side: announce ``ready``, then answer {"reps", "budget_s"} requests with call times (ms).

    A request {"quit": true} answers with the process's peak RSS and exits. Every answer is one
    JSON line on ``out`` (from ``claim_stdout``, called before any library is imported).
    """
    print(json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            print(json.dumps(peak_memory_mb()), file=out, flush=True)
            return
        times_ms = time_calls_ms(evaluate, int(request["reps"]), float(request.get("budget_s", "inf")))
        print(json.dumps({"times_ms": times_ms}), file=out, flush=True)


class Worker:
    """Driver side of ``worker_loop``: one long-lived subprocess, queried round by round."""

    def __init__(self, argv: Sequence[str], threads: int, label: str, retain_host_memory: bool = True):
        self.label = label
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=thread_env(threads, retain_host_memory),
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"worker {self.label} exited with code {code} (see its stderr above)")
        return json.loads(line)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, reps: int, budget_s: float) -> list[float]:
        """Time up to ``reps`` evaluations (stopping after ``budget_s``); returns ms per call."""
        return self._ask({"reps": reps, "budget_s": budget_s})["times_ms"]

    def close(self) -> dict[str, float]:
        """Stop the worker; returns its peak memory (``peak_memory_mb``)."""
        peak = self._ask({"quit": True})
        self.proc.wait(timeout=60)
        return peak

    def kill(self) -> None:
        """Terminate the worker if it is still running (after an error)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- molecular dynamics


def start_md(atoms, calc, timestep_fs: float = 0.5, temperature_K: float = 300.0, seed: int = 0):
    """Velocity Verlet (NVE) on a copy of ``atoms`` with seeded Maxwell-Boltzmann velocities, no net momentum."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    return VelocityVerlet(atoms, timestep=timestep_fs * units.fs)


def md_step_times_ms(dyn, steps: int, deadline: float = float("inf")) -> list[float]:
    """Wall time of each MD step (ms), force call included; stops early at ``deadline`` (perf_counter)."""
    times_ms: list[float] = []
    steps_iter = dyn.irun(steps=steps)
    next(steps_iter)  # initial forces: not a step
    t0 = time.perf_counter()
    for _ in steps_iter:
        t1 = time.perf_counter()
        times_ms.append((t1 - t0) * 1e3)
        t0 = t1
        if t1 >= deadline:
            break
    return times_ms


# ---------------------------------------------------------------- a local `mlip serve` subprocess


def md_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Parser with the options every aspirin-MD benchmark shares: checkpoint, data, timestep, seed, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="rMD17 aspirin extxyz (first frame starts MD)")
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=default_out(name))
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line settings as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def require_checkpoint(path: Path) -> Path:
    """``path`` if it exists, else exit with a message saying how to get or pass one."""
    if not Path(path).is_file():
        raise SystemExit(
            f"checkpoint not found: {path}\n"
            "Train it first (mlip train training/configs/aspirin-rmd17.yaml) or pass --checkpoint PATH."
        )
    return Path(path)


class Server:
    """`mlip serve` on a free 127.0.0.1 port (tests/launcher.py) with the benchmark's device, dtype and threads."""

    def __init__(
        self, checkpoint: Path, threads: int, dtype: str, extra_args: Sequence[str] = (), device: str = "cpu",
        program: list[str] | None = None,
    ):
        """``program``: another server with `mlip serve`'s options used here (``minimal_server.py``)."""
        sys.path.insert(0, str(REPO_ROOT))
        from tests.launcher import ServerProcess

        args = ["--checkpoint", str(checkpoint), "--device", device, "--dtype", dtype, "--log-level", "warning"]
        self.process = ServerProcess([*args, *extra_args], env=thread_env(threads), program=program)
        self.url = self.process.url

    def __enter__(self) -> "Server":
        self.process.start(timeout_s=180.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()

    def metric_sums(self, name: str) -> tuple[float, float]:
        """(sum, count) of a Prometheus histogram from /metrics, added over its labels."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        totals = {"_sum": 0.0, "_count": 0.0}
        for line in text.splitlines():
            for suffix in totals:
                if line.startswith(name + suffix):
                    totals[suffix] += float(line.rsplit(" ", 1)[1])
        return totals["_sum"], totals["_count"]
