"""mlip: an E(3)-equivariant machine-learned interatomic potential, served and driven from ASE.

The public names below are imported when first used, so that `import mlip` (and the `mlip`
command's help) does not pay for torch, e3nn or the HTTP client until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "AtomicGraph": ".graph",
    "Checkpoint": ".checkpoint",
    "MLIPCalculator": ".calculator",
    "MLIPModel": ".model",
    "ModelConfig": ".config",
    "Potential": ".potential",
    "RemoteCalculator": ".remote",
    "Structure": ".graph",
    "batch_graphs": ".graph",
    "build_graph": ".graph",
    "compute_properties": ".properties",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
