"""The exported towers at serving time: onnxruntime sessions + tokenizer + preprocessing.

An export folder is self-describing (``export.json`` names the files and their checksums,
``preprocess_config.json`` and ``tokenizer_config.json`` hold everything else), so this
class needs nothing but the folder: no torch, no open_clip, no clipdistill model code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill.ort_session import cpu_session
from clipdistill.paths import UnsafePathError
from clipdistill.serve.checksums import file_sha256
from clipdistill.serve.preprocess import ImageInput, ImagePreprocessor
from clipdistill.serve.tokenize import load_tokenizer

EXPORT_CONFIG = "export.json"
TOWER_FILES = {
    "fp32": {"image": "image_encoder.onnx", "text": "text_encoder.onnx"},
    "int8": {"image": "image_encoder.int8.onnx", "text": "text_encoder.int8.onnx"},
}


class ExportError(ValueError):
    """An export folder that is missing files, was tampered with, or lacks a variant."""


def read_export_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / EXPORT_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{directory} is not a clipdistill export: {EXPORT_CONFIG} is missing (run clipdistill export)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _session(path: Path, threads: int | None) -> Any:
    # a service answers requests one model at a time: spinning workers answer the next one sooner
    return cpu_session(str(path), threads)


class OnnxEncoders:
    """Both towers of one export, in one numerical variant (``fp32`` or ``int8``)."""

    def __init__(
        self, directory: str | Path, variant: str = "fp32", *, verify: bool = True, threads: int | None = None
    ):
        self.directory = Path(directory)
        self.config = read_export_config(self.directory)
        if variant not in TOWER_FILES:
            raise ExportError(f"unknown encoder variant {variant!r}; valid: {', '.join(TOWER_FILES)}")
        self.variant = variant
        files = self.config["files"]
        self.paths: dict[str, Path] = {}
        for tower, name in TOWER_FILES[variant].items():
            if name not in files or not (self.directory / name).is_file():
                hint = " (export with --int8)" if variant == "int8" else ""
                raise ExportError(f"{self.directory}: {name} is missing{hint}")
            path = self.directory / name
            if verify and file_sha256(path) != files[name]["sha256"]:
                raise ExportError(f"{path}: checksum differs from {EXPORT_CONFIG} (file changed after export)")
            self.paths[tower] = path
        self.embed_dim = int(self.config["embed_dim"])
        self.preprocess = ImagePreprocessor.from_dir(self.directory)
        try:
            self.tokenizer = load_tokenizer(self.directory)
        except UnsafePathError as error:
            raise ExportError(str(error)) from None
        self._image = _session(self.paths["image"], threads)
        self._text = _session(self.paths["text"], threads)

    @property
    def checksums(self) -> dict[str, str]:
        """sha256 of the two graphs in use, as manifests record them."""
        return {tower: self.config["files"][path.name]["sha256"] for tower, path in self.paths.items()}

    @property
    def identity(self) -> dict[str, Any]:
        """What an index manifest compares: source weights, graph checksums, dimension."""
        return {
            "spec": self.config["source"]["spec"],
            "weights_sha256": self.config["source"]["weights_sha256"],
            "variant": self.variant,
            "encoder_sha256": self.checksums,
            "embed_dim": self.embed_dim,
        }

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Unit embeddings of model-normalised pixels (B, 3, H, W)."""
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self._image.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Unit embeddings of token ids (B, context_length) int64."""
        if len(tokens) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self._text.run(None, {"input_ids": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenizer(list(texts)))
