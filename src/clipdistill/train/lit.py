"""Train the offline LiT teacher: a timm image tower against frozen MiniLM text features.

Because the text tower is locked, every caption's MiniLM feature is computed once before
training; a step then costs one image-tower forward/backward, which is what lets a useful
teacher train in a few minutes on two CPU cores. Each step pairs every image with one of its
captions drawn at random, so all captions are used over the epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from clipdistill.data.augment import random_scale_translate, replay_augmentation
from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.distill.losses import clip_loss
from clipdistill.eval.embed import embed_images
from clipdistill.eval.retrieval import recall_at_k
from clipdistill.io import append_jsonl, atomic_write_json
from clipdistill.models.encoding_memo import EncodingMemo, attach_encoding_memo
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.models.trunk_split import stack_rows
from clipdistill.train.schedule import AdamWSettings, build_optimizer, seed_everything, update

if TYPE_CHECKING:
    from clipdistill.run_config import RunTeacherConfig


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Budget and optimiser of the LiT teacher run (defaults: the scratch budget chosen on the
    emoji set, docs/results.md, "Teacher")."""

    model: LiTConfig = field(default_factory=LiTConfig)
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    augment: bool = True
    aug_scale: tuple[float, float] = (0.8, 1.0)  # zoom range of random_scale_translate (<1 zooms in)
    aug_shift: float = 0.1  # largest shift, as a fraction of the image size
    channels_last: bool = True  # NHWC convolutions: faster on CPU for ResNet towers (docs/results.md, "Teacher")
    multi_positive: bool = True  # identical captions of different images in a batch are all positives
    seed: int = 0
    max_seconds: float | None = None  # stop early (after a full epoch) when the budget is spent
    # With frozen leading stages (pretrained trunks), the frozen part's output is computed once
    # for this many augmented views of every train image (view 0 unaugmented) and each step
    # draws one view per image: a step then costs only the trained stages.
    frozen_views: int = 2
    # Those views are augmentation 0..frozen_views-1 of replay_augmentation (0 = the plain image)
    # with this seed and aug_scale/aug_shift: the views the teacher cache replays (same defaults),
    # so with a shared EncodingMemo the cache and the fusion teacher find their frozen rows computed.
    aug_seed: int = 0
    # Size the images are decoded at before the model resizes them to its input size; None: the
    # input size. The demo decodes at the cache's size for the same reason as aug_seed.
    decode_size: int | None = None


#: The default teacher: the ImageNet EfficientNet-Lite0 trunk at its native 224 px with the stem
#: and stages 0-4 frozen, aligned to frozen MiniLM (docs/results.md, "Teacher").
DEFAULT_TEACHER_SPEC = "lit:efficientnet-lite0"
DEFAULT_FROZEN_STAGES = 5
PRETRAINED_EPOCHS = 8
PRETRAINED_LR = 2e-3


def _lit_model_config(spec: str, frozen_stages: int) -> LiTConfig:
    """The LiT architecture of a ``lit:TRUNK[@SIZE]`` spec; any other spec is refused."""
    from clipdistill.models.lit import lit_config_from_spec
    from clipdistill.models.spec import ModelSpecError, parse_spec

    parsed = parse_spec(spec)
    if parsed.schema != "lit":
        raise ModelSpecError(f"{spec!r}: a trained teacher starts from a lit:TRUNK[@SIZE] architecture")
    try:
        return lit_config_from_spec(parsed.name, frozen_stages=frozen_stages)
    except ValueError as error:
        raise ModelSpecError(f"{spec!r}: {error}") from error


def pretrained_teacher_config(
    spec: str = DEFAULT_TEACHER_SPEC, frozen_stages: int = DEFAULT_FROZEN_STAGES
) -> TeacherTrainConfig:
    """The training run of a ``lit:WEIGHTS[@SIZE]`` teacher: what `teacher train` does by default.
    Only the upper stages and the head train, from ImageNet weights, so fewer epochs at a lower
    lr than the scratch defaults of :class:`TeacherTrainConfig` suffice."""
    return TeacherTrainConfig(model=_lit_model_config(spec, frozen_stages), epochs=PRETRAINED_EPOCHS, lr=PRETRAINED_LR)


