"""Checkpoint format: exact round trip, SHA-256 verification, no code execution, `mlip info`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mlip import Checkpoint, MLIPModel, Potential, Structure, save_checkpoint
from mlip.cli import main as cli_main

from .conftest import assert_reproduced


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
            assert_reproduced(a[key], b[key])
    ckpt = Checkpoint(checkpoint_path)
    assert ckpt.config == potential.config
    assert ckpt.metadata == {"trained_on": "nothing (random init)"}
    assert loaded.sha256 == ckpt.sha256 and len(ckpt.sha256) == 64


def test_float32_checkpoint_keeps_exact_constants_in_float64(tmp_path, model):
    """Parameters come from the file, constants from the code: a float32-saved checkpoint holds e3nn's
    Clebsch-Gordan tables rounded to float32 (|C|^2 - 1 ~ 1e-8), which a float64 evaluation must not use."""
    path = tmp_path / "float32.safetensors"
    save_checkpoint(path, copy.deepcopy(model).float())
    loaded, fresh = Checkpoint(path).build_model(), MLIPModel(model.config)
    constants = dict(fresh.named_buffers())
    saved = [name for name in Checkpoint(path).tensors if name in constants]
    assert any("_w3j" in name for name in saved)  # the tables are in the file (e3nn registers them persistent)
    for name, buffer in loaded.named_buffers():
        if name in saved:
            assert torch.equal(buffer, constants[name]), name
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, dict(model.named_parameters())[name].float().double()), name


def _header_length(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_tampered_weights_are_refused(checkpoint_path):
    data = bytearray(checkpoint_path.read_bytes())
    data[-5] ^= 0x01  # flip one bit in the last tensor's bytes
    checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        Checkpoint(checkpoint_path)


def rewrite_header(path, edit) -> None:
    """Apply ``edit`` to the safetensors header's string metadata (a dict) and write the file back."""
    data = path.read_bytes()
    n = _header_length(path)
    header = json.loads(data[8 : 8 + n])
    edit(header["__metadata__"])
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    path.write_bytes(len(new_header).to_bytes(8, "little") + new_header + data[8 + n :])


def edit_config(**changes):
    def edit(meta):
        meta["config"] = json.dumps({**json.loads(meta["config"]), **changes}, sort_keys=True)

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (edit_config(cutoff=5.0), "SHA-256"),
        (lambda meta: meta.update(metadata=json.dumps({"validation": "forged"})), "SHA-256"),
    ],
    ids=["config", "metadata"],
)
def test_tampered_header_is_refused(checkpoint_path, edit, message):
    rewrite_header(checkpoint_path, edit)
    with pytest.raises(ValueError, match=message):
        Checkpoint(checkpoint_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: meta.pop("config"), "'config' is missing"),
        (lambda meta: meta.pop("metadata"), "'metadata' is missing"),
        (lambda meta: meta.update(config="[1, 2"), "'config' is not valid JSON"),
        (lambda meta: meta.update(metadata="[1, 2]"), "'metadata' must be a JSON object"),
        (edit_config(num_channels="64"), "num_channels must be an integer"),
        (edit_config(l_max=40), "l_max <= sh_l_max <= 6"),
        (edit_config(num_channels=200000), "num_channels = 200000 is beyond"),
        (edit_config(unknown_key=1), "unknown model config keys"),
    ],
    ids=["no-config", "no-metadata", "bad-json", "metadata-list", "wrong-type", "l_max-40", "huge", "unknown-key"],
)
def test_malformed_header_is_a_value_error_naming_file_and_field(checkpoint_path, edit, message):
    """Checked before any tensor is read or model allocated (num_channels 200000 would ask for ~160 GB)."""
    rewrite_header(checkpoint_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        Checkpoint(checkpoint_path)
    assert str(checkpoint_path) in str(err.value)


def test_mismatched_tensor_shapes_name_the_tensor(checkpoint_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mlip.checkpoint import weights_sha256

    with safe_open(str(checkpoint_path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][..., :1].contiguous()  # a consistent, re-hashed file of the wrong shape
    meta["sha256"] = weights_sha256(tensors, meta["config"], meta["metadata"])
    save_file(tensors, str(checkpoint_path), metadata=meta)
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        Checkpoint(checkpoint_path).build_model()


def test_pinned_sha256(checkpoint_path):
    sha = Checkpoint(checkpoint_path).sha256
    assert Potential.load(checkpoint_path, sha256=sha.upper()).sha256 == sha
    with pytest.raises(ValueError, match="not the expected"):
        Potential.load(checkpoint_path, sha256="0" * 64)


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
