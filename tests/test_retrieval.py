"""recall_at_k against a naive reference that stable-sorts every query's scores.

Ties are the delicate part, so most data here is built from *exactly* unit vectors (four
entries of ±0.5, or one ±1): their norms, the normalisation and every dot product are exact in
float32 and float64 alike, so equal scores really are equal in both the implementation and the
reference, whatever order the matrix multiply sums in.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdistill.eval.retrieval import METRIC_KEYS, recall_at_k

KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


# --- reference ---------------------------------------------------------------------------------
def naive_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Rank every query with a stable argsort of -scores; read off the first positive."""
    images = np.asarray(image_emb, dtype=np.float64)
    texts = np.asarray(text_emb, dtype=np.float64)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    owner = np.asarray(text_to_image)
    scores = texts @ images.T

    i2t_ranks = []
    for i in range(len(images)):
        order = np.argsort(-scores[:, i], kind="stable")
        i2t_ranks.append(np.flatnonzero(owner[order] == i)[0])
    t2i_ranks = []
    for j in range(len(texts)):
        order = np.argsort(-scores[j], kind="stable")
        t2i_ranks.append(np.flatnonzero(order == owner[j])[0])

    out = {f"i2t_R@{k}": 100.0 * np.mean(np.array(i2t_ranks) < k) for k in ks}
    out |= {f"t2i_R@{k}": 100.0 * np.mean(np.array(t2i_ranks) < k) for k in ks}
    out["rsum"] = sum(out.values())
    return out


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


# --- data --------------------------------------------------------------------------------------
def exact_codebook(dim: int) -> np.ndarray:
    """All unit vectors with one ±1 entry or four ±0.5 entries: exact norms and dot products."""
    vectors = []
    for i, sign in itertools.product(range(dim), (1.0, -1.0)):
        v = np.zeros(dim)
        v[i] = sign
        vectors.append(v)
    for idx in itertools.combinations(range(dim), 4):
        for signs in itertools.product((0.5, -0.5), repeat=4):
            v = np.zeros(dim)
            v[list(idx)] = signs
            vectors.append(v)
    return np.array(vectors)


def tied_vectors(rng: np.random.Generator, n: int, dim: int = 5, codebook_size: int = 12) -> np.ndarray:
    """Rows from a small codebook (many duplicates and equal scores), scaled by powers of two
    so the normalisation inside recall_at_k is exercised yet stays exact."""
    book = exact_codebook(dim)
    book = book[rng.choice(len(book), size=min(codebook_size, len(book)), replace=False)]
    scale = 2.0 ** rng.integers(-3, 4, size=(n, 1))
    return book[rng.integers(0, len(book), size=n)] * scale


