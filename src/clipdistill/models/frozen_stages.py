"""Fast inference of a pretrained trunk's frozen stages (the LiT teacher's stem + stages 0-4).

Those stages run over every image view of the train split once per demo (the teacher's frozen
bank; the fusion teacher and the cache reuse the rows through an ``EncodingMemo``), and at 224 px
they are most of the teacher's cost. In eager PyTorch on CPU a large part of that time goes to
BatchNorm and to the "same" padding of timm's ``tf_`` convolutions, memory-bound passes over the
largest feature maps. So on CPU they run as an ONNX Runtime graph, faster than eager
(docs/results.md, "Where the demo's time goes"), exported once per weights in memory; elsewhere
(CUDA) they run in PyTorch with each BatchNorm folded into its convolution.
Both are the eager function up to float rounding (about 1e-5 relative).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import torch
from torch import nn

from clipdistill.ort_session import cpu_session

# Pixels per ONNX Runtime call (8 images at 224 px). The session's memory arena keeps the
# largest activations it has ever held, and at 224 px the early stages hold about 15 MB per
# image: one call on the 1,024 images an evaluation decoded at once left 6.7 GB resident for the
# rest of the process. Calls of 8 images at 224 px keep the arena near 0.3 GB (32 images: 0.9 GB)
# for about 12% more time per image; smaller inputs get proportionally more rows per call
# (docs/results.md, "Memory").
PIXELS_PER_CALL = 8 * 224 * 224


def rows_per_call(height: int, width: int) -> int:
    """How many rows of ``height`` x ``width`` pixels one call takes (at least one)."""
    return max(1, PIXELS_PER_CALL // (height * width))


def fold_batchnorms(modules: list[nn.Module]) -> list[nn.Module]:
    """Eval-mode copies of ``modules`` with every BatchNorm that directly follows a convolution
    (in registration order, which is the forward order in timm's EfficientNet blocks and stem)
    folded into it (torch's ``fuse_conv_bn_eval``); a timm ``BatchNormAct2d`` keeps its dropout
    and activation. The same function up to float rounding, one pass over each feature map fewer."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(children: list[tuple[str, nn.Module]], owner: nn.Module | None) -> list[nn.Module]:
        kept = [module for _, module in children]
        for i in range(1, len(children)):
            (conv_name, conv), (bn_name, bn) = children[i - 1], children[i]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                after = nn.Sequential(*[m for name in ("drop", "act") if (m := getattr(bn, name, None)) is not None])
                kept[i - 1], kept[i] = fuse_conv_bn_eval(conv, bn), after
                if owner is not None:
                    setattr(owner, conv_name, kept[i - 1])
                    setattr(owner, bn_name, kept[i])
        for module in kept:
            if not isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                fold(list(module.named_children()), module)
        return kept

    copies = [copy.deepcopy(module).eval() for module in modules]
    return fold([(str(i), module) for i, module in enumerate(copies)], None)


class FrozenStages:
    """``modules`` applied in sequence, frozen and in eval mode, as fast as this device allows.

    Built for one set of weights: the caller rebuilds it when they change. On CPU one ONNX graph
    per input size (timm's "same" padding is computed from the size when traced, so the graph
    fixes it), with a dynamic batch."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.folded = nn.Sequential(*fold_batchnorms(modules)).to(device)
        self.sessions: dict[tuple[int, int], Any] = {}

    def _onnx_session(self, height: int, width: int) -> Any:
        module = copy.deepcopy(self.folded).to(memory_format=torch.contiguous_format)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about timm's padding arithmetic (fixed per size)
            torch.onnx.export(
                module,
                (torch.zeros(1, 3, height, width),),
                buffer,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        # Calls alternate with torch's own work in this process: idle workers must sleep, or they
        # spin on the cores torch's threads are about to use (ORT's default after each call).
        return cpu_session(buffer.getvalue(), torch.get_num_threads(), spin=False)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, w), channels-last, of model-normalised ``pixels`` (B, 3, H, W)."""
        if self.device.type != "cpu":
            return self.folded(pixels.contiguous(memory_format=torch.channels_last))
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        if size not in self.sessions:
            self.sessions[size] = self._onnx_session(*size)
        session = self.sessions[size]
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        chunks = []
        rows = rows_per_call(*size)
        for start in range(0, len(array), rows):
            (features,) = session.run(["features"], {"pixels": array[start : start + rows]})
            chunks.append(torch.from_numpy(features))
        return torch.cat(chunks).contiguous(memory_format=torch.channels_last)
