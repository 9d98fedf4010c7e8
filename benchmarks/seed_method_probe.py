"""Issue 18's four defects, measured on a real teacher + fusion teacher (no student training).

On ``--batches`` random val batches of ``--batch`` captions (each with its image):

- fusion: corr(F, S) over the batch's B² pairs (= corr(z(F), S); near 1, MCAD's Ŝ is S at a
  sharper temperature), and the mean fusion vs κ_T·cos logit of positives and of each row's
  top-7 dual negatives (a constant gap is what DCD's student affine absorbs);
- MCAD targets: cos(v̂, v^T) (min, mean) and, for images with two captions in the split,
  cos(v̂ from caption a, v̂ from caption b);
- ComKD: EduAttention entropy over log B with κ_a = κ_T and with the paper's 1/√d, with the
  teacher's own image features standing in for P(v^S) (what P is trained towards).

    .venv/bin/python benchmarks/seed_method_probe.py --data runs/q18/data --teacher run:runs/q18/teacher \\
        --fusion fusion:runs/q18/fusion --out runs/q18/probe.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from clipdistill.data.images import load_image_tensor, to_unit
from clipdistill.data.loading import load_dataset
from clipdistill.distill.methods.mcad import pearson
from clipdistill.io import atomic_write_json
from clipdistill.models.fusion import FusionStates, load_fusion
from clipdistill.models.teachers import load_teacher


def _targets(fusion: Any, states: FusionStates, image: torch.Tensor, lam: float) -> torch.Tensor:
    g, _ = fusion.matched_dual_features(states)
    return F.normalize(image + lam * F.normalize(g, dim=-1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--fusion", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--lam", type=float, default=0.3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    split = load_dataset(args.data).split("val")
    teacher = load_teacher(args.teacher)
    fusion = load_fusion(args.fusion)
    size = int(teacher.model.image_size[0])
    pixels = to_unit(load_image_tensor(split.image_paths(), size, progress=False))
    texts = split.texts()
    owner = torch.tensor(split.text_to_image())
    kappa = float(teacher.logit_scale.exp())
    generator = torch.Generator().manual_seed(0)
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    with torch.no_grad():
        for _ in range(args.batches):
            captions = torch.randperm(len(texts), generator=generator)[: args.batch]
            images = owner[captions]
            unit = pixels[images]
            batch_texts = [texts[int(c)] for c in captions]
            v, t = teacher.embed_images(unit), teacher.embed_texts(batch_texts)
            states = fusion.states(unit, batch_texts)
            logits = fusion.score_matrix(states)
            dual = v @ t.t()
            add("corr_fusion_dual", pearson(logits, dual))
            same = images[:, None] == images[None, :]
            top = min(7, int((~same).sum(dim=1).min()))  # DCD keeps 7 hard negatives
            hard = (kappa * dual).masked_fill(same, -math.inf).topk(top, dim=1).indices
            add("fusion_positive", float(logits.diag().mean()))
            add("fusion_hard_negative", float(logits.gather(1, hard).mean()))
            add("dual_positive", float(kappa * dual.diag().mean()))
            add("dual_hard_negative", float((kappa * dual).gather(1, hard).mean()))
            if fusion.pooled_dim is not None and fusion.own_side_heads:
                v_hat = _targets(fusion, states, v, args.lam)
                cos = F.cosine_similarity(v_hat, v, dim=-1)
                add("mcad_cos_vhat_v_min", float(cos.min()))
                add("mcad_cos_vhat_v_mean", float(cos.mean()))
            n = len(captions)
            for name, scale in (("kappa_T", kappa), ("paper_sqrt_d", 1 / math.sqrt(v.shape[1]))):
                weights = torch.softmax(scale * v @ t.t(), dim=1)
                entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=1).mean()
                add(f"comkd_entropy_over_logB_{name}", float(entropy / math.log(n)))

        if fusion.pooled_dim is not None and fusion.own_side_heads:  # two captions of one image
            counts = torch.bincount(owner)
            two = torch.nonzero(counts >= 2).flatten()[: args.batch]
            first = torch.tensor([int(torch.nonzero(owner == i)[0]) for i in two])
            second = torch.tensor([int(torch.nonzero(owner == i)[1]) for i in two])
            unit = pixels[two]
            v = teacher.embed_images(unit)
            targets = []
            for chosen in (first, second):
                batch_texts = [texts[int(c)] for c in chosen]
                targets.append(_targets(fusion, fusion.states(unit, batch_texts), v, args.lam))
            add("mcad_cos_two_captions_min", float(F.cosine_similarity(*targets, dim=-1).min()))

    result = {
        "data": args.data,
        "teacher": args.teacher,
        "fusion": args.fusion,
        "batch": args.batch,
        "batches": args.batches,
        "kappa_T": kappa,
        **{key: round(statistics.fmean(values), 4) for key, values in rows.items()},
    }
    atomic_write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
