"""Equal-budget training: ours vs MACE, same data split, same wall-clock training budget, same threads.

For each dataset the driver writes ONE seeded train/validation split (the split `mlip train CONFIG`
makes by itself, via ``training.data.split_samples``) to train.xyz / valid.xyz, and both trainers
read exactly those files. For each budget (minutes) it then trains, one after the other so they
never share the cores, or with ``--concurrent`` both at once (``--threads 1`` each on a 2-core
machine), so that whatever else loads the machine slows both alike:

* ours: ``mlip train`` with the shipped YAML config of the dataset, overriding data files, output,
  ``max_time`` (native: the cosine schedule and stage two are timed against it), threads, seed and
  dtype; evaluated with ``mlip eval --json``.
* MACE: ``mace_run_train`` from ``benchmarks/.venv-mace`` (never imported here). MACE has no
  wall-clock flag, so a short probe run first measures its seconds per epoch; each budget then gets
  ``max_num_epochs = budget / epoch time`` with stage two ("SWA") on the last quarter, like ours,
  and the process is interrupted if it is still training when the budget is spent. A killed run is
  finalised by MACE itself (``--restart_latest`` with ``max_num_epochs`` = the last saved epoch,
  so it trains no further and writes its ``.model`` files). The stage-two model is evaluated when
  there is one (MACE's usual final model), else the stage-one model, with ``mace_eval_configs``;
  errors are computed here with the same ``ErrorAccumulator`` that ``mlip eval`` uses.

The budget is training-loop wall time for both: from the start of the first epoch (ours:
``Trainer.run``; MACE: its "Started training" log line) to the end of the last. Start-up, data
loading and the final evaluation are outside it and reported separately (``wall_s``). Both models
select their checkpoint on the validation set (best EMA weights), so the reported errors are
validation errors, not test errors. Evaluation runs in float64 (``--eval-dtype``) for both: total
aspirin energies are about -17 600 eV, where float32 round-off alone is ~2 meV.

Model sizes are ``model_speed.py`` presets (``--ours-size``, ``--mace-size``), so ``pareto.py`` can
put each trained model beside the timing of the same architecture.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model_worker import MACE_HIDDEN_IRREPS, OURS_CONFIG

from common import (
    BENCH_DIR,
    REPO_ROOT,
    default_out,
    machine_info,
    markdown_table,
    settings_of,
    thread_env,
    write_json,
)

PROJECT_BIN = Path(sys.executable).parent  # the project venv running this driver: mlip lives here
MACE_VENV = BENCH_DIR / ".venv-mace"


@dataclass(frozen=True)
class Dataset:
    """A benchmark dataset: our shipped training config (data file, split, loss weights) is the source of truth."""

    name: str
    config: Path  # training/configs/*.yaml, the base of our runs and of the split
    periodic: bool  # train and report stress (Si) or not (aspirin)


DATASETS = {
    "aspirin": Dataset("aspirin", REPO_ROOT / "training" / "configs" / "aspirin-rmd17.yaml", periodic=False),
    "si": Dataset("si", REPO_ROOT / "training" / "configs" / "si-zuo2020.yaml", periodic=True),
}


DEFAULT_SIZE = {"ours": "ours-32", "mace": "mace-L1-64"}  # also the size of result rows from before "size" existed


def size_of(row: dict[str, Any]) -> str:
    """The model_speed.py preset a result row was trained at."""
    return row.get("size") or DEFAULT_SIZE[row["model"]]


def ours_size_overrides(size: str) -> list[str]:
    """`mlip train --set` flags that give the shipped config the width of model_speed preset ``size``."""
    from mlip import ModelConfig

    channels = OURS_CONFIG[size].get("num_channels", ModelConfig.num_channels)  # preset "ours" is the default width
    return ["--set", f"model.num_channels={channels}"]


def mace_size_flags(size: str) -> list[str]:
    """`mace_run_train` width flags of model_speed preset ``size`` (its hidden irreps, e.g. 64x0e+64x1o)."""
    terms = [re.fullmatch(r"(\d+)x(\d+)[eo]", t) for t in MACE_HIDDEN_IRREPS[size].split("+")]
    return ["--num_channels", terms[0].group(1), "--max_L", str(max(int(t.group(2)) for t in terms))]


# ---------------------------------------------------------------- the shared split


def write_split(dataset: Dataset, seed: int, max_train: int | None, out_dir: Path) -> dict[str, Any]:
    """Write train.xyz / valid.xyz for ``dataset``: the split `mlip train CONFIG --seed SEED` makes itself.

    Same reader, same isolated-atom handling (E0 references go to training, never to validation)
    and same ``split_samples`` call as ``training.trainer.Trainer``. ``max_train`` keeps a seeded
    random subset of the training part (smoke tests only); validation is never reduced. Labels are
    written back unchanged (energy in info, forces in arrays, stress in info) and checked on re-read.
    """
    from ase.io import read, write

    from mlip.training.config import TrainConfig
    from mlip.training.data import LabelKeys, is_isolated_atom, read_samples, split_samples

    cfg = TrainConfig.from_yaml(dataset.config)
    source = (REPO_ROOT / cfg.train_file).resolve()
    keys = LabelKeys(cfg.energy_key, cfg.forces_key, cfg.stress_key, cfg.virial_key)
    samples = read_samples(source, keys)
    isolated = [s.index for s in samples if is_isolated_atom(s)]
    regular = [s for s in samples if not is_isolated_atom(s)]
    train, valid = split_samples(regular, cfg.valid_fraction, cfg.valid_count, seed)
    train_idx = [s.index for s in train]
    if max_train is not None and max_train < len(train_idx):
        train_idx = sorted(np.random.default_rng(seed).permutation(train_idx)[:max_train].tolist())
    valid_idx = [s.index for s in valid]

    frames = read(source, ":")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.xyz", "valid": out_dir / "valid.xyz"}
    write(paths["train"], [frames[i] for i in train_idx + isolated], format="extxyz")
    write(paths["valid"], [frames[i] for i in valid_idx], format="extxyz")

    reread = read_samples(paths["valid"], keys)  # labels must survive the round trip exactly enough
    for ref, got in zip(valid, reread):
        if abs(ref.energy - got.energy) > 1e-6 or np.abs(ref.forces - got.forces).max() > 1e-6:
            raise RuntimeError(f"labels changed when writing {paths['valid']} (config {ref.index})")
    return {
        "source": str(source),
        "train_file": str(paths["train"]),
        "valid_file": str(paths["valid"]),
        "n_train": len(train_idx) + len(isolated),
        "n_valid": len(valid_idx),
        "split": f"training.data.split_samples, seed {seed}, "
        + (f"valid_count {cfg.valid_count}" if cfg.valid_count is not None else f"valid_fraction {cfg.valid_fraction}")
        + (f", training subset of {max_train}" if max_train is not None else ""),
        "valid_indices": valid_idx,
        "batch_size": cfg.batch_size,  # MACE trains with our config's batch size, stress weight and
        "stress_weight": cfg.stress_weight,  # stage-two fraction (last quarter), so only the models differ
        "stage_two_fraction": cfg.stage_two_fraction,
    }


# ---------------------------------------------------------------- ours


def train_ours(
    dataset: Dataset, split: dict[str, Any], budget_s: float, run_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """`mlip train` on the shared split with ``max_time = budget_s``, then `mlip eval --json` on valid.xyz."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "model.safetensors"
    cmd = [
        str(PROJECT_BIN / "mlip"), "train", str(dataset.config),
        "--train-file", split["train_file"], "--valid-file", split["valid_file"],
        "--output", str(checkpoint), "--max-time", f"{budget_s:g}", "--seed", str(args.seed), "--dtype", args.dtype,
        "--device", "cpu",
        "--set", f"num_threads={args.threads}",
        "--set", "max_epochs=1000000",  # the budget, not an epoch count, ends the run and drives the schedule
        *ours_size_overrides(args.ours_size),
    ]
    row: dict[str, Any] = {"command": " ".join(cmd)}
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(args.threads), cwd=REPO_ROOT,
                              timeout=2 * budget_s + 600)
    row["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0 or not checkpoint.is_file():
        raise RuntimeError(f"mlip train failed (exit {proc.returncode}), see {run_dir / 'train.log'}")

    records = [json.loads(line) for line in checkpoint.with_suffix(".metrics.jsonl").read_text().splitlines() if line]
    row["epochs"] = len(records)
    row["train_s"] = records[-1]["elapsed_s"]
    import mlip

    ckpt = mlip.Checkpoint(checkpoint)
    row["selected_epoch"] = ckpt.metadata.get("training", {}).get("best_epoch")
    row["num_parameters"] = sum(p.numel() for p in ckpt.build_model().parameters())

    out = subprocess.run(
        [str(PROJECT_BIN / "mlip"), "eval", "--checkpoint", str(checkpoint), "--data", split["valid_file"],
         "--dtype", args.eval_dtype, "--device", "cpu", "--json"],
        capture_output=True, text=True, env=thread_env(args.threads), cwd=REPO_ROOT, check=True,
    )
    row["validation"] = json.loads(out.stdout.strip().splitlines()[-1])
    row["checkpoint"] = str(checkpoint)
    return row


# ---------------------------------------------------------------- MACE


def mace_bin(name: str) -> str:
    """A console script of the MACE venv (exit with the set-up command when the venv is missing)."""
    path = MACE_VENV / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: create the MACE venv first (benchmarks/README.md, 'Set-up')")
    return str(path)


def mace_flags(split: dict[str, Any], dataset: Dataset, run_dir: Path, args: argparse.Namespace,
               max_epochs: int, start_stage_two: int | None) -> list[str]:
    """`mace_run_train` flags: MACE of size ``--mace-size`` with MACE's recommended rMD17-style training.

    Model: ScaleShiftMACE, by default 64 channels, max_L 1 (hidden irreps 64x0e+64x1o), max_ell 3, correlation 3,
    2 interactions, r_max 5 Å. Training: weighted E/F loss 1/100 (stress 'stress' loss on periodic
    data, at our config's stress weight), AMSGrad lr 0.01, EMA 0.99, ReduceLROnPlateau (MACE's
    default), stage two with E/F weights 1000/100 and lr 1e-3. These equal our shipped settings
    where both have them. E0s 'average' (least squares over the training set), like our 'fit'.
    """
    flags = [
        "--name", "mace", "--seed", str(args.seed), "--device", "cpu", "--default_dtype", args.dtype,
        "--work_dir", str(run_dir), "--model_dir", str(run_dir), "--checkpoints_dir", str(run_dir / "checkpoints"),
        "--log_dir", str(run_dir / "logs"), "--results_dir", str(run_dir / "results"),
        "--train_file", split["train_file"], "--valid_file", split["valid_file"],
        "--energy_key", "energy", "--forces_key", "forces", "--stress_key", "stress",  # the keys our xyz files use
        "--E0s", "average",
        "--model", "ScaleShiftMACE", *mace_size_flags(args.mace_size), "--max_ell", "3",
        "--correlation", "3", "--num_interactions", "2", "--r_max", "5.0",
        "--batch_size", str(split["batch_size"]), "--valid_batch_size", "32",
        "--lr", "0.01", "--amsgrad", "--weight_decay", "5e-7", "--clip_grad", "10",
        "--ema", "--ema_decay", "0.99",
        "--energy_weight", "1.0", "--forces_weight", "100.0",
        "--max_num_epochs", str(max_epochs), "--patience", "1000000", "--eval_interval", "1",
        "--error_table", "PerAtomMAE", "--plot", "False", "--save_cpu",
    ]
    if dataset.periodic:
        weight = str(split["stress_weight"])
        flags += ["--loss", "stress", "--stress_weight", weight, "--swa_stress_weight", weight]
    else:
        flags += ["--loss", "weighted"]
    if start_stage_two is not None:
        flags += ["--swa", "--start_swa", str(start_stage_two), "--swa_energy_weight", "1000.0",
                  "--swa_forces_weight", "100.0", "--swa_lr", "1e-3"]
    return flags


class MaceProcess:
    """`mace_run_train` as a child process; every output line is logged with the time it arrived."""

    STARTED = "Started training"
    EPOCH = re.compile(r"Epoch (\d+):")
    COMPLETE = "Training complete"

    def __init__(self, flags: Sequence[str], log_path: Path, threads: int):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.started_at: float | None = None  # monotonic time of "Started training"
        self.epoch_at: dict[int, float] = {}  # epoch -> monotonic time its validation line appeared
        self.completed_at: float | None = None
        self.interrupted = False  # this driver stopped it (budget or probe), whatever it logged after
        self.lines: list[str] = []
        self.proc = subprocess.Popen([mace_bin("mace_run_train"), *flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=thread_env(threads), cwd=REPO_ROOT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                now = time.monotonic()
                log.write(line)
                log.flush()
                self.lines.append(line)
                if self.STARTED in line and self.started_at is None:
                    self.started_at = now
                elif (m := self.EPOCH.search(line)) and "Initial" not in line:
                    self.epoch_at[int(m.group(1))] = now
                elif self.COMPLETE in line:
                    self.completed_at = now

    def running(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self) -> None:
        """SIGINT (KeyboardInterrupt in MACE), then SIGKILL if it has not exited after 30 s."""
        if self.running():
            self.interrupted = True
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait(self, budget_s: float | None = None, until_epoch: int | None = None) -> None:
        """Until exit; interrupt once ``budget_s`` of training has passed or epoch ``until_epoch`` is logged."""
        while self.running():
            time.sleep(0.2)
            if until_epoch is not None and until_epoch in self.epoch_at:
                self.interrupt()
            if budget_s is not None and self.started_at is not None and self.completed_at is None:
                if time.monotonic() - self.started_at >= budget_s:
                    self.interrupt()
        self.reader.join(timeout=10)

    def train_s(self) -> float | None:
        """Training-loop wall time: "Started training" to "Training complete", the last epoch or the kill."""
        if self.started_at is None:
            return None
        end = self.completed_at or (max(self.epoch_at.values()) if self.epoch_at else time.monotonic())
        return end - self.started_at

    def failure(self, what: str) -> RuntimeError:
        tail = "".join(self.lines[-15:])
        return RuntimeError(f"{what} (exit {self.proc.returncode}), see {self.log_path}:\n{tail}")


def probe_mace_epoch_s(
    dataset: Dataset, split: dict[str, Any], run_dir: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """MACE's seconds per epoch (training + validation + checkpoint) and its one-off seconds inside the loop.

    The epoch time is the mean of epochs 1 and 2 (between the epoch-0 and epoch-2 log lines; one
    epoch alone read 40 % high in a concurrent run, so MACE finished early); the one-off part
    (initial validation, first-call set-up) is what epoch 0 took beyond that, from "Started
    training". The probe is stopped as soon as epoch 2 is logged: about three epochs plus start-up.
    """
    proc = MaceProcess(mace_flags(split, dataset, run_dir, args, max_epochs=4, start_stage_two=None),
                       run_dir / "probe.log", args.threads)
    proc.wait(until_epoch=2)
    if not {0, 2} <= set(proc.epoch_at) or proc.started_at is None:
        raise proc.failure("MACE epoch-time probe ended before three epochs")
    epoch_s = (proc.epoch_at[2] - proc.epoch_at[0]) / 2
    return epoch_s, max(0.0, proc.epoch_at[0] - proc.started_at - epoch_s)


def finalise_killed_mace(dataset: Dataset, split: dict[str, Any], run_dir: Path, args: argparse.Namespace,
                         start_stage_two: int | None) -> MaceProcess:
    """Let MACE write its .model files from the checkpoints of an interrupted run, training no further.

    ``--restart_latest`` with ``max_num_epochs`` equal to the last saved epoch skips the epoch loop
    and goes straight to MACE's own end-of-training code: load the best stage-one (and stage-two)
    checkpoint, save ``mace.model`` (and ``mace_stagetwo.model``), report errors.
    """
    pattern = re.compile(r"_epoch-(\d+)(_swa)?\.pt$")
    names = [p.name for p in (run_dir / "checkpoints").glob("*.pt")]
    saved = [(int(m.group(1)), bool(m.group(2))) for name in names if (m := pattern.search(name))]
    if not saved:
        raise RuntimeError(f"MACE saved no checkpoint within the budget ({run_dir / 'checkpoints'})")
    last_epoch = max(epoch for epoch, _ in saved)
    has_stage_two = any(swa for _, swa in saved) and start_stage_two is not None
    # stage two must start before max_num_epochs or MACE ignores it (the loop is skipped either way)
    stage_two = min(start_stage_two, last_epoch - 1) if has_stage_two else None
    flags = mace_flags(split, dataset, run_dir, args, max_epochs=last_epoch, start_stage_two=stage_two)
    proc = MaceProcess([*flags, "--restart_latest"], run_dir / "finalise.log", args.threads)
    proc.wait()
    if proc.proc.returncode != 0:
        raise proc.failure("MACE finalisation (--restart_latest) failed")
    return proc


def mace_validation(
    model: Path, valid_file: str, run_dir: Path, args: argparse.Namespace, stress: bool
) -> dict[str, Any]:
    """`mace_eval_configs` on valid.xyz, errors computed with our ErrorAccumulator (same definitions as `mlip eval`)."""
    from ase.io import read

    from mlip.training.data import LabelKeys, read_samples
    from mlip.training.metrics import ErrorAccumulator

    predictions = run_dir / "valid_predictions.xyz"
    cmd = [mace_bin("mace_eval_configs"), "--configs", valid_file, "--model", str(model), "--output", str(predictions),
           "--device", "cpu", "--default_dtype", args.eval_dtype, "--batch_size", "32"]
    cmd += ["--compute_stress"] if stress else []
    out = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args.threads), cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"mace_eval_configs failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    errors: dict[str, ErrorAccumulator] = {"all": ErrorAccumulator()}
    references = read_samples(valid_file, LabelKeys())
    for ref, atoms in zip(references, read(predictions, ":"), strict=True):
        pred = {"energy": float(atoms.info["MACE_energy"]), "forces": np.asarray(atoms.arrays["MACE_forces"])}
        if stress and "MACE_stress" in atoms.info:
            pred["stress"] = np.asarray(atoms.info["MACE_stress"], dtype=float).reshape(3, 3)
        for key in ("all", ref.config_type):
            errors.setdefault(key, ErrorAccumulator()).add(pred, ref.energy, ref.forces, ref.stress)
    by_type = {k: v.summary() for k, v in errors.items() if k != "all"}
    return {**errors["all"].summary(), "by_config_type": by_type if len(by_type) > 1 else {}}


def convert_mace_model(model: Path, dtype: str, out: Path) -> int:
    """Save ``model`` cast to ``dtype``; returns its parameter count.

    mace_eval_configs does not cast the model to ``--default_dtype`` (a float32 model fails in
    float64); MACECalculator casts the same way. Runs in the MACE venv, never imported here.
    """
    code = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False, map_location='cpu'); "
            "m = m.to(getattr(torch, sys.argv[2])); torch.save(m, sys.argv[3]); "
            "print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([str(MACE_VENV / "bin" / "python"), "-c", code, str(model), dtype, str(out)],
                          capture_output=True, text=True, env=thread_env(1))
    if proc.returncode != 0:
        raise RuntimeError(f"casting {model} to {dtype} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1])


def train_mace(dataset: Dataset, split: dict[str, Any], budget_s: float, epoch_s: float, overhead_s: float,
               run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`mace_run_train` for ``budget_s`` of training, then evaluation on valid.xyz.

    Epochs come from the probe (``overhead_s`` is the one-off part of its loop); the run is
    interrupted if it is still training when the budget is spent.
    """
    max_epochs = max(1, math.floor((budget_s - overhead_s) / epoch_s))
    start_stage_two = max(1, math.floor((1 - split["stage_two_fraction"]) * max_epochs))
    start_stage_two = start_stage_two if start_stage_two < max_epochs else None  # too few epochs for a stage two
    flags = mace_flags(split, dataset, run_dir, args, max_epochs, start_stage_two)
    row: dict[str, Any] = {"command": " ".join([mace_bin("mace_run_train"), *flags]), "planned_epochs": max_epochs,
                           "planned_start_stage_two": start_stage_two}
    t0 = time.perf_counter()
    proc = MaceProcess(flags, run_dir / "train.log", args.threads)
    proc.wait(budget_s=budget_s)
    row["train_s"] = proc.train_s()
    row["epochs"] = (max(proc.epoch_at) + 1) if proc.epoch_at else 0
    row["interrupted_at_budget"] = proc.interrupted
    if proc.started_at is None:
        raise proc.failure("MACE ended before training started")
    if proc.proc.returncode != 0 and not proc.interrupted:
        raise proc.failure("mace_run_train failed")
    # Stopped at the budget, even just as its last epoch ended (it may have logged "Training
    # complete" and then been killed while writing its model): the model comes from the checkpoints.
    final = finalise_killed_mace(dataset, split, run_dir, args, start_stage_two) if proc.interrupted else proc
    row["wall_s"] = time.perf_counter() - t0

    stage_two = run_dir / "mace_stagetwo.model"
    model = stage_two if stage_two.is_file() else run_dir / "mace.model"
    if not model.is_file():
        raise final.failure(f"MACE wrote no model file in {run_dir}")
    which = "two" if model == stage_two else "one"
    loaded = [m for line in final.lines if (m := re.search(rf"Loaded Stage {which} model from epoch (\d+)", line))]
    row["selected_epoch"] = int(loaded[-1].group(1)) if loaded else None
    row["selected_stage"] = 2 if which == "two" else 1
    eval_model = run_dir / f"mace_eval_{args.eval_dtype}.model"
    row["num_parameters"] = convert_mace_model(model, args.eval_dtype, eval_model)
    row["validation"] = mace_validation(eval_model, split["valid_file"], run_dir, args, stress=dataset.periodic)
    row["checkpoint"] = str(model)
    return row


# ---------------------------------------------------------------- output


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """One markdown row per (dataset, model, budget)."""
    rows = []
    for r in results:
        v = r.get("validation") or {}
        rows.append([
            r["dataset"], size_of(r), float(r["budget_min"]),
            None if r.get("train_s") is None else round(r["train_s"]),
            r.get("epochs"), r.get("num_parameters"),
            v.get("energy_mae_meV"), v.get("energy_mae_meV_per_atom"), v.get("forces_mae_meV_per_A"),
            r["error"].splitlines()[0][:60] if r.get("error") else "",
        ])
    return rows


TABLE_HEADERS = ["dataset", "model", "budget min", "train s", "epochs", "params", "E MAE meV",
                 "E MAE meV/atom", "F MAE meV/Å", "error"]


def plot_forces_vs_budget(results: list[dict[str, Any]], path: Path) -> Path:
    """Validation force MAE (meV/Å) against training budget (minutes): one panel per dataset, one line per model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        for size in sorted({size_of(r) for r in results if r["dataset"] == name}):
            points = sorted((r["budget_min"], r["validation"]["forces_mae_meV_per_A"]) for r in results
                            if r["dataset"] == name and size_of(r) == size and r.get("validation"))
            if points:
                ax.plot(*zip(*points), marker="o" if size.startswith("ours") else "s", label=size)
        ax.set(title=name, xlabel="training budget (minutes)", ylabel="validation force MAE (meV/Å)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def mace_versions() -> dict[str, str]:
    """mace-torch, e3nn and torch versions of the MACE venv (package metadata only, nothing imported)."""
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({p: m.version(p) for p in ('mace-torch', 'e3nn', 'torch')}))")
    out = subprocess.run([str(MACE_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", action="extend", choices=sorted(DATASETS),
                        help="aspirin (rMD17, 50 validation configs) and/or si (Zuo 2020, 10%% validation); "
                        "default both")
    parser.add_argument("--budgets-min", nargs="+", type=float, default=[20.0, 60.0], help="training budgets, minutes")
    parser.add_argument("--models", nargs="+", choices=["ours", "mace"], default=["ours", "mace"])
    parser.add_argument("--ours-size", choices=sorted(OURS_CONFIG), default=DEFAULT_SIZE["ours"],
                        help="model_speed.py preset: ours-32 = the shipped width, ours = 64 channels")
    parser.add_argument("--mace-size", choices=sorted(MACE_HIDDEN_IRREPS), default=DEFAULT_SIZE["mace"],
                        help="model_speed.py preset: hidden irreps " + ", ".join(
                            f"{k} {v}" for k, v in sorted(MACE_HIDDEN_IRREPS.items())))
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for every run")
    parser.add_argument("--seed", type=int, default=0, help="split seed and training seed of both models")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="training dtype, both")
    parser.add_argument("--eval-dtype", choices=["float32", "float64"], default="float64",
                        help="evaluation dtype, both")
    parser.add_argument("--workdir", type=Path,
                        help="run directory (default: benchmarks/runs/equal_budget-UTCSTAMP, git-ignored)")
    parser.add_argument("--out", type=Path, default=default_out("equal_budget"), help="JSON; the PNG goes beside it")
    parser.add_argument("--max-train", type=int, help="train on a seeded subset of this many configs (smoke tests)")
    parser.add_argument("--concurrent", action="store_true",
                        help="train ours and MACE at the same time (give each --threads 1 on a 2-core machine), so "
                        "any other load on the machine falls on both alike")
    parser.add_argument("--mace-epoch-s", type=float, help="MACE seconds per epoch: skip the probe run")
    args = parser.parse_args(argv)
    args.dataset = list(dict.fromkeys(args.dataset or ["aspirin", "si"]))
    if args.workdir is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.workdir = BENCH_DIR / "runs" / f"equal_budget-{stamp}"
    args.workdir = args.workdir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    payload: dict[str, Any] = {"machine": machine_info(args.threads), "settings": settings_of(args), "datasets": {},
                               "results": []}
    if "mace" in args.models:
        mace_bin("mace_run_train")
        payload["mace_versions"] = mace_versions()
    results: list[dict[str, Any]] = payload["results"]

    for name in args.dataset:
        dataset = DATASETS[name]
        data_dir = args.workdir / name
        split = write_split(dataset, args.seed, args.max_train, data_dir)
        info = payload["datasets"][name] = {k: v for k, v in split.items() if k != "valid_indices"}
        info["valid_indices"] = split["valid_indices"]
        print(f"{name}: {split['n_train']} train / {split['n_valid']} valid configs -> {data_dir}", flush=True)

        lock = threading.Lock()

        def record(row: dict[str, Any]) -> None:
            with lock:
                results.append(row)
                write_json(args.out, payload)  # after every run, so a long benchmark keeps what it has

        def mace_epoch_time() -> tuple[float | None, float]:
            epoch_s, overhead_s = args.mace_epoch_s, 0.0
            if epoch_s is None:
                try:
                    epoch_s, overhead_s = probe_mace_epoch_s(dataset, split, data_dir / "mace_probe", args)
                except RuntimeError as err:
                    print(f"{name}: MACE probe failed: {err}", file=sys.stderr)
            info["mace_epoch_s"], info["mace_loop_overhead_s"] = epoch_s, overhead_s
            print(f"{name}: MACE probe: {epoch_s} s per epoch, {overhead_s:.1f} s one-off", flush=True)
            return epoch_s, overhead_s

        def run(model: str, budget_min: float, epoch_s: float | None, overhead_s: float) -> None:
            budget_s = 60.0 * budget_min
            size = args.ours_size if model == "ours" else args.mace_size
            run_dir = data_dir / f"{size}-{budget_min:g}min"
            row: dict[str, Any] = {"dataset": name, "model": model, "size": size, "budget_min": budget_min,
                                   "budget_s": budget_s,
                                   "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
            print(f"{name}: training {model} for {budget_min:g} min in {run_dir}", flush=True)
            try:
                if model == "ours":
                    row.update(train_ours(dataset, split, budget_s, run_dir, args))
                elif epoch_s is None:
                    raise RuntimeError("no MACE epoch time (probe failed)")
                else:
                    row.update(train_mace(dataset, split, budget_s, epoch_s, overhead_s, run_dir, args))
            except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as err:
                row["error"] = str(err)
                print(f"{name}/{model}/{budget_min:g} min failed: {err}", file=sys.stderr, flush=True)
            record(row)

        def all_budgets(model: str) -> None:
            epoch = mace_epoch_time() if model == "mace" else (None, 0.0)
            for budget_min in args.budgets_min:
                run(model, budget_min, *epoch)

        if args.concurrent:  # one thread per model; the MACE probe runs while ours trains, under the same load
            with ThreadPoolExecutor(len(args.models)) as pool:
                for future in [pool.submit(all_budgets, model) for model in args.models]:
                    future.result()
        else:  # one run at a time, budget by budget
            epoch = mace_epoch_time() if "mace" in args.models else (None, 0.0)
            for budget_min in args.budgets_min:
                for model in args.models:
                    run(model, budget_min, *epoch if model == "mace" else (None, 0.0))

    print()
    print(markdown_table(TABLE_HEADERS, table_rows(results)))
    write_json(args.out, payload)
    plot_forces_vs_budget(results, args.out.with_suffix(".png"))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
