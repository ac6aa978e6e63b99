"""The installed distribution: one `mlip` package with its server, trainer and shipped potentials."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cli_help_does_not_import_torch():
    """`mlip --help` and `import mlip` stay light: torch, e3nn and the server load only when used."""
    code = (
        "import sys, contextlib, io, mlip, mlip.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): mlip.cli.main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'e3nn', 'fastapi', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_remote_client_does_not_import_torch():
    """A client machine needs no torch: RemoteCalculator (and the cell rule it applies) import numpy, ASE and msgpack."""
    code = (
        "import sys\n"
        "from mlip import RemoteCalculator\n"
        "from mlip.cell import cell_has_stress\n"
        "print(sorted(m for m in ('torch', 'e3nn', 'fastapi', 'vesin') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve():
    import mlip

    for name in mlip.__all__:
        assert getattr(mlip, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mlip.nope  # noqa: B018


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the source tree (no build artefacts left in the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "__pycache__", "*.egg-info", "build", "dist", "*.train-state.pt", ".pytest_cache"
    ))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(source)],
        check=True, capture_output=True,
    )
    (path,) = (tmp / "dist").glob("mlip_service-*.whl")
    return path


def test_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mlip"}
    for expected in ("mlip/server/app.py", "mlip/training/trainer.py", "mlip/training/configs/aspirin-rmd17.yaml",
                     "mlip/checkpoints/aspirin-rmd17.safetensors", "mlip/checkpoints/aspirin-rmd17.md"):
        assert expected in names
    assert not any(n.startswith("mlip/tests") or n.endswith("launcher.py") for n in names)


def test_wheel_works_in_a_fresh_venv(wheel, tmp_path):
    """Installed from the wheel (dependencies borrowed from this venv), away from the repository:
    `mlip info` finds the shipped potentials inside the package, and an evaluation matches the source tree."""
    import site

    from ase.build import molecule

    from mlip import MLIPCalculator

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (purelib,) = json.loads(subprocess.run(
        [str(python), "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
        capture_output=True, text=True, check=True).stdout)
    Path(purelib, "borrowed-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # not mlip: it is editable here
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)

    def run(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=True, cwd=tmp_path).stdout

    shipped = json.loads(run(str(venv / "bin" / "mlip"), "info", "--json"))
    assert {row["name"] for row in shipped} >= {"aspirin-rmd17", "si-zuo2020", "acac-300K"}
    assert all(Path(row["path"]).is_relative_to(venv) for row in shipped)
    assert "serve checkpoints" in run(str(venv / "bin" / "mlip"), "--help")

    code = (
        "import json, mlip, importlib.util\n"
        "from ase.build import molecule\n"
        "atoms = molecule('CH3CHO'); atoms.calc = mlip.MLIPCalculator('aspirin-rmd17')\n"
        "print(json.dumps({'file': mlip.__file__, 'energy': atoms.get_potential_energy(),\n"
        "                  'generic': [m for m in ('server', 'training') if importlib.util.find_spec(m)]}))"
    )
    installed = json.loads(run(str(python), "-c", code))
    assert Path(installed["file"]).is_relative_to(venv)
    assert installed["generic"] == []  # no top-level `server` or `training` in the user's environment
    atoms = molecule("CH3CHO")
    atoms.calc = MLIPCalculator(REPO / "checkpoints" / "aspirin-rmd17.safetensors")
    assert installed["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    assert np.isfinite(installed["energy"])
