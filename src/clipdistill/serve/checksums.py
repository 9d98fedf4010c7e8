"""SHA-256 of files and of a model's weights: the identities manifests compare.

Importing this module never imports torch (``weights_sha256`` imports it only when called),
because the serving side verifies encoder files with ``file_sha256``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from clipdistill.hashing import file_sha256 as file_sha256  # re-exported: serve/ verifies files with it


def weights_sha256(model: Any) -> str:
    """Checksum of a torch module's parameters and buffers (names, shapes, dtypes, bytes).

    Two loads of the same checkpoint give the same value whatever folder they came from, so
    embeddings computed with torch and encoders exported to ONNX can be matched to each other.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode())
        # A raw byte view works for every dtype (bfloat16 has no numpy equivalent).
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
