"""The fusion teacher: LiT token features, the cross-attention head against a naive reference,
BLIP ITM against transformers itself, training and loading ``fusion:`` folders, re-ranking,
fusion states in the teacher cache (equal to online), and the ``train-fusion`` CLI."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.data.loading import load_dataset
from clipdistill.distill.base import Batch, MethodConfigError, TeacherSource, build_method_args
from clipdistill.distill.cache import MANIFEST_FILE, CachedTeacher, CacheMismatchError, build_cache
from clipdistill.distill.fusion_source import OnlineFusion
from clipdistill.distill.methods import get_method
from clipdistill.distill.teacher_source import OnlineTeacher
from clipdistill.eval.paired_bootstrap import mean_difference
from clipdistill.eval.rerank import rerank_from_states, rerank_recall
from clipdistill.models.fusion import (
    CrossAttention,
    FusionConfig,
    FusionEncoder,
    FusionError,
    FusionStates,
    FusionTeacher,
    dual_token_geometry,
    load_fusion,
    load_fusion_encoder,
    pad_texts,
    read_fusion_config,
    save_fusion_encoder,
    score_pairs,
    unpad_texts,
)
from clipdistill.models.lit import LiTConfig, LiTModel
from clipdistill.models.spec import ModelSpecError, parse_fusion_spec
from clipdistill.models.teachers import load_model, load_teacher
from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

TINY = FusionTrainConfig(epochs=2, batch_size=4, width=16, heads=2, mine_top=4, negatives=2, lr=1e-2)


def _save_teacher(folder: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    LiTModel(LiTConfig(image_model="test_vit", image_size=32)).save(folder)  # 5 image tokens at 32 px
    return f"run:{folder}"


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def dataset(shapes_dataset_dir: Path) -> PairedDataset:
    return load_dataset(shapes_dataset_dir)


@pytest.fixture(scope="module")
def fusion_dir(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str, dataset: PairedDataset) -> Path:
    out = tmp_path_factory.mktemp("fusion")
    train_fusion_teacher(teacher_spec, dataset, out, TINY, progress=False)
    return out


def _batch(dataset: PairedDataset, aug_ids: list[int]) -> Batch:
    from clipdistill.data.augment import replay_augmentation

    records = dataset.split("train").images[: len(aug_ids)]
    ids = [r.image_id for r in records]
    pixels = replay_augmentation(to_unit(load_image_tensor([r.path for r in records], 32)), ids, aug_ids, seed=0)
    captions = [r.captions[i % len(r.captions)] for i, r in enumerate(records)]
    return Batch(
        unit_pixels=pixels,
        texts=[c.text for c in captions],
        image_ids=ids,
        caption_ids=[c.caption_id for c in captions],
        aug_ids=torch.tensor(aug_ids),
    )


# ---------------------------------------------------------------- LiT token features
@pytest.mark.parametrize(("trunk", "tokens"), [("test_vit", 5), ("test_convnext", 1), ("test_mambaout", 1)])
def test_lit_token_features(trunk: str, tokens: int) -> None:
    model = LiTModel(LiTConfig(image_model=trunk, image_size=32)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    image_tokens = model.encode_image_tokens(pixels)
    assert image_tokens.shape == (2, tokens, model.trunk.num_features)
    ids = model.tokenize(["a red circle on white", "blue"])
    embedding, hidden, mask = model.encode_text_and_tokens(ids)
    torch.testing.assert_close(embedding, model.encode_text(ids), atol=1e-6, rtol=0)
    assert hidden.shape == (2, model.config.context_length, 384)
    assert mask.sum(dim=1).tolist() == (ids != model.text.pad_token_id).sum(dim=1).tolist()
    assert bool((hidden[~mask] == 0).all()) and bool((hidden[mask].abs().sum(-1) > 0).all())
    torch.testing.assert_close(model.encode_text_tokens(ids), hidden)


# ---------------------------------------------------------------- the pair head
def test_cross_attention_equals_naive_pooled_attention() -> None:
    """LN(mean over real query tokens of [x_q + out(multi-head attention of q over real keys)])."""
    torch.manual_seed(0)
    layer = CrossAttention(width=8, heads=2)
    x, other = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    query_mask = torch.tensor([[True] * 4, [True, False, False, False], [True, True, True, False]])
    key_mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, True, True, False]])
    out = layer(layer.project(x, query_mask), layer.project(other, key_mask), query_mask, key_mask)
    for p in range(3):
        q = layer.q(x[p]).view(4, 2, 4)
        k = layer.k(other[p]).view(5, 2, 4)
        v = layer.v(other[p]).view(5, 2, 4)
        heads = []
        for h in range(2):
            scores = q[:, h] @ k[:, h].t() / math.sqrt(4)
            scores[:, ~key_mask[p]] = float("-inf")
            heads.append(torch.softmax(scores, dim=-1) @ v[:, h])
        tokens = x[p] + layer.out(torch.cat(heads, dim=-1))
        expected = layer.norm(tokens[query_mask[p]].mean(dim=0))
        torch.testing.assert_close(out[p], expected, atol=1e-5, rtol=1e-5)


def _random_encoder(seed: int = 0, match: str = "cross") -> FusionEncoder:
    torch.manual_seed(seed)
    config = FusionConfig(
        "fake:dual", image_token_dim=6, image_tokens=3, text_token_dim=5, embed_dim=4, width=8, heads=2, match=match
    )
    encoder = FusionEncoder(config)
    torch.nn.init.normal_(encoder.itm.weight)
    if match == "pool":  # trained-looking pooling weights, so every term of the pooled cosine counts
        torch.nn.init.normal_(encoder.word_score.weight)
        encoder.word_image.data.fill_(1.5)
        encoder.patch_text.data.fill_(-2.0)
    return encoder.eval()


def _random_states(n_images: int = 4, n_texts: int = 5, seed: int = 1, extra: int = 0) -> FusionStates:
    """Random states of width 8 (+ ``extra`` dual-space features per token, as ``match="pool"`` has)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 1, 4, 2, 3][:n_texts]
    text, mask = pad_texts([torch.randn(n, 8 + extra, generator=g) for n in lengths])
    return FusionStates(
        image=torch.randn(n_images, 3, 8 + extra, generator=g),
        image_global=F.normalize(torch.randn(n_images, 4, generator=g), dim=-1),
        text=text,
        text_mask=mask,
        text_global=F.normalize(torch.randn(n_texts, 4, generator=g), dim=-1),
    )


