"""The fusion teacher's heads g, h into the dual space read only their own side.

MCAD's targets are v̂ = norm(v + λ·ĝ) for the student's image tower and t̂ = norm(t + λ·ĥ) for
its text tower; each tower sees one side of the pair, so a target that carries the other side
is one it cannot reach. With ``heads_input="sides"`` h read the caption attending to its own
image, and the heads loss taught ĝ_i and ĥ_i a shared code of the image.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipdistill.distill.base import Batch, StudentFeatures, TeacherOutputs, TeacherSource, build_method_args
from clipdistill.distill.methods import get_method
from clipdistill.models.fusion import FusionConfig, FusionEncoder, FusionStates, FusionTeacher
from clipdistill.train.fusion import FusionTrainConfig, _heads_loss


class _Teacher(TeacherSource):
    """Fixed dual features and fusion states with a real fusion head."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, fusion: FusionTeacher, states: FusionStates) -> None:
        self.embed_dim, self.spec = int(image.shape[1]), "fake:teacher"
        self.image, self.text, self.fusion, self.states = image, text, fusion, states

    def __call__(self, batch: Batch) -> TeacherOutputs:
        return TeacherOutputs(self.image, self.text, torch.tensor(math.log(20.0)), fusion=self.states)


def _batch(n: int) -> Batch:
    return Batch(
        unit_pixels=torch.zeros(n, 3, 4, 4),
        texts=["a red heart"] * 2 + [f"caption {i}" for i in range(2, n)],
        image_ids=[str(i) for i in range(n)],
        caption_ids=[f"{i}_0" for i in range(n)],
        aug_ids=torch.zeros(n, dtype=torch.int64),
    )


def test_one_caption_paired_with_two_images_gets_one_mcad_text_target() -> None:
    """Rows 0 and 1 are the same caption (same states, same dual feature) with two different
    images: the student's text tower sees the same input, so its target must be the same."""
    n, dim = 4, 8
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text[1] = text[0]
    words = torch.randn(n, 4, 8, generator=g)
    words[1] = words[0]
    states = FusionStates(
        image=torch.randn(n, 3, 8, generator=g) * 3,
        image_global=image,
        text=words,
        text_mask=torch.ones(n, 4, dtype=torch.bool),
        text_global=text,
    )
    config = FusionConfig(
        dual_spec="fake:teacher", image_token_dim=5, image_tokens=3, text_token_dim=7, embed_dim=dim, width=8, heads=2
    )
    torch.manual_seed(0)
    encoder = FusionEncoder(config)
    with torch.no_grad():
        torch.nn.init.normal_(encoder.itm.weight)  # a trained logit: methods refuse an untrained head
        encoder.text_to_image.out.weight.mul_(10.0)  # what the paired image contributes, made visible
        encoder.image_head.weight.mul_(50.0)
        encoder.text_head.weight.mul_(50.0)
    teacher = _Teacher(image, text, FusionTeacher(encoder, spec="fusion:fake"), states)
    cls = get_method("mcad")
    method = cls(dim, teacher, build_method_args(cls, {"w_task": 0.0, "w_dist": 0.0, "w_feat": 1.0, "lam": 0.5}))
    assert method.use_fusion_features
    # The targets read off the feature loss's gradient at a zero student: d/ds mean((s − y)²) = 2(s − y)/(n·dim).
    student_image = torch.zeros(n, dim, requires_grad=True)
    student_text = torch.zeros(n, dim, requires_grad=True)
    out = method(_batch(n), StudentFeatures(image=student_image, text=student_text, logit_scale=torch.tensor(0.0)))
    out.total().backward()
    assert student_text.grad is not None
    t_hat = -student_text.grad * n * dim / 2
    assert float((t_hat - text).norm(dim=-1).min()) > 1e-2  # the nudge is not nothing
    assert float(F.cosine_similarity(t_hat[0], t_hat[1], dim=0)) >= 0.99


