"""Atomic file writes: every artifact goes to a temp file, is fsynced, then renamed.

A crash mid-write must leave the previous version readable, so no writer in clipdistill
opens its final path for writing directly. ``os.replace`` is atomic on POSIX within one
filesystem, which is why the temp file is created beside the target, not in /tmp.

A temp file is named ``.TARGET.HOST.PID-RANDOM.tmp``. A write killed before its rename (SIGKILL,
OOM, power cut) leaves one behind, so the first atomic write of a process into a folder removes
the ones whose process (on this host) is no longer running, and says so on stderr: an orphan is
cleaned wherever artifacts are written (cache, export, index, run folders), never one a live
writer still owns. The finished file gets the permissions the umask allows (``mkstemp``
creates 0600, which would hide artifacts from the rest of a group).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from clipdistill.faults import failpoint


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only be
    read by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9]+)\.(?P<pid>\d+)-[^.]*\.tmp$")
_swept: set[str] = set()  # folders this process has already cleared of orphans


def temp_prefix(name: str) -> str:
    """``.NAME.HOST.PID-``: the start of every temp name made for ``name`` (a file or a folder;
    ``mkstemp``/``mkdtemp`` add the random part and ``.tmp``), so a leftover names its writer."""
    return f".{name}.{_host_tag()}.{os.getpid()}-"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def left_by_killed_writer(name: str) -> bool:
    """Whether ``name`` is a temp name of :func:`temp_prefix` whose writer, a process of this
    host other than this one, is no longer running (names of other hosts are never judged)."""
    match = _TEMP_NAME.match(name)
    if not match or match["host"] != _host_tag():
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _pid_running(pid)


def orphaned_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Temp files in ``directory`` left by a killed :func:`atomic_path` of this host: their
    process is no longer running. Files of live processes and of other hosts are not listed."""
    return [path for path in stale_temp_files(directory) if left_by_killed_writer(path.name)]


def _sweep_orphans(directory: Path) -> None:
    """Once per process and folder: delete :func:`orphaned_temp_files`, naming each on stderr."""
    key = str(directory.absolute())
    if key in _swept:
        return
    _swept.add(key)
    for orphan in orphaned_temp_files(directory):
        with contextlib.suppress(FileNotFoundError):
            orphan.unlink()
            print(f"removed {orphan}, left by a write that was killed before it finished", file=sys.stderr)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success fsync it and rename it over ``target``.

    For writers that insist on a file name (safetensors, torch.save, matplotlib, faiss).
    On any exception the temp file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        failpoint(f"atomic:{target.name}", tmp)  # crash tests: the bytes are written, the rename is not done
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() would have created it
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(target: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temp file beside ``target``, then fsync and rename."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(target, lambda handle: handle.write(data))


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(target, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def append_jsonl(target: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it: logs are append-only, so a torn last line is the
    worst a crash can do, and readers skip it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    failpoint(f"append:{target.name}", target)


def stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Temp files :func:`atomic_path` left behind when its process was killed mid-write."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob(".*.tmp") if path.is_file())


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete them (a killed checkpoint write can leave a multi-GB orphan); returns what went.

    Only call this on a folder one process writes to: another live writer's temp file would go too."""
    removed = stale_temp_files(directory)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines log, skipping a torn final line left by a crash."""
    records: list[dict[str, Any]] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
    return records


def pread_exactly(fd: int, target: memoryview, offset: int) -> bool:
    """Fill ``target`` from file ``fd`` at ``offset`` (``os.preadv`` may return fewer bytes than
    asked); ``False`` when the file ends first, for the caller to name what is missing."""
    while target:
        read = os.preadv(fd, [target], offset)
        if read == 0:
            return False
        target, offset = target[read:], offset + read
    return True
