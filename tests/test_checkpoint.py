"""Checkpoint format: exact round trip, SHA-256 verification, no code execution, `mlip info`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlip import Checkpoint, Potential, Structure, save_checkpoint
from mlip.cli import main as cli_main


@pytest.fixture
def checkpoint_path(tmp_path, model):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, metadata={"trained_on": "nothing (random init)"})
    return path


def test_round_trip_is_exact(checkpoint_path, potential, molecule_atoms, crystal_atoms):
    loaded = Potential.load(checkpoint_path, dtype="float64")
    structures = [Structure.from_atoms(a) for a in (molecule_atoms, crystal_atoms)]
    props = ["energy", "forces", "stress", "energies"]
    for a, b in zip(potential.evaluate(structures, props), loaded.evaluate(structures, props)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    ckpt = Checkpoint(checkpoint_path)
    assert ckpt.config == potential.config
    assert ckpt.metadata == {"trained_on": "nothing (random init)"}
    assert loaded.sha256 == ckpt.sha256 and len(ckpt.sha256) == 64


def _header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_tampered_weights_are_refused(checkpoint_path):
    data = bytearray(checkpoint_path.read_bytes())
    data[-5] ^= 0x01  # flip one bit in the last tensor's bytes
    checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        Checkpoint(checkpoint_path)


def test_tampered_config_is_refused(checkpoint_path):
    data = checkpoint_path.read_bytes()
    n = _header_length(checkpoint_path)
    header = json.loads(data[8 : 8 + n])
    config = json.loads(header["__metadata__"]["config"])
    config["cutoff"] = config["cutoff"] + 1.0
    header["__metadata__"]["config"] = json.dumps(config, sort_keys=True)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    checkpoint_path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + data[8 + n :])
    with pytest.raises(ValueError, match="SHA-256"):
        Checkpoint(checkpoint_path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_refused(checkpoint_path, keep):
    data = checkpoint_path.read_bytes()
    checkpoint_path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Checkpoint(checkpoint_path)


def test_pickle_file_is_refused_without_executing(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError):
        Checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Checkpoint(tmp_path / "nope.safetensors")


def test_mlip_info_prints_card_and_config(checkpoint_path, capsys):
    checkpoint_path.with_suffix(".md").write_text("# Model card\nRandom weights.\n")
    assert cli_main(["info", str(checkpoint_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Model card") and '"cutoff": 4.0' in out
    assert cli_main(["info", "--json", str(checkpoint_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["species"] == [1, 6, 7, 8, 13, 29] and info["num_parameters"] > 1000
