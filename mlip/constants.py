"""Constant buffers kept as float64 masters, so casting a model to float32 and back does not round them."""

from __future__ import annotations

import torch
from torch import nn


class Float64Constants(nn.Module):
    """Mixin: ``register_constant`` buffers are re-derived from their float64 master on every ``.to()``/``.float()``.

    A float32 copy of a Clebsch-Gordan or basis table rounded at 1e-7 would stay rounded after
    ``.double()``; re-deriving it from the master keeps a float64 model exact whatever it went through.
    """

    def register_constant(self, name: str, master: torch.Tensor) -> None:
        """A non-persistent buffer ``name`` (not in checkpoints) whose master is ``master`` (float64, CPU)."""
        if "_float64_masters" not in self.__dict__:
            self._float64_masters: dict[str, torch.Tensor] = {}
        self._float64_masters[name] = master
        self.register_buffer(name, master.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, master in self.__dict__.get("_float64_masters", {}).items():
            self._buffers[name] = fn(master)
        return self
