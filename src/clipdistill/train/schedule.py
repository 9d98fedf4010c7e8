"""Optimiser, learning-rate schedule and update step shared by the three training loops.

The student trainer (``train/trainer.py``), the LiT teacher (``train/lit.py``) and the fusion
head (``train/fusion.py``) all train with AdamW, a linear warm-up then a cosine decay to zero,
and gradient-norm clipping; they differ only in the AdamW settings each passes (the student
uses open_clip's betas, eps and weight-decay groups, the teachers torch's defaults).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW's settings; the defaults are torch's (``fused=None``: torch picks the kernel)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool | None = None


def decay_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases and scalars (ndim < 2). Trainable
    parameters of ``modules`` in order, each once (a parameter shared by two modules is not
    stepped twice)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def student_groups(
    student: torch.nn.Module, method: torch.nn.Module, weight_decay: float, scalar_lr: float
) -> list[dict[str, Any]]:
    """:func:`decay_groups` of the student and the method, with the method's scalars (0-dim
    parameters: learned temperatures, gates, attention scales) moved to a third group at
    ``scalar_lr``, without weight decay.

    AdamW moves a parameter by about its learning rate per step whatever the gradient's size, so
    at the weights' lr a temperature or gate can move only ~lr × steps: over a short run that
    pins it at its initialisation and the mechanism it controls never acts. The third group is
    always present (possibly empty), so the optimiser's state has one layout for every method."""
    decay, no_decay = decay_groups([student, method], weight_decay)
    scalar_ids = {id(param) for param in method.parameters() if param.requires_grad and param.ndim == 0}
    scalars = [param for param in no_decay["params"] if id(param) in scalar_ids]
    no_decay["params"] = [param for param in no_decay["params"] if id(param) not in scalar_ids]
    return [decay, no_decay, {"params": scalars, "weight_decay": 0.0, "lr": scalar_lr}]


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict[str, Any]],
    settings: AdamWSettings,
    warmup_steps: int,
    total_steps: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (parameters, or groups such as :func:`decay_groups` gives, whose
    own ``weight_decay`` wins) and its :func:`cosine_with_warmup` schedule over ``total_steps``."""
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        eps=settings.eps,
        fused=settings.fused,
    )
    return optimizer, cosine_with_warmup(optimizer, warmup_steps, total_steps)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplier: ``step/warmup`` during warmup, then half a cosine to 0 at ``total``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def update(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One step: backward, clip the gradient norm of every parameter the optimiser steps at
    ``grad_clip``, step the optimiser and the schedule; returns the norm before clipping.

    With a ``scaler`` (mixed precision) the loss is scaled for backward and the gradients
    unscaled before clipping, so the clip applies to the true gradients."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    return grad_norm


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order and augmentation."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
