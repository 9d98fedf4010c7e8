"""Loss functions as pure functions of tensors (no modules, no state).

Methods in ``distill/methods`` compose these; keeping them pure makes each one testable
against a naive reference on hand-built tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Image-to-text logits κ·V·Tᵀ with κ = exp(logit_scale) clamped at 100 (as CLIP does)."""
    return logit_scale.exp().clamp(max=100.0) * image @ text.t()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on matched rows: ½[CE(L_i2t, I) + CE(L_t2i, I)]."""
    logits = contrastive_logits(image, text, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
