"""One training loop for every distillation method.

Per step: take the epoch plan's next images, replay their fixed augmentation, pick one
caption each, encode with the student, hand both to the method, sum its ``*_loss`` terms,
step. The method owns teacher access and its trainable extras; the loop knows nothing about
any particular method.

Multi-process (``torchrun``): every process builds the same plan, takes its share of each
global batch and runs one :class:`~clipdistill.train.distributed.TrainStep` under DDP; rank 0
alone writes logs and checkpoints. ``train/distributed.py`` holds everything distributed.

Determinism: each epoch's plan (image order, caption picks, augmentation ids) is drawn from a
generator seeded by (seed, epoch) alone, so a resumed run rebuilds the exact plan from the
checkpoint's (epoch, step) without replaying anything.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipdistill.config import ConfigError, TrainConfig, read_yaml, to_dict, with_derived_image_size
from clipdistill.data.augment import replay_augmentation
from clipdistill.data.dataset import PairedDataset
from clipdistill.data.images import to_unit
from clipdistill.data.pixels import PixelSource, pixel_source
from clipdistill.distill.base import TEACHER_OF_NEED, Batch, DistillMethod, TeacherSource, build_method_args
from clipdistill.distill.methods import fusion_methods, get_method, resolve_method_entry
from clipdistill.eval.embed import embed_image_source, embed_texts
from clipdistill.eval.retrieval import recall_at_k
from clipdistill.io import append_jsonl, atomic_write_json, read_jsonl
from clipdistill.models.encoding_memo import EncodingMemo
from clipdistill.models.openclip_model import OpenCLIPDualEncoder
from clipdistill.train.checkpoint import (
    BEST,
    LATEST,
    CheckpointError,
    load_checkpoint,
    prune_finished,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from clipdistill.train.distributed import (
    GatheringTeacher,
    TrainStep,
    any_process,
    average_floats,
    barrier,
    broadcast_from_main,
    context_from_env,
    init_process_group,
    local_rows,
    process_device,
    wrap_ddp,
)
from clipdistill.train.schedule import AdamWSettings, build_optimizer, seed_everything, student_groups, update
from clipdistill.train.state import (
    StopSignals,
    TrainingStopped,
    bad_samples_entry,
    check_names,
    prepare_run_folder,
    record_bad_samples,
)
from clipdistill.train.sync_batchnorm import to_plain_batchnorm
from clipdistill.train.term_gradients import summarise_terms, term_gradients

MAX_LOGIT_SCALE = 4.6052  # ln(100), CLIP's clamp


@dataclass
class EpochPlan:
    """Image order, per-image caption pick (index within the image) and augmentation id."""

    order: torch.Tensor
    caption_pick: torch.Tensor
    aug_ids: torch.Tensor


def epoch_plan(caption_counts: torch.Tensor, k_augmentations: int, seed: int, epoch: int) -> EpochPlan:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(caption_counts)
    order = torch.randperm(n, generator=generator)
    caption_pick = (torch.rand(n, generator=generator) * caption_counts).long()
    aug_ids = torch.randint(0, max(1, k_augmentations), (n,), generator=generator)
    return EpochPlan(order, caption_pick, aug_ids)


def build_teacher_source(config: TrainConfig, dataset: PairedDataset, device: torch.device) -> TeacherSource | None:
    """Cached teacher when ``teacher.cache`` is set, the online teacher when only ``teacher.spec`` is.

    With ``teacher.fusion`` the source also gives that fusion teacher's per-item states: from
    the cache (which must hold them) or computed online."""
    if config.teacher.cache:
        from clipdistill.distill.cache import CachedTeacher

        if not config.teacher.spec:
            raise ConfigError("key 'teacher.spec' is required with 'teacher.cache' (the cache is checked against it)")
        source = CachedTeacher.open(
            config.teacher.cache,
            teacher_spec=config.teacher.spec,
            dataset=dataset,
            split="train",
            image_size=config.data.image_size,
            k_augmentations=config.augment.k,
            seed=config.augment.seed,
            aug_scale=config.augment.scale,
            aug_max_shift=config.augment.max_shift,
            fusion=config.teacher.fusion,
        )
        source.device = device
        return source
    if config.teacher.spec:
        from clipdistill.distill.teacher_source import OnlineTeacher
        from clipdistill.models.fusion import load_fusion_teacher
        from clipdistill.models.teachers import load_teacher

        online: TeacherSource = OnlineTeacher(
            load_teacher(config.teacher.spec, device=device, allow_random=config.teacher.allow_random)
        )
        if config.teacher.fusion:
            from clipdistill.distill.fusion_source import OnlineFusion

            online = OnlineFusion(online, load_fusion_teacher(config.teacher.fusion, device=device))
        return online
    return None


def check_needs(config: TrainConfig, method_cls: type[DistillMethod]) -> None:
    """Refuse a config that lacks what the method needs, or names a teacher or student that does
    not exist, naming the key; before the data is read or anything is built."""
    check_names(config)
    needs = set(method_cls.needs)
    if any(TEACHER_OF_NEED[need] == "dual" for need in needs) and not config.teacher.spec:
        raise ConfigError(f"method {method_cls.name!r} needs a teacher: set key 'teacher.spec' (e.g. run:runs/teacher)")
    fusion = sorted(need for need in needs if TEACHER_OF_NEED[need] == "fusion")
    if fusion and not config.teacher.fusion:
        raise ConfigError(
            f"method {method_cls.name!r} needs {', '.join(fusion)}: set key 'teacher.fusion' to a fusion teacher "
            "(fusion:PATH from `clipdistill teacher train-fusion`, or blip-itm:ID)"
        )
    if config.teacher.fusion:
        from clipdistill.models.spec import ModelSpecError, parse_fusion_spec

        try:
            parse_fusion_spec(config.teacher.fusion)  # a dual-encoder spec here fails before any work
        except ModelSpecError as error:
            raise ConfigError(f"key 'teacher.fusion': {error}") from error
        if "fusion" not in method_cls.teachers():
            raise ConfigError(
                f"key 'teacher.fusion' is set but method {method_cls.name!r} does not use a fusion teacher; "
                f"remove the key (methods that use one: {', '.join(fusion_methods())})"
            )
        if not config.teacher.spec:
            raise ConfigError("key 'teacher.spec' is required with 'teacher.fusion' (the dual teacher)")


def build_student_model(config: TrainConfig) -> OpenCLIPDualEncoder:
    """The student of ``config.student``: its architecture and first weights, then its frozen
    trunk stages (``student.frozen_stages``)."""
    student = _initial_student(config)
    try:
        student.freeze_trunk_stages(config.student.frozen_stages)
    except ValueError as error:
        raise ConfigError(f"key 'student.frozen_stages': {error}") from error
    return student


def _initial_student(config: TrainConfig) -> OpenCLIPDualEncoder:
    import json

    from clipdistill.models.spec import ModelSpecError
    from clipdistill.models.student_init import init_student
    from clipdistill.models.student_towers import apply_tower_init
    from clipdistill.models.students import StudentConfigError, build_student, student_config

    if config.student.init:
        try:
            return init_student(config.student.init)
        except (StudentConfigError, ModelSpecError, FileNotFoundError) as error:
            raise ConfigError(f"key 'student.init': {error}") from error
    if config.student.model_config:
        path = Path(config.student.model_config)
        if not path.is_file():
            raise ConfigError(f"key 'student.model_config': file {path} does not exist")
        raw = json.loads(path.read_text(encoding="utf-8"))
        student = build_student(raw.get("model_cfg", raw))
    else:
        student = build_student(
            student_config(
                config.student.preset, image_size=config.student.image_size, embed_dim=config.student.embed_dim
            )
        )
    try:
        apply_tower_init(student, config.student.image_init, config.student.text_init, config.teacher.spec)
    except StudentConfigError as error:
        raise ConfigError(str(error)) from error
    return student


def _truncate_log(path: Path, key: str, limit: int) -> None:
    """After a resume, drop log lines written after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    import json

    from clipdistill.io import atomic_write_text

    kept = [record for record in read_jsonl(path) if record.get(key, 0) <= limit]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`fit` runs it."""

    def __init__(
        self, config: TrainConfig, *, progress: bool = True, encoding_memo: EncodingMemo | None = None
    ) -> None:
        """``encoding_memo``: where the student's frozen trunk rows and the fusion teacher's
        logits grids are kept, shared with the other students of a run (both exact: sharing
        changes no number); by default the student keeps its own and grids are not kept."""
        from clipdistill.data.splits import split_dataset
        from clipdistill.device import resolve_device

        config = with_derived_image_size(config)
        self.config = config
        self.dist = context_from_env(config.distributed.gather_with_grad, config.distributed.local_loss)
        self.progress = progress and self.dist.is_main
        self.device = resolve_device(process_device(config.device, self.dist))
        self.created_group = init_process_group(self.dist, self.device, config.distributed.backend)
        self.run_dir = config.run_dir
        name, _, variant_args = resolve_method_entry(config.method)  # NAME or NAME:VARIANT
        method_cls = get_method(name)
        method_args = build_method_args(method_cls, {**variant_args, **config.method_args})
        check_needs(config, method_cls)

        seed_everything(config.seed)
        # Data without splits (an open_clip CSV) gets them carved as every command carves them.
        self.dataset, _ = split_dataset(
            config.data.path, config.data.images, config.data.split_options(), on_bad_sample=config.data.on_bad_sample
        )
        self.train_split = self.dataset.split("train")
        self.val_split = self.dataset.split("val")
        self.student = build_student_model(config).to(self.device)
        self.teacher = build_teacher_source(config, self.dataset, self.device)
        if encoding_memo is not None:
            self.student.encoding_memo = encoding_memo
            fusion = getattr(self.teacher, "fusion", None)
            if fusion is not None:
                fusion.encoding_memo = encoding_memo  # its own grids only, not its dual teacher's towers
        if self.dist.enabled and self.teacher is not None:
            self.teacher = GatheringTeacher(self.teacher, self.dist)
        self.method = method_cls(self.student.embed_dim, self.teacher, method_args).to(self.device)
        step = TrainStep(self.student, self.method, self.dist)
        self.forward_step = wrap_ddp(step, self.device) if self.dist.enabled else step

        data = config.data
        self.train_images = pixel_source(
            self.train_split.image_paths(),
            data.image_size,
            preload=data.preload,
            workers=data.workers,
            progress=progress,
        )
        self.val_images: PixelSource | None = None  # only rank 0 evaluates; built on its first evaluation
        self.train_texts = self.train_split.texts()
        self.train_caption_ids = self.train_split.caption_ids()
        self.train_image_ids = [record.image_id for record in self.train_split.images]
        self.train_tokens = self.student.tokenize(self.train_texts)  # once: captions never change
        counts = torch.tensor([len(record.captions) for record in self.train_split.images])
        self.caption_counts = counts
        self.first_caption = torch.cumsum(counts, 0) - counts

        optim = config.optim
        self.batch_size = min(optim.batch_size, len(self.train_split))
        self.steps_per_epoch = max(1, len(self.train_split) // self.batch_size)
        self.rows = local_rows(self.batch_size, self.dist)  # this process's share of each batch
        self.total_steps = self.steps_per_epoch * optim.epochs
        self.optimizer, self.scheduler = build_optimizer(
            student_groups(self.student, self.method, optim.weight_decay, optim.scalar_lr),
            # open_clip's betas and eps; fused: one kernel for all parameters (the per-tensor
            # loop dominated small-batch CPU steps)
            AdamWSettings(lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, 0.98), eps=1e-6, fused=True),
            optim.warmup_steps,
            self.total_steps,
        )
        self.use_amp = optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_rsum = float("-inf")
        self.epoch_terms: dict[str, Any] = {}  # the current epoch's per-term gradients (term_gradients)
        self.seconds = 0.0
        self._stop = StopSignals()  # armed by fit()

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step},
            "best_rsum": self.best_rsum,
            "seconds": self.seconds,
            "config": to_dict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = len(state["optimizer"]["param_groups"])
        if groups != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"checkpoint of run {self.run_dir} has {groups} optimiser parameter groups, this version "
                f"{len(self.optimizer.param_groups)} (a method's scalars train in a group of their own); "
                "finish it with the version that started it, or start a new run"
            )
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        position = state["position"]
        self.epoch, self.step_in_epoch, self.global_step = (
            position["epoch"],
            position["step_in_epoch"],
            position["global_step"],
        )
        self.best_rsum = float(state["best_rsum"])
        self.seconds = float(state["seconds"])

    def _prepare_run_dir(self, resume: str | None) -> None:
        """Rank 0 checks/creates the run folder and reads the checkpoint; every process loads it
        (in a multi-process run it travels by broadcast, so no process reads files but rank 0)."""
        state = broadcast_from_main(lambda: self._prepare_on_main(resume), self.dist)
        if state is not None:
            self.load_state_dict(state)

    def _prepare_on_main(self, resume: str | None) -> dict[str, Any] | None:
        state = prepare_run_folder(self.config, resume)
        if state is None:
            return None
        position = state["position"]
        _truncate_log(self.run_dir / "log.jsonl", "step", position["global_step"])
        _truncate_log(self.run_dir / "results.jsonl", "epoch", position["epoch"])
        return state

    # --- one step -------------------------------------------------------------------------
    def _rows_of_step(self, plan: EpochPlan, step: int) -> torch.Tensor:
        """This process's training-image rows of one step of the plan."""
        return plan.order[step * self.batch_size : (step + 1) * self.batch_size][self.rows]

    def _batch(self, plan: EpochPlan, step: int) -> tuple[Batch, torch.Tensor]:
        """One step's batch, its images decoded now (the loop instead takes them from the
        source's prefetching iterator; tests and benchmarks build single steps with this)."""
        index = self._rows_of_step(plan, step)
        with closing(self.train_images.batches([index])) as decoded:
            return self._assemble(index, plan, next(decoded))

    def _assemble(self, index: torch.Tensor, plan: EpochPlan, images: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """The step's batch from its rows ``index`` and their decoded uint8 ``images``."""
        captions = self.first_caption[index] + plan.caption_pick[index]
        aug_ids = plan.aug_ids[index]
        image_ids = [self.train_image_ids[i] for i in index.tolist()]
        augment = self.config.augment
        pixels = replay_augmentation(
            to_unit(images),
            image_ids,
            aug_ids,
            seed=augment.seed,
            scale=augment.scale,
            max_shift=augment.max_shift,
        )
        batch = Batch(
            unit_pixels=pixels.to(self.device),
            texts=[self.train_texts[c] for c in captions.tolist()],
            image_ids=image_ids,
            caption_ids=[self.train_caption_ids[c] for c in captions.tolist()],
            aug_ids=aug_ids,
        )
        return batch, self.train_tokens[captions].to(self.device)

    def train_step(self, batch: Batch, tokens: torch.Tensor, *, measure_terms: bool = False) -> dict[str, Any]:
        """One optimiser step. ``measure_terms``: also each loss term's gradient on the student's
        outputs (train/term_gradients.py; one process only), returned under ``terms``."""
        self.student.train()
        self.method.train()
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            output = self.forward_step(batch, tokens)  # encode, gather (multi-process), method
            total = output.total()
        if not torch.isfinite(total):
            terms = {k: float(v) for k, v in output.losses.items()}
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: {terms}")
        measured = None
        if measure_terms:  # one process only: under DDP the step module is wrapped
            measured = term_gradients(output.losses, self.forward_step.outputs, self.method.task_term)
        grad_norm = update(total, self.optimizer, self.scheduler, self.config.optim.grad_clip, self.scaler)
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        record = {k: float(v.detach()) for k, v in output.losses.items()}
        record.update({"total_loss": float(total.detach()), "grad_norm": float(grad_norm)})
        record.update(output.report)
        if self.dist.local_loss:
            record = average_floats(record, self.dist)  # per-process shares -> whole-batch values
        if measured is not None:
            record["terms"] = measured
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.student.eval()
        data = self.config.data
        if self.val_images is None:
            self.val_images = pixel_source(
                self.val_split.image_paths(), data.image_size, preload=data.preload, workers=data.workers
            )
        image_emb = embed_image_source(self.student, self.val_images)
        text_emb = embed_texts(self.student, self.val_split.texts())
        return recall_at_k(image_emb, text_emb, self.val_split.text_to_image())

    def _stop_requested(self) -> str | None:
        """The signal that asks this run to stop, agreed by every process: under torchrun the
        signal can reach the processes at different steps, and a process that stopped alone
        would leave the others waiting in the next step's gather."""
        requested = self._stop.requested
        if not self.dist.enabled:
            return requested
        return (requested or "SIGTERM") if any_process(requested is not None, self.dist) else None

    def _save(self, name: str) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / "checkpoints" / name, self.state_dict(), keep_previous=name == LATEST)

    # --- the loop -------------------------------------------------------------------------
    def _after_step(self, record: dict[str, float], bar: Any) -> None:
        """Advance the position, log, checkpoint, and stop here if a signal asked to."""
        config = self.config
        self.step_in_epoch += 1
        self.global_step += 1
        log_now = self.global_step % config.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
        if log_now and self.dist.is_main:
            lr = self.optimizer.param_groups[0]["lr"]
            line = {"step": self.global_step, "epoch": self.epoch + 1, "lr": lr, **record}
            append_jsonl(self.run_dir / "log.jsonl", {**line, "seconds": round(self.seconds, 3)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['total_loss']:.3f}")
        if config.save_every and self.global_step % config.save_every == 0:
            self._save(LATEST)
        stop = self._stop_requested()
        if stop:
            self._save(LATEST)
            raise TrainingStopped(stop, self.global_step, self.run_dir / "checkpoints" / LATEST)

    def fit(self, resume: str | None = None) -> dict[str, Any]:
        """Train to the configured budget; returns the summary also written to ``summary.json``.

        A SIGTERM or Ctrl-C stops after the step in flight with ``latest`` saved
        (:class:`~clipdistill.train.state.TrainingStopped`); ``--resume latest`` continues exactly."""
        with StopSignals() as self._stop:
            return self._fit(resume)

    def _fit(self, resume: str | None) -> dict[str, Any]:
        from clipdistill.models.students import save_student

        self._prepare_run_dir(resume)
        if self.dist.is_main:
            record_bad_samples(self.run_dir, self.dataset)
        config = self.config
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc=config.name, unit="step")
        while self.epoch < config.optim.epochs:
            plan = epoch_plan(self.caption_counts, config.augment.k, config.seed, self.epoch)
            rows = [self._rows_of_step(plan, step) for step in range(self.step_in_epoch, self.steps_per_epoch)]
            with closing(self.train_images.batches(rows)) as decoded:  # stops decode workers on any exit
                for index in rows:
                    started = time.perf_counter()  # the step clock includes waiting for decoded images
                    batch, tokens = self._assemble(index, plan, next(decoded))
                    # one process: DDP's forward hands back no per-process outputs to measure on
                    last = self.step_in_epoch == self.steps_per_epoch - 1 and not self.dist.enabled
                    record = self.train_step(batch, tokens, measure_terms=last)
                    self.seconds += time.perf_counter() - started
                    if "terms" in record:
                        self.epoch_terms = record.pop("terms")
                    self._after_step(record, bar)
            self.epoch += 1
            self.step_in_epoch = 0
            if not self.dist.is_main:  # rank 0 evaluates and saves; the others go on to the next step
                continue
            metrics = self.evaluate()
            improved = metrics["rsum"] > self.best_rsum
            if improved:
                self.best_rsum = metrics["rsum"]
            append_jsonl(
                self.run_dir / "results.jsonl",
                {
                    "epoch": self.epoch,
                    "step": self.global_step,
                    "val": metrics,
                    "train_seconds": round(self.seconds, 3),
                    **({"terms": self.epoch_terms} if self.epoch_terms else {}),
                },
            )
            self.epoch_terms = {}
            if improved:
                self._save(BEST)
            self._save(LATEST)
        if bar is not None:
            bar.close()
        to_plain_batchnorm(self.student)  # ordinary BatchNorm layers again (a no-op in one process)
        if not self.dist.is_main:
            barrier(self.dist)  # wait for rank 0's final save, then report the same summary
            return _read_summary(self.run_dir)
        best_path = self.run_dir / "checkpoints" / BEST
        if best_path.is_file() or not (self.run_dir / "model").is_dir():
            self.student.load_state_dict(load_checkpoint(best_path)["student"])
            save_student(self.student.eval(), self.run_dir / "model")
        # else: a finished run extended with more epochs, none better than its best, whose best.pt
        # was pruned: its model folder already holds the best weights
        results = read_jsonl(self.run_dir / "results.jsonl")
        best_epoch = max(results, key=lambda r: r["val"]["rsum"])
        summary = {
            "name": config.name,
            "method": config.method,
            "seed": config.seed,
            "best_epoch": best_epoch["epoch"],
            "val": best_epoch["val"],
            "train_seconds": round(self.seconds, 2),
            "steps": self.global_step,
            "model": f"local-dir:{self.run_dir / 'model'}",
            "terms": summarise_terms([r["terms"] for r in results if "terms" in r], self.method.task_term),
            **bad_samples_entry(self.dataset),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        prune_finished(self.run_dir / "checkpoints", config.keep_checkpoints)  # after the summary: the run is done
        barrier(self.dist)
        return summary


def _read_summary(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    progress: bool = True,
    encoding_memo: EncodingMemo | None = None,
) -> dict[str, Any]:
    """Build a :class:`Trainer` and fit it (the library entry point behind ``clipdistill train``).
    Under torchrun every process calls this; it leaves the process group it joined on return.
    ``encoding_memo``: see :class:`Trainer`."""
    from clipdistill.train.distributed import shutdown

    trainer = Trainer(config, progress=progress, encoding_memo=encoding_memo)
    try:
        return trainer.fit(resume=resume)
    finally:
        shutdown(trainer.created_group)


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    return read_yaml(Path(run_dir) / "config.yaml")
