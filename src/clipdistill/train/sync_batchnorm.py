"""BatchNorm over the global batch in a multi-process run, converted in for training and out
for saving.

A data-parallel run is the one-process run only if every BatchNorm layer normalises with the
statistics of the whole global batch, as one process would see it. PyTorch's
``nn.SyncBatchNorm`` does that, but only for accelerator tensors (its kernels and its input
check accept only CUDA, HPU, XPU or a private accelerator), so on CPU (gloo)
:class:`GlobalBatchNorm` does the same with the collectives gloo has: each process computes
its rows' per-channel mean, biased variance and count, one all-gather with gradient shares them
(its backward all-reduces, so the gradient that every process's outputs put on the statistics
reaches every process's inputs, as in SyncBatchNorm's backward), and they are merged with
count weights (Chan et al.'s parallel variance), so unequal per-process batches and empty ones
weigh exactly by their rows.
Written here because no library offers a CPU SyncBatchNorm; its semantics are
``nn.SyncBatchNorm``'s: synchronised only in training mode, running variance from the unbiased
global variance, ``momentum=None`` a cumulative average over ``num_batches_tracked``, and eval
mode plain BatchNorm on the running statistics.

timm's ``BatchNormAct2d`` (the ``small``/``base`` presets' fastvit trunks) is a BatchNorm2d
subclass that applies its ``drop`` and ``act`` after normalising; PyTorch's converter would
turn it into a SyncBatchNorm without them. Here it becomes :class:`GlobalBatchNormAct`
(CPU) or timm's own ``SyncBatchNormAct`` (CUDA), keeping both.

Conversion keeps every parameter and buffer object and name, so ``state_dict`` keys,
checkpoints and resume are unchanged, and :func:`to_plain_batchnorm` puts the original
modules back (holding the trained tensors) before the student is saved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clipdistill.config import ConfigError

# the original module a converted layer replaced; an attribute outside nn.Module's registries,
# so it adds no state_dict key and is not visited by modules() or .to()
_ORIGINAL = "_clipdistill_plain_batchnorm"


class BatchNormConversionError(ConfigError):
    """A BatchNorm variant this module does not know how to synchronise (named with its path;
    a :class:`ConfigError`, so the CLI reports it in one line)."""


# exact types only: a subclass may change forward(), and replacing it would silently drop that
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormAct2d)


class _GatherStats(torch.autograd.Function):
    """all_gather of one row per process whose backward sums the gathered gradient over
    processes (all-reduce) and returns this process's row: the exact adjoint.

    Not ``torch.distributed.nn.functional.all_gather``: that is deprecated in torch 2.14 (a
    FutureWarning per call site) and its backward needs all_to_all; all_gather + all_reduce
    exist on every backend (``distributed._GatherWithGrad`` is the same adjoint for features,
    but takes the run's DistContext, which a layer inside the student does not have)."""

    @staticmethod
    def forward(ctx: Any, row: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, row.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (1d, 2d or 3d input) whose training statistics are over every process's rows;
    outside training or outside a multi-process group it is ``nn.BatchNorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = input.numel() // max(channels, 1)
        dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(dtype)
        if count:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        else:  # an empty share: zeros that keep the graph, so this process joins the backward too
            mean = var = x.sum(dim=dims)
        row = torch.cat([mean, var, x.new_full((1,), float(count))])
        gathered = _GatherStats.apply(row)
        means, variances, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"expected more than 1 value per channel when training over all processes, got {total}")
        share = counts / total
        mean = (share * means).sum(0)
        var = (share * (variances + (means - mean) ** 2)).sum(0)

        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # the formula of ATen's batch_norm update (unbiased variance)
                unbiased = var * (total / (total - 1))
                self.running_mean.copy_(factor * mean + (1 - factor) * self.running_mean)
                self.running_var.copy_(factor * unbiased + (1 - factor) * self.running_var)

        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        shape = (1, channels) + (1,) * (input.dim() - 2)
        return (x * scale.view(shape) + shift.view(shape)).to(input.dtype)


class GlobalBatchNormAct(GlobalBatchNorm):
    """:class:`GlobalBatchNorm` followed by the ``drop`` and ``act`` of the timm
    ``BatchNormAct2d`` it replaces (same child names, so the same state_dict keys)."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


def _replacement(module: _BatchNorm, device: torch.device) -> nn.Module:
    is_act = type(module) is BatchNormAct2d
    kind: type[nn.Module]
    if device.type == "cuda":
        kind = SyncBatchNormAct if is_act else nn.SyncBatchNorm
    else:
        kind = GlobalBatchNormAct if is_act else GlobalBatchNorm
    new = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
    if is_act:
        new.drop = module.drop
        new.act = module.act
    return new


def _convert(module: nn.Module, device: torch.device, path: str) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not hasattr(module, _ORIGINAL):
        if type(module) not in _CONVERTIBLE:
            raise BatchNormConversionError(
                f"module {path or '<root>'} is a {type(module).__module__}.{type(module).__qualname__}, a BatchNorm "
                "variant that cannot be synchronised over processes (known: nn.BatchNorm1d/2d/3d, timm "
                "BatchNormAct2d); train this student in one process"
            )
        out = _replacement(module, device)
        for name, tensor in module._parameters.items():  # the same objects: optimiser and checkpoints agree
            out._parameters[name] = tensor
        for name, tensor in module._buffers.items():
            out._buffers[name] = tensor
        out.train(module.training)
        object.__setattr__(out, _ORIGINAL, module)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, device, f"{path}.{name}" if path else name))
    return out


def to_global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` (in place; the possibly new root is returned)
    by one that normalises over the global batch: ``nn.SyncBatchNorm`` (timm's
    ``SyncBatchNormAct`` for ``BatchNormAct2d``) on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    return _convert(module, device, "")


def to_plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`to_global_batchnorm` (in place; the root is returned): each converted layer
    becomes its original module again, holding the current (trained) parameters and buffers."""
    out = module
    original = getattr(module, _ORIGINAL, None)
    if original is not None:
        out = original
        for name, tensor in module._parameters.items():
            out._parameters[name] = tensor
        for name, tensor in module._buffers.items():
            out._buffers[name] = tensor
        object.__delattr__(module, _ORIGINAL)
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, to_plain_batchnorm(child))
    return out
