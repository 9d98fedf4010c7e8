"""Multi-process training: N gloo processes with batch B/N each compute the losses, gradients
and BatchNorm running statistics of 1 process with batch B (every gather mode that is meant to
be exact; a BatchNorm-free toy student and the real ``tiny``/``small`` presets, whose BatchNorm
layers normalise over the global batch), and the torchrun entry point trains, checkpoints on
rank 0 only, resumes, and saves a student with ordinary BatchNorm layers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipdistill.models.lit import LiTConfig, LiTModel

WORKER = Path(__file__).with_name("ddp_parity_worker.py")
REPO_SRC = Path(__file__).resolve().parents[1] / "src"
METHODS = ("clip", "openclip", "conaclip", "dcd", "clipkd", "comkd")
# (gather_with_grad, local_loss): the settings that are exact (see train/distributed.py)
MODES = {"global": (True, False), "global_nograd": (False, False), "local": (True, True)}
# The first four methods in every exact mode; CLIP-KD (ICL, CKD) and ComKD (batch moments,
# attention over the batch) in the mode that changes their math (per-process query rows).
CASES = [(m, mode) for m in METHODS[:4] for mode in MODES] + [("clipkd", "local"), ("comkd", "local")]


def _torchrun(*args: str, timeout: int = 600, check: bool = True, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO_SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    LiTModel(LiTConfig(image_model="test_convnext", image_size=32)).save(folder)
    return f"run:{folder}"


@pytest.fixture(scope="module")
def student_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BatchNorm-free student (LayerNorm convnext), cheap enough to run every method in
    every gather mode; the BatchNorm presets are tested below."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "timm_model_name": "test_convnext",
                    "timm_model_pretrained": False,
                    "timm_pool": "avg",
                    "timm_proj": "linear",
                    "image_size": 32,
                },
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            }
        )
    )
    return str(path)


def _raw(tmp: Path, data: Path, teacher: str, student: str, method: str, mode: str) -> dict:
    gather_with_grad, local_loss = MODES[mode]
    raw = {
        "name": f"{method}-{mode}",
        "out_dir": str(tmp / "runs"),
        "method": method,
        "data": {"path": str(data), "image_size": 32},
        "student": {"model_config": student},
        "optim": {"epochs": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "grad_clip": 1e9},
        "augment": {"k": 2},
        "distributed": {"gather_with_grad": gather_with_grad, "local_loss": local_loss},
    }
    if method != "clip":
        raw["teacher"] = {"spec": teacher}
    if method == "dcd":
        raw["method_args"] = {"random_negatives": 2, "hard_negatives": 1}  # a real draw from 3 candidates
    return raw


def _one_process(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_SRC), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    subprocess.run([sys.executable, *args], check=True, env=env, timeout=600)


def _parity(
    tmp: Path, configs: dict[str, dict], reference_of: dict[str, str], steps: int, nproc: int = 2
) -> dict[str, float]:
    """Run ``configs`` under torchrun with ``nproc`` processes and their one-process references
    (``reference_of``: config name -> reference name), assert that every step's loss terms,
    parameter gradients and student buffers (BatchNorm running statistics) agree within 1e-5 in
    every process, and return the largest absolute difference of each kind at each step."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"steps": steps, "configs": configs}))
    _torchrun(str(WORKER), str(tmp / "ddp"), str(spec), nproc=nproc, timeout=300 * nproc)
    reference_spec = tmp / "reference.json"
    references = {ref: configs[name] for name, ref in reversed(reference_of.items())}
    reference_spec.write_text(json.dumps({"steps": steps, "configs": references}))
    _one_process(str(WORKER), str(tmp / "ref"), str(reference_spec))
    reference = torch.load(tmp / "ref" / "rank0.pt")
    ranks = [torch.load(tmp / "ddp" / f"rank{r}.pt") for r in range(nproc)]
    largest = {f"{kind} step {step + 1}": 0.0 for step in range(steps) for kind in ("losses", "grads", "buffers")}
    for name in configs:
        expected_steps = reference[reference_of[name]]
        assert len(expected_steps) == steps
        for step, expected in enumerate(expected_steps):
            for rank, results in enumerate(ranks):
                got = results[name][step]
                assert set(got["losses"]) == set(expected["losses"]) and expected["losses"], name
                for key, value in expected["losses"].items():
                    assert got["losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, step, rank, key)
                    worst = f"losses step {step + 1}"
                    largest[worst] = max(largest[worst], abs(got["losses"][key] - value))
                for kind in ("grads", "buffers"):
                    assert set(got[kind]) == set(expected[kind]) and (expected[kind] or kind == "buffers"), name
                    for key, tensor in expected[kind].items():
                        torch.testing.assert_close(
                            got[kind][key],
                            tensor,
                            rtol=1e-5,
                            atol=1e-5,
                            msg=lambda m, n=name, k=key, s=step, r=rank: f"{n} step {s} rank {r} {k}: {m}",
                        )
                        worst = f"{kind} step {step + 1}"
                        difference = (got[kind][key].double() - tensor.double()).abs().max()
                        largest[worst] = max(largest[worst], float(difference))
    return largest


@pytest.mark.e2e
def test_two_processes_match_one_process(
    shapes_dataset_dir: Path, tmp_path: Path, teacher_spec: str, student_config: str
) -> None:
    configs = {
        f"{method}/{mode}": _raw(tmp_path, shapes_dataset_dir, teacher_spec, student_config, method, mode)
        for method, mode in CASES
    }
    _parity(tmp_path, configs, {name: name.split("/")[0] for name in configs}, steps=2)


# --- BatchNorm students -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_teacher(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> dict[str, str]:
    """A LiT teacher with token features, a fusion teacher over it and a teacher cache holding
    both teachers' outputs (k = 2 augmentations at 32 px): what conaclip and mcad read."""
    from clipdistill.data.loading import load_dataset
    from clipdistill.distill.cache import build_cache
    from clipdistill.train.fusion import FusionTrainConfig, train_fusion_teacher

    root = tmp_path_factory.mktemp("cached-teacher")
    torch.manual_seed(0)
    LiTModel(LiTConfig(image_model="test_vit", image_size=32)).save(root / "teacher")
    spec, dataset = f"run:{root / 'teacher'}", load_dataset(shapes_dataset_dir)
    fusion = FusionTrainConfig(epochs=1, batch_size=4, width=16, heads=2, mine_top=4, negatives=2)
    train_fusion_teacher(spec, dataset, root / "fusion", fusion, progress=False)
    cache = build_cache(
        spec, dataset, root / "cache", k_augmentations=2, image_size=32, fusion=f"fusion:{root / 'fusion'}",
        shard_size=8, batch_size=4, progress=False,
    )  # fmt: skip
    return {"spec": spec, "cache": str(cache), "fusion": f"fusion:{root / 'fusion'}"}


def _preset_raw(tmp: Path, data: Path, teacher: dict[str, str], preset: str, method: str, mode: str) -> dict:
    """A real student preset trained from the teacher cache (``clip`` needs no teacher; only
    ``mcad`` reads the fusion states)."""
    raw = _raw(tmp, data, "", "", method, mode)
    raw["name"] = f"{preset}-{method}-{mode}"
    raw["student"] = {"preset": preset}
    if method != "clip":
        raw["teacher"] = {"spec": teacher["spec"], "cache": teacher["cache"]}
    if method == "mcad":
        raw["teacher"]["fusion"] = teacher["fusion"]
    return raw


# clip, conaclip and mcad on the tiny preset (efficientvit: BatchNorm2d) in the default mode, with
# per-process query rows (local_loss) once, and the small preset (fastvit: BatchNorm2d and timm's
# BatchNormAct2d)
BN_CASES = [("tiny", m, "global") for m in ("clip", "conaclip", "mcad")] + [
    ("tiny", "conaclip", "local"),
    ("small", "mcad", "global"),
]
BN_STEPS = 2


def _bn_parity(tmp: Path, data: Path, teacher: dict[str, str], cases: list, nproc: int) -> dict[str, float]:
    configs = {"/".join(case): _preset_raw(tmp, data, teacher, *case) for case in cases}
    largest = _parity(tmp, configs, {name: name.rsplit("/", 1)[0] for name in configs}, BN_STEPS, nproc=nproc)
    ranks = [torch.load(tmp / "ddp" / f"rank{r}.pt") for r in range(nproc)]
    for name in configs:  # the running statistics compared above are there and did move
        for results in ranks:
            buffers = results[name][-1]["buffers"]
            tracked = [key for key in buffers if key.endswith("num_batches_tracked")]
            assert tracked and all(int(buffers[key]) == BN_STEPS for key in tracked), name
            moved = [key for key in buffers if key.endswith("running_var") and not torch.all(buffers[key] == 1)]
            assert len(moved) == len(tracked), name
    print(f"{nproc} processes, largest |difference| to 1 process:", largest)
    return largest


@pytest.mark.e2e
def test_batchnorm_students_in_two_processes_match_one_process(
    shapes_dataset_dir: Path, tmp_path: Path, cached_teacher: dict[str, str]
) -> None:
    """The shipped presets have BatchNorm: with statistics over the global batch, 2 x B/2 is
    1 x B in losses, gradients and running statistics (per process it is not: with
    per-process BatchNorm the step-1 losses differ by ~1e-2)."""
    cases = [case for case in BN_CASES if case[2] == "global"]  # the slow 4-process test has local_loss too
    _bn_parity(tmp_path, shapes_dataset_dir, cached_teacher, cases, nproc=2)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 4 processes on 2 shared cores
def test_batchnorm_students_in_four_processes_match_one_process(
    shapes_dataset_dir: Path, tmp_path: Path, cached_teacher: dict[str, str]
) -> None:
    """The same with 4 processes (1 row each of the batch of 4: statistics of one row per
    process), whatever the number of cores."""
    _bn_parity(tmp_path, shapes_dataset_dir, cached_teacher, BN_CASES, nproc=4)


@pytest.mark.slow
def test_torchrun_saves_a_plain_batchnorm_student_with_the_one_process_statistics(
    shapes_dataset_dir: Path, tmp_path: Path
) -> None:
    """The real entry point with the tiny preset (float32, one step): the run's model folder
    loads with open_clip as ordinary BatchNorm2d layers whose running statistics are those of
    the same run in one process, and the checkpoint holds the same keys."""
    import yaml
    from safetensors.torch import load_file

    from clipdistill.models.students import WEIGHTS_FILE, load_student

    runs = {}
    for nproc in (1, 2):
        raw = _raw(tmp_path, shapes_dataset_dir, "", "", "clip", "global")
        raw.update({"name": f"tiny-{nproc}", "student": {"preset": "tiny"}})
        raw["optim"]["epochs"] = 1
        path = tmp_path / f"tiny-{nproc}.yaml"
        path.write_text(yaml.safe_dump(raw))
        if nproc == 1:
            _one_process("-m", "clipdistill.train", str(path), "--no-progress")
        else:
            _torchrun("-m", "clipdistill.train", str(path), "--no-progress", nproc=nproc)
        runs[nproc] = tmp_path / "runs" / f"tiny-{nproc}"
    one, two = (load_file(runs[n] / "model" / WEIGHTS_FILE) for n in (1, 2))
    assert list(one) == list(two)
    statistics = [k for k in one if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) == 3 * 112  # efficientvit_m0's BatchNorm2d layers
    for key in statistics:
        assert not torch.equal(one[key], torch.zeros_like(one[key]) if "var" not in key else torch.ones_like(one[key]))
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    student = load_student(runs[2] / "model")
    kinds = {type(m) for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.BatchNorm2d}
    checkpoints = [torch.load(runs[n] / "checkpoints" / "latest.pt", weights_only=True) for n in (1, 2)]
    assert list(checkpoints[0]["student"]) == list(checkpoints[1]["student"])


@pytest.mark.e2e
def test_batchnorm_over_unequal_and_empty_shares_matches_the_whole_batch(tmp_path: Path) -> None:
    """GlobalBatchNorm weighs each process's statistics by its rows: outputs, input and
    parameter gradients and running statistics equal plain BatchNorm on the whole batch, for
    1d/2d/3d inputs, momentum None (cumulative average), no affine, timm's BatchNormAct2d with
    its activation, and a process with no rows at all."""
    _torchrun(str(WORKER.with_name("ddp_batchnorm_worker.py")), str(tmp_path), timeout=300)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == [f"case{c}" for c in range(4)]
        for case, diffs in results.items():
            assert {"output1", "input_grad1", "running_mean1", "running_var1"} <= set(diffs), case
            for key, value in diffs.items():
                assert value < 1e-12, (rank, case, key, value)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_batchnorm_conversion_keeps_keys_tensors_and_activations_and_is_undone(device: str) -> None:
    """Converting in keeps every state_dict key and tensor object (checkpoints, resume and the
    optimiser see the same state), turns timm's BatchNormAct2d into a variant that keeps its
    activation (PyTorch's own converter drops it), and converting out restores the original
    classes holding the trained tensors. ``cuda`` only builds the SyncBatchNorm modules."""
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
    from torch import nn

    from clipdistill.models.students import build_student
    from clipdistill.train.sync_batchnorm import (
        BatchNormConversionError,
        GlobalBatchNorm,
        GlobalBatchNormAct,
        to_global_batchnorm,
        to_plain_batchnorm,
    )

    torch.manual_seed(0)
    student = build_student("small")  # fastvit_t8: BatchNorm2d and BatchNormAct2d
    path = "model.visual.trunk.stem.0.conv_kxk.0.bn"
    student.get_submodule(path).act = nn.GELU()  # a real activation (the preset's are Identity)
    before = {name: type(m) for name, m in student.named_modules()}
    state = student.state_dict(keep_vars=True)
    pixels = torch.rand(2, 3, 64, 64)
    expected = student.eval().encode_image(pixels)
    kinds = {"cpu": (GlobalBatchNorm, GlobalBatchNormAct), "cuda": (nn.SyncBatchNorm, SyncBatchNormAct)}[device]

    assert to_global_batchnorm(student, torch.device(device)) is student
    converted = {name: type(m) for name, m in student.named_modules()}
    assert {name for name, kind in before.items() if kind is BatchNormAct2d} == {
        name for name, kind in converted.items() if kind is kinds[1]
    }
    assert {name for name, kind in before.items() if kind is nn.BatchNorm2d} == {
        name for name, kind in converted.items() if kind is kinds[0]
    }
    assert isinstance(student.get_submodule(path).act, nn.GELU)
    after = student.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    if device == "cpu":  # outside a process group, eval and training are plain BatchNorm
        torch.testing.assert_close(student.encode_image(pixels), expected, rtol=0, atol=0)

    with torch.no_grad():
        student.get_submodule(path).running_mean.add_(1.0)  # "trained" statistics
    to_plain_batchnorm(student)
    assert {name: type(m) for name, m in student.named_modules()} == before
    assert list(student.state_dict()) == list(state)
    assert float(student.get_submodule(path).running_mean.min()) >= 1.0
    assert isinstance(student.get_submodule(path).act, nn.GELU)

    class CustomBatchNorm(nn.BatchNorm2d):
        pass

    student.get_submodule(path.removesuffix(".bn")).bn = CustomBatchNorm(4)
    with pytest.raises(BatchNormConversionError, match=rf"{re.escape(path)} is a .*CustomBatchNorm"):
        to_global_batchnorm(student, torch.device(device))


@pytest.mark.slow
def test_torchrun_entry_checkpoints_on_rank0_and_resumes_with_two_processes(
    shapes_dataset_dir: Path, tmp_path: Path, student_config: str
) -> None:
    import yaml

    def config_file(out: Path, **data: object) -> Path:
        raw = _raw(tmp_path, shapes_dataset_dir, "", student_config, "clip", "global")
        raw.update({"name": "run", "out_dir": str(out), "save_every": 1, "log_every": 1})
        raw["data"].update(data)
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(raw))
        return path

    straight = config_file(tmp_path / "straight")
    _torchrun("-m", "clipdistill.train", str(straight), "--no-progress")
    run = tmp_path / "straight" / "run"
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one writer: rank 0 (6 train images / batch 4 = 1 step x 2 epochs)
    assert [json.loads(line)["epoch"] for line in (run / "results.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt"]  # keep_checkpoints: latest
    assert json.loads((run / "summary.json").read_text())["steps"] == 2

    # The crashed-and-resumed run decodes each process's rows per batch in a worker (data.preload
    # false): it must still equal the preloaded straight run bit for bit.
    resumed_cfg = config_file(tmp_path / "resumed", preload=False, workers=1)
    crashed = _torchrun(str(WORKER.with_name("ddp_crash_worker.py")), str(resumed_cfg), "--no-progress", check=False)
    assert crashed.returncode != 0  # both processes stopped before step 2; rank 0 saved step 1
    _torchrun("-m", "clipdistill.train", str(resumed_cfg), "--resume", "latest", "--no-progress")
    resumed_run = tmp_path / "resumed" / "run"
    steps = [json.loads(line)["step"] for line in (resumed_run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    expected = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    got = torch.load(resumed_run / "checkpoints" / "latest.pt", weights_only=True)
    assert got["position"] == expected["position"]
    # both runs took the same 2-process steps, so weights and Adam moments are bitwise equal
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"]), index
    for key, value in expected["student"].items():
        assert torch.equal(got["student"][key], value), key


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
@pytest.mark.e2e
def test_leaving_the_group_stops_its_threads_even_after_open_clip_is_imported() -> None:
    """A group kept alive past shutdown (torch.distributed.nn binds it as default arguments
    when first imported after init) leaves gloo threads that abort the process at exit."""
    result = _torchrun(str(WORKER.with_name("ddp_shutdown_worker.py")), timeout=300)
    lines = sorted(re.findall(r"rank \d+: during=\[[^\]]*\] after=\[[^\]]*\]", result.stdout))
    assert len(lines) == 2, result.stdout + result.stderr
    for line in lines:
        assert "during=['gloo_tcp_loop'" in line, line  # the check sees gloo's threads at all
        assert line.endswith("after=[]"), line


def test_settings_that_cannot_work_are_refused_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdistill.config import ConfigError
    from clipdistill.train.distributed import DistContext, context_from_env, init_process_group, local_rows

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match=r"RANK=5 and WORLD_SIZE=2"):
        context_from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match=r"RANK='one' must be an integer"):
        context_from_env()
    two = DistContext(rank=1, world=2)
    assert local_rows(6, two) == slice(3, 6)
    with pytest.raises(
        ConfigError, match=r"'optim.batch_size' \(5\) must be divisible by the number of processes \(2\)"
    ):
        local_rows(5, two)
    with pytest.raises(ConfigError, match=r"'distributed.backend' must be auto, gloo or nccl, got 'mpi'"):
        init_process_group(DistContext(), torch.device("cpu"), "mpi")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set; launch with torchrun"):
        init_process_group(two, torch.device("cpu"), "gloo")
