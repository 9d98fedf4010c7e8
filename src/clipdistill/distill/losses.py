"""Loss functions as pure functions of tensors (no modules, no state).

Methods in ``distill/methods`` compose these; keeping them pure makes each one testable
against a naive reference on hand-built tensors.

Conventions used throughout:

- Embeddings are L2-normalised rows (B, D); row i of the image set matches row i of the text set.
- A *log* scale (``logit_scale``, as stored by CLIP models) is exponentiated and clamped at 100
  by :func:`contrastive_logits`; functions that mirror open_clip's loss modules take the
  already-exponentiated scale instead, exactly as open_clip does, and say so.
- Distribution losses take ``(teacher_logits, student_logits)`` in that order and reduce by the
  mean over rows (PyTorch's ``batchmean``), the reduction open_clip and CLIP-KD use.
- ``rows`` (a slice, default ``None`` = every row): the query rows whose loss is taken, for
  multi-process training with ``local_loss`` (see ``train/distributed.py``). The embeddings are
  still the whole gathered batch (every row is a key); the loss is the mean over the given
  query rows (in both directions for symmetric losses), so the mean over processes, each taking
  an equal share of rows, is exactly the whole-batch loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MAX_SCALE = 100.0  # CLIP clamps κ = exp(logit_scale) at 100


def _query_rows(n: int, rows: slice | None) -> slice:
    return slice(0, n) if rows is None else rows


def _symmetric_ce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, rows: slice) -> torch.Tensor:
    """½[CE(s·a[rows]·bᵀ, rows) + CE(s·b[rows]·aᵀ, rows)]: query rows against every key."""
    labels = torch.arange(rows.start, rows.stop, device=a.device)
    forward = scale * a[rows] @ b.t()
    backward = scale * b[rows] @ a.t()
    return 0.5 * (F.cross_entropy(forward, labels) + F.cross_entropy(backward, labels))


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Image-to-text logits κ·V·Tᵀ with κ = exp(logit_scale) clamped at 100 (as CLIP does)."""
    return logit_scale.exp().clamp(max=MAX_SCALE) * image @ text.t()


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, rows: slice | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE on matched rows: ½[CE(L_i2t, I) + CE(L_t2i, I)] (``rows``: module doc)."""
    if rows is not None:
        return _symmetric_ce(image, text, logit_scale.exp().clamp(max=MAX_SCALE), rows)
    logits = contrastive_logits(image, text, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """CE(softmax(teacher), log_softmax(student)) = −Σ_j p^T_ij log p^S_ij, mean over rows i.

    This is open_clip's ``DistillClipLoss.dist_loss``. It differs from the KL divergence by the
    teacher's entropy, a constant w.r.t. the student: same gradients, different value."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(z^T/T) ‖ softmax(z^S/T)) per row, mean over rows, times T².

    This is Hinton's KD term as CLIP-KD implements it (``DistillKL``: ``kl_div(..., 'batchmean')
    * T**2``); the T² keeps gradient magnitudes independent of T."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return kl * temperature**2


def bidirectional_kl(
    teacher_logits_i2t: torch.Tensor,
    student_logits_i2t: torch.Tensor,
    temperature: float = 1.0,
    rows: slice | None = None,
) -> torch.Tensor:
    """½[KL(L^T_i2t ‖ L^S_i2t) + KL(L^T_t2i ‖ L^S_t2i)] on row softmaxes (t2i = transpose).

    CLIP-KD's CKD term: the paper says "both directions"; its code averages the two, as here.
    With ``rows``, only those rows of each direction (module doc)."""
    if rows is not None:
        return 0.5 * (
            kl_divergence(teacher_logits_i2t[rows], student_logits_i2t[rows], temperature)
            + kl_divergence(teacher_logits_i2t.t()[rows], student_logits_i2t.t()[rows], temperature)
        )
    return 0.5 * (
        kl_divergence(teacher_logits_i2t, student_logits_i2t, temperature)
        + kl_divergence(teacher_logits_i2t.t(), student_logits_i2t.t(), temperature)
    )