def grouped_captions(counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """text_to_image for images with the given caption counts, in shuffled order."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return rng.permutation(owner)


# --- agreement with the reference ----------------------------------------------------------------
def test_matches_reference_five_captions_continuous():
    rng = np.random.default_rng(0)
    n_images, dim = 60, 16
    images = rng.normal(size=(n_images, dim))
    owner = np.repeat(np.arange(n_images), 5)
    texts = images[owner] + 1.5 * rng.normal(size=(len(owner), dim))
    got = recall_at_k(images.astype(np.float32), texts.astype(np.float32), owner)
    assert_same(got, naive_recall(images, texts, owner))
    assert 0 < got["t2i_R@1"] < 100  # a non-trivial case


def test_matches_reference_with_ties():
    rng = np.random.default_rng(1)
    n_images = 40
    images = tied_vectors(rng, n_images)
    owner = np.repeat(np.arange(n_images), 5)
    texts = tied_vectors(rng, len(owner))
    assert_same(recall_at_k(images, texts, owner), naive_recall(images, texts, owner))


def test_matches_reference_uneven_captions_shuffled():
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 8, size=30).tolist()
    owner = grouped_captions(counts, rng)
    images = tied_vectors(rng, len(counts))
    texts = tied_vectors(rng, len(owner))
    ks = (1, 2, 3, 50)
    assert_same(recall_at_k(images, texts, owner, ks), naive_recall(images, texts, owner, ks))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunking_does_not_change_results(chunk_size):
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 6, size=25).tolist()
    owner = grouped_captions(counts, rng)
    images = tied_vectors(rng, len(counts))
    texts = tied_vectors(rng, len(owner))
    whole = recall_at_k(images, texts, owner)
    assert recall_at_k(images, texts, owner, chunk_size=chunk_size) == whole


@st.composite
def retrieval_problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=7))
    dim = draw(st.integers(4, 5))
    codebook_size = draw(st.integers(2, 10))
    ks = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    chunk_size = draw(st.none() | st.integers(1, 5))
    rng = np.random.default_rng(seed)
    owner = grouped_captions(counts, rng)
    images = tied_vectors(rng, len(counts), dim, codebook_size)
    texts = tied_vectors(rng, len(owner), dim, codebook_size)
    return images, texts, owner, ks, chunk_size


@settings(max_examples=150, deadline=None)
@given(retrieval_problems())
def test_property_matches_reference(problem):
    images, texts, owner, ks, chunk_size = problem
    got = recall_at_k(images, texts, owner, ks, chunk_size=chunk_size)
    assert_same(got, naive_recall(images, texts, owner, ks))


# --- known values ------------------------------------------------------------------------------
def test_hand_built_example_exact_values():
    """Ranks worked out by hand, including ties broken by the lower index.

    t2i ranks [0, 1, 1, 2]; i2t ranks [0, 3, 2] (image 1's caption 2 scores 0, beaten by
    captions 1 and 3 with score 1 and by caption 0 with an equal score and a lower index).
    """
    images = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
    got = recall_at_k(images, texts, [0, 0, 1, 2], ks=(1, 2, 3))
    want = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 100 / 3,
        "i2t_R@3": 200 / 3,
        "t2i_R@1": 25.0,
        "t2i_R@2": 75.0,
        "t2i_R@3": 100.0,
        "rsum": 100 / 3 + 100 / 3 + 200 / 3 + 25 + 75 + 100,
    }
    assert_same(got, want)


def test_perfect_embeddings_score_100():
    rng = np.random.default_rng(4)
    images = rng.normal(size=(20, 32))
    owner = np.repeat(np.arange(20), 5)
    texts = images[owner] * rng.uniform(0.1, 10, size=(len(owner), 1))  # scale must not matter
    got = recall_at_k(images, texts, owner)
    assert got == {key: (600.0 if key == "rsum" else 100.0) for key in KEYS}


def test_keys_order_and_python_floats():
    rng = np.random.default_rng(5)
    images, texts = rng.normal(size=(8, 4)), rng.normal(size=(16, 4))
    got = recall_at_k(images, texts, np.repeat(np.arange(8), 2))
    assert list(got) == KEYS == list(METRIC_KEYS)
    assert all(type(v) is float for v in got.values())
    assert all(0.0 <= got[k] <= 100.0 for k in KEYS[:-1])


def test_accepts_fp16_numpy_torch_and_list_inputs():
    rng = np.random.default_rng(6)
    # fp16-representable values, so every conversion below is exact and results must be equal
    images = rng.normal(size=(12, 8)).astype(np.float16).astype(np.float64)
    owner = np.repeat(np.arange(12), 3)
    texts = (images[owner] + rng.normal(size=(36, 8))).astype(np.float16).astype(np.float64)
    reference = recall_at_k(images.astype(np.float32), texts.astype(np.float32), owner)
    variants = [
        (images.astype(np.float16), texts.astype(np.float16), owner.tolist()),
        (torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(owner)),
        (torch.from_numpy(images).half(), torch.from_numpy(texts), owner.astype(np.int32)),
    ]
    for image_emb, text_emb, mapping in variants:
        got = recall_at_k(image_emb, text_emb, mapping)
        assert got == reference


def test_does_not_modify_inputs():
    rng = np.random.default_rng(7)
    images = rng.normal(size=(5, 4)).astype(np.float32)
    texts = rng.normal(size=(10, 4)).astype(np.float32)
    before = images.copy(), texts.copy()
    recall_at_k(images, texts, np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(images, before[0])
    np.testing.assert_array_equal(texts, before[1])


# --- errors ------------------------------------------------------------------------------------
def _small():
    rng = np.random.default_rng(8)
    return rng.normal(size=(3, 4)), rng.normal(size=(6, 4))


def test_image_without_caption_is_an_error_naming_it():
    images, texts = _small()
    with pytest.raises(ValueError, match="image index 2"):
        recall_at_k(images, texts, [0, 0, 1, 1, 0, 1])


@pytest.mark.parametrize("mapping", [[0, 1, 2, 0, 1, 3], [0, 1, 2, 0, 1, -1]])
def test_out_of_range_image_index_is_an_error(mapping):
    images, texts = _small()
    with pytest.raises(ValueError, match=r"text_to_image\[5\]"):
        recall_at_k(images, texts, mapping)


@pytest.mark.parametrize("mapping", [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 0], [[0, 1, 2], [0, 1, 2]]])
def test_wrong_length_mapping_is_an_error(mapping):
    images, texts = _small()
    with pytest.raises(ValueError, match="one entry per caption"):
        recall_at_k(images, texts, mapping)


def test_float_mapping_is_an_error():
    images, texts = _small()
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(images, texts, np.array([0, 1, 2, 0, 1, 2], dtype=np.float32))


def test_bad_shapes_ks_and_chunk_size_are_errors():
    images, texts = _small()
    owner = [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="dims differ"):
        recall_at_k(images, texts[:, :3], owner)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(images[0], texts, owner)
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(images, texts, owner, ks=(0, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        recall_at_k(images, texts, owner, chunk_size=0)
