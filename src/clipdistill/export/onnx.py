"""Export a model's two towers to ONNX (fp32 and int8) with a parity report.

Each tower becomes its own graph so a phone or a CPU service can ship or load only the one it
needs (a text-search box needs just the text tower at query time). The graphs are the
``TowerView`` modules, i.e. encode + L2-normalise, so served embeddings are unit vectors just
like the torch ones. Everything serving needs besides the graphs (image size, mean, std,
tokenizer files and context length) is written beside them, so serving never needs torch.

Exporter: the TorchScript-based exporter (``dynamo=False``) is the default. Measured with
torch 2.14.1 on the tiny student (timm efficientvit_m0 + open_clip text transformer): both
exporters give max |diff| ~2e-7, but the dynamo exporter takes ~5x longer (50 s vs 11 s),
moves weights into a separate ``.onnx.data`` file and cannot produce opset 17 (it upgrades to
18 and the down-conversion fails); the legacy one writes one self-contained file per tower.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipdistill.io import atomic_path, atomic_write_json
from clipdistill.serve.checksums import file_sha256, weights_sha256
from clipdistill.serve.encoders import EXPORT_CONFIG, TOWER_FILES, OnnxEncoders
from clipdistill.serve.preprocess import PREPROCESS_CONFIG, ImagePreprocessor
from clipdistill.serve.tokenize import BPE_FILE, TOKENIZER_CONFIG, WORDPIECE_FILE, load_tokenizer

PARITY_FILE = "parity.json"
EXPORTERS = ("torchscript", "dynamo")
# Dynamic int8 quantisation (weights int8 per channel, activations quantised on the fly) of
# MatMul/Gemm and of the token-embedding Gather. Measured on the tiny student: quantising the
# 49408x128 embedding table shrinks the text graph 27.9 MB -> 7.2 MB at no extra cosine loss
# (min cosine to torch 0.9955 with or without it). Kept in fp32:
#  * Conv: quantize_dynamic cannot quantise the exported Conv weights (BN-folded, not
#    initializers) and onnxruntime's dynamic ConvInteger is slow on CPU anyway, so conv
#    image trunks (efficientvit) stay fp32;
#  * the last MatMul/Gemm of each tower (the projection into the shared embedding space):
#    its error goes straight into the embedding, and it is a small share of the bytes.
INT8_OP_TYPES = ("MatMul", "Gemm", "Gather")
_PROJECTION_OPS = ("MatMul", "Gemm")


#: ``stage(name)`` gives a context manager around one stage of the export (the CLI prints each
#: stage and its time: tracing a tower or the int8 pass of a large model takes minutes).
Stage = Callable[[str], contextlib.AbstractContextManager[Any]]


class ExportConfigError(ValueError):
    """A model the export cannot serve (unsupported tokenizer, bad options)."""


def no_stage(name: str) -> contextlib.AbstractContextManager[Any]:
    """The silent :data:`Stage`: a library call prints nothing."""
    return contextlib.nullcontext()


# --- graphs ------------------------------------------------------------------------------------
def export_tower(model: Any, tower: str, path: Path, *, opset: int = 17, exporter: str = "torchscript") -> None:
    """Write one tower's ONNX graph (dynamic batch axis) atomically."""
    import torch

    if exporter not in EXPORTERS:
        raise ExportConfigError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    module = (model.image_tower() if tower == "image" else model.text_tower()).eval()
    if tower == "image":
        example = torch.zeros(2, 3, *model.image_size)
        input_name = "pixel_values"
    else:
        example = model.tokenize(["a probe caption", "another"])
        example = _pad_tokens(example.numpy(), _context_length(model), _pad_id(model))
        example = torch.from_numpy(example)
        input_name = "input_ids"
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad(), _mha_fastpath_off():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=opset,
            dynamo=exporter == "dynamo",
            external_data=False,
        )


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """Trace ``nn.MultiheadAttention`` through its plain ops: without an attention mask (the
    bidirectional text tower of the ``lite0`` student) torch's eval fast path calls
    ``aten::_native_multi_head_attention``, which has no ONNX export. Same numbers either way."""
    import torch

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def last_projection_nodes(path: Path) -> list[str]:
    """Name of the last MatMul/Gemm node in the graph (the projection to the embedding)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node if node.op_type in _PROJECTION_OPS]
    return names[-1:]


def quantize_int8(source: Path, target: Path, *, keep_last_fp32: bool = True) -> dict[str, Any]:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = last_projection_nodes(source) if keep_last_fp32 else []
    with atomic_path(target) as tmp:
        quantize_dynamic(
            str(source),
            str(tmp),
            op_types_to_quantize=list(INT8_OP_TYPES),
            nodes_to_exclude=excluded,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return {"op_types_to_quantize": list(INT8_OP_TYPES), "nodes_to_exclude": excluded, "per_channel": True}


# --- serving config ----------------------------------------------------------------------------
def _context_length(model: Any) -> int:
    if hasattr(model, "context_length"):
        return int(model.context_length)
    return int(model.text.context_length)  # LiT


def _pad_id(model: Any) -> int:
    text = getattr(model, "text", None)
    return int(getattr(text, "pad_token_id", 0) or 0)


def _pad_tokens(tokens: np.ndarray, context_length: int, pad_id: int) -> np.ndarray:
    """Pad (or keep) token ids to the fixed width the graphs take (LiT pads to the longest)."""
    out = np.full((len(tokens), context_length), pad_id, dtype=np.int64)
    width = min(tokens.shape[1], context_length)
    out[:, :width] = tokens[:, :width]
    return out


def write_tokenizer(model: Any, out: Path) -> dict[str, Any]:
    """Copy the model's tokenizer files beside the graphs and describe them."""
    tokenizer = getattr(model, "_tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):  # open_clip HFTokenizer
        config = _hf_tokenizer_config(tokenizer, out)
    elif tokenizer is not None:  # open_clip
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower, default_bpe

        if not isinstance(tokenizer, SimpleTokenizer):
            raise ExportConfigError(
                f"cannot serve open_clip tokenizer {type(tokenizer).__name__} without torch (only SimpleTokenizer)"
            )
        if tokenizer.reduction_fn is not None or tokenizer.clean_fn is not _clean_lower:
            raise ExportConfigError("only open_clip SimpleTokenizer with clean='lower' and no reduction mask is served")
        extra = [tokenizer.decoder[i] for i in tokenizer.all_special_ids[2:]]
        with atomic_path(out / BPE_FILE) as tmp:
            tmp.write_bytes(Path(default_bpe()).read_bytes())
        config = {
            "kind": "clip_bpe",
            "file": BPE_FILE,
            "context_length": int(tokenizer.context_length),
            "sot_token_id": int(tokenizer.sot_token_id),
            "eot_token_id": int(tokenizer.eot_token_id),
            "pad_token_id": 0,
            "additional_special_tokens": extra,
            "clean": "ftfy + html.unescape x2 + whitespace collapse + lower (open_clip 'lower')",
        }
    elif hasattr(model, "text") and hasattr(model.text, "tokenizer"):  # LiT: MiniLM WordPiece
        hf = model.text.tokenizer
        with atomic_path(out / WORDPIECE_FILE) as tmp:
            hf.backend_tokenizer.save(str(tmp))
        config = {
            "kind": "wordpiece",
            "file": WORDPIECE_FILE,
            "context_length": int(model.text.context_length),
            "pad_token_id": int(model.text.pad_token_id),
            "clean": "whitespace",  # MiniLMTextEncoder.tokenize cleans as open_clip does
        }
    else:
        raise ExportConfigError(f"do not know how to export the tokenizer of {type(model).__name__}")
    atomic_write_json(out / TOKENIZER_CONFIG, config)
    return config


def _hf_tokenizer_config(tokenizer: Any, out: Path) -> dict[str, Any]:
    """open_clip's ``HFTokenizer`` (a student on the teacher's MiniLM WordPiece): its fast
    tokenizer's ``tokenizer.json`` served by the WordPiece path, after the same text cleaning
    open_clip applies first, padded with the pad id to ``context_length`` and truncated there as
    ``padding='max_length', truncation=True`` does."""
    from open_clip.tokenizer import _clean_lower, _clean_whitespace

    cleans = {_clean_whitespace: "whitespace", _clean_lower: "lower"}
    clean = cleans.get(tokenizer.clean_fn)
    hf = tokenizer.tokenizer
    if clean is None or tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
        raise ExportConfigError(
            "only open_clip HFTokenizer with clean 'whitespace' or 'lower', no tokenizer_mode and no "
            "strip_sep_token is served"
        )
    if not getattr(hf, "is_fast", False) or hf.padding_side != "right" or hf.truncation_side != "right":
        raise ExportConfigError(f"cannot serve {type(hf).__name__}: a fast tokenizer padded and truncated right")
    with atomic_path(out / WORDPIECE_FILE) as tmp:
        hf.backend_tokenizer.save(str(tmp))
    return {
        "kind": "wordpiece",
        "file": WORDPIECE_FILE,
        "context_length": int(tokenizer.context_length),
        "pad_token_id": int(hf.pad_token_id),
        "clean": clean,
    }


def write_preprocess(model: Any, out: Path) -> ImagePreprocessor:
    prep = ImagePreprocessor(
        size=tuple(int(v) for v in model.image_size),  # type: ignore[arg-type]
        mean=tuple(float(v) for v in model.image_mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in model.image_std),  # type: ignore[arg-type]
    )
    atomic_write_json(out / PREPROCESS_CONFIG, prep.to_dict())
    return prep


# --- parity ------------------------------------------------------------------------------------
def _compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    cosine = np.sum(reference * other, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1) + 1e-12
    )
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