def feature_mse(student: torch.Tensor, teacher: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Mean squared error over all B·D elements (``F.mse_loss``, mean reduction); ``rows``: over
    those rows only.

    For unit vectors this is 2(1 − cos)/D per row, which is why feature distillation needs a
    large weight (CLIP-KD uses 2000) to be comparable with contrastive losses."""
    if rows is not None:
        return F.mse_loss(student[rows], teacher[rows])
    return F.mse_loss(student, teacher)


def info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float, rows: slice | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between two embedding sets, matched index = positive:
    ½[CE(a·bᵀ/τ, I) + CE(b·aᵀ/τ, I)]. ``temperature`` is τ itself (not a log scale); pass a
    tensor to learn it. With τ = 1/κ this equals :func:`clip_loss`. ``rows``: module doc."""
    if rows is not None:
        return _symmetric_ce(a, b, 1.0 / temperature, rows)
    logits = a @ b.t() / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def cross_contrastive_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    logit_scale: torch.Tensor,
    rows: slice | None = None,
) -> torch.Tensor:
    """CLIP-KD's interactive contrastive learning (ICL):
    ½[CE(κ·v^S·t^Tᵀ, I) + CE(κ·t^S·v^Tᵀ, I)] — student queries against teacher keys only.

    ``logit_scale`` is a log scale (κ = exp, clamped at 100). CLIP-KD's released code
    multiplies by the raw parameter ``log(1/0.07)`` without exponentiating; the paper describes a
    learnable temperature, so we exponentiate as CLIP does. ``rows``: the student query rows
    (module doc); every teacher row stays a key."""
    rows = _query_rows(student_image.shape[0], rows)
    labels = torch.arange(rows.start, rows.stop, device=student_image.device)
    image_to_text = contrastive_logits(student_image[rows], teacher_text, logit_scale)
    text_to_image = contrastive_logits(student_text[rows], teacher_image, logit_scale)
    return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))


def similarity_distance(
    student_sim: torch.Tensor,
    teacher_sim: torch.Tensor,
    distance: Literal["kl", "mse"] = "kl",
    tau: float = 0.07,
    mask_diagonal: bool = False,
    rows: slice | None = None,
) -> torch.Tensor:
    """Distance between a student similarity matrix and the teacher's counterpart (both raw
    cosines, B×B).

    - ``"kl"``: KL(softmax(S^T/τ) ‖ softmax(S^S/τ)) per row, mean over rows. No τ² factor: τ here
      turns cosines into logits, it does not soften existing logits.
    - ``"mse"``: mean squared difference of the raw cosine matrices.

    ``mask_diagonal`` drops the diagonal from both matrices first (each row keeps B−1 entries).
    For self-similarity matrices (Sim(X, X)) the diagonal is 1 on both sides and carries no
    information; at small τ it would also absorb almost all the softmax mass.

    ``rows``: the matrices given are those rows of the whole-batch matrices (b × B, module
    doc); only the position of the diagonal depends on it."""
    if mask_diagonal:
        n, width = student_sim.shape
        start = 0 if rows is None else rows.start
        keep = torch.ones((n, width), dtype=torch.bool, device=student_sim.device)
        keep[torch.arange(n, device=keep.device), torch.arange(start, start + n, device=keep.device)] = False
        student_sim = student_sim[keep].view(n, width - 1)
        teacher_sim = teacher_sim[keep].view(n, width - 1)
    if distance == "kl":
        return kl_divergence(teacher_sim / tau, student_sim / tau)
    if distance == "mse":
        return F.mse_loss(student_sim, teacher_sim)
    raise ValueError(f"unknown similarity distance {distance!r}; valid: 'kl', 'mse'")


def openclip_distill_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: torch.Tensor | float,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of open_clip's ``DistillClipLoss`` (single process): ``(contrastive, distill)``.

    contrastive = ½[CE(κ·V·Tᵀ, I) + CE(κ·T·Vᵀ, I)] on the student;
    distill = ½[CE(softmax(L^T_i2t), log_softmax(L^S_i2t)) + same for t2i], with the teacher
    ("dist") logits at the teacher's own scale. As in open_clip, ``logit_scale`` and
    ``dist_logit_scale`` are the **already-exponentiated** scales κ (no clamp here). ``rows``:
    the query rows of both directions (module doc), open_clip's ``local_loss``."""
    if rows is not None:
        labels = torch.arange(rows.start, rows.stop, device=image_features.device)
        per_image = logit_scale * image_features[rows] @ text_features.t()
        per_text = logit_scale * text_features[rows] @ image_features.t()
        dist_per_image = dist_logit_scale * dist_image_features[rows] @ dist_text_features.t()
        dist_per_text = dist_logit_scale * dist_text_features[rows] @ dist_image_features.t()
        contrastive = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        distill = 0.5 * (soft_cross_entropy(dist_per_image, per_image) + soft_cross_entropy(dist_per_text, per_text))
        return contrastive, distill
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logit_scale * text_features @ image_features.t()
    dist_logits_per_image = dist_logit_scale * dist_image_features @ dist_text_features.t()
    dist_logits_per_text = dist_logit_scale * dist_text_features @ dist_image_features.t()
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    contrastive = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    distill = 0.5 * (
        soft_cross_entropy(dist_logits_per_image, logits_per_image)
        + soft_cross_entropy(dist_logits_per_text, logits_per_text)
    )
    return contrastive, distill