def teacher_train_config(spec: str, frozen_stages: int | None = None) -> TeacherTrainConfig:
    """The training run of any ``lit:TRUNK[@SIZE][+TEXT]`` spec with its defaults: a pretrained trunk
    gets :func:`pretrained_teacher_config` (stages 0-4 frozen), a timm trunk trained from scratch
    :class:`TeacherTrainConfig`'s own budget (nothing frozen). ``frozen_stages`` overrides."""
    from clipdistill.models.imagenet_lite import LITE_VARIANTS
    from clipdistill.models.lit import split_lit_spec
    from clipdistill.models.spec import parse_spec

    parsed = parse_spec(spec)
    if parsed.schema == "lit" and split_lit_spec(parsed.name)[0] in LITE_VARIANTS:
        return pretrained_teacher_config(spec, DEFAULT_FROZEN_STAGES if frozen_stages is None else frozen_stages)
    return TeacherTrainConfig(model=_lit_model_config(spec, frozen_stages or 0))


def run_teacher_train_config(teacher: RunTeacherConfig, decode_size: int | None = None) -> TeacherTrainConfig:
    """How a ``clipdistill distill``/``demo`` run trains its ``lit:`` teacher: the defaults of
    :func:`teacher_train_config` for the spec, with the run's ``teacher.*`` keys that are set,
    so a preset and ``teacher train`` with the same options train the same teacher."""
    defaults = teacher_train_config(teacher.spec, teacher.frozen_stages)
    model = defaults.model if teacher.text_proj is None else replace(defaults.model, text_proj=teacher.text_proj)
    budget = {"epochs": teacher.epochs, "lr": teacher.lr}
    return replace(
        defaults,
        model=model,
        max_seconds=teacher.max_seconds,
        decode_size=decode_size,
        **{key: value for key, value in budget.items() if value is not None},
    )


