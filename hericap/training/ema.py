"""An exponential moving average of the weights (``optimizer.ema_decay``), no Ray.

After every optimiser step, each floating-point parameter and buffer ``p`` moves its average
``a`` by ``a <- a + (1 - d) (p - a)`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` after ``n``
updates (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``), so that the early
average does not hang on the random initialisation. Integer buffers are copied.

A checkpoint of a run with EMA stores the average as its ``model.pt`` (what validation scored,
what the kept best is chosen by, what eval, serve and ``hericap average`` read) and the raw
weights, with the update count, in ``training_state.pt`` (what training resumes from): see
:func:`checkpoint_weights` and :func:`restore_weights`. Resuming is exact.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEma", "checkpoint_weights", "restore_weights"]

logger = logging.getLogger(__name__)

# d = min(ema_decay, (1 + n) / (WARMUP_OFFSET + n)) after n updates (TensorFlow's rule).
WARMUP_OFFSET = 10
# training_state.pt keys of a run with EMA
RAW_WEIGHTS_KEY = "raw_model"
EMA_KEY = "ema"


class WeightEma:
    """The moving average of ``model``'s floating-point state.

    Args:
        model: the (unwrapped) model whose state is averaged; the average starts at its weights.
        decay: ``optimizer.ema_decay``, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optimizer.ema_decay={decay} must be in (0, 1) for an average")
        self.decay = decay
        self.updates = 0
        self.shadow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (WARMUP_OFFSET + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (after an optimiser step)."""
        weight = 1.0 - self.current_decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                # lerp leaves an entry that has not moved (a frozen weight) exactly as it is
                self.shadow[k].lerp_(v.detach().to(self.shadow[k].dtype), weight)
        self.updates += 1

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict with the averaged entries in place of its own."""
        return {k: self.shadow.get(k, v) for k, v in model.state_dict().items()}

    def load(self, averaged: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore an average saved by :func:`checkpoint_weights`."""
        missing = sorted(set(self.shadow) - set(averaged))
        if missing:
            raise RuntimeError(f"the checkpoint's averaged weights lack {missing[:5]}")
        for k, v in self.shadow.items():
            v.copy_(averaged[k])
        self.updates = updates

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block ``model`` holds the averaged weights; its own come back exactly."""
        state = model.state_dict()
        with torch.no_grad():
            saved = {k: state[k].detach().clone() for k in self.shadow}
            for k, v in self.shadow.items():
                state[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)


def checkpoint_weights(
    model: nn.Module, ema: WeightEma | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(what ``model.pt`` stores, what ``training_state.pt`` adds): without EMA the weights and
    nothing; with EMA the average, and the raw weights with the update count."""
    if ema is None:
        return model.state_dict(), {}
    extra = {
        RAW_WEIGHTS_KEY: model.state_dict(),
        EMA_KEY: {"decay": ema.decay, "updates": ema.updates},
    }
    return ema.state_dict_for(model), extra


def restore_weights(
    model: nn.Module,
    ema: WeightEma | None,
    saved: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any],
    load: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any],
) -> None:
    """Put a checkpoint's weights back: the raw ones into ``model`` and the average into ``ema``.

    Args:
        model: the model to train on.
        ema: this run's average (None: ``optimizer.ema_decay=0``).
        saved: the checkpoint's ``model.pt``.
        train_state: its ``training_state.pt``.
        load: ``load(model, state)``, a strict state-dict load.
    """
    raw = train_state.get(RAW_WEIGHTS_KEY)
    load(model, raw if raw is not None else saved)
    if ema is not None and raw is not None:
        ema.load(saved, int(train_state.get(EMA_KEY, {}).get("updates", 0)))
    elif ema is not None:
        ema.load(model.state_dict(), 0)
        logger.info("the checkpoint has no moving average: it starts from its weights now")
    elif raw is not None:
        logger.info("optimizer.ema_decay=0: training goes on from the raw weights, without EMA")
