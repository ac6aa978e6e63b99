"""RemoteCalculator against a real `mlip serve` subprocess: same trajectories as in-process, restarts, auth, errors."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.mep import NEB
from ase.optimize import BFGS, FIRE
from prometheus_client.parser import text_string_to_metric_families

from mlip import MLIPCalculator, Potential, RemoteCalculator, Structure
from mlip.remote import RemoteError

from .serverproc import ServerProcess, free_port, make_checkpoint, one_torch_thread  # noqa: F401

KEY = "remote-test-key"
MD_STEPS = 100


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("remote") / "small.safetensors")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """A float64 CPU server that requires an API key."""
    log = tmp_path_factory.mktemp("remote-log") / "server.log"
    process = ServerProcess(["--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "float64"], log, env={"MLIP_API_KEY": KEY})
    try:
        yield process.start()
    finally:
        process.stop()


def acetamide():
    atoms = molecule("CH3CONH2")
    atoms.rattle(0.05, seed=3)
    MaxwellBoltzmannDistribution(atoms, temperature_K=500, rng=np.random.default_rng(0))
    return atoms


def crystal():
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1, 2]] = 13
    atoms.rattle(0.05, seed=4)
    return atoms


def trajectory(calc, steps: int = MD_STEPS, on_step=None) -> np.ndarray:
    """NVE positions (Å) after every VelocityVerlet step (0.5 fs)."""
    atoms = acetamide()
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    frames = []

    def record() -> None:
        frames.append(atoms.positions.copy())
        if on_step is not None:
            on_step(len(frames))

    dyn.attach(record, interval=1)
    dyn.run(steps)
    return np.array(frames)


@pytest.fixture(scope="module")
def reference(checkpoint) -> np.ndarray:
    return trajectory(MLIPCalculator(checkpoint))


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_md_follows_in_process_trajectory(server, reference, transport):
    with RemoteCalculator(server.url, api_key=KEY, transport=transport) as calc:
        frames = trajectory(calc)
    assert frames.shape == reference.shape
    np.testing.assert_allclose(frames, reference, atol=1e-8, rtol=0)


def stream_messages(url: str) -> float:
    """WebSocket messages answered with a result so far."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "mlip_requests"]
    return sum(s.value for s in family.samples if s.labels.get("endpoint") == "/v1/stream" and s.labels.get("status") == "200")


def test_server_killed_and_restarted_mid_run(server, reference):
    calls, answered_before_kill, restarted = [], [], threading.Event()
    answered_before_run = stream_messages(server.url)

    def kill_and_restart(step: int) -> None:
        if step == 40:
            answered_before_kill.append(stream_messages(server.url))
            server.process.kill()
            server.process.wait(10)
            threading.Thread(target=lambda: (server.start(), restarted.set()), daemon=True).start()

    with RemoteCalculator(server.url, api_key=KEY, reconnect_s=90, backoff_s=0.05) as calc:
        original = calc.calculate
        calc.calculate = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        frames = trajectory(calc, on_step=kill_and_restart)
    assert restarted.wait(90)  # same port: the module's later tests use the restarted server
    answered_after = stream_messages(server.url)
    np.testing.assert_allclose(frames, reference, atol=1e-8, rtol=0)
    assert answered_before_kill[0] - answered_before_run + answered_after == len(calls)  # every step answered exactly once


def test_auth_required_and_key_from_environment(server, monkeypatch):
    monkeypatch.delenv("MLIP_API_KEY", raising=False)
    atoms = acetamide()
    for transport in ("ws", "http"):
        atoms.calc = RemoteCalculator(server.url, transport=transport)
        start = time.monotonic()
        with pytest.raises(RemoteError) as err:
            atoms.get_potential_energy()
        assert err.value.status == 401 and "API key" in err.value.message
        assert time.monotonic() - start < 2  # not retried
    monkeypatch.setenv("MLIP_API_KEY", KEY)
    with RemoteCalculator(server.url) as calc:
        atoms.calc = calc
        assert np.isfinite(atoms.get_potential_energy())


@pytest.mark.parametrize("transport, field", [("ws", "numbers"), ("http", "structures[0].numbers")])
def test_client_error_raised_at_once_with_server_message(server, transport, field):
    atoms = molecule("CH3CONH2")
    atoms.numbers[0] = 26
    with RemoteCalculator(server.url, api_key=KEY, transport=transport) as calc:
        atoms.calc = calc
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"element\(s\) \['Fe'\] not supported") as err:
            atoms.get_forces()
        assert isinstance(err.value, RemoteError) and err.value.status == 422 and err.value.field == field
        assert time.monotonic() - start < 2
        fine = acetamide()  # the calculator keeps working after a rejected structure
        fine.calc = calc
        assert np.isfinite(fine.get_forces()).all()


