"""The teacher cache: teacher outputs computed once, stored as safetensors shards + a manifest.

Running a large teacher every step dominates distillation cost, yet its outputs depend only on
(image, augmentation, caption, teacher, preprocessing). So :func:`build_cache` computes them
once for k fixed augmentations per image (MobileCLIP's "dataset reinforcement": augmentation
``a`` of image ``i`` is replayed bit-for-bit by :func:`~clipdistill.data.augment.replay_augmentation`
in every training process), and :class:`CachedTeacher` serves them to a method exactly like
:class:`~clipdistill.distill.teacher_source.OnlineTeacher` would.

Every row is keyed by (sample id, caption id, augmentation id, teacher, preprocessing hash),
never by its row index: the ids of each row are stored inside the shard itself and the teacher
and preprocessing are named by the shard's ``header`` hash, so a reordered or filtered dataset
can never silently read another image's output. A cache built for another teacher, dataset,
split, preprocessing or k is refused with the field, both values and the rebuild command.

Layout of a cache folder::

    images-00000.safetensors   embeddings (n, D) float32, aug_ids (n,) int64; metadata keys = image ids
    texts-00000.safetensors    embeddings (m, D) float32;                    metadata keys = caption ids
    image_tokens-00000.safetensors, text_tokens-00000.safetensors   tokens (optional, same rows)
    fusion_images-00000.safetensors   fusion teacher states (rows, N, ...), global (rows, G)   (optional)
    fusion_texts-00000.safetensors    fusion states ragged (tokens, ...), lengths (m,), global (m, G)
    manifest.json              written last, atomically: a cache without it is unfinished

Image rows are image-major: global row ``r`` holds augmentation ``r % k`` of image
``image_ids[r // k]``; text rows follow ``caption_ids``. Shard ``s`` holds rows
``[start, start + rows)`` as listed in the manifest.

**Fusion teacher outputs** (``build_cache(..., fusion=SPEC)``, ``cache build --fusion SPEC``).
MCAD and DCD need fusion match logits for pairs *inside a training batch* (all B² of them, or
each row's dual top-k, or each query's mined candidates), and which pairs share a batch is
decided by the run's epoch plan (seed, epoch, batch size). A pair table is therefore either all
N_images·k × N_captions pairs (about 42M for the emoji train split, quadratic in the data) or
tied to one (seed, batch size, epochs) plan and useless to every other run. So we cache what is
exact for any plan instead: the fusion teacher's **per-item states** (see
:mod:`clipdistill.models.fusion`: everything that depends on one image row or one caption,
i.e. the dual towers' tokens after the fusion teacher's input projections, and its dual-stage
embeddings), keyed exactly like the embeddings. Per step, :class:`CachedTeacher` gathers the
batch's states and the method runs only the fusion **pair head** on the pairs it needs (for
``fusion:`` one pooled cross-attention layer each way plus an MLP, cheap next to the towers);
the towers, the expensive part, never run in training.
Scores, pooled pair features and the heads g, h are then the same function of the same inputs
online and cached, so losses agree to float rounding. The fusion shards carry their own headers (fusion spec and
weights fingerprint added), so adding a fusion teacher to a cache reuses its embedding shards.

The package, one job per module: :mod:`~clipdistill.distill.cache.format` (names, errors, one
shard on disk), :mod:`~clipdistill.distill.cache.manifest` (what a cache is keyed by, the
manifest), :mod:`~clipdistill.distill.cache.build` (:func:`build_cache`, the embedding shards),
:mod:`~clipdistill.distill.cache.fusion_shards`, :mod:`~clipdistill.distill.cache.job` (what
one build works on) and :mod:`~clipdistill.distill.cache.reader` (:class:`CachedTeacher`).
Teacher fingerprints are :mod:`clipdistill.models.fingerprint`'s (they hash model files).
"""

from clipdistill.distill.cache.build import build_cache
from clipdistill.distill.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    FUSION_KINDS,
    MANIFEST_FILE,
    PIPELINE,
    CacheCorruptError,
    CacheError,
    CacheKeyError,
    CacheMismatchError,
    TokenFeaturesUnavailableError,
)
from clipdistill.distill.cache.manifest import dataset_fingerprint, preprocessing_hash, read_manifest
from clipdistill.distill.cache.reader import CachedTeacher
from clipdistill.models.fingerprint import teacher_fingerprint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FUSION_KINDS",
    "MANIFEST_FILE",
    "PIPELINE",
    "CacheCorruptError",
    "CacheError",
    "CacheKeyError",
    "CacheMismatchError",
    "CachedTeacher",
    "TokenFeaturesUnavailableError",
    "build_cache",
    "dataset_fingerprint",
    "preprocessing_hash",
    "read_manifest",
    "teacher_fingerprint",
]
