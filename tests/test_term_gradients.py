"""Per-term gradients (train/term_gradients.py): each loss term's gradient on the student's
outputs against the task term's, measured without changing the step, summarised per run, and
written by the trainer into results.jsonl and summary.json."""

from __future__ import annotations

import pytest
import torch

from clipdistill.train.term_gradients import INERT_RATIO, summarise_terms, term_gradients


def _losses(outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    direction = torch.tensor([1.0, 2.0, 0.0, 0.0])
    across = torch.tensor([0.0, 0.0, 3.0, 0.0])
    return {
        "task_loss": (outputs * direction).sum(),
        "twice_loss": 2.0 * (outputs * direction).sum(),  # the task term again, twice as strong
        "across_loss": (outputs * across).sum(),  # orthogonal to the task gradient
        "faint_loss": -0.01 * (outputs * direction).sum(),  # against it, 1% of it
    }


def test_ratios_and_cosines_against_the_task_term() -> None:
    outputs = torch.zeros(4, requires_grad=True)
    measured = term_gradients(_losses(outputs), [outputs], "task_loss")
    assert measured["task_loss"]["grad_ratio"] == pytest.approx(1.0)
    assert measured["twice_loss"]["grad_ratio"] == pytest.approx(2.0)
    assert measured["twice_loss"]["cos_task"] == pytest.approx(1.0)
    assert measured["across_loss"]["cos_task"] == pytest.approx(0.0)
    assert measured["across_loss"]["grad_ratio"] == pytest.approx(3.0 / 5**0.5)
    assert measured["faint_loss"]["grad_ratio"] == pytest.approx(0.01)
    assert measured["faint_loss"]["cos_task"] == pytest.approx(-1.0)


def test_a_term_that_reads_one_of_the_outputs_only() -> None:
    image, text = torch.zeros(4, requires_grad=True), torch.zeros(6, requires_grad=True)
    losses = {"task_loss": image.sum() + text.sum(), "image_loss": 3.0 * image.sum()}
    measured = term_gradients(losses, [image, text], "task_loss")
    assert measured["image_loss"]["grad_ratio"] == pytest.approx(6.0 / 10**0.5)
    assert measured["image_loss"]["cos_task"] == pytest.approx(2.0 / 10**0.5)


def test_measuring_leaves_the_step_s_gradients_as_they_were() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    inputs = torch.randn(3, 4)

    def gradients(measure: bool) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        outputs = net(inputs)
        losses = _losses(outputs.sum(0))
        if measure:
            term_gradients(losses, [outputs], "task_loss")
        torch.stack(list(losses.values())).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, measured in zip(gradients(False), gradients(True), strict=True):
        assert torch.equal(plain, measured)


def test_a_term_under_the_threshold_all_run_is_flagged() -> None:
    faint = {"task_loss": {"grad_norm": 1.0, "grad_ratio": 1.0, "cos_task": 1.0}}
    runs = [
        {**faint, "kl_loss": {"grad_norm": 0.01, "grad_ratio": 0.01, "cos_task": 0.5}},
        {**faint, "kl_loss": {"grad_norm": 0.03, "grad_ratio": 0.03, "cos_task": 0.7}},
    ]
    summary = summarise_terms(runs, "task_loss")
    assert summary["kl_loss"]["inert"] and summary["kl_loss"]["grad_ratio"] == pytest.approx(0.02)
    assert summary["kl_loss"]["cos_task"] == pytest.approx(0.6) and summary["kl_loss"]["measured"] == 2
    assert "inert" not in summary["task_loss"]  # the reference itself
    runs[1]["kl_loss"]["grad_ratio"] = 2 * INERT_RATIO  # above it once: not inert
    assert not summarise_terms(runs, "task_loss")["kl_loss"]["inert"]
