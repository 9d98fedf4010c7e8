"""The single-stream fusion teacher: scores an (image, caption) pair jointly.

A dual encoder scores a pair with one dot product of two vectors computed apart, so it cannot
check that the caption's words refer to what is in *this* image. A fusion (single-stream)
model lets the caption's tokens attend to the image's tokens before it decides: it ranks hard
candidates better, but runs once per pair, so it is too slow to index. It is the right tool for
a teacher (MCAD, DCD) and for re-ranking a dual encoder's short list.

Every backend splits its work in two, which is what lets the teacher cache serve it exactly:

* **per-item states** (:class:`FusionStates`): everything that depends on one image or one
  caption alone: image tokens, caption tokens, and the backend's own dual-stage embeddings
  (``image_global``/``text_global``, the space the first retrieval stage ranks in). These
  need the expensive towers and are computed once per item; the cache stores them.
* **the pair head** (:meth:`FusionTeacher.pair_logits`): cross-attention between one caption's
  tokens and one image's tokens, run per pair on the states.

Backends (the spec parser in :mod:`clipdistill.models.spec` names them):

* ``fusion:PATH`` (:class:`FusionEncoder`): ours, trained by ``clipdistill teacher
  train-fusion`` on top of a dual teacher (any :class:`DualEncoder` with token features, e.g.
  the LiT teacher). States are the dual teacher's trunk tokens and MiniLM tokens projected to a
  small width; the head is one cross-attention layer each way (caption→image and image→caption),
  pooled over its query tokens, an MLP giving the pooled pair feature f, and a logit that adds a learned correction to
  the dual teacher's own cosine (so re-ranking starts from the dual order and learns what the
  dot product misses). Its heads g, h map into the dual teacher's space (MCAD's feature targets),
  each reading only its own side (``heads_input="own"``): g the image's projected tokens, h the
  caption's.
  With ``match="pool"`` (what ``train-fusion`` builds by default) the logit is instead the dual
  teacher's own cosine recomputed with pair-conditioned pooling (:func:`pooled_cosine`): the
  image says which caption words it explains, the caption which patches matter. On emoji, whose
  val/test concepts never occur in training, the learned correction overfit the training
  concepts and lowered held-out R@1; these few weights over MiniLM's token space raise it.
* ``blip-itm:ID`` (:class:`BlipItmBackend`): transformers' ``BlipForImageTextRetrieval``. States
  are the ViT's patch embeddings and the caption's token ids; the head is BLIP's text encoder with
  cross-attention plus its ITM head. Its dual stage is BLIP's own ITC projections; it has no heads
  into another teacher's space, so it gives no pooled features for MCAD.

The match logit is a ranking score for the pair. ``train-fusion``'s default listwise loss trains
only its differences between one caption's candidates, so its offset is arbitrary (``dual_bias``
stays at the centring it starts from); only under ``loss: bce`` is it the log-odds that the pair
matches. BLIP's (logit[match] − logit[no match]) is the log-odds of its ITM head.

A ``fusion:`` folder records the training that produced it (``fusion_config.json``'s ``training``:
kept ``epoch``, its ``steps``, ``epochs_run``); :meth:`FusionTeacher.untrained` says when a head
is untrained (no steps recorded; or, without a record, the logit's zero-initialised weights still
0), and distillation methods that read a fusion teacher refuse such a head.
"""

from clipdistill.models.fusion.base import (
    DENSE_FRACTION,
    PAIR_CHUNK,
    FusionBackend,
    FusionError,
    FusionStates,
    FusionTeacher,
    pad_texts,
    score_pairs,
    unpad_texts,
)
from clipdistill.models.fusion.blip import BlipItmBackend, load_blip_itm
from clipdistill.models.fusion.encoder import (
    CONFIG_FILE,
    HEADS_INPUTS,
    WEIGHTS_FILE,
    CrossAttention,
    FusionConfig,
    FusionEncoder,
    dual_token_geometry,
    pooled_cosine,
    read_fusion_config,
    read_fusion_training,
    save_fusion_encoder,
)
from clipdistill.models.fusion.factory import load_fusion, load_fusion_encoder, load_fusion_teacher
from clipdistill.models.fusion.identity import same_dual_teacher

__all__ = [
    "CONFIG_FILE",
    "DENSE_FRACTION",
    "HEADS_INPUTS",
    "PAIR_CHUNK",
    "WEIGHTS_FILE",
    "BlipItmBackend",
    "CrossAttention",
    "FusionBackend",
    "FusionConfig",
    "FusionEncoder",
    "FusionError",
    "FusionStates",
    "FusionTeacher",
    "dual_token_geometry",
    "load_blip_itm",
    "load_fusion",
    "load_fusion_encoder",
    "load_fusion_teacher",
    "pad_texts",
    "pooled_cosine",
    "read_fusion_config",
    "read_fusion_training",
    "same_dual_teacher",
    "save_fusion_encoder",
    "score_pairs",
    "unpad_texts",
]
