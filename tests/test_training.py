"""`mlip train` / `mlip eval` on EMT data: learning, checkpoint fidelity, resume, E0s, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlip import Checkpoint, MLIPModel, Potential, Structure
from mlip.cli import main as cli_main
from mlip.training.config import TrainConfig
from mlip.training.data import LabelKeys, read_samples
from mlip.training.statistics import fit_e0s
from mlip.training.trainer import Trainer

from .emt_data import emt_crystals, write_xyz

TINY_MODEL = {"cutoff": 4.0, "num_channels": 6, "l_max": 1, "num_layers": 2, "num_radial": 4, "kernel_hidden": 8}


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory) -> Path:
    return write_xyz(tmp_path_factory.mktemp("data") / "emt.xyz", emt_crystals(24))


def make_config(tmp_path: Path, train_file: Path, **overrides) -> TrainConfig:
    settings = dict(
        train_file=str(train_file),
        output=str(tmp_path / "model.safetensors"),
        valid_count=6,
        model=TINY_MODEL,
        batch_size=4,
        max_epochs=4,
        warmup_epochs=1,
        lr=0.01,
        dtype="float64",
        device="cpu",
        stress_weight=10.0,
        stage_two_energy_weight=None,  # a different loss in the last quarter: tested on its own below
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_log(config: TrainConfig) -> list[dict]:
    return [json.loads(line) for line in Path(config.output).with_suffix(".metrics.jsonl").read_text().splitlines()]


def test_training_reduces_loss_and_writes_artifacts(tmp_path, emt_file):
    config = make_config(tmp_path, emt_file, max_epochs=8)
    metadata = Trainer(config).run()
    log = read_log(config)
    assert len(log) == 8
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    assert log[-1]["valid_forces_mae_meV_per_A"] < log[0]["valid_forces_mae_meV_per_A"]
    out = Path(config.output)
    for suffix in (".md", ".learning_curve.png", ".parity.png"):
        assert out.with_suffix(suffix).stat().st_size > 500
    card = out.with_suffix(".md").read_text()
    assert "forces MAE (meV/Å)" in card and "stress MAE" in card and "rattled" in card
    assert metadata["validation"]["n_structures"] == 6
    assert set(metadata["validation_by_config_type"]) == {"rattled", "strained"}


def test_stage_two_raises_energy_weight_and_caps_lr_for_the_last_quarter(tmp_path, emt_file):
    config = make_config(tmp_path, emt_file, max_epochs=8, warmup_epochs=0, stage_two_energy_weight=1000.0, stage_two_lr=1e-3)
    trainer = Trainer(config)
    trainer.run()
    log = read_log(config)
    assert [record["lr"] <= 1e-3 for record in log] == [False] * 6 + [True] * 2
    assert trainer.stage_two_started and trainer.energy_weight == 1000.0
    assert trainer.best_epoch >= 6  # the checkpoint is a stage-two model
    assert "stage two (last 25% of the budget): energy weight 1000.0" in Path(config.output).with_suffix(".md").read_text()


def test_float32_training_uses_float64_energy_labels(tmp_path, emt_file):
    trainer = Trainer(make_config(tmp_path, emt_file, max_epochs=1, dtype="float32"))
    graph = trainer.train_graphs[0].to(trainer.device, trainer.dtype)
    assert graph.positions.dtype == torch.float32 and graph.targets["energy"].dtype == torch.float64


def test_checkpoint_reproduces_trained_model(tmp_path, emt_file):
    config = make_config(tmp_path, emt_file, max_epochs=2)
    trainer = Trainer(config)
    trainer.run()
    ema = trainer.ema.module
    loaded = Potential.load(config.output)
    trained = Potential(MLIPModel(ema.config), dtype="float64")
    trained.model.load_state_dict(ema.state_dict())
    structures = [s.structure for s in trainer.valid]
    for a, b in zip(loaded.evaluate(structures, ["energy", "forces", "stress"]), trained.evaluate(structures, ["energy", "forces", "stress"])):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-12)
    assert Checkpoint(config.output).metadata["training"]["n_train"] == 18


def test_resume_continues_where_it_stopped(tmp_path, emt_file):
    straight = make_config(tmp_path / "a", emt_file, max_epochs=4, scheduler="cosine")
    Trainer(straight).run()
    first = make_config(tmp_path / "b", emt_file, max_epochs=2, scheduler="cosine")
    Trainer(first).run()
    resumed = make_config(tmp_path / "b", emt_file, max_epochs=4, scheduler="cosine", resume=True)
    Trainer(resumed).run()
    assert [r["epoch"] for r in read_log(resumed)] == [0, 1, 2, 3]
    # same LR schedule: a cosine over max_epochs is the same whether or not it was interrupted
    a, b = Checkpoint(straight.output), Checkpoint(resumed.output)
    for name, tensor in a.tensors.items():
        np.testing.assert_allclose(tensor.numpy(), b.tensors[name].numpy(), atol=1e-10)


def test_resume_without_state_is_an_error(tmp_path, emt_file):
    with pytest.raises(ValueError, match="no training state"):
        Trainer(make_config(tmp_path, emt_file, resume=True))


def test_e0_fit_recovers_known_values():
    rng = np.random.default_rng(0)
    e0 = {1: -13.6, 8: -2042.6, 6: -1029.8}
    samples = []
    from mlip.training.data import Sample

    for _ in range(40):
        numbers = rng.choice([1, 6, 8], size=rng.integers(2, 9))
        energy = sum(e0[z] for z in numbers) + rng.normal(scale=1e-3)
        structure = Structure.from_arrays(numbers, rng.normal(size=(len(numbers), 3)) * 3)
        samples.append(Sample(structure, energy, np.zeros((len(numbers), 3)), None, "default", 0))
    fitted, note = fit_e0s(samples, [1, 6, 8])
    assert "least-squares" in note
    for z, value in e0.items():
        assert fitted[z] == pytest.approx(value, abs=5e-3)


def test_e0_fit_on_one_composition_is_reported_not_invented():
    """All configs C2H6O: one equation for three E0s. The fit must say so, not return min-norm nonsense."""
    from mlip.training.data import Sample

    rng = np.random.default_rng(1)
    numbers = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
    samples = [
        Sample(Structure.from_arrays(numbers, rng.normal(size=(9, 3)) * 3), -4200.0 + rng.normal(), np.zeros((9, 3)), None, "d", 0)
        for _ in range(10)
    ]
    with pytest.warns(UserWarning, match="not identifiable"):
        fitted, note = fit_e0s(samples, [1, 6, 8])
    assert "not identifiable" in note and "rank 1 < 3" in note
    mean = sum(s.energy for s in samples) / 90
    assert all(v == pytest.approx(mean) for v in fitted.values())


def test_isolated_atoms_set_e0s(tmp_path):
    frames = emt_crystals(10)
    for z, energy in ((29, -1.5), (13, -2.5)):
        atom = Atoms(numbers=[z], positions=[[0, 0, 0]])
        atom.calc = SinglePointCalculator(atom, energy=energy, forces=np.zeros((1, 3)))
        frames.append(atom)
    config = make_config(tmp_path, write_xyz(tmp_path / "d.xyz", frames), max_epochs=1, valid_count=3, seed=3)
    trainer = Trainer(config)
    assert trainer.model_config.e0s == {13: -2.5, 29: -1.5}


def run_eval(args: list[str], capsys) -> str:
    assert cli_main(["eval", *args]) == 0
    return capsys.readouterr().out


def test_eval_json_matches_numpy(tmp_path, emt_file, capsys):
    config = make_config(tmp_path, emt_file, max_epochs=1)
    Trainer(config).run()
    out = run_eval(["--checkpoint", config.output, "--data", str(emt_file), "--json", "--batch-size", "5"], capsys)
    report = json.loads(out.strip().splitlines()[-1])
    samples = read_samples(emt_file, LabelKeys())
    potential = Potential.load(config.output)
    preds = [potential.evaluate([s.structure], ["energy", "forces", "stress"])[0] for s in samples]
    de = np.array([p["energy"] - s.energy for p, s in zip(preds, samples)])
    n = np.array([s.num_atoms for s in samples])
    df = np.concatenate([(p["forces"] - s.forces).ravel() for p, s in zip(preds, samples)])
    ds = np.concatenate([(p["stress"] - s.stress).ravel() for p, s in zip(preds, samples)])
    expected = {
        "n_structures": len(samples),
        "energy_mae_meV": np.abs(de).mean() * 1e3,
        "energy_rmse_meV": np.sqrt((de**2).mean()) * 1e3,
        "energy_mae_meV_per_atom": np.abs(de / n).mean() * 1e3,
        "energy_rmse_meV_per_atom": np.sqrt(((de / n) ** 2).mean()) * 1e3,
        "forces_mae_meV_per_A": np.abs(df).mean() * 1e3,
        "forces_rmse_meV_per_A": np.sqrt((df**2).mean()) * 1e3,
        "stress_mae_meV_per_A3": np.abs(ds).mean() * 1e3,
    }
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, rel=1e-9), key
    table = run_eval(["--checkpoint", config.output, "--data", str(emt_file), "--plot", str(tmp_path / "p.png")], capsys)
    assert "F MAE meV/Å" in table and "strained" in table and (tmp_path / "p.png").stat().st_size > 1000


def test_bad_data_gives_clear_errors(tmp_path, emt_file, capsys):
    frames = emt_crystals(4)
    no_forces = [Atoms(a.symbols, a.positions, cell=a.cell, pbc=True) for a in frames]
    for a, f in zip(no_forces, frames):
        a.info["energy"] = f.get_potential_energy()
    with pytest.raises(ValueError, match=r"no_forces.xyz\[0\]: no forces under key 'forces'"):
        read_samples(write_xyz(tmp_path / "no_forces.xyz", no_forces), LabelKeys())

    nan = emt_crystals(4)
    nan[2].calc.results["energy"] = float("nan")
    with pytest.raises(ValueError, match=r"nan.xyz\[2\]: energy label contains NaN"):
        read_samples(write_xyz(tmp_path / "nan.xyz", nan), LabelKeys())

    config = make_config(tmp_path, emt_file, max_epochs=1)
    Trainer(config).run()
    gold = emt_crystals(2)
    gold[0].numbers[0] = 79
    write_xyz(tmp_path / "gold.xyz", gold)
    code = cli_main(["eval", "--checkpoint", config.output, "--data", str(tmp_path / "gold.xyz")])
    assert code == 2
    assert "element(s) ['Au'] not supported" in capsys.readouterr().err


def test_cli_overrides_and_yaml(tmp_path, emt_file):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train_file": str(emt_file), "model": TINY_MODEL, "valid_count": 4, "device": "cpu"}))
    out = tmp_path / "cli.safetensors"
    code = cli_main(["train", str(path), "--output", str(out), "--max-epochs", "1", "--set", "model.num_channels=4", "--set", "batch_size=6"])
    assert code == 0
    ckpt = Checkpoint(out)
    assert ckpt.config.num_channels == 4 and ckpt.metadata["training"]["config"]["batch_size"] == 6
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_yaml(path, {"learning_rate": 1})


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory, emt_file) -> Path:
    """A tiny model trained on the EMT crystals: what the fine-tuning tests start from."""
    config = make_config(tmp_path_factory.mktemp("source"), emt_file, max_epochs=2)
    Trainer(config).run()
    return Path(config.output)


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all tensors of two state dicts."""
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    return (diff / sum(float((b[k].double() ** 2).sum()) for k in b)) ** 0.5


