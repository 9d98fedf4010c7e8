"""Pretrained starting points for a preset student's two towers (``student.image_init`` and
``student.text_init``), applied to a freshly built student before training.

* ``image_init: imagenet`` loads the ImageNet EfficientNet-Lite weights (models/imagenet_lite.py,
  sha256-pinned) strictly into the open_clip timm trunk (``model.visual.trunk``); the projection
  to the embedding stays random. Only a ``tf_efficientnet_lite0/1/2`` trunk has such weights.
* ``text_init: teacher`` is TinyCLIP-style weight inheritance (Wu et al., ICCV 2023) from the
  teacher's text tower, all-MiniLM-L6-v2 (the LiT teacher's frozen text tower is exactly that
  installed model, read from ``minilm_path()``). The student must use MiniLM's WordPiece
  tokenizer and vocabulary (the ``lite0`` preset does), so it inherits:

  - a rank-``width`` basis ``P`` (384 x width) of the residual stream: the top right singular
    vectors of MiniLM's word-embedding matrix ``E`` (uncentred SVD, so ``E P P^T`` is the best
    rank-``width`` approximation of ``E`` itself; signs fixed so the result is the same on every
    machine). ``P`` is the identity when the student is as wide as MiniLM;
  - token embeddings ``E @ P``; positional embeddings: MiniLM's first ``context_length`` rows
    (plus its token-type-0 row, which BERT adds to every token) ``@ P``;
  - a subset of MiniLM's 6 layers spread evenly from the first to the last (2 layers: 0 and 5):
    the first layer sees the embedding statistics it was trained on, the last one writes the
    representation the final norm and the pooling expect; layers in between are dropped, as in
    TinyCLIP's uniform layer inheritance;
  - inside a layer, weights on the residual-stream dims are mapped by ``P`` (inputs ``W P``,
    outputs ``P^T W``, biases ``P^T b``). Attention keeps whole teacher heads: the
    ``width / 32`` MiniLM heads with the largest OV-circuit norm ``||W_o[:, h] W_v[h]||``, in
    their original order (a student head of 32 dims, as in the ``lite0`` preset, is exactly one
    teacher head; wider student heads concatenate neighbouring ones). The MLP keeps the
    ``mlp_ratio * width`` hidden units of MiniLM's 1536 with the largest ``||w_in|| * ||w_out||``
    (what a unit can contribute), in their original order;
  - layer norms: a diagonal gain in MiniLM's basis becomes ``diag(P^T diag(g) P)`` (its
    diagonal in the student's basis), the bias ``b @ P``;
  - the text projection ``P^T`` when the student's embedding has MiniLM's 384 dims, so the
    student's text embedding starts in MiniLM's coordinates; otherwise it stays random.

  A LiT teacher locked to another tower (``lit:TRUNK+mpnet``, all-mpnet-base-v2) still gives
  MiniLM's layers, recorded as ``text_weights`` in what :func:`apply_tower_init` returns: the
  student reads MiniLM's WordPiece ids, the rows the inherited embeddings are indexed by, and
  MPNet's vocabulary numbers the same words differently (30527 ids, ``<s>``/``<pad>``/``</s>``
  first); its 12 x 768 layers would also exceed every preset's text tower. MiniLM is always
  installed, so the student starts from a pretrained English encoder in MiniLM's coordinates
  (which distillation then moves to the teacher's) rather than from random weights.

  MiniLM is a post-LayerNorm BERT (``x = LN(x + f(x))``) pooled by a mean over tokens; open_clip's
  text block is pre-LayerNorm (``x = x + f(LN(x))``) pooled at [CLS]. So the inheritance is an
  *initialisation* that keeps the teacher's vocabulary geometry, heads and units, not an exact
  copy of its function: the pre-LN ``ln_1`` of a block takes the LayerNorm that fed the teacher
  layer (the embedding norm, or the previous layer's output norm), ``ln_2`` the layer's
  attention-output norm, ``ln_final`` the last inherited layer's output norm.

Both are deterministic (no random numbers are drawn), so a seeded run stays reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipdistill.models.openclip_model import OpenCLIPDualEncoder
from clipdistill.models.students import MINILM_TOKENIZER, StudentConfigError

IMAGE_INITS = ("random", "imagenet", "teacher")
TEXT_INITS = ("random", "teacher")
TEACHER_HEAD_DIM = 32  # all-MiniLM-L6-v2: 12 heads x 32 = 384
#: The model ``text_init: teacher`` inherits from, whatever the teacher's text tower (see above).
TEXT_INIT_SOURCE = "all-MiniLM-L6-v2"


class TowerInitError(StudentConfigError):
    """A tower initialisation that does not fit the student; the message names the config key."""


def apply_tower_init(
    student: OpenCLIPDualEncoder, image_init: str = "random", text_init: str = "random", teacher_spec: str | None = None
) -> dict[str, Any]:
    """Initialise the student's towers in place; returns what was done (for the run's log)."""
    if image_init not in IMAGE_INITS:
        raise TowerInitError(f"key 'student.image_init' has value {image_init!r}; valid: {', '.join(IMAGE_INITS)}")
    if text_init not in TEXT_INITS:
        raise TowerInitError(f"key 'student.text_init' has value {text_init!r}; valid: {', '.join(TEXT_INITS)}")
    done: dict[str, Any] = {"image_init": image_init, "text_init": text_init}
    if image_init == "imagenet":
        done["image_weights"] = init_image_from_imagenet(student)
    if image_init == "teacher":
        done["image_weights"] = init_image_from_teacher(student, teacher_spec)
    if text_init == "teacher":
        done["text_layers"] = init_text_from_minilm(student)
        done["text_weights"] = TEXT_INIT_SOURCE
    return done


# --- image ------------------------------------------------------------------------------------
def init_image_from_imagenet(student: OpenCLIPDualEncoder) -> str:
    """Load the ImageNet Lite weights into ``model.visual.trunk`` strictly; returns the weights' name."""
    from clipdistill.models.imagenet_lite import LITE_VARIANTS, PretrainedWeightsError, map_lite_state, read_lite_state

    vision = _model_cfg(student).get("vision_cfg", {})
    trunk_name = vision.get("timm_model_name")
    names = {variant.timm_name: name for name, variant in LITE_VARIANTS.items()}
    trunk = getattr(getattr(student.model, "visual", None), "trunk", None)
    if trunk_name not in names or trunk is None:
        shown = repr(trunk_name) if trunk_name else "not a timm trunk"
        raise TowerInitError(
            f"key 'student.image_init' is 'imagenet' but the student's image trunk is {shown}; ImageNet weights "
            f"exist for the timm trunks {', '.join(sorted(names))} (use student.preset=lite0, or image_init=random)"
        )
    name = names[trunk_name]
    state, _ = read_lite_state(name)
    mapped = {k: v for k, v in map_lite_state(state, trunk).items() if not k.startswith("classifier.")}
    try:
        trunk.load_state_dict(mapped, strict=True)
    except RuntimeError as error:
        raise PretrainedWeightsError(f"{name}: weights do not fit the student's {trunk_name} trunk: {error}") from error
    return name


