"""What a run folder holds before training starts: a fresh run, a run to resume, or someone else's run.

Kept apart from the loop so the rules are in one place: a folder that holds another run is
refused (naming the keys that differ), a run killed before its first checkpoint simply starts
again, temp files a kill left behind are removed, ``--resume`` must match the config, and a
folder another live process is training in is refused (``run.lock``, naming that process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from clipdistill.config import ConfigError, TrainConfig, read_yaml, save_config, to_dict
from clipdistill.data.dataset import PairedDataset
from clipdistill.io import atomic_write_json, remove_stale_temp_files
from clipdistill.train.checkpoint import LATEST, PREVIOUS, CheckpointError, find_resume_checkpoint

CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
RUN_LOGS = ("log.jsonl", "results.jsonl")
# Keys that change how a run executes, never what it computes (the same pixels either way):
# a run may be resumed with other values, e.g. with decoding workers on a bigger machine.
EXECUTION_KEYS = frozenset({"data.preload", "data.workers", "keep_checkpoints"})


def _differing_keys(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[str]:
    """Dotted keys whose values differ (``optim.lr``), so a refusal names exactly what changed.

    A key the saved config lacks but that holds its default now is no difference: it was added
    to clipdistill after that run was saved, and the run behaved as the default does. Nor is
    one of :data:`EXECUTION_KEYS`."""
    defaults = to_dict(TrainConfig()) if defaults is None else defaults
    keys: list[str] = []
    for key in sorted(set(saved) | set(current)):
        left, right = saved.get(key), current.get(key)
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(left, dict) and isinstance(right, dict) and key != "method_args":
            keys += _differing_keys(left, right, f"{prefix}{key}.", default if isinstance(default, dict) else {})
        elif (key not in saved and right == default) or f"{prefix}{key}" in EXECUTION_KEYS:
            continue
        elif left != right:
            keys.append(f"{prefix}{key}")
    return keys


def _describe(keys: list[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    def value(tree: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None  # type: ignore[assignment]
        return tree

    return ", ".join(f"{key} ({value(saved, key)!r} there, {value(current, key)!r} now)" for key in keys)


def check_names(config: TrainConfig) -> None:
    """A misspelt teacher spec or student preset fails in the first second, naming its key,
    not after the dataset is decoded and the teacher loaded."""
    from clipdistill.models.spec import ModelSpecError, parse_spec
    from clipdistill.models.students import StudentConfigError, student_config

    if config.teacher.spec:
        try:
            parsed = parse_spec(config.teacher.spec)
        except ModelSpecError as error:
            raise ConfigError(f"key 'teacher.spec': {error}") from error
        if parsed.schema in ("run", "local-dir") and not Path(parsed.name).exists():
            raise ConfigError(
                f"key 'teacher.spec': {parsed.schema} folder {parsed.name} does not exist "
                "(train one with `clipdistill teacher train`, or fix the path)"
            )
    if config.student.init:
        try:
            parsed = parse_spec(config.student.init)
        except ModelSpecError as error:
            raise ConfigError(f"key 'student.init': {error}") from error
        if parsed.schema == "local-dir" and not Path(parsed.name).is_dir():
            raise ConfigError(f"key 'student.init': folder {parsed.name} does not exist")
    elif not config.student.model_config:
        try:
            student_config(config.student.preset)
        except StudentConfigError as error:
            raise ConfigError(f"key 'student.preset': {error}") from error


def prepare_run_folder(config: TrainConfig, resume: str | None) -> dict[str, Any] | None:
    """Get ``config.run_dir`` ready; return the checkpoint state to resume from, or ``None`` for step 0.

    It deletes temp files a killed write left in the run folder, so with several processes on
    one run (torchrun) only one of them may call it."""
    run_dir = config.run_dir
    checkpoints = run_dir / "checkpoints"
    current = to_dict(config)
    lock_run_folder(run_dir)
    orphans = [path for folder in (checkpoints, run_dir, run_dir / "model") for path in remove_stale_temp_files(folder)]
    for orphan in orphans:
        print(f"removed {orphan}, left by a write that was killed before it finished", file=sys.stderr)
    if (run_dir / "summary.json").is_file() and not any((checkpoints / name).exists() for name in (LATEST, PREVIOUS)):
        raise ConfigError(
            f"run folder {run_dir} holds a finished run that kept no checkpoint to continue from "
            f"(keep_checkpoints: none); its student is in {run_dir / 'model'}; choose another 'name' to train again"
        )
    if resume is not None:
        found = find_resume_checkpoint(checkpoints, resume)
        if found is not None:
            path, state = found
            differing = _differing_keys(state.get("config", {}), current)
            if differing:
                raise CheckpointError(
                    f"cannot resume from {path}: config differs in key(s) "
                    f"{_describe(differing, state.get('config', {}), current)}; resume with the run's own config "
                    f"({run_dir / CONFIG_FILE}) or start a new run under another 'name'"
                )
            return state
    elif (checkpoints / LATEST).exists():
        raise ConfigError(
            f"run folder {run_dir} already holds a run ({checkpoints / LATEST}); "
            "pass --resume latest to continue it, or choose another 'name'"
        )
    _check_not_another_run(run_dir, current)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in RUN_LOGS:  # a run killed before its first checkpoint: its logs are redone from step 0
        (run_dir / stale).unlink(missing_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    return None


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


_locks: dict[str, int] = {}  # run folder -> the open descriptor holding its lock (this process)


def lock_run_folder(run_dir: Path) -> None:
    """Take ``run_dir/run.lock`` for this process (an exclusive ``flock``, with our pid written in
    it) or raise :class:`RunFolderBusy` naming the process that holds it. Two processes training
    into one folder would interleave checkpoints and logs. The kernel drops the lock when the
    holder exits however it exits (a SIGKILL included), so a stale lock cannot block a restart;
    within one process taking it again is a no-op, and :class:`StopSignals` (the scope of one
    ``fit``) releases the locks taken inside it."""
    import fcntl

    key = str(run_dir.absolute())
    if key in _locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(
            f"run folder {run_dir} is in use by another process (pid {holder}, see {path}); "
            "wait for it to finish or stop it, or choose another 'name' or 'out_dir'"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _locks[key] = fd


def release_run_folder(run_dir: Path | None = None) -> None:
    """Drop this process's lock on ``run_dir`` (every lock it holds when ``None``)."""
    keys = list(_locks) if run_dir is None else [str(run_dir.absolute())]
    for key in keys:
        fd = _locks.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def _check_not_another_run(run_dir: Path, current: dict[str, Any]) -> None:
    """A folder whose config.yaml describes a different run is never overwritten."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path)
    differing = _differing_keys(saved, current)
    if differing:
        raise ConfigError(
            f"run folder {run_dir} holds a different run ({saved_path} differs in "
            f"{_describe(differing, saved, current)}); choose another 'name' or 'out_dir', or delete the folder"
        )


BAD_SAMPLES_FILE = "bad_samples.json"


def bad_samples_entry(dataset: PairedDataset) -> dict[str, Any]:
    """``{"bad_samples": counts + first offenders}`` when ``--on-bad-sample skip`` dropped any, else ``{}``."""
    if dataset.skipped is None or not dataset.skipped.samples:
        return {}
    return {"bad_samples": dataset.skipped.summary()}


def record_bad_samples(run_dir: Path, dataset: PairedDataset) -> None:
    """Every skipped sample (not only the first few) in the run folder, for whoever audits the run."""
    entry = bad_samples_entry(dataset)
    if not entry:
        (run_dir / BAD_SAMPLES_FILE).unlink(missing_ok=True)
        return
    samples = dataset.skipped.samples if dataset.skipped is not None else []
    everything = [{"source": s.source, "where": s.where, "reason": s.reason, "kind": s.kind} for s in samples]
    atomic_write_json(run_dir / BAD_SAMPLES_FILE, {**entry["bad_samples"], "all": everything})


class TrainingStopped(RuntimeError):
    """SIGTERM/SIGINT arrived; the step in flight finished and ``latest`` was saved."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        self.signal_name = signal_name
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint saved to {checkpoint}; "
            "continue with --resume latest"
        )


class StopSignals:
    """Turn the first SIGTERM (a preemption notice, ``kill``) or SIGINT (Ctrl-C) into a request
    the loop honours after the step in flight, saving ``latest`` first, so a stop costs nothing.
    A second signal acts as it normally would (the handlers are one-shot). Outside the main
    thread signals cannot be caught, and nothing is installed."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._held_before: set[str] = set()

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        self._held_before = set(_locks)
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
            # Restart interrupted system calls (SA_RESTART): Python installs handlers that interrupt
            # them, and a SIGTERM landing inside torch.save's C++ writes left a short write that
            # failed the checkpoint ("unexpected pos", seen once in the crash-resume test). The flag
            # is set per signal; the handler itself still only records the request.
            signal.siginterrupt(number, False)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        import signal

        self.requested = signal.Signals(number).name
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # a second one is not caught

    def __exit__(self, *exc: object) -> None:
        import signal

        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        for key in set(_locks) - self._held_before:  # run folders locked during this fit
            release_run_folder(Path(key))