@torch.no_grad()
def _minilm_features(model: LiTModel, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    """MiniLM features of ``texts`` (row-aligned). Each distinct caption is encoded once, and
    captions are batched in length order so padding-to-longest wastes almost nothing: this
    pass is a fixed cost inside the teacher's time budget."""
    unique = sorted(set(texts), key=lambda text: (len(text), text))
    chunks = [
        model.minilm_features(model.tokenize(unique[i : i + batch_size])) for i in range(0, len(unique), batch_size)
    ]
    features = torch.cat(chunks)
    row = {text: i for i, text in enumerate(unique)}
    return features[torch.tensor([row[text] for text in texts], dtype=torch.long)]


def _multi_positive_clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where rows with the same caption are all positives of each other.

    Generic captions ("a flag emoji") belong to many images; with one-hot targets a batch
    holding two of them pushes each image away from its own caption. Targets here spread the
    mass uniformly over all identical captions, which reduces to ``clip_loss`` without repeats.
    """
    logits = logit_scale.exp().clamp(max=100.0) * image @ text.t()
    same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


@torch.no_grad()
def _evaluate(model: LiTModel, images: torch.Tensor, text_features: torch.Tensor, text_to_image: list[int]) -> dict:
    """Recall@K from uint8 pixels, or from precomputed frozen features (float) when given those."""
    model.eval()
    if images.is_floating_point():
        image_emb = torch.cat([model.encode_from_frozen(images[i : i + 256]) for i in range(0, len(images), 256)])
    else:
        image_emb = embed_images(model, images)
    text_emb = F.normalize(model.text_proj(text_features), dim=-1)
    return recall_at_k(image_emb, text_emb, text_to_image)


def _augment(pixels: torch.Tensor, config: TeacherTrainConfig, generator: torch.Generator) -> torch.Tensor:
    return random_scale_translate(pixels, scale=config.aug_scale, max_shift=config.aug_shift, generator=generator)


class FrozenBank:
    """The frozen stages' output for ``views`` augmented views of every train image: view v of
    an image is its replayed augmentation v (0 = as it is). Computed once, so the (dominant)
    cost of the early high-resolution stages is paid ``views`` times per image instead of once
    per epoch. With an encoding memo attached the bank holds the rows' keys and reads each batch
    back from the memo (most rows on disk): the rows are 0.5 GB for the emoji train split at
    224 px and grow with the images; without one it holds the rows."""

    def __init__(self, views: list[list[Any]], read: Callable[[list[Any]], list[torch.Tensor]]) -> None:
        self.views = views
        self.read = read

    def __len__(self) -> int:
        return len(self.views)

    def gather(self, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows ``views[view[i]][index[i]]`` as one channels-last batch (the trunk's layout)."""
        return stack_rows(self.read([self.views[v][i] for v, i in zip(view.tolist(), index.tolist(), strict=True)]))

    def stacked(self, view: int) -> torch.Tensor:
        """Every row of one view as one batch (for evaluation)."""
        return stack_rows(self.read(self.views[view]))


@torch.no_grad()
def _frozen_bank(
    model: LiTModel, pixels: torch.Tensor, image_ids: list[str], views: int, config: TeacherTrainConfig
) -> FrozenBank:
    """The :class:`FrozenBank` of ``pixels``: each view's replayed augmentations through the
    frozen stages, 64 images at a time."""
    model.eval()
    bank: list[list[Any]] = []
    for view in range(views):
        entries: list[Any] = []
        for start in range(0, len(pixels), 64):
            ids = image_ids[start : start + 64]
            unit = replay_augmentation(
                to_unit(pixels[start : start + 64]),
                ids,
                [view] * len(ids),
                seed=config.aug_seed,
                scale=config.aug_scale,
                max_shift=config.aug_shift,
            )
            prepared = model.prepare_pixels(unit)  # NHWC inside (LiTModel)
            keys = model.frozen_keys(prepared)
            entries += keys if keys is not None else model.frozen_rows(prepared)
        bank.append(entries)
    keyed = bool(bank) and bool(bank[0]) and isinstance(bank[0][0], bytes)
    return FrozenBank(bank, model.frozen_rows_reader() if keyed else list)


def train_lit_teacher(
    dataset: PairedDataset,
    out: str | Path,
    config: TeacherTrainConfig | None = None,
    *,
    progress: bool = True,
    encoding_memo: EncodingMemo | None = None,
) -> dict[str, Any]:
    """Train on ``train``, select the best epoch by val rsum, save it to ``out``.

    ``encoding_memo``: where the frozen towers' rows go (MiniLM's captions, the frozen trunk
    stages' images), for the later stages of a run that encode the same rows.

    Writes ``out/log.jsonl`` (one line per epoch), ``out/train_config.json`` and the model
    (``clipdistill_model.json`` + ``model.safetensors``); returns the final summary, which
    includes the test-split metrics of the selected epoch when the dataset has a test split.
    """
    config = config or TeacherTrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(config.seed)
    started = time.perf_counter()

    train, val = dataset.split("train"), dataset.split("val")
    model = attach_encoding_memo(LiTModel(config.model, spec=f"run:{out}"), encoding_memo)
    size = config.decode_size or config.model.image_size
    train_pixels = load_image_tensor(train.image_paths(), size, progress=progress)
    val_pixels = load_image_tensor(val.image_paths(), size, progress=progress)

    # Frozen text tower: every caption's MiniLM feature once, grouped per image.
    train_texts = train.texts()
    train_features = _minilm_features(model, train_texts)
    caption_row = {text: i for i, text in enumerate(dict.fromkeys(train_texts))}
    caption_ids = torch.tensor([caption_row[text] for text in train_texts], dtype=torch.long)
    owner = torch.tensor(train.text_to_image())
    counts = torch.bincount(owner, minlength=len(train))
    first = torch.cumsum(counts, 0) - counts
    val_features = _minilm_features(model, val.texts())

    if config.channels_last:
        model.trunk.to(memory_format=torch.channels_last)
        train_pixels = train_pixels.contiguous(memory_format=torch.channels_last)
        val_pixels = val_pixels.contiguous(memory_format=torch.channels_last)
    frozen_bank: FrozenBank | None = None
    if model.splits_at_frozen() and config.frozen_views > 0:
        views = config.frozen_views if config.augment else 1
        frozen_bank = _frozen_bank(model, train_pixels, [r.image_id for r in train.images], views, config)
        val_ids = [r.image_id for r in val.images]
        val_pixels = _frozen_bank(model, val_pixels, val_ids, 1, config).stacked(0)  # _evaluate reads features
        del train_pixels  # the bank replaces them
        model.frozen_prefix.release()  # training runs the trained stages only; the test pass rebuilds it

    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, len(train) // config.batch_size)
    optimizer, scheduler = build_optimizer(
        trainable,
        AdamWSettings(lr=config.lr, weight_decay=config.weight_decay),
        config.warmup_steps,
        steps_per_epoch * config.epochs,
    )
    atomic_write_json(out / "train_config.json", asdict(config))
    log_path = out / "log.jsonl"
    log_path.unlink(missing_ok=True)

    best: dict[str, Any] = {"rsum": -1.0}
    best_state: dict[str, torch.Tensor] | None = None
    epoch_bar = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epoch_bar = tqdm(epoch_bar, desc="teacher", unit="epoch")
    for epoch in epoch_bar:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            pick = first[index] + (torch.rand(len(index), generator=generator) * counts[index]).long()
            if frozen_bank is not None:
                view = torch.randint(len(frozen_bank), (len(index),), generator=generator)
                image = model.encode_from_frozen(frozen_bank.gather(view, index))
            else:
                pixels = to_unit(train_pixels[index])
                if config.augment:
                    pixels = _augment(pixels, config, generator)
                if config.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                image = model.encode_image(model.prepare_pixels(pixels))
            text = F.normalize(model.text_proj(train_features[pick]), dim=-1)
            if config.multi_positive:
                loss = _multi_positive_clip_loss(image, text, model.logit_scale, caption_ids[pick])
            else:
                loss = clip_loss(image, text, model.logit_scale)
            update(loss, optimizer, scheduler, config.grad_clip)
            with torch.no_grad():
                model.log_scale.clamp_(0, 4.6052)
            losses.append(float(loss.detach()))
        metrics = _evaluate(model, val_pixels, val_features, val.text_to_image())
        elapsed = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "loss": sum(losses) / len(losses),
            "val": metrics,
            "seconds": round(elapsed, 2),
            "logit_scale": float(model.log_scale.detach().exp()),
        }
        append_jsonl(log_path, record)
        if progress:
            epoch_bar.set_postfix(loss=f"{record['loss']:.3f}", val_rsum=f"{metrics['rsum']:.1f}")
        if metrics["rsum"] > best["rsum"]:
            best = {"epoch": epoch + 1, **metrics}
            best_state = {k: v.detach().clone() for k, v in model.trained_state().items()}
        if config.max_seconds is not None and elapsed > config.max_seconds:
            break

    assert best_state is not None  # at least one epoch ran
    model.load_state_dict(best_state, strict=False)
    model.eval()
    model.save(out)
    summary: dict[str, Any] = {
        "best_epoch": best["epoch"],
        "val": {k: v for k, v in best.items() if k != "epoch"},
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    if "test" in dataset.split_counts():
        test = dataset.split("test")
        test_pixels = load_image_tensor(test.image_paths(), size)
        summary["test"] = _evaluate(model, test_pixels, _minilm_features(model, test.texts()), test.text_to_image())
    atomic_write_json(out / "train_summary.json", summary)
    return summary