def init_image_from_teacher(student: OpenCLIPDualEncoder, teacher_spec: str | None) -> str:
    """The teacher's own image tower (trunk + projection into the shared space) as the student's
    start: TinyCLIP's weight inheritance where the architectures agree, as a Lite teacher's trunk
    and a lite student's do. The student then runs it at its own (smaller) input size, so what
    distillation has to teach is the change of resolution, not the whole embedding space.

    The teacher may be a LiT teacher or an open_clip model with a timm trunk (an exported LiT
    teacher, another student); its trunk is read from its config before any weights are loaded,
    so a teacher whose image tower cannot be inherited (a ViT, another trunk) is refused at once,
    saying why and what to use instead."""
    from clipdistill.models.teachers import load_model

    if not teacher_spec:
        raise TowerInitError("key 'student.image_init' is 'teacher' but no 'teacher.spec' is set")
    visual = getattr(student.model, "visual", None)
    trunk, proj = getattr(visual, "trunk", None), getattr(getattr(visual, "head", None), "proj", None)
    if trunk is None or not isinstance(proj, torch.nn.Linear):
        raise TowerInitError(
            f"key 'student.image_init' is 'teacher': needs a student with a timm trunk and a linear projection; "
            f"{_INSTEAD}"
        )
    student_trunk = _model_cfg(student).get("vision_cfg", {}).get("timm_model_name")
    teacher_trunk, described = teacher_image_trunk(teacher_spec)
    if teacher_trunk is None:
        raise TowerInitError(
            f"key 'student.image_init' is 'teacher' but the teacher {teacher_spec} has {described}, not the "
            f"student's timm trunk {student_trunk}, so there is no image tower to inherit; {_INSTEAD}"
        )
    if teacher_trunk != student_trunk:
        raise TowerInitError(
            f"key 'student.image_init' is 'teacher': the teacher's trunk {teacher_trunk} differs from the "
            f"student's {student_trunk}; {_INSTEAD}"
        )
    teacher_trunk_module, teacher_proj = _teacher_image_modules(load_model(teacher_spec))
    wide, own = teacher_proj.weight.shape[0], proj.weight.shape[0]
    if wide != own:
        raise TowerInitError(
            f"key 'student.image_init' is 'teacher': the teacher {teacher_spec} embeds in {wide} dims, the student "
            f"in {own}, so its projection cannot be inherited; set student.embed_dim={wide}"
        )
    try:  # strict: a projection of another shape, or with/without a bias, is refused by torch itself
        trunk.load_state_dict(teacher_trunk_module.state_dict(), strict=True)
        proj.load_state_dict(teacher_proj.state_dict(), strict=True)
    except RuntimeError as error:
        raise TowerInitError(f"key 'student.image_init' is 'teacher': {teacher_spec} does not fit: {error}") from error
    return teacher_spec