def openclip_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """open_clip's ``DistillClipLoss`` summed: contrastive + distillation (see
    :func:`openclip_distill_terms`). Same argument order and convention as open_clip:
    student first, teacher ("dist") second, scales already exponentiated."""
    contrastive, distill = openclip_distill_terms(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
    )
    return contrastive + distill


# --- MCAD ------------------------------------------------------------------------------------------
def topk_pair_mask(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """(B_i, B_t) bool: each row's top-``k`` columns ∪ each column's top-``k`` rows.

    MCAD's ``fusion_pairs: topk`` scores only these pairs with the fusion teacher: a row's top-k
    are the captions its image distribution is decided on (i2t), a column's top-k the images
    of that caption's (t2i), so both distillation directions see fused scores where they matter."""
    rows = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    cols = similarity.topk(min(k, similarity.shape[0]), dim=0).indices
    mask = torch.zeros_like(similarity, dtype=torch.bool)
    mask.scatter_(1, rows, True)
    mask.scatter_(0, cols, True)
    return mask


def fused_similarity(
    dual_similarity: torch.Tensor,
    fusion_logits: torch.Tensor,
    mask: torch.Tensor,
    mu: float,
    standardise: Literal["dual", "unit"] = "dual",
) -> torch.Tensor:
    """MCAD's modified similarity Ŝ = S + μ·z(F) on the entries in ``mask`` (S elsewhere).

    z standardises the fusion logits over the masked entries of the batch (mean 0, then divided
    by their standard deviation, population form): ``"unit"`` stops there (std 1); ``"dual"``
    multiplies by the standard deviation of S over the same entries, so μ is a fraction of the
    dual similarities' own spread and the two terms are on one scale whatever the fusion
    teacher's logit range. A constant F (std 0) adds nothing. Entries of ``fusion_logits``
    outside ``mask`` are ignored."""
    if standardise not in ("dual", "unit"):
        raise ValueError(f"unknown standardise {standardise!r}; valid: 'dual', 'unit'")
    values = fusion_logits[mask]
    if values.numel() == 0:
        return dual_similarity
    spread = values.std(unbiased=False)
    if float(spread) == 0.0:
        return dual_similarity
    z = (fusion_logits - values.mean()) / spread
    if standardise == "dual":
        z = z * dual_similarity[mask].std(unbiased=False)
    return dual_similarity + mu * torch.where(mask, z, torch.zeros_like(z))


# --- DCD -------------------------------------------------------------------------------------------
def entropy_shares(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DCD's weights e_b = (Σ_k p_bk log p_bk) / Σ_b' Σ_k p_b'k log p_b'k, p_b = softmax(z_b):
    each query's share of the batch's teacher entropy (they sum to 1; an uncertain teacher row
    weighs more). When every row is one-hot (total entropy 0) all shares are equal, the limit
    of equal certainty."""
    log_p = F.log_softmax(teacher_logits.float(), dim=1)
    negative_entropy = (log_p.exp() * log_p).sum(dim=1)
    total = negative_entropy.sum()
    if float(total) == 0.0:
        return torch.full_like(negative_entropy, 1.0 / negative_entropy.numel())
    return negative_entropy / total


def dcd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    alpha: float = 0.2,
    temperature: float = 1.0,
    per_sample_kd_weight: bool = False,
    rows: slice | None = None,
    distill_targets: torch.Tensor | None = None,
    self_bias: torch.Tensor | float = 0.0,
    distill: str = "mse",
) -> dict[str, torch.Tensor]:
    """One direction of DCD on mined candidates; column 0 is each query's positive.

    ``distill_targets`` (same shape as ``teacher_logits``, default: them) is what the
    distillation MSE fits the student's scores to; the entropy shares always come from
    ``teacher_logits``. DCD's method passes the teacher's scores mapped onto the student's
    scale there, so a constant teacher shift cannot move the student's cosines. ``self_bias`` c
    is added to the student's scores in the self-learning BCE only.

    ``teacher_logits``, ``student_logits``: (B, K) scores of each query's K candidates.
    Returns ``{"loss", "distill", "self", "shares", "kd_weights"}``:

    - shares e_b: :func:`entropy_shares` of the teacher logits;
    - distillation d = T²·MSE(z/T, s/T) = MSE(z, s) (``distill="mse"``, the paper's: T cancels), or *[ours]*
      (``distill="kl"``) T²·KL(softmax(z/T) ‖ softmax(s/T)) over each query's K candidates: the
      teacher's ranking of them, not its score values; *[ours]* ``distill="kl-negatives"`` the same
      KL over the negatives only (columns 1.., each side renormalised without the positive:
      decoupled KD's non-target part, Zhao et al. 2022): the teacher's ranking of the negatives
      without how much mass it gives the positive. With ``per_sample_kd_weight`` (the paper):
      per-query term (MSE: mean over the K slots) weighted by r_b = softmax_b((1 − e_b)²) and summed. Without
      (the released code): the batch-mean MSE; the code multiplies that already batch-reduced
      value by per-sample weights that sum to 1, so the weights do nothing (r_b = 1/B here);
    - self-learning n = Σ_b e_b · BCEWithLogits(s_b + c, [1, 0, …, 0]) (mean over the K slots);
    - loss = α·d + (1 − α)·n.

    ``rows`` (module doc): ``teacher_logits`` covers the whole batch (the shares and KD weights
    are normalised over it), ``student_logits`` only these rows; d and n, sums over queries,
    are then these rows' part scaled by B/len(rows), so their mean over processes is the
    whole-batch value. ``shares``/``kd_weights`` are returned for the whole batch."""
    expected = teacher_logits.shape if rows is None else (rows.stop - rows.start, teacher_logits.shape[1])
    if tuple(student_logits.shape) != tuple(expected) or teacher_logits.dim() != 2:
        raise ValueError(f"teacher and student candidate logits differ: {teacher_logits.shape}, {student_logits.shape}")
    shares = entropy_shares(teacher_logits).to(student_logits.dtype)
    if per_sample_kd_weight:
        kd_weights = torch.softmax((1.0 - shares) ** 2, dim=0)
    else:
        kd_weights = torch.full_like(shares, 1.0 / shares.numel())
    rows = _query_rows(teacher_logits.shape[0], rows)
    share_factor = teacher_logits.shape[0] / (rows.stop - rows.start)
    targets_all = teacher_logits if distill_targets is None else distill_targets
    if targets_all.shape != teacher_logits.shape:
        raise ValueError(
            f"distill_targets {tuple(targets_all.shape)} differ from teacher_logits {tuple(teacher_logits.shape)}"
        )
    teacher_rows = targets_all[rows]
    if distill == "mse":
        per_query = ((teacher_rows - student_logits) ** 2).mean(dim=1)  # T²·MSE(z/T, s/T) = MSE(z, s)
    elif distill in ("kl", "kl-negatives"):
        # kl-negatives: the positive (column 0) left out of both distributions, so the teacher's
        # ranking of the negatives is distilled but not how much mass it gives the positive
        first = 1 if distill == "kl-negatives" else 0
        target_log = F.log_softmax(teacher_rows[:, first:] / temperature, dim=1)
        student_log = F.log_softmax(student_logits[:, first:] / temperature, dim=1)
        per_query = (target_log.exp() * (target_log - student_log)).sum(dim=1) * temperature**2
    else:
        raise ValueError(f"dcd_loss distill must be 'mse', 'kl' or 'kl-negatives', got {distill!r}")
    distill = (kd_weights[rows] * per_query).sum() * share_factor
    targets = torch.zeros_like(student_logits)
    targets[:, 0] = 1.0
    bce = F.binary_cross_entropy_with_logits(student_logits + self_bias, targets, reduction="none").mean(dim=1)
    self_learning = (shares[rows] * bce).sum() * share_factor
    return {
        "loss": alpha * distill + (1.0 - alpha) * self_learning,
        "distill": distill,
        "self": self_learning,
        "shares": shares,
        "kd_weights": kd_weights,
    }


# --- ComKD -----------------------------------------------------------------------------------------
def moment_alignment(features: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """ComKD's IFAlign: |μ_d(x) − μ_d(y)| + |σ²_d(x) − σ²_d(y)|, mean and (population) variance
    of each feature dimension d over the batch, summed over dimensions (``reduction="sum"``, as
    the paper writes it) or averaged (``"mean"``, *[ours]*: a gradient that does not grow with d)."""
    if features.shape[1] != target.shape[1]:
        raise ValueError(f"feature dims differ: {features.shape[1]} vs {target.shape[1]}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"moment_alignment reduction must be 'sum' or 'mean', got {reduction!r}")
    mean_gap = (features.mean(dim=0) - target.mean(dim=0)).abs()
    var_gap = (features.var(dim=0, unbiased=False) - target.var(dim=0, unbiased=False)).abs()
    gaps = mean_gap + var_gap
    return gaps.sum() if reduction == "sum" else gaps.mean()


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q·Kᵀ / scale)·V: ComKD's EduAttention read-out (scale C, default √d)."""
    return torch.softmax(queries @ keys.t() / scale, dim=1) @ values