@pytest.mark.parametrize("match", ["cross", "pool"])
def test_pair_scores_do_not_depend_on_batching_or_padding(match: str) -> None:
    teacher = FusionTeacher(_random_encoder(match=match), spec="fusion:fake")
    states = _random_states(extra=4 if match == "pool" else 0)
    matrix = teacher.score_matrix(states)
    assert matrix.shape == (4, 5) and matrix.std() > 0
    # one pair at a time, from states holding only that image and caption (padded to its own length)
    for i in range(4):
        for j in range(5):
            text, mask = pad_texts(unpad_texts(states.text[j : j + 1], states.text_mask[j : j + 1]))
            single = FusionStates(
                states.image[i : i + 1], states.image_global[i : i + 1], text, mask, states.text_global[j : j + 1]
            )
            zero = torch.zeros(1, dtype=torch.long)
            torch.testing.assert_close(teacher.pair_logits(single, zero, zero)[0], matrix[i, j], atol=1e-5, rtol=0)
    # a sparse pair list (gathered per pair) gives the grid's numbers
    image_index, text_index = torch.tensor([0, 3, 2, 1]), torch.tensor([4, 0, 2, 2])
    sparse = teacher.pair_logits(states, image_index, text_index)
    torch.testing.assert_close(sparse, matrix[image_index, text_index], atol=1e-5, rtol=0)
    # values behind the mask are ignored
    noisy = FusionStates(
        states.image,
        states.image_global,
        states.text + 5.0 * ~states.text_mask[..., None],
        states.text_mask,
        states.text_global,
    )
    torch.testing.assert_close(teacher.score_matrix(noisy), matrix, atol=1e-5, rtol=0)