def relax(calc) -> tuple:
    atoms = crystal()
    atoms.calc = calc
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    converged = opt.run(fmax=0.05, steps=40)
    return converged, opt.nsteps, atoms.positions, atoms.cell.array, atoms.get_stress()


def test_cell_relaxation_matches_in_process(server, checkpoint):
    expected = relax(MLIPCalculator(checkpoint))
    with RemoteCalculator(server.url, api_key=KEY) as calc:
        got = relax(calc)
    assert got[0] and expected[0] and got[1] == expected[1]
    for a, b in zip(got[2:], expected[2:]):
        np.testing.assert_allclose(a, b, atol=1e-8, rtol=0)


def test_session_follows_species_cell_and_pbc_changes(server, checkpoint):
    local = MLIPCalculator(checkpoint)
    structures = [acetamide(), crystal()]
    strained = crystal()
    strained.set_cell(strained.cell.array * 1.03, scale_atoms=True)
    open_cell = crystal()
    open_cell.pbc = [True, True, False]
    structures += [strained, open_cell, acetamide()]
    with RemoteCalculator(server.url, api_key=KEY) as calc:
        for atoms in structures:
            expected = atoms.copy()
            expected.calc = local
            atoms.calc = calc
            np.testing.assert_allclose(atoms.get_forces(), expected.get_forces(), atol=1e-10, rtol=0)
            np.testing.assert_allclose(atoms.get_potential_energies(), expected.get_potential_energies(), atol=1e-10)
            if atoms.pbc.any():
                np.testing.assert_allclose(atoms.get_stress(), expected.get_stress(), atol=1e-10, rtol=0)


def test_calculate_many_in_one_request(server, checkpoint):
    images = [acetamide(), crystal(), crystal()]
    images[2].rattle(0.05, seed=9)
    expected = Potential.load(checkpoint).evaluate([Structure.from_atoms(a) for a in images], ["energy", "forces", "stress"])
    with RemoteCalculator(server.url, api_key=KEY) as calc:
        results = calc.calculate_many(images, properties=["energy", "forces", "stress"])
    assert len(results) == 3 and "stress" not in results[0]
    for got, ref in zip(results, expected):
        assert got["energy"] == pytest.approx(ref["energy"], abs=1e-10)
        np.testing.assert_allclose(got["forces"], ref["forces"], atol=1e-10, rtol=0)
        if "stress" in ref:
            np.testing.assert_allclose(got["stress"], ref["stress"], atol=1e-10, rtol=0)


def neb_path(make_calc) -> np.ndarray:
    initial = molecule("CH3CONH2")
    final = initial.copy()
    final.positions[5] += [0.3, 0.2, 0.0]  # a displaced methyl hydrogen
    images = [initial] + [initial.copy() for _ in range(3)] + [final]
    for image in images:
        image.calc = make_calc()
    neb = NEB(images, method="improvedtangent")
    neb.interpolate()
    FIRE(neb, logfile=None).run(fmax=0.1, steps=5)
    return np.array([image.positions for image in images])


def test_neb_matches_in_process(server, checkpoint):
    potential = Potential.load(checkpoint)
    calcs = []

    def remote() -> RemoteCalculator:
        calcs.append(RemoteCalculator(server.url, api_key=KEY))
        return calcs[-1]

    try:
        got = neb_path(remote)
    finally:
        for calc in calcs:
            calc.close()
    np.testing.assert_allclose(got, neb_path(lambda: MLIPCalculator(potential)), atol=1e-8, rtol=0)


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_unreachable_server_is_retried_for_the_reconnect_budget(transport):
    atoms = acetamide()
    with RemoteCalculator(f"http://127.0.0.1:{free_port()}", transport=transport, reconnect_s=1.5, backoff_s=0.05) as calc:
        atoms.calc = calc
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="within 1.5 s"):
            atoms.get_forces()
    assert 0.7 < time.monotonic() - start < 5  # it kept trying for (about) the budget, then gave up


def test_client_defaults_outlast_the_server_deadline():
    from mlip.server.settings import Settings

    calc = RemoteCalculator()
    assert calc.timeout > Settings().request_timeout_s and calc.reconnect_s >= 120


def test_timeouts_and_504_are_not_retried():
    from mlip.remote import _error_from, _Unavailable

    assert isinstance(_error_from(504, {"error": {"message": "no result within 120 s"}}), TimeoutError)
    for status in (500, 502, 503):
        assert isinstance(_error_from(status, {}), _Unavailable)
    assert isinstance(_error_from(422, {}), ValueError)
