"""mlip: an E(3)-equivariant machine-learned interatomic potential, served and driven from ASE."""

__version__ = "0.1.0"

from .calculator import MLIPCalculator  # noqa: E402
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .graph import AtomicGraph, Structure, batch_graphs, build_graph  # noqa: E402
from .model import MLIPModel  # noqa: E402
from .potential import Potential  # noqa: E402
from .properties import compute_properties  # noqa: E402

__all__ = [
    "AtomicGraph",
    "Checkpoint",
    "MLIPCalculator",
    "MLIPModel",
    "ModelConfig",
    "Potential",
    "RemoteCalculator",
    "Structure",
    "__version__",
    "batch_graphs",
    "build_graph",
    "compute_properties",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str):
    """Import RemoteCalculator (httpx, websockets) only when it is used."""
    if name == "RemoteCalculator":
        from .remote import RemoteCalculator

        return RemoteCalculator
    raise AttributeError(f"module 'mlip' has no attribute {name!r}")