def test_dense_grids_are_memoised_per_weights_and_states(monkeypatch) -> None:
    """MCAD and DCD score the same batches in one ``distill`` run, which hands their fusion
    teachers one memo: the second scoring of a batch's states reads the first's grid (the same
    numbers), while other states or other weights compute their own, and a teacher without a
    memo keeps nothing."""
    from clipdistill.models.encoding_memo import EncodingMemo

    encoder = _random_encoder(match="cross")
    calls: list[int] = []
    original = encoder.pair_grid

    def counting(prepared: object, images: slice, with_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return original(prepared, images, with_pooled=with_pooled)

    monkeypatch.setattr(encoder, "pair_grid", counting)
    teacher = FusionTeacher(encoder, spec="fusion:fake")
    states = _random_states()
    matrix = teacher.score_matrix(states)
    first = len(calls)
    assert first > 0
    teacher.score_matrix(states)
    assert len(calls) == 2 * first  # no memo: computed again
    teacher.encoding_memo = EncodingMemo()
    other_method = FusionTeacher(encoder, spec="fusion:fake")
    other_method.encoding_memo = teacher.encoding_memo
    torch.testing.assert_close(teacher.score_matrix(states), matrix, rtol=0, atol=0)
    calls.clear()
    image_index, text_index = torch.tensor([0, 1, 2, 3, 3, 2]), torch.tensor([0, 1, 2, 3, 4, 0])
    again = other_method.pair_logits(states, image_index, text_index)  # a dense-enough subset: the kept grid
    assert calls == [] and torch.equal(again, matrix[image_index, text_index])
    teacher.score_matrix(_random_states(seed=2))
    assert len(calls) == first  # other states
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.1)
    changed = teacher.score_matrix(states)
    assert len(calls) == 2 * first and not torch.equal(changed, matrix)  # other weights


def test_untrained_head_scores_like_the_dual_stage() -> None:
    config = FusionConfig(
        "fake:dual", image_token_dim=6, image_tokens=3, text_token_dim=5, embed_dim=4, width=8, heads=2
    )
    teacher = FusionTeacher(FusionEncoder(config), spec="fusion:fake")
    states = _random_states()
    dual = states.image_global @ states.text_global.t()
    torch.testing.assert_close(teacher.score_matrix(states), config.dual_logit_scale * dual, atol=1e-5, rtol=0)
    result = rerank_from_states(states, [0, 1, 2, 3, 0], teacher.pair_logits, k=3)
    assert result["reranked"] == result["dual"] and result["gain_R@1"] == 0.0


def test_pooled_cosine_equals_naive() -> None:
    """Per pair: word weights softmax(v·LN(w) + δ·cos(w, mean patch)), patch weights
    softmax(γ·cos(p, pooled caption)), cosine of the two weighted means; untrained = the dual cosine."""
    encoder = _random_encoder(match="pool")
    states = _random_states(extra=4)
    logits = FusionTeacher(encoder, spec="fusion:fake").score_matrix(states)
    for i in range(states.n_images):
        patches = states.image[i, :, 8:]
        mean = F.normalize(patches.mean(dim=0), dim=0)
        for j in range(states.n_texts):
            words = states.text[j, states.text_mask[j], 8:]
            w = encoder.word_score(encoder.word_norm(words)).squeeze(-1)
            w = w + encoder.word_image * (F.normalize(words, dim=-1) @ mean)
            text = F.normalize(torch.softmax(w, dim=0) @ words, dim=0)
            b = torch.softmax(encoder.patch_text * (F.normalize(patches, dim=-1) @ text), dim=0)
            cosine = F.normalize(b @ patches, dim=0) @ text
            expected = encoder.dual_weight * cosine + encoder.dual_bias
            torch.testing.assert_close(logits[i, j], expected, atol=1e-5, rtol=0)

    untrained = FusionTeacher(FusionEncoder(encoder.config), spec="fusion:fake")
    words = [states.text[j, states.text_mask[j], 8:] for j in range(states.n_texts)]
    dual = (
        F.normalize(states.image[:, :, 8:].mean(dim=1), dim=-1)
        @ F.normalize(torch.stack([w.mean(dim=0) for w in words]), dim=-1).t()
    )
    scale = encoder.config.dual_logit_scale
    torch.testing.assert_close(untrained.score_matrix(states), scale * dual, atol=1e-5, rtol=0)


def test_pool_logits_never_read_the_cross_attention_half() -> None:
    """With ``match="pool"`` a logits-only call skips the pair cross-attention (it only makes f):
    the same logits as a call that asks for f, also when the trained half of the states is NaN
    (what the fusion trainer's listwise scoring feeds it), and with gradients for the pooling."""
    encoder = _random_encoder(match="pool").train()
    runs: list[str] = []
    for name in ("text_to_image", "image_to_text"):
        getattr(encoder, name).register_forward_hook(lambda *_, name=name: runs.append(name))
    states = _random_states(extra=4)
    image_index, text_index = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([4, 0, 2, 3, 3])
    with_f, pooled = score_pairs(encoder, states, image_index, text_index, pooled=True)
    assert runs == ["text_to_image", "image_to_text"]
    alone, none = score_pairs(encoder, states, image_index, text_index)
    assert pooled is not None and none is None and len(runs) == 2
    torch.testing.assert_close(alone, with_f, atol=1e-6, rtol=0)
    image = states.image.clone()
    image[..., :8] = float("nan")
    blind = FusionStates(image, states.image_global, states.text, states.text_mask, states.text_global)
    logits, _ = score_pairs(encoder, blind, image_index, text_index)
    torch.testing.assert_close(logits, with_f, atol=1e-6, rtol=0)
    logits.sum().backward()
    assert encoder.word_score.weight.grad is not None and torch.isfinite(encoder.word_score.weight.grad).all()
    assert len(runs) == 2  # the cross-attention ran only for the call that asked for f


