"""open_clip models (zoo names, ``hf-hub:``, ``local-dir:`` folders) as :class:`DualEncoder`.

Students are open_clip models too, so this one adapter serves both sides of distillation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipdistill.models.base import DualEncoder
from clipdistill.models.spec import ModelSpecError
from clipdistill.models.trunk_split import FrozenPrefix, is_efficientnet, leading_stages, traced, upper_features


def _as_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = tuple(size)[-2:]
    return (int(height), int(width))


class OpenCLIPDualEncoder(DualEncoder):
    """Wraps an ``open_clip`` CLIP/CustomTextCLIP with its tokenizer and preprocessing config."""

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str = "") -> None:
        super().__init__()
        import open_clip

        self.model = model
        self._tokenizer = tokenizer
        self.spec = spec
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.image_size = _as_pair(preprocess.get("size", 224))
        self.image_mean = tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.image_std = tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        with torch.no_grad():
            probe = self._encode_text(self.tokenize(["a probe caption"]))
        self.embed_dim = int(probe.shape[-1])
        # BatchNorm CNN image towers (the lite0 student's EfficientNet trunk) get channels-last
        # pixels: PyTorch's CPU depthwise convolutions and BatchNorm are much faster in NHWC (a
        # lite0 student's training step at 96 px: 1.8 s against 3.1 s, measured), and the
        # weights stay as they are (convolutions follow the input's layout), so saving, export
        # and the optimiser see nothing different.
        self.channels_last_pixels = any(isinstance(m, nn.BatchNorm2d) for m in model.visual.modules())
        self.frozen_stages = 0
        self.frozen_prefix: FrozenPrefix | None = None

    def freeze_trunk_stages(self, stages: int) -> None:
        """Keep the image trunk's stem and first ``stages`` blocks fixed (``student.frozen_stages``):
        no gradient, BatchNorm statistics fixed (eval mode), and in training and evaluation their
        output comes from :class:`~clipdistill.models.trunk_split.FrozenPrefix`, each image row
        computed once per process (models/trunk_split.py says why). Only timm EfficientNet
        trunks split this way (the lite0 preset). The module tree and the weights stay as they
        are, so the saved folder and the exported graph are the plain open_clip model."""
        trunk = getattr(self.model.visual, "trunk", None)
        if stages > 0 and (trunk is None or not is_efficientnet(trunk)):
            found = "no timm trunk" if trunk is None else f"a {type(trunk).__name__} trunk"
            raise ValueError(
                f"student.frozen_stages {stages}: only a timm EfficientNet image trunk (preset lite0) splits; "
                f"this student has {found}"
            )
        modules = leading_stages(trunk, stages, "student.frozen_stages")  # checks the count; [] for 0
        for module in modules:
            module.requires_grad_(False)
        self.frozen_stages = stages
        self.frozen_prefix = FrozenPrefix(modules, f"student-frozen:{stages}") if modules else None
        self.train(self.training)

    def train(self, mode: bool = True) -> OpenCLIPDualEncoder:
        super().train(mode)
        if self.frozen_prefix is not None:
            for module in self.frozen_prefix.modules:
                module.eval()  # frozen stages keep their BatchNorm statistics
        return self

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last_pixels and pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.frozen_prefix is not None and not traced():
            visual = self.model.visual
            upper = upper_features(visual.trunk, self.frozen_prefix.memoised(pixels), self.frozen_stages)
            return visual.head(visual.trunk.forward_head(upper))
        return self.model.encode_image(pixels, normalize=False)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).long()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def is_image_parameter(self, name: str) -> bool:
        return name.startswith("model.visual.")

    @property
    def context_length(self) -> int:
        return int(getattr(self._tokenizer, "context_length", 77))


def hub_cache() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE`` / ``HF_HOME``), where weights are looked up."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cannot_fetch(spec: str, what: str, cache: str, error: BaseException, local: str) -> ModelSpecError:
    """The one-line error for weights that are neither cached nor downloadable (an air-gapped
    machine): the spec, the cache looked in, why, and how to pass local weights instead."""
    reason = " ".join(str(error).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return ModelSpecError(
        f"cannot load {spec!r}: {what} could be neither found in the cache {cache} nor downloaded "
        f"({type(error).__name__}: {reason}); without the hub, pass local weights: {local}"
    )


def _local_hint(model_name: str) -> str:
    return (
        f"openclip:{model_name}@/path/to/weights.safetensors (a file, as open_clip's `pretrained` takes it) "
        "or local-dir:/path/to/folder (open_clip_config.json + weights)"
    )


def fetch_weights(model_name: str, pretrained: str | None, spec: str, *, weights: bool = True) -> None:
    """Make sure the weights a spec names are on this machine before the model is built, so a
    failed download is one line naming the spec and the cache, not a traceback from open_clip
    (and an ``hf-hub:`` spec never falls back to random weights, as open_clip does with a
    warning when only the config can be fetched). Cached files are found without a network."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf, get_pretrained_cfg

    if model_name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo = model_name.removeprefix("hf-hub:")
        hint = f"local-dir:/path/to/folder (a download of {repo}: open_clip_config.json + weights)"
        try:
            hf_hub_download(repo_id=repo, filename="open_clip_config.json")
        except Exception as error:  # any failure to fetch (offline, no such repo, no access)
            raise cannot_fetch(spec, "its open_clip_config.json", hub_cache(), error, hint) from None
        if weights:
            try:
                download_pretrained_from_hf(repo)
            except Exception as error:
                raise cannot_fetch(spec, "its weights", hub_cache(), error, hint) from None
        return
    if not weights or not pretrained or Path(pretrained).is_file():
        return
    config = get_pretrained_cfg(model_name, pretrained)
    if not config:
        return  # an unknown tag is refused earlier (models.teachers), with the valid ones
    cache = hub_cache() if config.get("hf_hub") else str(Path("~/.cache/clip").expanduser())
    try:
        download_pretrained(config)
    except Exception as error:
        raise cannot_fetch(spec, f"the weights of tag {pretrained!r}", cache, error, _local_hint(model_name)) from None


def load_openclip(model_name: str, pretrained: str | None, *, load_weights: bool, spec: str) -> OpenCLIPDualEncoder:
    """Build through open_clip's own factory so any open_clip checkpoint loads unchanged."""
    import open_clip

    fetch_weights(model_name, pretrained, spec, weights=load_weights)  # hf-hub: the config comes from the hub too
    model = open_clip.create_model(model_name, pretrained=pretrained, load_weights=load_weights)
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenCLIPDualEncoder(model, tokenizer, spec=spec)
