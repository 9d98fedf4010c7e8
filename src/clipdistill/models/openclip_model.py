"""open_clip models (zoo names, ``hf-hub:``, ``local-dir:`` folders) as :class:`DualEncoder`.

Students are open_clip models too, so this one adapter serves both sides of distillation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipdistill.models.base import DualEncoder
from clipdistill.models.encoding_memo import EncodingMemo, traced
from clipdistill.models.hub import cannot_fetch, hub_cache
from clipdistill.models.trunk_split import FrozenPrefix, is_efficientnet, leading_stages, upper_features


def _as_pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = tuple(size)[-2:]
    return (int(height), int(width))


class OpenCLIPDualEncoder(DualEncoder):
    """Wraps an ``open_clip`` CLIP/CustomTextCLIP with its tokenizer and preprocessing config."""

    #: Where the frozen trunk stages' rows are kept (:meth:`freeze_trunk_stages`).
    encoding_memo: EncodingMemo | None = None

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
        # pixels: PyTorch's CPU depthwise convolutions and BatchNorm are much faster in NHWC
        # (docs/results.md, "Where the demo's time goes"), and the weights stay as they are
        # (convolutions follow the input's layout), so saving, export and the optimiser see
        # nothing different.
        self.channels_last_pixels = any(isinstance(m, nn.BatchNorm2d) for m in model.visual.modules())
        self.frozen_stages = 0
        self.frozen_prefix: FrozenPrefix | None = None

    def freeze_trunk_stages(self, stages: int) -> None:
        """Keep the image trunk's stem and first ``stages`` blocks fixed (``student.frozen_stages``):
        no gradient, BatchNorm statistics fixed (eval mode), and in training and evaluation their
        output comes from :class:`~clipdistill.models.trunk_split.FrozenPrefix`, each image row
        computed once (models/trunk_split.py says why): those rows are exact, so the model keeps
        them in its own :attr:`encoding_memo` unless it is handed one to share (a run that trains
        several students from one teacher's tower). Only timm EfficientNet
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
        if modules and self.encoding_memo is None:
            self.encoding_memo = EncodingMemo()
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
            memo = self.encoding_memo
            frozen = self.frozen_prefix.run(pixels) if memo is None else self.frozen_prefix.memoised(pixels, memo)
            upper = upper_features(visual.trunk, frozen, self.frozen_stages)
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


OPENCLIP_CONFIG = "open_clip_config.json"
#: The key of ``open_clip_config.json`` where clipdistill records how it runs the folder (open
#: clip ignores it): ``frozen_stages`` of an exported LiT teacher's trunk.
FOLDER_EXTRAS = "clipdistill"
#: The Hugging Face config of a folder's own text model (an exported LiT teacher keeps MiniLM's here).
HF_TEXT_CONFIG = "config.json"


def has_hf_text_model(directory: str | Path) -> bool:
    """Whether an open_clip folder's text tower is a Hugging Face model (``text_cfg.hf_model_name``)."""
    path = Path(directory) / OPENCLIP_CONFIG
    if not path.is_file():
        return False
    raw = json.loads(path.read_text(encoding="utf-8"))
    return bool(raw.get("model_cfg", raw).get("text_cfg", {}).get("hf_model_name"))


def load_openclip_folder(directory: str | Path, *, spec: str = "") -> OpenCLIPDualEncoder:
    """Load an open_clip folder whose text tower is a Hugging Face model, from any working
    directory and wherever the folder has moved.

    open_clip builds such a tower with ``AutoConfig.from_pretrained(text_cfg.hf_model_name)``:
    a hub id, or a path that it does not resolve against the folder (the tokenizer, in
    contrast, is always read from the folder). A folder that holds its own ``config.json`` (an
    exported LiT teacher: export/open_clip.py) is therefore loaded with ``hf_model_name``
    pointed at the folder itself, as open_clip's ``create_model`` accepts as an override; the
    weights all come from the folder's checkpoint (``hf_model_pretrained`` false)."""
    import logging

    import open_clip

    directory = Path(directory)
    raw = json.loads((directory / OPENCLIP_CONFIG).read_text(encoding="utf-8"))
    model_cfg = raw.get("model_cfg", raw)
    overrides: dict[str, Any] = {}
    if (directory / HF_TEXT_CONFIG).is_file():
        text_cfg = {**model_cfg["text_cfg"], "hf_model_name": str(directory.resolve()), "hf_model_pretrained": False}
        overrides["text_cfg"] = text_cfg
    name = f"local-dir:{directory}"
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # open_clip logs its choices at warning level
    try:
        model = open_clip.create_model(name, **overrides)
    finally:
        root_logger.setLevel(level)
    encoder = OpenCLIPDualEncoder(model, open_clip.get_tokenizer(name), spec=spec or name)
    encoder.model_cfg = model_cfg
    if raw.get("preprocess_cfg"):
        encoder.preprocess_cfg = raw["preprocess_cfg"]
    frozen = int(raw.get(FOLDER_EXTRAS, {}).get("frozen_stages", 0))
    if frozen:  # an exported LiT teacher: its frozen stages run as the LiT teacher runs them
        encoder.freeze_trunk_stages(frozen)
    return encoder


def _local_hint(model_name: str) -> str:
    return (
        f"openclip:{model_name}@/path/to/weights.safetensors (a file, as open_clip's `pretrained` takes it) "
        "or local-dir:/path/to/folder (open_clip_config.json + weights)"
    )


def _tag_hub_file(config: dict[str, Any]) -> tuple[str, list[str]] | None:
    """``(repo, candidate filenames)`` of a pretrained tag stored on the hub, as open_clip's
    ``download_pretrained`` asks for them (the safetensors alternative first), else ``None``."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    location = config.get("hf_hub", "")
    if not location:
        return None
    repo, filename = location.rsplit("/", 1) if "/" in location else (location, "")
    filename = filename or HF_WEIGHTS_NAME
    safe = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename.endswith((".bin", ".pth", ".pt")) and filename != HF_WEIGHTS_NAME:
        safe.append(filename.rsplit(".", 1)[0] + ".safetensors")
    return repo.rstrip("/"), [*safe, filename]


def _zoo_text_needs_hub(model_name: str) -> bool:
    """Whether a zoo model's tokenizer or text tower comes from the hub (SigLIP's, RoBERTa's)."""
    import open_clip

    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    return bool(text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"))


def fetch_weights(model_name: str, pretrained: str | None, spec: str, *, weights: bool = True) -> bool:
    """Make sure the weights a spec names are on this machine before the model is built, so a
    failed download is one line naming the spec and the cache, not a traceback from open_clip
    (and an ``hf-hub:`` spec never falls back to random weights, as open_clip does with a
    warning when only the config can be fetched).

    Cached files are looked up first, without a request; when something is missing the hub is
    probed once (:func:`~clipdistill.models.hub.hub_unreachable`: ``HF_HUB_OFFLINE`` or a few
    seconds), so an unreachable hub is the one-line error in seconds, not after a minute of
    retries. Returns whether the model must then load offline (the hub is out of reach and
    everything it needs is cached), which :func:`load_openclip` does under
    :func:`~clipdistill.models.hub.hub_offline`."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf, get_pretrained_cfg

    from clipdistill.models.hub import cached_hub_file, hub_unreachable

    if model_name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo = model_name.removeprefix("hf-hub:")
        hint = f"local-dir:/path/to/folder (a download of {repo}: open_clip_config.json + weights)"
        unreachable = hub_unreachable()
        config_cached = cached_hub_file(repo, ["open_clip_config.json"])
        weights_cached = not weights or cached_hub_file(repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])
        if unreachable is not None:
            if not config_cached:
                raise cannot_fetch(spec, "its open_clip_config.json", hub_cache(), unreachable, hint)
            if not weights_cached:
                raise cannot_fetch(spec, "its weights", hub_cache(), unreachable, hint)
            return True
        try:
            hf_hub_download(repo_id=repo, filename="open_clip_config.json")
        except Exception as error:  # any failure to fetch (no such repo, no access)
            raise cannot_fetch(spec, "its open_clip_config.json", hub_cache(), error, hint) from None
        if weights:
            try:
                download_pretrained_from_hf(repo)
            except Exception as error:
                raise cannot_fetch(spec, "its weights", hub_cache(), error, hint) from None
        return False
    text_from_hub = _zoo_text_needs_hub(model_name)
    if not weights or not pretrained or Path(pretrained).is_file():
        return text_from_hub and hub_unreachable() is not None
    config = get_pretrained_cfg(model_name, pretrained)
    if not config:
        return False  # an unknown tag is refused earlier (models.teachers), with the valid ones
    hub_file = _tag_hub_file(config)
    if hub_file is not None:
        what = f"the weights of tag {pretrained!r}"
        cached = cached_hub_file(*hub_file)
        unreachable = hub_unreachable()
        if unreachable is not None:
            if not cached:
                raise cannot_fetch(spec, what, hub_cache(), unreachable, _local_hint(model_name))
            return True
    cache = hub_cache() if config.get("hf_hub") else str(Path("~/.cache/clip").expanduser())
    try:
        download_pretrained(config)
    except Exception as error:
        raise cannot_fetch(spec, f"the weights of tag {pretrained!r}", cache, error, _local_hint(model_name)) from None
    return text_from_hub and hub_unreachable() is not None


def load_openclip(model_name: str, pretrained: str | None, *, load_weights: bool, spec: str) -> OpenCLIPDualEncoder:
    """Build through open_clip's own factory so any open_clip checkpoint loads unchanged."""
    import open_clip

    from clipdistill.models.hub import hub_offline, hub_unreachable

    offline = fetch_weights(model_name, pretrained, spec, weights=load_weights)  # hf-hub: the config is fetched too
    with hub_offline(offline):
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, load_weights=load_weights)
            tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError) as error:
            if not offline:
                raise
            reason = hub_unreachable() or str(error)
            what = "its tokenizer or text model (named by its config)"
            raise cannot_fetch(spec, what, hub_cache(), reason, _local_hint(model_name)) from None
    return OpenCLIPDualEncoder(model, tokenizer, spec=spec)
