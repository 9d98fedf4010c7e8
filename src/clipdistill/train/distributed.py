"""Data-parallel training over processes, with the contrastive math of one process.

``torchrun --nproc_per_node N -m clipdistill.train CONFIG`` starts N copies of the trainer.
Each reads its rank from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
joins a process group (gloo on CPU, nccl on CUDA), takes rows ``[rank·b, (rank+1)·b)`` of
every global batch (b = ``optim.batch_size`` / N) and encodes only those. Contrastive terms
compare every row with every other row of the *global* batch, so the student features, the
teacher outputs and the batch's ids/captions are gathered before the method sees them.

Two settings (``distributed.*`` in the config, open_clip's names) decide how:

- ``local_loss: false`` (default): every process computes the whole-batch loss, identical on
  all of them. The gradient of a process's own features is then N times what one process
  would see per copy, and DDP's average over processes restores exactly the one-process
  gradient. With ``gather_with_grad: true`` the gather's backward sums every process's gradient
  for the local rows (an all-reduce); with ``false`` the other processes' rows are gathered as
  constants and the own rows' gradient is multiplied by N instead: the same numbers, one
  collective fewer. Exact for every method.
- ``local_loss: true``: a process takes the loss only over its own query rows (logits b × B
  instead of B × B, as open_clip's ``ClipLoss(local_loss=True)``); terms that are a sum over
  rows are scaled by B/b, so the average over processes is again the whole-batch value. Exact
  only with ``gather_with_grad: true`` (the gather's backward brings back the gradient that
  the other processes' rows put on this process's features); with ``false`` that gradient is
  dropped, which is open_clip's cheaper approximation.

Teacher outputs are computed on a process's own rows and gathered (they carry no gradient),
so an online teacher is never run twice on the same image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is
# first imported. open_clip imports it, and models (open_clip included) are built after the
# process group exists, so a first import then would keep the group alive past
# destroy_process_group(): its gloo threads outlive Python's finalisation and abort the process
# at exit ("terminate called without an active exception", about one 2-process run in six).
# Imported here, before any group exists, the defaults bind None.
import torch.distributed.nn
from torch import nn

from clipdistill.config import ConfigError
from clipdistill.distill.base import Batch, DistillMethod, MethodOutput, StudentFeatures, TeacherOutputs, TeacherSource

T = TypeVar("T")


class DistributedError(ConfigError):
    """A torchrun environment or a distributed setting that cannot work; the message names the
    variable or key (a :class:`ConfigError`, so the CLI reports it in one line)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run and the gather settings; ``world == 1`` is a plain run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    gather_with_grad: bool = True
    local_loss: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def context_from_env(gather_with_grad: bool = True, local_loss: bool = False) -> DistContext:
    """Rank, world size and local rank from torchrun's environment (absent: a 1-process run)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    return DistContext(rank, world, local_rank, gather_with_grad, local_loss)


def process_device(device: str, ctx: DistContext) -> str:
    """The device this process trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process
    run (one GPU per process, torchrun's convention); CPU stays CPU."""
    if ctx.enabled and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def init_process_group(ctx: DistContext, device: torch.device, backend: str = "auto") -> bool:
    """Join torchrun's process group (``env://``); returns whether this call created it.

    ``backend="auto"`` picks nccl for CUDA and gloo for CPU, the backends PyTorch supports there.
    The backend is checked even in a 1-process run, so a typo fails before any cluster job."""
    if backend not in ("auto", "gloo", "nccl"):
        raise DistributedError(f"key 'distributed.backend' must be auto, gloo or nccl, got {backend!r}")
    if not ctx.enabled or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError("key 'distributed.backend' is nccl but the device is CPU; nccl needs CUDA (use gloo)")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(f"WORLD_SIZE={ctx.world} but {name} is not set; launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world)
    return True


def shutdown(created: bool) -> None:
    """Leave the process group this run created (never one a caller set up)."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def local_rows(global_size: int, ctx: DistContext) -> slice:
    """This process's rows of a global batch of ``global_size`` (equal shares, rank order)."""
    if global_size % ctx.world:
        raise DistributedError(
            f"key 'optim.batch_size' ({global_size}) must be divisible by the number of processes ({ctx.world}): "
            "every process takes an equal share of each batch"
        )
    share = global_size // ctx.world
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


# --- gathers ----------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered tensor's gradient over processes and hands
    each process its own rows: the exact adjoint of concatenating every process's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant (exactly, no rounding
    of the forward value as ``x·k − x·(k−1)`` would have)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def gather_tensor(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every process's rows (dim 0, rank order) as a constant (no gradient)."""
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def gather_features(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every process's rows of a trainable tensor so that, after DDP's gradient
    average, the gradient equals a one-process run on the whole batch (see the module doc)."""
    if not ctx.enabled:
        return tensor
    if ctx.gather_with_grad:
        return _GatherWithGrad.apply(tensor, ctx.rank, ctx.world)
    parts = list(gather_tensor(tensor, ctx).split(tensor.shape[0]))
    parts[ctx.rank] = tensor if ctx.local_loss else _ScaleGrad.apply(tensor, float(ctx.world))
    return torch.cat(parts)


def gather_padded(tensor: torch.Tensor, ctx: DistContext, dim: int = 1) -> torch.Tensor:
    """:func:`gather_tensor` for tensors whose size along ``dim`` differs between processes
    (captions padded to each batch's longest): zero-padded to the longest first."""
    if not ctx.enabled:
        return tensor
    size = torch.tensor([tensor.shape[dim]], dtype=torch.long, device=tensor.device)
    sizes = gather_tensor(size, ctx)
    longest = int(sizes.max())
    if tensor.shape[dim] < longest:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = longest - tensor.shape[dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    return gather_tensor(tensor, ctx)


def gather_objects(items: list[T], ctx: DistContext) -> list[T]:
    """Concatenate every process's list of picklable items (ids, captions) in rank order."""
    if not ctx.enabled:
        return items
    gathered: list[list[T] | None] = [None] * ctx.world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def broadcast_from_main(compute: Callable[[], T], ctx: DistContext) -> T:
    """Run ``compute`` on rank 0 only and hand its result (or its error) to every process.

    Used for reading a checkpoint once: an error on rank 0 (config mismatch, missing file) is
    raised on every rank with the same message, instead of leaving the others waiting."""
    if not ctx.enabled:
        return compute()
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload[0] = ("ok", compute())
        except Exception as error:  # re-raised below on every rank, rank 0 included
            payload[0] = ("error", error)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def _collective_device() -> torch.device:
    """Where small bookkeeping tensors must live for the process group's backend (nccl: the GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_process(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` is true in at least one process (one tiny all-reduce)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_floats(record: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean over processes of each value (per-process loss shares → the whole-batch value)."""
    if not ctx.enabled or not record:
        return record
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: float(v) / ctx.world for k, v in zip(keys, values.tolist(), strict=True)}


# --- the global batch and the teacher ----------------------------------------------------------
@dataclass
class GlobalBatch(Batch):
    """The whole batch across processes: ids, captions and augmentation ids of every row.

    ``unit_pixels`` holds this process's rows only: pixels are never gathered, because the only
    readers of pixels are teacher sources, and :class:`GatheringTeacher` runs them on
    ``local`` (this process's :class:`Batch`, rows ``rows`` of the whole) and gathers their outputs."""

    local: Batch | None = None
    rows: slice = field(default_factory=lambda: slice(0, 0))


def gather_batch(batch: Batch, ctx: DistContext) -> GlobalBatch:
    start = ctx.rank * len(batch.image_ids)
    return GlobalBatch(
        unit_pixels=batch.unit_pixels,
        texts=gather_objects(list(batch.texts), ctx),
        image_ids=gather_objects(list(batch.image_ids), ctx),
        caption_ids=gather_objects(list(batch.caption_ids), ctx),
        aug_ids=gather_tensor(batch.aug_ids, ctx),
        local=batch,
        rows=slice(start, start + len(batch.image_ids)),
    )


def gather_teacher_outputs(outputs: TeacherOutputs, ctx: DistContext) -> TeacherOutputs:
    """Every process's teacher outputs in rank order (constants: teachers are frozen). Fusion
    caption states are padded to the longest caption over all processes, mask false there."""
    fusion = outputs.fusion
    if fusion is not None:
        kind = type(fusion)
        values = {}
        for item in fields(fusion):
            tensor = getattr(fusion, item.name)
            padded = item.name in ("text", "text_mask")  # captions are padded per batch
            values[item.name] = gather_padded(tensor, ctx) if padded else gather_tensor(tensor, ctx)
        fusion = kind(**values)

    def maybe(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else gather_tensor(tensor, ctx)

    return TeacherOutputs(
        image=gather_tensor(outputs.image, ctx),
        text=gather_tensor(outputs.text, ctx),
        logit_scale=outputs.logit_scale,
        image_tokens=maybe(outputs.image_tokens),
        text_tokens=maybe(outputs.text_tokens),
        fusion=fusion,
    )


class GatheringTeacher(TeacherSource):
    """A teacher source for a multi-process run: asked for a :class:`GlobalBatch`, it runs the
    wrapped source (online teacher or cache) on this process's rows and gathers the outputs."""

    def __init__(self, inner: TeacherSource, ctx: DistContext) -> None:
        self.inner = inner
        self.ctx = ctx
        self.embed_dim = inner.embed_dim
        self.spec = inner.spec
        self.fusion = getattr(inner, "fusion", None)

    def __call__(self, batch: Batch) -> TeacherOutputs:
        if not isinstance(batch, GlobalBatch) or batch.local is None:
            return self.inner(batch)
        return gather_teacher_outputs(self.inner(batch.local), self.ctx)


# --- the module DDP wraps ---------------------------------------------------------------------
class TrainStep(nn.Module):
    """Student + method as one module, so DDP sees every trainable parameter and the one
    forward it hooks: encode this process's rows, gather, run the method on the global batch."""

    def __init__(self, student: nn.Module, method: DistillMethod, ctx: DistContext) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.ctx = ctx

    def forward(self, batch: Batch, tokens: torch.Tensor) -> MethodOutput:
        student: Any = self.student
        image = student.encode_image(student.prepare_pixels(batch.unit_pixels))
        text = student.encode_text(tokens)
        self.outputs = (image, text)  # what each loss term's gradient is measured on (term_gradients)
        if not self.ctx.enabled:
            return self.method(batch, StudentFeatures(image=image, text=text, logit_scale=student.logit_scale))
        global_batch = gather_batch(batch, self.ctx)
        features = StudentFeatures(
            image=gather_features(image, self.ctx),
            text=gather_features(text, self.ctx),
            logit_scale=student.logit_scale,
            rows=global_batch.rows if self.ctx.local_loss else None,
        )
        return self.method(global_batch, features)


def wrap_ddp(step: TrainStep, device: torch.device) -> nn.Module:
    """DDP around the step module (one GPU per process on CUDA, none on CPU). Every BatchNorm
    layer first becomes one whose training statistics are over the global batch (SyncBatchNorm
    on CUDA, :class:`~clipdistill.train.sync_batchnorm.GlobalBatchNorm` on CPU), so a BatchNorm
    student trains as in one process; :func:`~clipdistill.train.sync_batchnorm.to_plain_batchnorm`
    converts back before the student is saved."""
    from torch.nn.parallel import DistributedDataParallel

    from clipdistill.train.sync_batchnorm import to_global_batchnorm

    step = to_global_batchnorm(step, device)
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