def test_pool_states_reproduce_the_lit_dual_cosine(teacher_spec: str) -> None:
    """``match="pool"`` copies the LiT heads, so its per-patch and per-word states pool back to the
    teacher's own embeddings (exact for a ResNet trunk, whose embedding is a linear map of the mean of its tokens)."""
    dual = LiTModel(LiTConfig(image_model="resnet10t", image_size=32)).eval()
    config = FusionConfig("fake:dual", match="pool", width=8, heads=2, **dual_token_geometry(dual))
    encoder = FusionEncoder(config, dual)
    encoder.copy_dual_heads(dual)
    pixels = torch.rand(3, 3, 32, 32)
    teacher = FusionTeacher(encoder, spec="fusion:fake")
    states = teacher.states(pixels, ["a red circle", "blue square on white", "green"])
    image = F.normalize(states.image[:, :, 8:].mean(dim=1), dim=-1)
    torch.testing.assert_close(image, states.image_global, atol=1e-5, rtol=0)
    words = states.text[..., 8:].sum(dim=1) / states.text_mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(F.normalize(words, dim=-1), states.text_global, atol=1e-5, rtol=0)


def test_frozen_fusion_teacher_stays_frozen() -> None:
    teacher = FusionTeacher(_random_encoder(), spec="fusion:fake")
    teacher.train()
    assert not teacher.backend.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(FusionError, match="without its dual teacher"):
        teacher.text_states(["a"])


