"""Module-level mutable state, listed: no stage or method hands results to another through a global.

Every module of the package is imported and each mutable object it assigns at module level (a
dict, list, set or deque, or a function with an ``lru_cache``) must be one of :data:`KNOWN`, with
the reason it may live there; so must every name a function rebinds with ``global``. Frozen
encodings that stages share travel in an explicit ``EncodingMemo`` (models/encoding_memo.py),
never in a module's globals: a new memo, counter or cache at module level fails this test until
it is listed here with its reason.
"""

from __future__ import annotations

import ast
import collections
import importlib
import inspect
import pkgutil
from pathlib import Path

import clipdistill

CONSTANT = "constant table, never written after import"
REGISTRY = "registry, filled by register_* calls at import and read afterwards"

#: "module:name" -> why it is module-level state.
KNOWN: dict[str, str] = {
    # constant tables
    "clipdistill.cli.deploy_cmd:_REPORTS": CONSTANT,
    "clipdistill.data.bad_samples:_TO_MARK": CONSTANT,
    "clipdistill.data.emoji:CONCEPT_ALIASES": CONSTANT,
    "clipdistill.data.emoji:SPLIT_FRACTIONS": CONSTANT,
    "clipdistill.data.karpathy:_SPLIT_ALIASES": CONSTANT,
    "clipdistill.data.loading:_READERS": CONSTANT,
    "clipdistill.distill.base:TEACHER_OF_NEED": CONSTANT,
    "clipdistill.distill.cache.format:HEADER_OF": CONSTANT,
    "clipdistill.distill.cache.shard_rows:DTYPES": CONSTANT,
    "clipdistill.distill.methods.conaclip:DEFAULT_LOSS_WEIGHTS": CONSTANT,
    "clipdistill.models.imagenet_lite:LITE_VARIANTS": CONSTANT,
    "clipdistill.models.imagenet_lite:_EXPANDED": CONSTANT,
    "clipdistill.models.imagenet_lite:_SEPARABLE": CONSTANT,
    "clipdistill.models.imagenet_lite:_TOP_LEVEL": CONSTANT,
    "clipdistill.models.students:PRESETS": CONSTANT,
    "clipdistill.serve.app.budget:_MODE_BYTES": CONSTANT,
    "clipdistill.serve.app.limits:ACCEPTED_FORMATS": CONSTANT,
    "clipdistill.serve.app.routes:SEARCH_BODY": CONSTANT,
    "clipdistill.serve.app.schemas:ERRORS": CONSTANT,
    "clipdistill.serve.encoders:TOWER_FILES": CONSTANT,
    # registries
    "clipdistill.distill.registry:_REGISTRY": REGISTRY,
    "clipdistill.export:_REGISTRY": REGISTRY,
    "clipdistill.models.kinds:_REGISTRY": REGISTRY,
    # per-process facts about the machine and its files, never a model's output
    "clipdistill.data.loading:_checked": "decode checks of image files, keyed by path, size and mtime",
    "clipdistill.data.members:_member_index": "offsets of a tar shard's members, read once per shard file",
    "clipdistill.demo:_STARTED": "when the running job started (its stage lines print the time since)",
    "clipdistill.faults:_hits": "how often each named failpoint was passed (crash tests)",
    "clipdistill.io:_swept": "folders this process already cleared of killed writes' temp files",
    "clipdistill.models.hub:_probed": "whether the hub answered its one probe (an offline hub fails fast)",
    "clipdistill.ort_session:_register_shared_arena": "ONNX Runtime's shared CPU arena, registered once",
    "clipdistill.serve.tokenize:_bytes_to_unicode": "the constant byte-to-unicode table of CLIP's BPE, built once",
    "clipdistill.data.bad_samples:_default_policy": "the process's --on-bad-sample option, set once by the CLI",
    "clipdistill.train.state:_locks": "the run-folder locks this process holds (one descriptor each)",
}

MUTABLE_TYPES = (dict, list, set, bytearray, collections.deque)


def _assigned_names(path: Path) -> set[str]:
    """Names a module's source binds at its top level (assignments and function definitions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                names.add(target.id)
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


def _rebound_names(path: Path) -> set[str]:
    """Names that a ``global`` statement anywhere in the module rebinds."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}


def _module_state() -> dict[str, str]:
    found: dict[str, str] = {}
    prefix = clipdistill.__name__ + "."
    for info in pkgutil.walk_packages(clipdistill.__path__, prefix):
        module = importlib.import_module(info.name)
        source = inspect.getsourcefile(module)
        assigned = _assigned_names(Path(source)) if source else set()
        for name in _rebound_names(Path(source)) if source else set():
            found[f"{info.name}:{name}"] = "global"
        for name, value in vars(module).items():
            if name.startswith("__") or name not in assigned:
                continue
            if isinstance(value, MUTABLE_TYPES) or callable(getattr(value, "cache_info", None)):
                found[f"{info.name}:{name}"] = type(value).__name__
    return found


def test_every_module_level_mutable_object_is_listed_with_its_reason() -> None:
    found = _module_state()
    unlisted = sorted(set(found) - set(KNOWN))
    gone = sorted(set(KNOWN) - set(found))
    assert not unlisted, f"module-level mutable state not listed in KNOWN (say why it may be global): {unlisted}"
    assert not gone, f"KNOWN lists state that no longer exists: {gone}"
