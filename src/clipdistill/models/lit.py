"""The offline teacher: LiT-style ("locked text") dual encoder.

No pretrained CLIP weights are reachable here, so the teacher is built from pretrained
sentence encoders installed as packages: a frozen text tower (all-MiniLM-L6-v2 by default;
all-mpnet-base-v2, CLIP-B-sized, with ``+mpnet``: :data:`TEXT_TOWERS`), and a timm image tower
trained to land in that tower's sentence space. Because the text space is already semantic,
the image tower generalises to concepts whose images it never saw, which is what makes the
unseen-concept test split meaningful.

A saved teacher is a folder with ``clipdistill_model.json`` and ``model.safetensors``
holding only the trained parameters; the frozen text weights come from the installed
packages (the config names the tower, its checksum is recorded and checked so different
text weights are refused).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.models.base import DualEncoder, load_trained_weights
from clipdistill.models.encoding_memo import EncodingMemo, module_key, tensor_key, usable_memo
from clipdistill.models.text_minilm import MINILM_DIM, MiniLMTextEncoder, minilm_path
from clipdistill.models.text_mpnet import MPNET_DIM, MPNET_HUB_ID, MPNET_NAME, weights_sha256
from clipdistill.models.trunk_split import (
    FrozenPrefix,
    is_efficientnet,
    leading_stages,
    memoised_rows,
    stack_rows,
    upper_features,
)

MODEL_FILE = "clipdistill_model.json"
WEIGHTS_FILE = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mpnet_path() -> Path:
    from clipdistill.models.text_mpnet import mpnet_path

    return mpnet_path()


@dataclass(frozen=True)
class TextTower:
    """A frozen, mean-pooled sentence-transformers text tower the LiT teacher can lock to.

    ``width`` is known without loading the weights, so a config is checked before any load;
    ``path`` is called only when the tower is built (the mpnet folder is extracted then)."""

    key: str  # LiTConfig.text_model and the spec's +TEXT
    name: str  # recorded in a saved teacher
    label: str  # in messages
    hub_id: str  # the tokenizer name an exported open_clip folder records (never fetched)
    width: int
    path: Callable[[], Path]


TEXT_TOWERS: Mapping[str, TextTower] = MappingProxyType(
    {
        "minilm": TextTower(
            "minilm", "all-MiniLM-L6-v2", "MiniLM", "sentence-transformers/all-MiniLM-L6-v2", MINILM_DIM, minilm_path
        ),
        "mpnet": TextTower("mpnet", MPNET_NAME, "MPNet", MPNET_HUB_ID, MPNET_DIM, _mpnet_path),
    }
)


def get_text_tower(key: str) -> TextTower:
    """The registered tower ``key`` names; an unknown one is an error listing the valid ones."""
    if key not in TEXT_TOWERS:
        raise ValueError(f"LiTConfig.text_model must be one of {', '.join(TEXT_TOWERS)}, got {key!r}")
    return TEXT_TOWERS[key]


@dataclass(frozen=True)
class LiTConfig:
    """Architecture of the LiT teacher. ``text_proj='none'`` keeps the text tower's space
    untouched (LiT's locked-text recipe; ``embed_dim`` is then the tower's width); ``'linear'``
    adds a trainable map from the tower's width into ``embed_dim``, which scored higher with
    MPNet on the emoji set's unseen concepts (docs/results.md, "Teacher")."""

    # the scratch trunk: best recall per CPU-second of the timm trunks compared (docs/results.md, "Teacher")
    image_model: str = "resnet10t"
    image_size: int = 64
    embed_dim: int = MINILM_DIM
    text_proj: str = "none"
    context_length: int = 32
    init_logit_scale: float = math.log(1 / 0.07)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    # Pretrained ImageNet weights for the trunk (``efficientnet-lite0/1/2``, models/imagenet_lite.py;
    # image_model must then be the matching ``tf_efficientnet_lite*``); "" trains from scratch.
    image_pretrained: str = ""
    # Leading trunk stages kept frozen (stem + ``blocks[:n]``, BatchNorm statistics included):
    # low-level ImageNet filters transfer as they are, and a frozen stage costs no backward.
    frozen_stages: int = 0
    # The frozen text tower (TEXT_TOWERS); a saved teacher without this key is a MiniLM one.
    text_model: str = "minilm"

    def __post_init__(self) -> None:
        if self.text_proj not in ("none", "linear"):
            raise ValueError(f"LiTConfig.text_proj must be 'none' or 'linear', got {self.text_proj!r}")
        width = get_text_tower(self.text_model).width
        if self.text_proj == "none" and self.embed_dim != width:
            raise ValueError(
                f"LiTConfig.embed_dim must be {width} (the {self.text_model} tower's width) when text_proj='none', "
                f"got {self.embed_dim}"
            )
        if self.image_pretrained:
            from clipdistill.models.imagenet_lite import lite_variant

            expected = lite_variant(self.image_pretrained).timm_name
            if self.image_model != expected:
                raise ValueError(
                    f"LiTConfig.image_pretrained {self.image_pretrained!r} needs image_model {expected!r}, "
                    f"got {self.image_model!r}"
                )
        if self.frozen_stages < 0:
            raise ValueError(f"LiTConfig.frozen_stages must be >= 0, got {self.frozen_stages}")

    @classmethod
    def from_dict(cls, raw: dict) -> LiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown LiT config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = dict(raw)
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def split_lit_spec(identifier: str) -> tuple[str, str, str]:
    """``(TRUNK, SIZE, TEXT)`` of ``TRUNK[@SIZE][+TEXT]``; a part not given is ``""``."""
    body, plus, text = identifier.partition("+")
    if plus and text.strip() not in TEXT_TOWERS:
        raise ValueError(
            f"lit:{identifier}: unknown text tower {text.strip()!r} after '+'; valid: {', '.join(TEXT_TOWERS)}"
        )
    trunk, _, size = body.partition("@")
    return trunk.strip(), size.strip(), text.strip()