_INSTEAD = (
    "use student.image_init=imagenet (ImageNet weights of the student's own Lite trunk, preset lite0) "
    "or student.image_init=random"
)


def teacher_image_trunk(spec: str) -> tuple[str | None, str]:
    """``(timm trunk name or None, what the image tower is)`` of a teacher, read from its config
    without loading weights (an ``hf-hub:`` teacher, whose config is on the hub, is loaded)."""
    import open_clip

    from clipdistill.models.lit import MODEL_FILE, lit_config_from_spec
    from clipdistill.models.run_dir import resolve_run_dir
    from clipdistill.models.spec import parse_spec

    parsed = parse_spec(spec)
    if parsed.schema == "lit":
        return lit_config_from_spec(parsed.name).image_model, "a LiT image tower"
    if parsed.schema == "hf":
        return None, "a transformers CLIP image tower (a ViT)"
    if parsed.schema == "hf-hub":
        from clipdistill.models.teachers import load_model

        trunk = getattr(getattr(getattr(load_model(spec), "model", None), "visual", None), "trunk", None)
        name = getattr(trunk, "pretrained_cfg", {}).get("architecture") if trunk is not None else None
        return (str(name), f"the timm trunk {name}") if name else (None, "an image tower without a timm trunk")
    if parsed.schema == "openclip":
        vision = (open_clip.get_model_config(parsed.name) or {}).get("vision_cfg", {})
    else:  # run:, local-dir:
        kind, directory = resolve_run_dir(parsed.name) if parsed.schema == "run" else ("openclip", Path(parsed.name))
        if kind == "lit":
            meta = json.loads((directory / MODEL_FILE).read_text(encoding="utf-8"))
            return str(meta["config"]["image_model"]), "a LiT image tower"
        raw = json.loads((directory / "open_clip_config.json").read_text(encoding="utf-8"))
        vision = raw.get("model_cfg", raw).get("vision_cfg", {})
    name = vision.get("timm_model_name")
    if name:
        return str(name), f"the timm trunk {name}"
    if isinstance(vision.get("layers"), (list, tuple)):
        return None, "open_clip's ResNet image tower (no timm trunk)"
    return None, "a ViT image tower (open_clip's VisionTransformer, no timm trunk)"


