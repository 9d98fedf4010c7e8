"""Train the ``fusion:`` teacher: image-text matching on hard negatives mined by the dual teacher.

The dual teacher is frozen, so its raw token features for every training image (× k replayed
augmentations) and every distinct caption are computed once; a step then costs only the small
fusion head. Each step takes a batch of images, pairs each with one of its captions, and adds
``negatives`` hard negatives per direction: captions drawn from the image's top-``mine_top``
captions by the dual teacher, and images drawn from the caption's top-``mine_top`` images. A
caption that is the same text as one of the image's own captions is never a negative (generic
captions such as "flag" belong to many images). The default loss (``loss: listwise``) is a
softmax cross-entropy of each caption's own image against its hard-negative images on the
match logit (re-ranking orders a short list); ``loss: bce`` is the class-balanced binary
cross-entropy of 2-way ITM with one logit. The heads loss trains g, h (see
:func:`train_fusion_teacher`).

The epoch kept is the trained one whose validation re-ranking (dual top-``rerank_k`` re-ordered
by the fusion logit) has the best text→image recall, never the initialisation (measured as the
summary's ``initial_val``); the summary reports dual vs re-ranked recall on val and, when there
is one, on test.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipdistill.data.dataset import PairedDataset
from clipdistill.distill.losses import clip_loss
from clipdistill.eval.rerank import rerank_from_states
from clipdistill.io import append_jsonl, atomic_write_json
from clipdistill.models.encoding_memo import EncodingMemo, attach_encoding_memo
from clipdistill.models.fusion import (
    HEADS_INPUTS,
    FusionConfig,
    FusionEncoder,
    FusionError,
    FusionStates,
    dual_token_geometry,
    save_fusion_encoder,
    score_pairs,
)
from clipdistill.train.fusion_split import Augmentation, EncodedSplit, encode_split
from clipdistill.train.schedule import AdamWSettings, build_optimizer, seed_everything, update


@dataclass(frozen=True)
class FusionTrainConfig:
    """Architecture, mining and budget of a fusion-teacher run (defaults sized for the emoji set)."""

    width: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    match: str = "pool"  # FusionConfig.match: "pool" re-pools the dual cosine, "cross" adds a learned correction
    loss: str = "listwise"  # "listwise": softmax CE over a caption's candidates; "bce": pointwise ITM
    epochs: int = 8
    batch_size: int = 64  # listwise: captions per step; bce: images per step
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    mine_top: int = 64  # hard negatives are drawn from each query's top-64 by the dual teacher
    negatives: int = 31  # hard negatives per positive (bce: per direction); listwise lists are 1 + 31 images
    heads_lambda: float = 0.3  # λ in norm(v + λ·g(f)) while training g, h (MCAD's default λ)
    w_heads: float = 1.0  # weight of the heads loss; 0 leaves g, h untrained
    heads_input: str = "own"  # FusionConfig.heads_input: g from the image alone, h from the caption alone
    rerank_k: int = 16
    k_augmentations: int = 4  # replayed augmentations per training image (0 = the plain image)
    aug_seed: int = 0
    aug_scale: tuple[float, float] = (0.8, 1.0)
    aug_max_shift: float = 0.1
    image_size: int | None = None  # decode size; default: the dual teacher's input size
    encode_batch_size: int = 256
    seed: int = 0
    # Wall-clock budget of the whole run (encoding included), checked after every step: the run
    # stops at the first step past it and still validates that (partial) epoch.
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "mine_top", "negatives", "rerank_k", "k_augmentations"):
            if getattr(self, name) < 1:
                raise FusionError(f"fusion training option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.loss not in ("listwise", "bce"):
            raise FusionError(f"fusion training option 'loss' must be 'listwise' or 'bce', got {self.loss!r}")
        if self.heads_input not in HEADS_INPUTS:
            raise FusionError(
                f"fusion training option 'heads_input' must be one of {', '.join(map(repr, HEADS_INPUTS))}, "
                f"got {self.heads_input!r}"
            )
        if self.batch_size < 2:
            raise FusionError(f"fusion training option 'batch_size' must be >= 2, got {self.batch_size}")

    def augmentation(self) -> Augmentation:
        return Augmentation(self.aug_seed, self.aug_scale, self.aug_max_shift)


def _mine(
    scores: torch.Tensor, excluded: list[set[int]], top: int, what: str, most_excluded: int | None = None
) -> torch.Tensor:
    """Per row, the ``top`` highest-scoring columns not in ``excluded[row]`` (the row's positives).
    ``most_excluded``: the largest ``excluded`` set of the whole matrix, when ``scores`` is a block
    of its rows (so every block ranks as many columns as the whole would)."""
    n_columns = scores.shape[1]
    if most_excluded is None:
        most_excluded = max((len(e) for e in excluded), default=0)
    available = n_columns - most_excluded
    if available < 1:
        raise FusionError(f"too few distinct {what} to mine hard negatives from ({n_columns}, every one a positive)")
    top = min(top, available)
    ranked = scores.topk(min(n_columns, top + most_excluded), dim=1).indices.tolist()
    return torch.tensor(
        [[c for c in row if c not in skip][:top] for row, skip in zip(ranked, excluded, strict=True)],
        device=scores.device,
    )


def _mine_blocks(
    queries: torch.Tensor, keys: torch.Tensor, excluded: list[set[int]], top: int, what: str, block: int = 1024
) -> torch.Tensor:
    """:func:`_mine` over the scores ``queries @ keys.T``, ``block`` query rows at a time: the whole
    matrix is images x distinct captions, 0.6 GB for 7k images and four times that for twice the
    images. Each block's scores are the whole matrix's rows, bit for bit (tested)."""
    most = max((len(e) for e in excluded), default=0)
    parts = [
        _mine(queries[start : start + block] @ keys.t(), excluded[start : start + block], top, what, most)
        for start in range(0, len(queries), block)
    ]
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.long, device=queries.device)


def _states(
    encoder: FusionEncoder, data: EncodedSplit, rows: torch.Tensor, distinct: torch.Tensor, logits_only: bool = False
) -> FusionStates:
    """States of image rows ``rows`` and distinct captions ``distinct``. ``logits_only`` (a
    ``match="pool"`` encoder with precomputed patches, scored without pooled features): the
    image's trained half, which such a logit never reads, is NaN instead of projected from the
    raw 1280-wide tokens, which saves gathering and projecting them in every listwise step, and
    NaN makes any read of that half loud."""
    hidden, mask = data.text_batch(distinct)
    if logits_only and encoder.config.match == "pool" and data.image_patches is not None:
        patches = data.image_patches[rows]
        unread = patches.new_full((*patches.shape[:2], encoder.config.width), float("nan"))
        image = torch.cat([unread, patches], dim=-1)
    else:
        image = encoder.project_image(
            data.image_tokens[rows], None if data.image_patches is None else data.image_patches[rows]
        )
    return FusionStates(
        image=image,
        image_global=data.image_global[rows],
        text=encoder.project_text(hidden, mask),
        text_mask=mask,
        text_global=data.text_global[distinct],
    )


@torch.no_grad()
def _rerank(encoder: FusionEncoder, data: EncodedSplit, k: int) -> dict[str, Any]:
    """Re-ranking on a split encoded with one (plain) image row per image."""
    encoder.eval()
    states = _states(encoder, data, torch.arange(len(data.image_tokens)), data.caption_text)

    def score(s: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return score_pairs(encoder, s, image_index, text_index)[0]

    result = rerank_from_states(states, data.text_to_image, score, k=k)
    result["fusion_dual_corr"] = _fusion_dual_corr(encoder, states, data.text_to_image)
    return result


@torch.no_grad()
def _fusion_dual_corr(
    encoder: FusionEncoder, states: FusionStates, text_to_image: torch.Tensor, batch: int = 128, batches: int = 8
) -> float:
    """Mean over ``batches`` random batches of ``batch`` (image, caption) pairs of corr(F, S) over
    all B² pairs: what MCAD folds into its similarities (z standardising is affine, so this is
    corr(z(F), S)). Near 1 the fusion logit is an affine function of the dual cosine and adds only
    a sharper temperature. Seeded, so it does not move the training RNG."""
    from clipdistill.distill.methods.mcad import pearson

    generator = torch.Generator().manual_seed(0)
    n = len(text_to_image)
    values = []
    for _ in range(batches):
        captions = torch.randperm(n, generator=generator)[: min(batch, n)].to(text_to_image.device)
        images = text_to_image[captions]
        index = torch.arange(len(captions), device=images.device)
        image_index, text_index = index.repeat_interleave(len(captions)), index.repeat(len(captions))
        # in chunks of 1,024 pairs: at the default 4,096 the gathered patches took 0.3 GB
        logits = score_pairs(encoder, states, images[image_index], captions[text_index], chunk=1024)[0]
        dual = (states.image_global[images[image_index]] * states.text_global[captions[text_index]]).sum(-1)
        values.append(pearson(logits, dual))
    return round(sum(values) / len(values), 4)


def _heads_loss(
    encoder: FusionEncoder,
    config: FusionTrainConfig,
    states: FusionStates,
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    dual_image: torch.Tensor,
    dual_text: torch.Tensor,
) -> torch.Tensor:
    """Clip loss of (norm(v + λ·norm(g_i)), norm(t + λ·norm(h_i))) over the matched pairs (one per
    distinct image), at the dual teacher's scale: g, h learn the nudges that help each item find
    its partner *among the other items of the batch*. *[ours]* With ``heads_input="own"`` g_i
    sees only image i's states and h_i only caption i's, so the loss can only be lowered by what
    each side says alone. Any path from one side into the other head is a shortcut the loss takes:
    with ``"sides"`` h_i reads caption i's cross-attention against image i, and ĝ_i, ĥ_i learn a
    shared code of the image; with ``"pair"`` both read the pair feature f, and the loss is
    minimised by g_i = h_i = one large code of the pair. g, h are
    unit-normalised as MCAD uses them, so λ keeps the nudge bounded. With ``match="cross"`` the
    states are detached, so the heads loss leaves the match logit a pure ITM score."""
    if encoder.config.match == "cross":
        states = FusionStates(
            *(
                value.detach()
                for value in (states.image, states.image_global, states.text, states.text_mask, states.text_global)
            )
        )
    g, h = encoder.pair_heads(states, image_local, text_local)
    image_hat = F.normalize(dual_image + config.heads_lambda * F.normalize(g, dim=-1), dim=-1)
    text_hat = F.normalize(dual_text + config.heads_lambda * F.normalize(h, dim=-1), dim=-1)
    log_scale = torch.tensor(float(encoder.config.dual_logit_scale), device=dual_image.device).log()
    return clip_loss(image_hat, text_hat, log_scale)


def _listwise_step(
    encoder: FusionEncoder,
    data: EncodedSplit,
    config: FusionTrainConfig,
    captions: torch.Tensor,
    hard_images: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(listwise loss, heads loss)`` for a batch of caption indices.

    Each caption's list is its image and ``negatives`` images drawn from its top-``mine_top`` by
    the dual teacher, each in a random replayed augmentation; the loss is the softmax cross-entropy
    of the positive over the list. Re-ranking orders a short list, so this is the loss it is
    judged by (the pointwise BCE also rewards shifting every score, which ranks nothing). The heads
    loss trains f (not detached: with ``match="pool"`` f serves only g, h) and g, h on the
    matched pairs, one per distinct image of the batch (clip loss needs distinct rows)."""
    device = data.image_global.device
    k = data.k
    captions = captions.to(device)
    texts, images = data.caption_text[captions], data.text_to_image[captions]
    b, n = len(captions), min(config.negatives, hard_images.shape[1])
    choose = torch.rand(b, hard_images.shape[1], generator=generator).argsort(dim=1)[:, :n].to(device)
    candidates = torch.cat([images[:, None], hard_images[texts].gather(1, choose)], dim=1)  # positive first
    rows = candidates * k + torch.randint(0, k, candidates.shape, generator=generator).to(device)
    all_rows, row_local = torch.unique(rows.reshape(-1), return_inverse=True)
    all_texts, text_local = torch.unique(texts, return_inverse=True)
    pool = encoder.config.match == "pool"
    # With match="pool" the logit reads only the frozen dual-space half of the states (words,
    # patches); the trained half serves the heads loss of one pair per image. Projecting every
    # candidate row with gradients would be work wasted on rows that loss never reads.
    with torch.no_grad() if pool else contextlib.nullcontext():
        states = _states(encoder, data, all_rows, all_texts, logits_only=True)
    logits, _ = score_pairs(encoder, states, row_local, text_local.repeat_interleave(candidates.shape[1]))
    itm = F.cross_entropy(logits.view(b, -1), torch.zeros(b, dtype=torch.long, device=device))
    heads = torch.zeros((), device=device)
    if config.w_heads > 0:
        unique, inverse = torch.unique(images, return_inverse=True)
        first = torch.full((len(unique),), b, device=device).scatter_reduce(
            0, inverse, torch.arange(b, device=device), "amin"
        )
        if pool:
            head_states = _states(encoder, data, rows[first, 0], texts[first])
            image_local = text_local_heads = torch.arange(len(first), device=device)
        else:
            head_states, image_local, text_local_heads = states, row_local.view(b, -1)[first, 0], text_local[first]
        heads = _heads_loss(
            encoder,
            config,
            head_states,
            image_local,
            text_local_heads,
            data.image_global[rows[first, 0]],
            data.text_global[texts[first]],
        )
    return itm, heads


def _bce_step(
    encoder: FusionEncoder,
    data: EncodedSplit,
    config: FusionTrainConfig,
    images: torch.Tensor,
    mined: tuple[torch.Tensor, torch.Tensor],
    first_caption: torch.Tensor,
    counts: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pointwise BCE loss, heads loss)`` for a batch of image indices: each image's positive
    caption and ``negatives`` hard captions, each caption's image and ``negatives`` hard images
    (``mined`` = the dual teacher's hard texts per image, hard images per text), as separate pairs."""
    device = data.image_global.device
    k, n = data.k, config.negatives
    hard_texts, hard_images = mined
    b = len(images)
    pick = (torch.rand(b, generator=generator) * counts[images]).long()
    positive_text = data.caption_text[(first_caption[images] + pick).to(device)]
    images_d = images.to(device)
    rows = images_d * k + torch.randint(0, k, (b,), generator=generator).to(device)
    choose_t = torch.rand(b, hard_texts.shape[1], generator=generator).argsort(dim=1)[:, :n].to(device)
    negative_text = hard_texts[images_d].gather(1, choose_t)  # (b, ≤n)
    choose_i = torch.rand(b, hard_images.shape[1], generator=generator).argsort(dim=1)[:, :n].to(device)
    negative_images = hard_images[positive_text].gather(1, choose_i)
    negative_rows = negative_images * k + torch.randint(0, k, negative_images.shape, generator=generator).to(device)
    n_t, n_i = negative_text.shape[1], negative_rows.shape[1]

    all_rows, row_local = torch.unique(torch.cat([rows, negative_rows.reshape(-1)]), return_inverse=True)
    all_texts, text_local = torch.unique(torch.cat([positive_text, negative_text.reshape(-1)]), return_inverse=True)
    pos_row, neg_row = row_local[:b], row_local[b:].view(b, n_i)
    pos_text, neg_text = text_local[:b], text_local[b:].view(b, n_t)
    image_index = torch.cat([pos_row, pos_row.repeat_interleave(n_t), neg_row.reshape(-1)])
    text_index = torch.cat([pos_text, neg_text.reshape(-1), pos_text.repeat_interleave(n_i)])
    states = _states(encoder, data, all_rows, all_texts)
    logits, _ = score_pairs(encoder, states, image_index, text_index)
    positive_logits, negative_logits = logits[:b], logits[b:]
    itm = 0.5 * (
        F.binary_cross_entropy_with_logits(positive_logits, torch.ones_like(positive_logits))
        + F.binary_cross_entropy_with_logits(negative_logits, torch.zeros_like(negative_logits))
    )
    heads = torch.zeros((), device=device)
    if config.w_heads > 0:
        heads = _heads_loss(
            encoder, config, states, pos_row, pos_text, data.image_global[rows], data.text_global[positive_text]
        )
    return itm, heads


def _selection_key(result: dict[str, Any]) -> tuple[float, float, float]:
    after = result["reranked"]
    return (after["t2i_R@1"], after["t2i_R@5"], after["t2i_R@10"])


def _absolute_spec(spec: str) -> str:
    """Path specs made absolute so the fusion folder finds its dual teacher from any directory."""
    from clipdistill.models.spec import parse_spec

    parsed = parse_spec(spec)
    if parsed.schema in ("run", "local-dir") and Path(parsed.name).exists():
        return f"{parsed.schema}:{Path(parsed.name).resolve()}"
    return str(parsed)


def train_fusion_teacher(
    teacher_spec: str,
    dataset: PairedDataset,
    out: str | Path,
    config: FusionTrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    allow_random_teacher: bool = False,
    encoding_memo: EncodingMemo | None = None,
) -> dict[str, Any]:
    """Train a ``fusion:`` teacher on the ``train`` split over the dual teacher ``teacher_spec``.
    ``encoding_memo``: rows of the dual teacher's frozen towers shared with the run's other stages.

    Loss per step: ``itm`` (listwise CE over a caption's candidates, or ½[BCE(positives, 1) +
    BCE(hard negatives, 0)]) on the match logit, plus ``w_heads`` · the heads loss
    (:func:`_heads_loss`: a clip loss of (norm(v + λ·ĝ), norm(t + λ·ĥ)) over the batch's matched
    pairs, by default g from the image alone and h from the caption alone, so a code of the pair
    cannot win). The summary's ``fusion_dual_corr`` (val, test) is corr(F, S) over random batches,
    its ``gain_R@1_ci95`` the re-ranking gain's 95% interval (paired bootstrap over the caption
    queries). The dual cosine's weight starts at the dual teacher's κ and its bias at minus κ times
    the midpoint of positive and hard-negative cosines, so the untrained head already ranks
    exactly like the dual teacher. Under the listwise loss the bias stays there (frozen): a
    constant shift of a caption's candidates changes no softmax, so it would get no gradient and
    only weight decay would move it.

    Writes ``out/fusion_config.json`` (with the ``training`` record of the kept epoch: ``epoch``,
    ``steps`` up to it, ``epochs_run``, ``w_heads``; methods refuse a head with no steps, and MCAD
    does not distil heads trained at ``w_heads`` 0) + ``fusion.safetensors``
    (load with ``fusion:out``), ``log.jsonl`` (per epoch), ``train_config.json`` and
    ``train_summary.json``; returns the summary.

    A dual teacher without trained weights (``openclip:NAME`` with no tag, ``lit:``) is refused
    unless ``allow_random_teacher`` (:func:`~clipdistill.models.teachers.check_teacher_weights`).
    """
    from clipdistill.device import resolve_device
    from clipdistill.distill.cache import teacher_fingerprint
    from clipdistill.models.teachers import check_teacher_weights, load_model

    config = config or FusionTrainConfig()
    torch_device = resolve_device(str(device))
    out = Path(out)
    started = time.perf_counter()
    generator = seed_everything(config.seed)

    dual_spec = _absolute_spec(teacher_spec)
    check_teacher_weights(dual_spec, allow_random=allow_random_teacher)
    dual = attach_encoding_memo(load_model(dual_spec, device=torch_device), encoding_memo)
    dual.requires_grad_(False)
    geometry = dual_token_geometry(dual)
    height, width = dual.image_size
    image_size = config.image_size or int(height)
    if config.image_size is None and height != width:
        raise FusionError(f"dual teacher {dual_spec} takes {height}x{width} images; set image_size explicitly")

    train, val = dataset.split("train"), dataset.split("val")
    data = encode_split(
        dual, train, config.augmentation(), config.encode_batch_size, image_size, config.k_augmentations, progress
    )
    val_data = encode_split(dual, val, config.augmentation(), config.encode_batch_size, image_size, 1, progress)
    kappa = float(dual.logit_scale.detach().exp().clamp(max=100.0))
    fusion_config = FusionConfig(
        dual_spec=dual_spec,
        dual_fingerprint=teacher_fingerprint(dual_spec),
        dual_logit_scale=kappa,
        width=config.width,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        match=config.match,
        heads_input=config.heads_input,
        **geometry,
    )
    encoder = FusionEncoder(fusion_config, dual).to(torch_device)
    if config.match == "pool":
        encoder.copy_dual_heads(dual)
    data.add_patches(encoder)
    val_data.add_patches(encoder)

    # Hard negatives by the dual teacher, mined once on the plain images (augmentation 0).
    n_images, k = len(train), config.k_augmentations
    plain = data.image_global[torch.arange(n_images, device=torch_device) * k]
    owner = data.text_to_image.tolist()
    texts_of_image: list[set[int]] = [set() for _ in range(n_images)]
    images_of_text: list[set[int]] = [set() for _ in range(len(data.texts))]
    for caption, u in enumerate(data.caption_text.tolist()):
        texts_of_image[owner[caption]].add(u)
        images_of_text[u].add(owner[caption])
    hard_texts = _mine_blocks(plain, data.text_global, texts_of_image, config.mine_top, "captions")
    hard_images = _mine_blocks(data.text_global, plain, images_of_text, config.mine_top, "images")
    first_caption = torch.zeros(n_images, dtype=torch.long)
    counts = torch.bincount(data.text_to_image.cpu(), minlength=n_images)
    first_caption[1:] = torch.cumsum(counts, 0)[:-1]

    with torch.no_grad():  # centre the dual term: positives above 0, hard negatives below
        positive_cos = (plain[data.text_to_image] * data.text_global[data.caption_text]).sum(-1).mean()
        negative_cos = (plain[:, None, :] * data.text_global[hard_texts]).sum(-1).mean()
        encoder.dual_bias.fill_(-kappa * float(positive_cos + negative_cos) / 2)
    listwise = config.loss == "listwise"
    encoder.dual_bias.requires_grad_(not listwise)  # listwise: no gradient, so the offset stays the centring

    batch_size = min(config.batch_size, n_images)
    n_captions = len(data.caption_text)
    steps_per_epoch = max(1, (n_captions if listwise else n_images) // batch_size)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(
        trainable,
        AdamWSettings(lr=config.lr, weight_decay=config.weight_decay),
        config.warmup_steps,
        steps_per_epoch * config.epochs,
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "train_config.json", {"teacher": dual_spec, **asdict(config)})
    log_path = out / "log.jsonl"
    log_path.unlink(missing_ok=True)

    # The untrained head is measured (the summary's ``initial_val``) but never kept: a fusion
    # teacher is a trained one, so the best of the trained epochs is kept even when the
    # initialisation (which ranks like the dual teacher) re-ranks val better.
    initial = _rerank(encoder, val_data, config.rerank_k)
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] = {}
    total_steps = 0
    epochs: Any = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="fusion teacher", unit="epoch")
    for epoch in epochs:
        encoder.train()
        order = torch.randperm(n_captions if listwise else n_images, generator=generator)
        totals = {"itm_loss": 0.0, "heads_loss": 0.0}
        steps_done, out_of_time = 0, False
        for step in range(steps_per_epoch):
            if steps_done and config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                out_of_time = True
                break
            steps_done += 1
            if listwise:
                itm, heads = _listwise_step(
                    encoder, data, config, order[step * batch_size : (step + 1) * batch_size], hard_images, generator
                )
            else:  # bce: both directions, positives and negatives as separate pairs
                itm, heads = _bce_step(
                    encoder,
                    data,
                    config,
                    order[step * batch_size : (step + 1) * batch_size],
                    (hard_texts, hard_images),
                    first_caption,
                    counts,
                    generator,
                )
            loss = itm + config.w_heads * heads
            update(loss, optimizer, scheduler, config.grad_clip)
            totals["itm_loss"] += float(itm.detach())
            totals["heads_loss"] += float(heads.detach())
        total_steps += steps_done
        result = _rerank(encoder, val_data, config.rerank_k)
        elapsed = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            **{key: value / steps_done for key, value in totals.items()},
            "steps": steps_done,
            "val": result,
            "seconds": round(elapsed, 2),
        }
        append_jsonl(log_path, record)
        if progress:
            epochs.set_postfix(itm=f"{record['itm_loss']:.3f}", val_R1=f"{result['reranked']['t2i_R@1']:.1f}")
        if best is None or _selection_key(result) > _selection_key(best["val"]):
            best = {"epoch": epoch + 1, "val": result, "steps": total_steps}
            best_state = {name: value.clone() for name, value in encoder.head_state().items()}
        if out_of_time or (config.max_seconds is not None and elapsed > config.max_seconds):
            break

    assert best is not None  # epochs >= 1 (FusionTrainConfig) and every epoch takes a step
    encoder.load_state_dict(best_state, strict=False)
    encoder.eval()
    encoder.training_record = {
        "epoch": best["epoch"],
        "steps": best["steps"],
        "epochs_run": record["epoch"],
        "w_heads": config.w_heads,  # 0: g, h never trained (MCAD then distils the dual features)
    }
    save_fusion_encoder(encoder, out)
    summary: dict[str, Any] = {
        "teacher": dual_spec,
        "best_epoch": best["epoch"],
        "initial_val": initial,
        "val": best["val"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "model": f"fusion:{out}",
    }
    if "test" in dataset.split_counts():
        test_data = encode_split(
            dual, dataset.split("test"), config.augmentation(), config.encode_batch_size, image_size, 1, progress=False
        )
        test_data.add_patches(encoder)
        summary["test"] = _rerank(encoder, test_data, config.rerank_k)
    atomic_write_json(out / "train_summary.json", summary)
    return summary
