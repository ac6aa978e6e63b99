"""`mlip ipi`: the i-PI socket client, driven by the real i-PI and by ASE's SocketIOCalculator."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.socketio import SocketIOCalculator
from ase.io import read, write

from mlip import MLIPCalculator

from .serverproc import ServerProcess, make_checkpoint, one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLIP_TORCH_THREADS": "1"}


def socket_name() -> str:
    """A unique i-PI socket name (i-PI puts it at /tmp/ipi_NAME; UNIX socket paths are short)."""
    return f"mlip-{uuid.uuid4().hex[:10]}"


def mlip_ipi(unixsocket: str, structure: Path, *source: str) -> subprocess.Popen:
    command = [str(BIN / "mlip"), "ipi", "--unix", unixsocket, "--structure", str(structure), *source]
    return subprocess.Popen(command, env=THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launcher(tmp_path: Path, *source: str):
    """ASE's ``launch_client``: write the atoms as the template and start `mlip ipi` on the socket ASE opened."""

    def launch(atoms, properties=None, port=None, unixsocket=None):
        template = tmp_path / "template.extxyz"
        write(template, atoms)
        return mlip_ipi(unixsocket, template, *source)

    return launch


@pytest.mark.parametrize("kind", ["molecule", "crystal"])
def test_ase_socketio_drives_mlip_ipi(tmp_path, kind, molecule_atoms, crystal_atoms):
    """Energy, forces and (periodic) stress through the i-PI protocol equal the in-process calculator."""
    checkpoint = make_checkpoint(tmp_path / "model.safetensors")
    atoms = molecule_atoms if kind == "molecule" else crystal_atoms
    reference = atoms.copy()
    reference.calc = MLIPCalculator(checkpoint)
    with SocketIOCalculator(unixsocket=socket_name(), launch_client=launcher(tmp_path, "--checkpoint", str(checkpoint))) as calc:
        atoms.calc = calc
        for step in range(3):  # several steps over one connection: positions (and cell) change
            atoms.positions += 0.02 * np.random.default_rng(step).normal(size=atoms.positions.shape)
            reference.positions = atoms.positions
            assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-9)
            if kind == "crystal":
                np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-10)
                assert np.abs(reference.get_stress()).max() > 1e-4


def test_mlip_ipi_through_a_server(tmp_path, crystal_atoms):
    """`mlip ipi --server URL`: the same answers through a running `mlip serve`."""
    checkpoint = make_checkpoint(tmp_path / "model.safetensors")
    reference = crystal_atoms.copy()
    reference.calc = MLIPCalculator(checkpoint)
    with ServerProcess(["--checkpoint", str(checkpoint)], tmp_path / "serve.log") as server:
        with SocketIOCalculator(unixsocket=socket_name(), launch_client=launcher(tmp_path, "--server", server.url)) as calc:
            crystal_atoms.calc = calc
            assert crystal_atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(crystal_atoms.get_forces(), reference.get_forces(), atol=1e-9)
            np.testing.assert_allclose(crystal_atoms.get_stress(), reference.get_stress(), atol=1e-10)


def test_unreachable_ipi_is_a_clear_error(tmp_path):
    proc = mlip_ipi(socket_name(), REPO / "examples" / "aspirin.xyz", "--wait", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "cannot reach i-PI" in out, out


@pytest.mark.skipif(importlib.util.find_spec("ipi") is None, reason="i-PI (PyPI package ipi) is not installed")
def test_ipi_nve_of_aspirin(tmp_path):
    """The documented example (examples/ipi/input.xml), 10 NVE steps driven by the real i-PI: every step's
    potential energy and forces equal the in-process calculator's at i-PI's positions, and energy is conserved."""
    name, steps = socket_name(), 10
    structure = REPO / "examples" / "aspirin.xyz"
    text = (REPO / "examples" / "ipi" / "input.xml").read_text()
    text = text.replace("mlip-aspirin", name).replace("../aspirin.xyz", str(structure))
    text = text.replace("<total_steps> 100 </total_steps>", f"<total_steps> {steps} </total_steps>")
    (tmp_path / "input.xml").write_text(text)
    ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=tmp_path, env=THREAD_ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = None
    try:
        deadline = time.monotonic() + 60
        while not Path(f"/tmp/ipi_{name}").exists():
            assert ipi.poll() is None and time.monotonic() < deadline, f"i-PI did not open its socket:\n{ipi.stdout.read()}"
            time.sleep(0.2)
        client = mlip_ipi(name, structure, "--checkpoint", "aspirin-rmd17")
        ipi_out, _ = ipi.communicate(timeout=180)
        client_out, _ = client.communicate(timeout=30)
    finally:
        for proc in (ipi, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
        Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
    assert ipi.returncode == 0, ipi_out
    assert client.returncode == 0 and f"after {steps + 1} force evaluations" in client_out, client_out

    columns = np.loadtxt(tmp_path / "aspirin.out")  # step, time fs, conserved eV, potential eV, temperature K
    frames = read(tmp_path / "aspirin.pos_0.extxyz", ":")
    forces = [f.get_forces() for f in read(tmp_path / "aspirin.frc_0.extxyz", ":")]
    assert len(frames) == len(forces) == len(columns) == steps + 1
    calc = MLIPCalculator("aspirin-rmd17")
    energies = []
    for frame, force in zip(frames, forces):
        frame.pbc = False
        frame.calc = calc
        energies.append(frame.get_potential_energy())
        np.testing.assert_allclose(frame.get_forces(), force, atol=1e-6)  # 8 decimals in its extxyz
    # i-PI's eV is 1/0.036749326 Ha, 1e-7 above ASE's (1.7 meV of -17 619 eV); it prints 9 digits (1e-4 eV)
    np.testing.assert_allclose(energies, columns[:, 3], rtol=2e-7)
    np.testing.assert_allclose(np.subtract(energies, energies[0]), columns[:, 3] - columns[0, 3], atol=3e-4)
    assert np.ptp(columns[:, 2]) < 5e-3  # conserved energy, eV over 5 fs
    assert np.ptp(columns[:, 3]) > 1e-3  # and the atoms did move