def parity_inputs(
    model: Any, data: Path | None, images: Path | None, split: str, max_items: int | None, seed: int = 0
) -> tuple[np.ndarray, list[str], list[int] | None, str]:
    """(normalised pixels, captions, text_to_image or None, description) for the parity check."""
    import torch

    if data is None:
        rng = np.random.default_rng(seed)
        unit = torch.from_numpy(rng.random((64, 3, *model.image_size), dtype=np.float32))
        words = ["red", "heart", "a", "smiling", "cat", "face", "with", "tears", "of", "joy", "blue", "flag"]
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(64)]
        pixels = model.prepare_pixels(unit).numpy()
        return pixels, texts, None, "random inputs (no --data given): recall is not measured"
    from clipdistill.data.images import load_image_tensor, to_unit
    from clipdistill.data.loading import load_dataset

    dataset = load_dataset(data, images).split(split)
    if max_items is not None and len(dataset) > max_items:
        from clipdistill.data.dataset import PairedDataset

        dataset = PairedDataset(name=dataset.name, images=dataset.images[:max_items], source=dataset.source)
    raw = load_image_tensor(dataset.image_paths(), model.image_size[0])
    with torch.no_grad():
        pixels = torch.cat([model.prepare_pixels(to_unit(raw[i : i + 256])) for i in range(0, len(raw), 256)])
    description = f"{dataset.name} ({len(dataset)} images, {dataset.n_texts()} captions)"
    return pixels.numpy(), dataset.texts(), dataset.text_to_image(), description


