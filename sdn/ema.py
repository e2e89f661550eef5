"""Exponential moving average of model weights, kept as a full module so evaluation can run it.

Built on ``torch.optim.swa_utils.AveragedModel`` with its EMA update: the first update copies the
weights, later ones do ``ema = decay * ema + (1 - decay) * weights``; buffers are copied, not averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ExponentialMovingAverage:
    """EMA of ``model``'s parameters (``decay`` in [0, 1)); ``.module`` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not isinstance(decay, float | int) or isinstance(decay, bool) or not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self._averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False
        )
        self._averaged.module.requires_grad_(False).eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no gradients)."""
        return self._averaged.module

    @property
    def num_updates(self) -> int:
        return int(self._averaged.n_averaged.item())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture, unwrapped) into the average."""
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"EMA state has decay {state['decay']}, this EMA has {self.decay}")
        self.module.load_state_dict(state["module"])
        self._averaged.n_averaged.fill_(int(state["num_updates"]))