def test_fine_tuning_starts_from_the_checkpoint(tmp_path, source_checkpoint):
    new_data = write_xyz(tmp_path / "new.xyz", emt_crystals(12, seed=1))
    source = Checkpoint(source_checkpoint)
    tuned = Trainer(make_config(tmp_path, new_data, init_from=str(source_checkpoint), max_epochs=1, lr=1e-3))
    assert tuned.model_config.to_dict() == source.config.to_dict()  # architecture, E0s, scale, neighbour normalisation
    structures = [s.structure for s in tuned.valid]
    before = Potential(copy.deepcopy(tuned.model), dtype="float64").evaluate(structures, ["energy", "forces"])
    for a, b in zip(before, Potential.load(source_checkpoint).evaluate(structures, ["energy", "forces"])):
        np.testing.assert_allclose(a["energy"], b["energy"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(a["forces"], b["forces"], rtol=0, atol=1e-12)
    tuned.run()
    tuned_tensors = Checkpoint(tuned.config.output).tensors
    assert 0 < relative_distance(tuned_tensors, source.tensors) < 0.05  # trained, from the checkpoint's weights
    assert relative_distance(MLIPModel(source.config).state_dict(), source.tensors) > 0.5  # what a fresh start is
    card = Path(tuned.config.output).with_suffix(".md").read_text()
    assert f"fine-tuned from `{source_checkpoint}` (SHA-256 {source.sha256[:16]}" in card
    assert Checkpoint(tuned.config.output).metadata["training"]["init_from"]["sha256"] == source.sha256


def test_fine_tuning_keeps_architecture_and_elements_and_takes_e0s_given(tmp_path, emt_file, source_checkpoint, capsys):
    with pytest.raises(ValueError, match=r"model keys \['num_channels'\] differ from the checkpoint"):
        Trainer(make_config(tmp_path, emt_file, init_from=str(source_checkpoint), model={**TINY_MODEL, "num_channels": 8}))
    nickel = emt_crystals(8, seed=2)
    for atoms in nickel:
        atoms.numbers[0] = 28
    ni_file = write_xyz(tmp_path / "ni.xyz", nickel)
    with pytest.raises(ValueError, match=r"elements \[28\] are in the data but not in the checkpoint .*cannot add elements"):
        Trainer(make_config(tmp_path, ni_file, init_from=str(source_checkpoint), valid_count=2))
    given = Trainer(make_config(tmp_path, emt_file, init_from=str(source_checkpoint), e0s={"Cu": -1.5, "Al": -2.5}))
    assert given.model_config.e0s == {29: -1.5, 13: -2.5} != Checkpoint(source_checkpoint).config.e0s
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"train_file": str(emt_file), "model": TINY_MODEL, "valid_count": 4, "device": "cpu"}))
    assert cli_main(["train", str(path), "--init-from", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("compile", [False, True])
def test_torchrun_data_parallel_matches_single_process(tmp_path, emt_file, compile):
    """2 gloo processes x batch 2 take the same steps as 1 process x batch 4 (equal-size structures); with
    ``compile`` the processes run the traced step (eager backend) and average the gradients themselves."""
    base = dict(train_file=str(emt_file), model=TINY_MODEL, valid_count=4, max_epochs=2, device="cpu",
                dtype="float64", lr=0.01, warmup_epochs=1, clip_grad=None, num_threads=1)
    single, multi = tmp_path / "single.yaml", tmp_path / "multi.yaml"
    single.write_text(yaml.safe_dump({**base, "batch_size": 4, "output": str(tmp_path / "single.safetensors")}))
    multi.write_text(yaml.safe_dump({**base, "batch_size": 2, "output": str(tmp_path / "multi.safetensors"),
                                     "compile": compile, "compile_backend": "eager"}))
    assert cli_main(["train", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mlip.cli", "train", str(multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = Checkpoint(tmp_path / "single.safetensors"), Checkpoint(tmp_path / "multi.safetensors")
    assert b.metadata["training"]["world_size"] == 2
    assert b.metadata["training"]["config"]["command"].startswith("torchrun --standalone --nproc_per_node=2 -m mlip.cli train")
    assert "batch 4 (2 per process × 2 processes)" in (tmp_path / "multi.md").read_text()
    for name, tensor in a.tensors.items():
        np.testing.assert_allclose(b.tensors[name].numpy(), tensor.numpy(), atol=1e-9)