# ---------------------------------------------------------------- re-ranking vs a naive loop
def test_rerank_recall_against_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    n_images, n_texts, k = 6, 12, 3
    states = FusionStates(
        image=torch.zeros(n_images, 1, 1),
        image_global=F.normalize(torch.randn(n_images, 4, generator=g), dim=-1),
        text=torch.zeros(n_texts, 1, 1),
        text_mask=torch.ones(n_texts, 1, dtype=torch.bool),
        text_global=F.normalize(torch.randn(n_texts, 4, generator=g), dim=-1),
    )
    fusion_table = torch.randn(n_images, n_texts, generator=g)
    owner = [j % n_images for j in range(n_texts)]

    def score(_: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return fusion_table[image_index, text_index]

    calls: list[int] = []

    def counted(s: FusionStates, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        calls.append(len(image_index))
        return score(s, image_index, text_index)

    import clipdistill.eval.rerank as rerank

    monkeypatch.setattr(rerank, "PAIRS_PER_CALL", 8)  # 36 pairs in calls of 8: the same result
    result = rerank_from_states(states, owner, counted, k=k, ks=(1, 2, 5))
    assert calls == [8, 8, 8, 8, 4]
    dual = states.text_global @ states.image_global.t()
    hits = {"dual": [0, 0, 0], "reranked": [0, 0, 0]}
    for j in range(n_texts):
        ranked = sorted(range(n_images), key=lambda i: (-float(dual[j, i]), i))
        shortlist = sorted(ranked[:k], key=lambda i: (-float(fusion_table[i, j]), ranked.index(i)))
        reranked = shortlist + ranked[k:]
        for name, order in (("dual", ranked), ("reranked", reranked)):
            for slot, cut in enumerate((1, 2, 5)):
                hits[name][slot] += owner[j] in order[:cut]
    for name in ("dual", "reranked"):
        expected = [100.0 * h / n_texts for h in hits[name]]
        assert [result[name][f"t2i_R@{c}"] for c in (1, 2, 5)] == pytest.approx(expected)
    assert result["reranked"]["t2i_R@5"] == result["dual"]["t2i_R@5"]  # beyond k nothing can change
    # The R@1 gain's interval: a paired bootstrap over the caption queries of the same hits.
    per_query = {
        name: [100.0 * (owner[j] == order) for j, order in enumerate(firsts)]
        for name, firsts in (
            ("dual", [max(range(n_images), key=lambda i: (float(dual[j, i]), -i)) for j in range(n_texts)]),
            ("reranked", [_reranked_first(dual[j], fusion_table[:, j], k) for j in range(n_texts)]),
        )
    }
    expected_ci = mean_difference(per_query["reranked"], per_query["dual"], resamples=2000, seed=0)["ci95"]
    assert result["gain_R@1_ci95"] == expected_ci
    low, high = result["gain_R@1_ci95"]
    assert low <= result["gain_R@1"] <= high and low < high


def _reranked_first(dual: torch.Tensor, fusion: torch.Tensor, k: int) -> int:
    """The image a caption's dual top-``k`` re-ranked by the fusion scores puts first."""
    ranked = sorted(range(len(dual)), key=lambda i: (-float(dual[i]), i))
    return sorted(ranked[:k], key=lambda i: (-float(fusion[i]), ranked.index(i)))[0]


# ---------------------------------------------------------------- training and loading fusion: folders
def test_the_untrained_head_is_never_kept(
    tmp_path: Path, teacher_spec: str, dataset: PairedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the initialisation re-ranks val best (it ranks like the dual teacher), the kept
    head is the best trained epoch; the initialisation's val is reported beside it."""
    import clipdistill.train.fusion as fusion_training

    real = fusion_training._rerank
    val_scores = [90.0, 20.0, 30.0]  # the initialisation, epoch 1, epoch 2 (then test: as measured)

    def rigged(*args: object, **kwargs: object) -> dict:
        result = real(*args, **kwargs)
        if val_scores:
            result["reranked"] = {**result["reranked"], "t2i_R@1": val_scores.pop(0)}
        return result

    monkeypatch.setattr(fusion_training, "_rerank", rigged)
    summary = train_fusion_teacher(teacher_spec, dataset, tmp_path / "fusion", TINY, progress=False)
    assert summary["best_epoch"] == 2 and summary["val"]["reranked"]["t2i_R@1"] == 30.0
    assert summary["initial_val"]["reranked"]["t2i_R@1"] == 90.0


def test_train_fusion_writes_a_loadable_teacher(fusion_dir: Path, teacher_spec: str, dataset: PairedDataset) -> None:
    for name in ("fusion_config.json", "fusion.safetensors", "log.jsonl", "train_config.json", "train_summary.json"):
        assert (fusion_dir / name).is_file(), name
    summary = json.loads((fusion_dir / "train_summary.json").read_text())
    assert {"val", "test", "best_epoch", "teacher", "initial_val"} <= set(summary)
    assert summary["best_epoch"] >= 1  # a trained epoch, never the initialisation
    assert set(summary["test"]) == {"k", "dual", "reranked", "gain_R@1", "gain_R@1_ci95", "fusion_dual_corr"}
    assert -1.0 <= summary["test"]["fusion_dual_corr"] <= 1.0  # corr(z(F), S): what MCAD's Ŝ adds
    config = json.loads((fusion_dir / "fusion_config.json").read_text())["config"]
    assert config["dual_spec"] == f"run:{Path(teacher_spec.removeprefix('run:')).resolve()}"
    assert config["image_tokens"] == 5 and config["dual_fingerprint"]
    log = [json.loads(line) for line in (fusion_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["itm_loss"]) for r in log)

    teacher = load_fusion(f"fusion:{fusion_dir}")
    assert teacher.kind == "fusion" and teacher.pooled_dim == 384 and not teacher.backend.training
    test = dataset.split("test")
    pixels = to_unit(load_image_tensor(test.image_paths(), 32))
    result = rerank_recall(teacher, pixels, test.texts(), test.text_to_image(), k=2)
    assert result["dual"] == summary["test"]["dual"]  # the saved teacher is the one evaluated
    states = teacher.states(pixels, test.texts())
    g, h = teacher.matched_dual_features(
        FusionStates(states.image, states.image_global, states.text[:3], states.text_mask[:3], states.text_global[:3])
    )
    assert g.shape == h.shape == (3, 384)
    head_only = load_fusion(f"fusion:{fusion_dir}", with_encoders=False)
    torch.testing.assert_close(head_only.score_matrix(states), teacher.score_matrix(states))


@pytest.mark.parametrize("loss", ["listwise", "bce"])
def test_training_lowers_the_matching_loss(
    teacher_spec: str, dataset: PairedDataset, tmp_path: Path, loss: str
) -> None:
    from dataclasses import replace

    train_fusion_teacher(teacher_spec, dataset, tmp_path / "f", replace(TINY, epochs=6, loss=loss), progress=False)
    log = [json.loads(line) for line in (tmp_path / "f" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["itm_loss"] < log[0]["itm_loss"]
    assert log[-1]["heads_loss"] > 0  # the dual heads train in both branches (w_heads 1)


def test_fusion_teacher_refuses_a_retrained_dual_teacher(fusion_dir: Path, teacher_spec: str, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(fusion_dir, tmp_path / "fusion"))
    other = _save_teacher(tmp_path / "other", seed=1)
    meta = json.loads((moved / "fusion_config.json").read_text())
    meta["config"]["dual_spec"] = other
    (moved / "fusion_config.json").write_text(json.dumps(meta))
    with pytest.raises(FusionError, match=r"trained on dual teacher .*now holds weights.*train-fusion"):
        load_fusion(f"fusion:{moved}")


def _with_training(fusion_dir: Path, folder: Path, training: dict | None) -> str:
    """A copy of ``fusion_dir`` whose ``fusion_config.json`` records ``training`` (``None``: no
    record, as folders written before train-fusion recorded one)."""
    shutil.copytree(fusion_dir, folder)
    meta = json.loads((folder / "fusion_config.json").read_text())
    meta.pop("training", None)
    if training is not None:
        meta["training"] = training
    (folder / "fusion_config.json").write_text(json.dumps(meta))
    return f"fusion:{folder}"


class _FusionSource(TeacherSource):
    """A teacher source that only carries a fusion teacher (methods check it when built)."""

    def __init__(self, fusion: object) -> None:
        self.fusion, self.embed_dim, self.spec = fusion, 384, "fake:teacher"  # type: ignore[assignment]


def _build(method: str, fusion: object) -> object:
    cls = get_method(method)
    return cls(8, _FusionSource(fusion), build_method_args(cls, None))


def test_train_fusion_records_the_training_it_kept(fusion_dir: Path) -> None:
    summary = json.loads((fusion_dir / "train_summary.json").read_text())
    training = json.loads((fusion_dir / "fusion_config.json").read_text())["training"]
    assert training["epoch"] == summary["best_epoch"] and training["epochs_run"] == TINY.epochs
    assert training["w_heads"] == TINY.w_heads > 0
    assert training["steps"] >= training["epoch"]  # every epoch up to the kept one took a step
    assert load_fusion(f"fusion:{fusion_dir}", with_encoders=False).untrained() is None


@pytest.mark.parametrize("method", ["mcad", "dcd"])
def test_methods_that_read_a_fusion_teacher_refuse_an_untrained_head(
    fusion_dir: Path, tmp_path: Path, method: str
) -> None:
    """A folder that records no training steps is refused, naming the folder and how to train
    one; a folder without a record (written before train-fusion kept one) counts as trained
    exactly when its logit's zero-initialised weights moved."""
    untrained = _with_training(fusion_dir, tmp_path / "none", {"epoch": 0, "steps": 0, "epochs_run": 0})
    with pytest.raises(MethodConfigError, match=rf"{tmp_path / 'none'}.*untrained pair head.*train-fusion"):
        _build(method, load_fusion(untrained, with_encoders=False))

    legacy_trained = _with_training(fusion_dir, tmp_path / "old", None)
    fusion = load_fusion(legacy_trained, with_encoders=False)
    assert fusion.untrained() is None
    if method == "dcd":
        _build(method, fusion)  # MCAD would go on to refuse its 384-d heads for this 8-d fake teacher

    initial = tmp_path / "initial"
    save_fusion_encoder(FusionEncoder(read_fusion_config(fusion_dir)), initial)  # the head as constructed
    assert "training" not in json.loads((initial / "fusion_config.json").read_text())
    with pytest.raises(MethodConfigError, match=r"still at their initialisation.*train-fusion"):
        _build(method, load_fusion(f"fusion:{initial}", with_encoders=False))


def test_a_pretrained_blip_itm_head_counts_as_trained(blip_dir: Path) -> None:
    fusion = load_fusion(f"blip-itm:{blip_dir}")
    assert fusion.untrained() is None
    _build("dcd", fusion)


def test_the_logit_offset_stays_at_its_centring_under_the_listwise_loss(
    teacher_spec: str, dataset: PairedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constant shift of one caption's candidates changes no softmax, so the listwise loss
    gives ``dual_bias`` no gradient; left trainable, weight decay alone would move it."""
    import clipdistill.train.fusion as fusion_training

    real, centring = fusion_training._rerank, []

    def spy(encoder: FusionEncoder, *args: object, **kwargs: object) -> dict:
        centring.append(encoder.dual_bias.item())  # the first call measures the initial head
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(fusion_training, "_rerank", spy)
    train_fusion_teacher(teacher_spec, dataset, tmp_path / "f", replace(TINY, epochs=1), progress=False)
    assert load_fusion_encoder(tmp_path / "f", with_dual=False).dual_bias.item() == centring[0] != 0.0


def test_fusion_specs_are_not_dual_encoders(fusion_dir: Path, teacher_spec: str) -> None:
    with pytest.raises(ModelSpecError, match=r"fusion teacher.*teacher\.fusion"):
        load_model(f"fusion:{fusion_dir}")
    with pytest.raises(ModelSpecError, match="names a dual encoder, not a fusion teacher"):
        parse_fusion_spec(teacher_spec)
    with pytest.raises(ModelSpecError, match="folder does not exist"):
        load_fusion("fusion:/no/such/folder")


def test_a_dual_teacher_without_token_features_cannot_train_a_fusion_teacher(
    dataset: PairedDataset, tmp_path: Path
) -> None:
    from clipdistill.models.students import build_student, save_student, student_config

    save_student(build_student(student_config("tiny", image_size=32)), tmp_path / "student")
    with pytest.raises(FusionError, match="no token features"):
        train_fusion_teacher(f"local-dir:{tmp_path / 'student'}", dataset, tmp_path / "f", TINY, progress=False)


# ---------------------------------------------------------------- BLIP ITM
@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    from clipdistill.models.text_minilm import minilm_path

    torch.manual_seed(0)
    config = BlipConfig(
        text_config={
            "vocab_size": 30524,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "initializer_range": 0.5,
        },
        vision_config={
            "hidden_size": 32,
            "image_size": 32,
            "patch_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "initializer_range": 0.5,
        },
        image_text_hidden_size=16,
    )
    folder = tmp_path_factory.mktemp("blip")
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder)  # BERT WordPiece, like BLIP's
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_blip_itm_backend_matches_transformers(blip_dir: Path) -> None:
    from transformers import BlipForImageTextRetrieval

    teacher = load_fusion(f"blip-itm:{blip_dir}")
    assert teacher.kind == "blip-itm" and teacher.pooled_dim is None and teacher.global_dim == 16
    pixels = torch.rand(3, 3, 40, 40)
    texts = ["a red circle", "blue", "a green square with a few more words"]
    states = teacher.states(pixels, texts)
    matrix = teacher.score_matrix(states)
    assert float(matrix.std()) > 1e-3

    reference = BlipForImageTextRetrieval.from_pretrained(str(blip_dir)).eval()
    backend = teacher.backend
    prepared = F.interpolate(pixels, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(backend.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backend.image_std).view(1, 3, 1, 1)
    prepared = (prepared - mean) / std
    encoded = backend.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        for i in range(3):
            out = reference(
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                pixel_values=prepared[i : i + 1].expand(3, -1, -1, -1),
                use_itm_head=True,
            ).itm_score
            torch.testing.assert_close(matrix[i], out[:, 1] - out[:, 0], atol=1e-5, rtol=1e-5)
        itc = reference(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            pixel_values=prepared,
            use_itm_head=False,
        ).itm_score
    torch.testing.assert_close(states.image_global @ states.text_global.t(), itc, atol=1e-5, rtol=1e-5)
    with pytest.raises(FusionError, match="no pooled features"):
        teacher.matched_dual_features(states)


# ---------------------------------------------------------------- fusion states in the teacher cache
BUILD = {"k_augmentations": 2, "image_size": 32, "seed": 0, "shard_size": 5, "batch_size": 4}
OPEN = {
    "split": "train",
    "image_size": 32,
    "k_augmentations": 2,
    "seed": 0,
    "aug_scale": (0.8, 1.0),
    "aug_max_shift": 0.1,
}


def test_cached_fusion_states_equal_online(
    teacher_spec: str, fusion_dir: Path, dataset: PairedDataset, tmp_path: Path
) -> None:
    spec = f"fusion:{fusion_dir}"
    plain = build_cache(teacher_spec, dataset, tmp_path / "c", progress=False, **BUILD)
    embeddings = {p.name: p.stat().st_mtime_ns for p in plain.iterdir() if p.name.startswith(("images-", "texts-"))}
    with pytest.raises(CacheMismatchError, match=r"fusion=None.*--fusion"):
        CachedTeacher.open(plain, teacher_spec=teacher_spec, dataset=dataset, fusion=spec, **OPEN)

    out = build_cache(teacher_spec, dataset, tmp_path / "c", progress=False, fusion=spec, **BUILD)
    kept = {name: (out / name).stat().st_mtime_ns for name in embeddings}
    assert kept == embeddings  # adding a fusion teacher reuses the embedding shards
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["fusion"]["spec"] == spec and manifest["fusion"]["pooled_dim"] == 384
    assert len(manifest["shards"]["fusion_images"]) == 3 and len(manifest["shards"]["fusion_texts"]) == 3

    batch = _batch(dataset, [1, 0, 1, 0, 1])
    cached_source = CachedTeacher.open(out, teacher_spec=teacher_spec, dataset=dataset, fusion=spec, **OPEN)
    cached = cached_source(batch)
    online_source = OnlineFusion(OnlineTeacher(load_teacher(teacher_spec)), load_fusion(spec))
    online = online_source(batch)
    assert cached.fusion is not None and online.fusion is not None
    for name in ("image", "image_global", "text", "text_global"):
        torch.testing.assert_close(getattr(cached.fusion, name), getattr(online.fusion, name), atol=1e-5, rtol=1e-4)
    assert torch.equal(cached.fusion.text_mask, online.fusion.text_mask)
    assert cached_source.fusion is not None and online_source.fusion is not None
    torch.testing.assert_close(
        cached_source.fusion.score_matrix(cached.fusion),
        online_source.fusion.score_matrix(online.fusion),
        atol=1e-4,
        rtol=1e-4,
    )
    assert CachedTeacher.open(out, teacher_spec=teacher_spec, dataset=dataset, **OPEN)(batch).fusion is None

    other = tmp_path / "other_fusion"
    train_fusion_teacher(
        teacher_spec, dataset, other, FusionTrainConfig(**{**TINY.__dict__, "seed": 3}), progress=False
    )
    with pytest.raises(CacheMismatchError, match=r"built for fusion="):
        CachedTeacher.open(out, teacher_spec=teacher_spec, dataset=dataset, fusion=f"fusion:{other}", **OPEN)


# ---------------------------------------------------------------- CLI
runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_cli_train_fusion_and_cache_with_fusion(teacher_spec: str, shapes_dataset_dir: Path, tmp_path: Path) -> None:
    from clipdistill.cli.main import app

    out = tmp_path / "fusion"
    args = ["teacher", "train-fusion", "--teacher", teacher_spec, "--data", str(shapes_dataset_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--epochs", "1", "--batch-size", "4", "--width", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"fusion:{out}" in _flat(result.output) and "re-ranked by the fusion teacher" in _flat(result.output)
    assert "val: R@1 gain" in _flat(result.output) and "95% interval over the caption queries" in _flat(result.output)
    load_fusion(f"fusion:{out}")

    cache = tmp_path / "cache"
    build = ["cache", "build", "--teacher", teacher_spec, "--data", str(shapes_dataset_dir), "--out", str(cache)]
    result = runner.invoke(app, [*build, "--image-size", "32", "--fusion", f"fusion:{out}"])
    assert result.exit_code == 0, result.output
    assert f"fusion states of fusion:{out}" in _flat(result.output)

    bad = runner.invoke(app, [*build, "--fusion", teacher_spec])
    assert bad.exit_code == 2 and "names a dual encoder" in _flat(bad.output)


def test_cli_train_fusion_errors_are_one_line(shapes_dataset_dir: Path, tmp_path: Path) -> None:
    from clipdistill.cli.main import app
    from clipdistill.models.students import build_student, save_student, student_config

    save_student(build_student(student_config("tiny", image_size=32)), tmp_path / "student")
    common = ["teacher", "train-fusion", "--data", str(shapes_dataset_dir), "--out", str(tmp_path / "f")]
    for teacher, message in (
        (f"local-dir:{tmp_path / 'student'}", "no token features"),
        ("run:/no/such/teacher", "folder does not exist"),
    ):
        result = runner.invoke(app, [*common, "--teacher", teacher, "--no-progress"])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and message in _flat(result.output) and "Traceback" not in result.output