def _teacher_image_modules(teacher: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The teacher's trunk and image projection: a LiT teacher's, or an open_clip timm tower's."""
    from clipdistill.models.lit import LiTModel

    if isinstance(teacher, LiTModel):
        return teacher.trunk, teacher.image_proj
    visual = getattr(getattr(teacher, "model", None), "visual", None)
    trunk, proj = getattr(visual, "trunk", None), getattr(getattr(visual, "head", None), "proj", None)
    if trunk is None or not isinstance(proj, torch.nn.Linear):
        raise TowerInitError(
            f"key 'student.image_init' is 'teacher': the teacher {teacher.spec} has no timm trunk with a linear "
            f"projection to inherit; {_INSTEAD}"
        )
    return trunk, proj


# --- text -------------------------------------------------------------------------------------
def embedding_basis(embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """``P`` (dim x width): the top-``width`` right singular vectors of ``embeddings`` (float64),
    each signed so its largest-magnitude entry is positive (SVD signs are arbitrary otherwise)."""
    dim = embeddings.shape[1]
    if width == dim:
        return torch.eye(dim, dtype=torch.float64)
    # The right singular vectors are the eigenvectors of the (dim x dim) Gram matrix: in float64
    # that is as accurate here and ~8x faster than an SVD of the 30522-row matrix.
    matrix = embeddings.double()
    _, vectors = torch.linalg.eigh(matrix.T @ matrix)  # ascending eigenvalues
    basis = vectors[:, -width:].flip(1).contiguous()
    peak = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[peak, torch.arange(width)])
    return basis * signs


def spread_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """``student_layers`` teacher layer indices spread evenly from the first to the last."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def _top_in_order(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in ascending index order (ties: lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def _layer_norm(weight: torch.Tensor, bias: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (basis * basis).T @ weight, bias @ basis


def read_minilm(path: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MiniLM's weights (safetensors, float64) and its config.json."""
    from safetensors.torch import load_file

    from clipdistill.models.text_minilm import minilm_path

    folder = path or minilm_path()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    state = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    return state, config


def _check_text_tower(student: OpenCLIPDualEncoder, config: dict[str, Any]) -> dict[str, Any]:
    text_cfg = _model_cfg(student).get("text_cfg", {})
    vocab = int(config["vocab_size"])
    if text_cfg.get("hf_tokenizer_name") != MINILM_TOKENIZER or int(text_cfg.get("vocab_size", 0)) != vocab:
        raise TowerInitError(
            f"key 'student.text_init' is 'teacher' but the student's text tower uses tokenizer "
            f"{text_cfg.get('hf_tokenizer_name') or 'open_clip CLIP BPE'!r} with {text_cfg.get('vocab_size')} ids; "
            f"inheriting MiniLM's token embeddings needs its WordPiece vocabulary (text_cfg.hf_tokenizer_name "
            f"{MINILM_TOKENIZER!r}, vocab_size {vocab}), as in student.preset=lite0"
        )
    model = student.model
    if text_cfg.get("hf_model_name") or text_cfg.get("embed_cls") or not hasattr(model, "token_embedding"):
        raise TowerInitError("key 'student.text_init': the student's text tower is not open_clip's TextTransformer")
    width = int(model.token_embedding.weight.shape[1])
    teacher_width = int(config["hidden_size"])
    problems = []
    if int(config["hidden_size"]) // int(config["num_attention_heads"]) != TEACHER_HEAD_DIM:
        problems.append(f"the teacher's heads are not {TEACHER_HEAD_DIM} wide")
    if width % TEACHER_HEAD_DIM or width > teacher_width:
        problems.append(f"width {width} (must be a multiple of {TEACHER_HEAD_DIM}, at most {teacher_width})")
    if len(model.transformer.resblocks) > int(config["num_hidden_layers"]):
        problems.append(f"layers {len(model.transformer.resblocks)} (MiniLM has {config['num_hidden_layers']})")
    if model.transformer.resblocks[0].mlp.c_fc.out_features > int(config["intermediate_size"]):
        problems.append(f"MLP hidden {model.transformer.resblocks[0].mlp.c_fc.out_features} (MiniLM has 1536)")
    if model.positional_embedding.shape[0] > int(config["max_position_embeddings"]):
        problems.append(f"context_length {model.positional_embedding.shape[0]} (MiniLM has 512 positions)")
    if problems:
        raise TowerInitError(f"key 'student.text_init': the text tower cannot inherit MiniLM: {'; '.join(problems)}")
    return text_cfg


@torch.no_grad()
def init_text_from_minilm(student: OpenCLIPDualEncoder, path: Path | None = None) -> list[int]:
    """Inherit the student's text tower from MiniLM (see the module docstring); returns the
    teacher layers used."""
    state, config = read_minilm(path)
    _check_text_tower(student, config)
    model = student.model
    width = int(model.token_embedding.weight.shape[1])
    words = state["embeddings.word_embeddings.weight"]
    basis = embedding_basis(words, width)
    new: dict[str, torch.Tensor] = {"token_embedding.weight": words @ basis}
    context = model.positional_embedding.shape[0]
    positions = (
        state["embeddings.position_embeddings.weight"][:context] + state["embeddings.token_type_embeddings.weight"][0]
    )
    new["positional_embedding"] = positions @ basis
    blocks = model.transformer.resblocks
    layers = spread_layers(int(config["num_hidden_layers"]), len(blocks))
    n_heads = width // TEACHER_HEAD_DIM
    for index, (block, layer) in enumerate(zip(blocks, layers, strict=True)):
        src = f"encoder.layer.{layer}."
        dst = f"transformer.resblocks.{index}."
        before = "embeddings.LayerNorm" if layer == 0 else f"encoder.layer.{layer - 1}.output.LayerNorm"
        new[dst + "ln_1.weight"], new[dst + "ln_1.bias"] = _layer_norm(
            state[before + ".weight"], state[before + ".bias"], basis
        )
        new[dst + "ln_2.weight"], new[dst + "ln_2.bias"] = _layer_norm(
            state[src + "attention.output.LayerNorm.weight"], state[src + "attention.output.LayerNorm.bias"], basis
        )
        w_o = state[src + "attention.output.dense.weight"]
        w_v = state[src + "attention.self.value.weight"]
        head = [slice(h * TEACHER_HEAD_DIM, (h + 1) * TEACHER_HEAD_DIM) for h in range(len(w_v) // TEACHER_HEAD_DIM)]
        ov = [torch.linalg.matrix_norm(w_o[:, rows] @ w_v[rows]) for rows in head]
        heads = _top_in_order(torch.stack(ov), n_heads)
        dims = (heads[:, None] * TEACHER_HEAD_DIM + torch.arange(TEACHER_HEAD_DIM)).reshape(-1)
        qkv = [state[f"{src}attention.self.{part}.weight"][dims] @ basis for part in ("query", "key", "value")]
        new[dst + "attn.in_proj_weight"] = torch.cat(qkv)
        new[dst + "attn.in_proj_bias"] = torch.cat(
            [state[f"{src}attention.self.{part}.bias"][dims] for part in ("query", "key", "value")]
        )
        new[dst + "attn.out_proj.weight"] = basis.T @ w_o[:, dims]
        new[dst + "attn.out_proj.bias"] = state[src + "attention.output.dense.bias"] @ basis
        w_in, w_out = state[src + "intermediate.dense.weight"], state[src + "output.dense.weight"]
        units = _top_in_order(w_in.norm(dim=1) * w_out.norm(dim=0), block.mlp.c_fc.out_features)
        new[dst + "mlp.c_fc.weight"] = w_in[units] @ basis
        new[dst + "mlp.c_fc.bias"] = state[src + "intermediate.dense.bias"][units]
        new[dst + "mlp.c_proj.weight"] = basis.T @ w_out[:, units]
        new[dst + "mlp.c_proj.bias"] = state[src + "output.dense.bias"] @ basis
    last = f"encoder.layer.{layers[-1]}.output.LayerNorm"
    new["ln_final.weight"], new["ln_final.bias"] = _layer_norm(state[last + ".weight"], state[last + ".bias"], basis)
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.nn.Parameter) and projection.shape == (width, words.shape[1]):
        new["text_projection"] = basis.T
    own = model.state_dict()
    for name, value in new.items():
        if own[name].shape != value.shape:
            raise TowerInitError(
                f"key 'student.text_init': {name} has shape {tuple(own[name].shape)}, not {tuple(value.shape)}"
            )
        own[name].copy_(value.to(own[name].dtype))
    return layers


def _model_cfg(student: OpenCLIPDualEncoder) -> dict[str, Any]:
    model_cfg = getattr(student, "model_cfg", None)
    if model_cfg is None:
        raise TowerInitError("the student has no model_cfg; build it with build_student()")
    return model_cfg