def _torch_embed(model: Any, pixels: np.ndarray, tokens: np.ndarray, batch: int = 256) -> tuple[np.ndarray, ...]:
    import torch

    with torch.inference_mode():
        image = [model.encode_image(torch.from_numpy(pixels[i : i + batch])) for i in range(0, len(pixels), batch)]
        text = [model.encode_text(torch.from_numpy(tokens[i : i + batch])) for i in range(0, len(tokens), batch)]
    return torch.cat(image).numpy(), torch.cat(text).numpy()


def _onnx_embed(
    encoders: OnnxEncoders, pixels: np.ndarray, tokens: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, ...]:
    image = [encoders.encode_pixels(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    text = [encoders.encode_tokens(tokens[i : i + batch]) for i in range(0, len(tokens), batch)]
    return np.concatenate(image), np.concatenate(text)


def parity_report(
    model: Any,
    out: Path,
    *,
    variants: list[str],
    data: Path | None,
    images: Path | None = None,
    split: str = "test",
    max_items: int | None = None,
    stage: Stage = no_stage,
) -> dict[str, Any]:
    """Torch vs each ONNX variant on the same pixels and token ids: diffs, cosines, recall."""
    from clipdistill.eval.retrieval import recall_at_k

    with stage("parity: reading the inputs"):
        pixels, texts, text_to_image, description = parity_inputs(model, data, images, split, max_items)
    served_tokens = load_tokenizer(out)(texts)
    torch_tokens = _pad_tokens(model.tokenize(texts).numpy(), _context_length(model), _pad_id(model))
    mismatched = int((served_tokens != torch_tokens).any(axis=1).sum())
    with stage(f"parity: torch on {len(pixels)} images, {len(texts)} captions"):
        embeddings = {"torch": _torch_embed(model, pixels, torch_tokens)}
    for variant in variants:
        with stage(f"parity: ONNX {variant}"):
            embeddings[f"onnx_{variant}"] = _onnx_embed(OnnxEncoders(out, variant), pixels, served_tokens)
    report: dict[str, Any] = {
        "inputs": description,
        "tokenizer_mismatched_captions": mismatched,
        "n_images": len(pixels),
        "n_texts": len(texts),
    }
    reference_image, reference_text = embeddings["torch"]
    for name, (image, text) in embeddings.items():
        entry: dict[str, Any] = {}
        if name != "torch":
            entry["image"] = _compare(reference_image, image)
            entry["text"] = _compare(reference_text, text)
        entry["recall"] = recall_at_k(image, text, text_to_image) if text_to_image is not None else None
        report[name] = entry
    return report


# --- the whole export --------------------------------------------------------------------------
def export_model(
    spec: str,
    out: str | Path,
    *,
    int8: bool = False,
    opset: int = 17,
    exporter: str = "torchscript",
    data: str | Path | None = None,
    images: str | Path | None = None,
    split: str = "test",
    max_items: int | None = None,
    stage: Stage = no_stage,
) -> dict[str, Any]:
    """Export ``spec`` to ``out`` and return the parity report (also written as parity.json).

    ``export.json`` is written last: a folder without it is an interrupted export, and every
    reader refuses it. ``stage`` wraps each stage (loading, tracing each tower, int8
    quantisation, parity), for progress output.
    """
    import onnx
    import onnxruntime
    import torch

    from clipdistill.models.teachers import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_CONFIG).unlink(missing_ok=True)
    with stage(f"loading {spec}"):
        model = load_model(spec)
    variants = ["fp32", "int8"] if int8 else ["fp32"]
    int8_info: dict[str, Any] = {}
    for tower in ("image", "text"):
        fp32_path = out / TOWER_FILES["fp32"][tower]
        with stage(f"tracing the {tower} tower to ONNX ({exporter}, opset {opset})"):
            export_tower(model, tower, fp32_path, opset=opset, exporter=exporter)
        if int8:
            with stage(f"int8 quantisation of the {tower} tower"):
                int8_info[tower] = quantize_int8(fp32_path, out / TOWER_FILES["int8"][tower])
    tokenizer_config = write_tokenizer(model, out)
    prep = write_preprocess(model, out)
    names = [TOWER_FILES[v][t] for v in variants for t in ("image", "text")]
    config = {
        "format": "clipdistill-export/1",
        "source": {"spec": str(spec), "weights_sha256": weights_sha256(model)},
        "embed_dim": int(model.embed_dim),
        "image_size": list(prep.size),
        "context_length": tokenizer_config["context_length"],
        "inputs": {"image": "pixel_values float32 (B, 3, H, W)", "text": "input_ids int64 (B, context_length)"},
        "output": "embeddings float32 (B, embed_dim), L2-normalised",
        "files": {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size} for name in names},
        "variants": variants,
        "opset": opset,
        "exporter": exporter,
        "int8": int8_info or None,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    atomic_write_json(out / EXPORT_CONFIG, config)
    parity = parity_report(
        model,
        out,
        variants=variants,
        data=Path(data) if data is not None else None,
        images=Path(images) if images is not None else None,
        split=split,
        max_items=max_items,
        stage=stage,
    )
    if int8:
        parity["int8_settings"] = {
            "quantised_op_types": list(INT8_OP_TYPES),
            "kept_fp32": "Conv layers (conv trunks stay fp32) and the last MatMul/Gemm of each tower (projection)",
            "nodes_to_exclude": {tower: info["nodes_to_exclude"] for tower, info in int8_info.items()},
        }
    parity["files"] = config["files"]
    atomic_write_json(out / PARITY_FILE, parity)
    return parity


def read_parity(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / PARITY_FILE).read_text(encoding="utf-8"))