def lit_config_from_spec(identifier: str, frozen_stages: int = 0) -> LiTConfig:
    """The architecture ``lit:TRUNK[@SIZE][+TEXT]`` names.

    ``TRUNK`` is ImageNet weights (``efficientnet-lite0/1/2``: their timm trunk, its own pixel
    statistics, at ``SIZE`` px, default the weights' native size, where their filters were
    trained), or any timm model name, trained from scratch (``lit:resnet10t``; default size
    :class:`LiTConfig`'s). ``TEXT`` is the frozen text tower (:data:`TEXT_TOWERS`, default
    ``minilm``), whose space the embedding keeps (``text_proj='none'``, ``embed_dim`` = its
    width). Its image projection is untrained: ``teacher train`` aligns it."""
    from clipdistill.models.imagenet_lite import LITE_MEAN, LITE_STD, LITE_VARIANTS, lite_variant

    weights, size, text = split_lit_spec(identifier)
    text_config = {"text_model": text, "embed_dim": TEXT_TOWERS[text].width} if text else {}
    if size and not size.strip().isdigit():
        raise ValueError(f"lit:{identifier}: the size after '@' must be a number of pixels, got {size!r}")
    if weights not in LITE_VARIANTS:
        import timm

        if not timm.is_model(weights):
            raise ValueError(
                f"lit:{identifier}: {weights!r} is neither pretrained image weights ({', '.join(LITE_VARIANTS)}) "
                "nor a timm model name (a trunk trained from scratch)"
            )
        scratch = LiTConfig(image_model=weights, frozen_stages=frozen_stages, **text_config)
        return replace(scratch, image_size=int(size)) if size else scratch
    variant = lite_variant(weights)
    return LiTConfig(
        image_model=variant.timm_name,
        image_pretrained=weights,
        image_size=int(size) if size else variant.native_size,
        image_mean=LITE_MEAN,
        image_std=LITE_STD,
        frozen_stages=frozen_stages,
        **text_config,
    )