def _random_pairs(n: int, width: int, dim: int, generator: torch.Generator) -> FusionStates:
    """Pairs whose caption is independent of the image: states and dual features all drawn apart."""
    lengths = torch.randint(2, 6, (n,), generator=generator)
    mask = torch.arange(5)[None, :] < lengths[:, None]
    return FusionStates(
        image=torch.randn(n, 4, width, generator=generator),
        image_global=F.normalize(torch.randn(n, dim, generator=generator), dim=-1),
        text=torch.randn(n, 5, width, generator=generator) * mask[..., None],
        text_mask=mask,
        text_global=F.normalize(torch.randn(n, dim, generator=generator), dim=-1),
    )


def _held_out_pair_recall(heads_input: str, steps: int = 80, batch: int = 32, held_out: int = 512) -> float:
    """Train g, h with the fusion trainer's heads loss on fresh random pairs every step, then
    the share of held-out pairs whose ĝ finds its own ĥ in its top 10 among all held-out captions
    (and back), averaged over both directions. Chance is 10/held_out (about 20 hits, so a count
    at chance stays well under twice it)."""
    width, dim = 16, 16
    config = FusionConfig(
        dual_spec="fake:teacher",
        image_token_dim=5,
        image_tokens=4,
        text_token_dim=7,
        embed_dim=dim,
        width=width,
        heads=2,
        heads_input=heads_input,
    )
    torch.manual_seed(0)
    encoder = FusionEncoder(config)
    train_config = FusionTrainConfig(heads_input=heads_input)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    index = torch.arange(batch)
    for _ in range(steps):
        states = _random_pairs(batch, width, dim, generator)
        loss = _heads_loss(encoder, train_config, states, index, index, states.image_global, states.text_global)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        states = _random_pairs(held_out, width, dim, generator)
        every = torch.arange(held_out)
        g, h = encoder.pair_heads(states, every, every)
        scores = F.normalize(g, dim=-1) @ F.normalize(h, dim=-1).t()
    found = [(scores.topk(10, dim=axis).indices == every.unsqueeze(axis)).any(dim=axis) for axis in (1, 0)]
    return float(sum(hits.double().mean() for hits in found) / 2)


@pytest.mark.parametrize(("heads_input", "carries_the_pair"), [("own", False), ("sides", True)])
def test_heads_trained_on_unrelated_pairs_find_the_partner_only_if_one_reads_the_other(
    heads_input: str, carries_the_pair: bool
) -> None:
    """Captions independent of their images: whatever ĝ, ĥ say about the partner on held-out
    pairs came from one head reading the other side. ``own`` heads stay at chance (R@10 of
    10/512); ``sides`` heads, the same training, find the partner far above it."""
    recall = _held_out_pair_recall(heads_input)
    chance = 10 / 512
    if carries_the_pair:
        assert recall > 5 * chance
    else:
        assert recall < 2 * chance


def test_mcad_does_not_distil_heads_that_were_never_trained() -> None:
    """A head trained with ``w_heads: 0`` has a trained match logit but random g, h: MCAD uses
    its scores and distils the dual features, with a warning naming why."""
    dim = 8
    config = FusionConfig(
        dual_spec="fake:teacher", image_token_dim=5, image_tokens=3, text_token_dim=7, embed_dim=dim, width=8, heads=2
    )
    encoder = FusionEncoder(config)
    encoder.training_record = {"epoch": 1, "steps": 10, "epochs_run": 1, "w_heads": 0.0}
    fusion = FusionTeacher(encoder, spec="fusion:fake")
    assert fusion.untrained() is None and "w_heads 0" in str(fusion.heads_untrained())
    states = FusionStates(
        image=torch.zeros(2, 3, 8),
        image_global=torch.zeros(2, dim),
        text=torch.zeros(2, 4, 8),
        text_mask=torch.ones(2, 4, dtype=torch.bool),
        text_global=torch.zeros(2, dim),
    )
    teacher = _Teacher(F.normalize(torch.ones(2, dim), dim=-1), F.normalize(torch.ones(2, dim), dim=-1), fusion, states)
    cls = get_method("mcad")
    with pytest.warns(UserWarning, match="never trained"):
        method = cls(dim, teacher, build_method_args(cls, {}))
    assert not method.use_fusion_features
    encoder.training_record["w_heads"] = 1.0
    assert get_method("mcad")(dim, teacher, build_method_args(cls, {})).use_fusion_features