def _lost_rows(what: str) -> Callable[[list[int]], list[torch.Tensor]]:
    """A memo ``compute`` for rows that must already be there: a clear error instead."""

    def lost(missing: list[int]) -> list[torch.Tensor]:
        raise RuntimeError(
            f"{len(missing)} {what} row(s) are no longer in the encoding memo (a memo without spill drops "
            "rows past its budget); build it with spill=True"
        )

    return lost


class LiTModel(DualEncoder):
    """timm image trunk + linear head, frozen text tower (+ optional projection)."""

    #: Rows shared with other stages of a run (models/encoding_memo.py): the frozen stages'
    #: rows, and without gradients the whole trunk's.
    encoding_memo: EncodingMemo | None = None

    def __init__(self, config: LiTConfig, spec: str = "", load_pretrained: bool = True) -> None:
        """``load_pretrained=False`` skips reading ``config.image_pretrained`` (a saved teacher
        overwrites every trunk weight anyway)."""
        super().__init__()
        import timm

        self.config = config
        self.spec = spec
        self.image_size = (config.image_size, config.image_size)
        self.image_mean = config.image_mean
        self.image_std = config.image_std
        self.embed_dim = config.embed_dim
        if config.image_pretrained:
            from clipdistill.models.imagenet_lite import create_lite_trunk

            self.trunk = create_lite_trunk(config.image_pretrained, num_classes=0, pretrained=load_pretrained)
        else:
            self.trunk = timm.create_model(config.image_model, pretrained=False, num_classes=0)
        # EfficientNet trunks (the Lite ones) run in NHWC: PyTorch's CPU depthwise convolutions are
        # faster there, and the cache build, the fusion teacher's encoding and evaluation all run
        # this tower over every image. They are also the
        # trunks whose frozen stages split off (stem, ``blocks``, ``conv_head``/``bn2``, pooled head).
        self.efficientnet_trunk = is_efficientnet(self.trunk)
        if self.efficientnet_trunk:
            self.trunk.to(memory_format=torch.channels_last)
        self.frozen_trunk = leading_stages(self.trunk, config.frozen_stages, "LiTConfig.frozen_stages")
        self.frozen_prefix = FrozenPrefix(self.frozen_trunk, f"lit-frozen:{config.frozen_stages}")
        for module in self.frozen_trunk:
            module.requires_grad_(False)
        self.image_proj = nn.Linear(self.trunk.num_features, config.embed_dim)
        self.text_entry = get_text_tower(config.text_model)  # text_tower() is DualEncoder's tower view
        self.text_folder = self.text_entry.path()
        # The same mean-pooled encoder loads every tower: MiniLM (BERT) and MPNet differ only in
        # the folder's config, vocabulary and pad id, which it reads from the folder.
        self.text = MiniLMTextEncoder(context_length=config.context_length, path=self.text_folder)
        if self.text.width != self.text_entry.width:
            raise ValueError(
                f"{self.text_folder / 'config.json'}: hidden_size {self.text.width}, but the "
                f"{self.text_entry.name} tower is {self.text_entry.width} wide"
            )
        self.text.requires_grad_(False)
        width = self.text_entry.width
        self.text_proj: nn.Module = (
            nn.Linear(width, config.embed_dim, bias=False) if config.text_proj == "linear" else nn.Identity()
        )
        if isinstance(self.text_proj, nn.Linear):
            with torch.no_grad():  # start as the identity map so training begins in the tower's space
                self.text_proj.weight.copy_(torch.eye(config.embed_dim, width))
        self.log_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        # A timm trunk ending in global pooling runs at any size; one with position embeddings
        # (a ViT named as the trunk) does not.
        self.resizable_image_input = not hasattr(self.trunk, "pos_embed")

    def train(self, mode: bool = True) -> LiTModel:
        super().train(mode)
        self.text.eval()  # the locked tower never leaves eval mode (dropout stays off)
        for module in self.frozen_trunk:
            module.eval()  # frozen stages keep their ImageNet BatchNorm statistics
        return self

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.trunk.forward_head(self._upper_features(pixels)))

    def _trunk_layout(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` in the trunk's memory format (NHWC for EfficientNet trunks, see ``__init__``)."""
        return pixels.contiguous(memory_format=torch.channels_last) if self.efficientnet_trunk else pixels

    # --- the frozen / trained split of the trunk (teacher training caches the frozen part) -------
    def splits_at_frozen(self) -> bool:
        """Whether :meth:`frozen_features` + :meth:`encode_from_frozen` reproduce the image tower.

        True for timm's EfficientNet family (the Lite trunks) with at least one frozen stage;
        other trunks train end to end."""
        return bool(self.frozen_trunk) and self.efficientnet_trunk

    def _require_frozen_split(self) -> None:
        if not self.splits_at_frozen():
            stages = self.config.frozen_stages
            raise ValueError(f"{self.config.image_model} with frozen_stages {stages} has no frozen split")

    @torch.no_grad()
    def frozen_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen stem and stages on model-normalised pixels: a pure function of the image
        (frozen weights, BatchNorm in eval), so teacher training computes it once per view, and
        with an :attr:`encoding_memo` attached every later pass (fusion teacher, cache,
        evaluation) reuses the rows it has already seen."""
        self._require_frozen_split()
        memo = usable_memo(self.encoding_memo)
        if memo is None:
            return self.frozen_prefix.run(pixels)
        return self.frozen_prefix.memoised(pixels, memo)

    @torch.no_grad()
    def frozen_keys(self, pixels: torch.Tensor) -> list[bytes] | None:
        """Memoise the frozen stages' rows of ``pixels`` and return their keys for
        :meth:`frozen_rows_reader` (``None`` without a memo): teacher training reads every train
        row each epoch, and holding the keys instead of the rows leaves them to the memo (most on
        disk), so its memory does not grow with the images."""
        self._require_frozen_split()
        memo = usable_memo(self.encoding_memo)
        if memo is None:
            return None
        keys = [tensor_key(row) for row in pixels]
        self.frozen_prefix.memoised_rows(pixels, memo, keys)
        return keys

    def frozen_rows_reader(self) -> Callable[[list[bytes]], list[torch.Tensor]]:
        """Reads the rows of keys from :meth:`frozen_keys` back from the memo (for these frozen weights)."""
        tower = self._attached_memo("frozen_rows_reader").tower(self.frozen_prefix.key())
        lost = _lost_rows("frozen-stage")
        return lambda keys: tower.fetch(keys, lost)

    @torch.no_grad()
    def frozen_rows(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`frozen_features` as one tensor per row, without a stacked copy: with a memo
        attached these are the memo's own rows, so a caller keeping every row of the train split
        (teacher training's frozen bank, half a GB at 224 px) does not hold them twice."""
        self._require_frozen_split()
        memo = usable_memo(self.encoding_memo)
        if memo is None:
            return list(self.frozen_prefix.run(pixels).unbind(0))
        return self.frozen_prefix.memoised_rows(pixels, memo)

    def _upper_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``trunk.forward_features`` (before pooling); with a memo attached and nothing
        training, memoised per row for the whole trunk, its frozen stages memoised on their own
        (teacher training's bank): bit-for-bit the same computation otherwise."""
        memo = usable_memo(self.encoding_memo)
        if self.splits_at_frozen() and memo is not None and not torch.is_grad_enabled():
            return self._memoised_upper(pixels, memo)
        return self.trunk.forward_features(self._trunk_layout(pixels))

    def _memoised_upper(self, pixels: torch.Tensor, memo: EncodingMemo) -> torch.Tensor:
        """Every row of ``forward_features`` once per trunk weights: the cache's dual pass and the
        fusion teacher's token and embedding calls ask for the same rows of a frozen teacher,
        and the trained stages at 224 px were half of the cache stage. A miss runs the trained
        stages on the (memoised) frozen rows; both memos share one hash of each pixel row. Once
        a row's whole trunk is memoised its frozen row is dropped from the memo: every later
        reader of that pixel row (fusion teacher, cache, evaluation) asks for the whole trunk,
        and the frozen rows of the train split are half a GB at 224 px."""
        return stack_rows(self._memoised_upper_rows(pixels, memo), pixels.device)

    def _memoised_upper_rows(
        self, pixels: torch.Tensor, memo: EncodingMemo, row_keys: list[bytes] | None = None
    ) -> list[torch.Tensor]:
        """:meth:`_memoised_upper` before stacking: the memo's own (C, h, w) rows (CPU)."""
        keys = row_keys if row_keys is not None else [tensor_key(row) for row in pixels]

        def forward(missing: list[int]) -> torch.Tensor:
            missing_keys = [keys[i] for i in missing]
            frozen = self.frozen_prefix.memoised(pixels[missing], memo, missing_keys)
            memo.tower(self.frozen_prefix.key()).discard(missing_keys)
            return self._upper_from_frozen(frozen)

        return memoised_rows(memo, self._trunk_memo_key(), keys, forward)

    def _trunk_memo_key(self) -> str:
        return module_key("lit-trunk", [self.trunk])

    def _upper_from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        """The trained stages and the head convolution on :meth:`frozen_features`: the rest of
        ``trunk.forward_features``."""
        return upper_features(self.trunk, features, self.config.frozen_stages)

    def encode_from_frozen(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image embedding from :meth:`frozen_features`: the trained stages, head and projection."""
        embedding = self.image_proj(self.trunk.forward_head(self._upper_from_frozen(features)))
        return torch.nn.functional.normalize(embedding, dim=-1) if normalize else embedding

    def minilm_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frozen text tower's sentence features (before ``text_proj``), MiniLM's or MPNet's;
        cacheable during training."""
        with torch.no_grad():
            return self.text(tokens)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.minilm_features(tokens))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.tokenize(texts)

    # --- token features (the fusion teacher and the token cache read these) ---------------------
    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature map as tokens (B, N, C) from model-normalised pixels.

        timm's ``forward_features`` is the trunk before pooling, so these are exactly the
        features the image embedding pools: a CNN map (B, C, h, w) becomes h·w tokens in
        row-major order (channels-last maps (B, h, w, C), e.g. MambaOut's, too); a
        transformer trunk already returns (B, N, C)."""
        features = self._upper_features(pixels)
        channels = int(self.trunk.num_features)
        if features.dim() == 4 and features.shape[1] == channels:
            return features.flatten(2).transpose(1, 2)
        if features.dim() == 4 and features.shape[-1] == channels:
            return features.flatten(1, 2)
        if features.dim() != 3:
            raise ValueError(f"{self.config.image_model}.forward_features gave shape {tuple(features.shape)}")
        return features

    @torch.no_grad()
    def image_token_keys(self, pixels: torch.Tensor) -> list[bytes] | None:
        """Memoise the whole-trunk rows of ``pixels`` and return their keys for
        :meth:`image_tokens_reader` (``None`` without a memo): a caller that reads every row of
        the train split again and again (the fusion teacher's training) keeps keys, and the
        memo keeps the rows, most of them on disk."""
        memo = usable_memo(self.encoding_memo)
        if not (self.splits_at_frozen() and memo is not None):
            return None
        keys = [tensor_key(row) for row in pixels]
        self._memoised_upper_rows(pixels, memo, keys)
        return keys

    def image_tokens_reader(self) -> Callable[[list[bytes]], list[torch.Tensor]]:
        """Reads the (N, C) token rows of keys from :meth:`image_token_keys` back from the memo
        (for these trunk weights)."""
        tower = self._attached_memo("image_tokens_reader").tower(self._trunk_memo_key())
        lost = _lost_rows("image token")

        def read(keys: list[bytes]) -> list[torch.Tensor]:
            return [row.permute(1, 2, 0).reshape(-1, row.shape[0]) for row in tower.fetch(keys, lost)]  # (h·w, C)

        return read

    def _attached_memo(self, caller: str) -> EncodingMemo:
        memo = usable_memo(self.encoding_memo)
        if memo is None:
            raise RuntimeError(f"{caller} needs the encoding memo that holds the rows")
        return memo

    def text_token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) bool: which positions of :meth:`encode_text_tokens` are real tokens."""
        mask = tokens != self.text.pad_token_id
        return torch.nn.functional.pad(mask, (0, self.config.context_length - mask.shape[1]), value=False)

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's last hidden state (B, context_length, width), zero at padding.

        Always padded to ``context_length`` (whatever padding ``tokens`` has), so features of
        batches tokenised to different lengths can be stacked (the token cache does); the
        padding rows are exactly 0, and :meth:`text_token_mask` gives the real positions."""
        return self.encode_text_and_tokens(tokens)[1]

    def encode_text_and_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding, token_features, mask)`` from one text-tower pass: the unit text embedding
        (as :meth:`encode_text`), :meth:`encode_text_tokens` and :meth:`text_token_mask`.

        The frozen tower is the expensive part of the text side, so the fusion teacher, which needs the
        sentence embedding and the tokens, gets both for the price of one forward."""
        if tokens.shape[1] > self.config.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed context_length {self.config.context_length}")
        with torch.no_grad():
            hidden, mask = self.text.hidden_states(tokens)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        hidden = hidden * weights
        pooled = hidden.sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # MiniLMTextEncoder.forward's pooling
        embedding = torch.nn.functional.normalize(self.text_proj(pooled), dim=-1)
        pad = self.config.context_length - tokens.shape[1]
        return embedding, torch.nn.functional.pad(hidden, (0, 0, 0, pad)), self.text_token_mask(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith(("trunk.", "image_proj."))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen text tower's weights (they come from the installed packages)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("text.")}

    def save(self, directory: str | Path) -> Path:
        """Write ``clipdistill_model.json`` + ``model.safetensors`` atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(self.trained_state(), str(tmp))
        config = asdict(self.config)
        meta = {
            "kind": "lit",
            "config": config,
            "text_model": {"name": self.text_entry.name, "sha256": weights_sha256(self.text_folder)},
        }
        atomic_write_json(directory / MODEL_FILE, meta)
        return directory


def load_lit(directory: str | Path, spec: str = "") -> LiTModel:
    """Load a saved LiT teacher with the text tower its config names (MiniLM when it names
    none); refuses a folder whose text weights' checksum differs from the installed ones."""
    directory = Path(directory)
    meta = json.loads((directory / MODEL_FILE).read_text(encoding="utf-8"))
    if meta.get("kind") != "lit":
        raise ValueError(f"{directory / MODEL_FILE}: field 'kind' is {meta.get('kind')!r}, expected 'lit'")
    try:
        config = LiTConfig.from_dict(meta["config"])
    except ValueError as error:
        raise ValueError(f"{directory / MODEL_FILE}: field 'config': {error}") from error
    tower = get_text_tower(config.text_model)
    expected = meta.get("text_model", {}).get("sha256")
    actual = weights_sha256(tower.path())
    if expected and expected != actual:
        raise ValueError(
            f"{directory}: trained against a different {tower.label} (sha256 {expected[:12]}…, "
            f"installed {actual[:12]}…)"
        )
    model = LiTModel(config, spec=spec, load_pretrained=False)
    load_trained_weights(model, directory / WEIGHTS_FILE, "text.")  # the text tower comes from its packages
    return model.eval()
