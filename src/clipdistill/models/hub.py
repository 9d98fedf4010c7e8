"""Reaching the Hugging Face hub, or knowing quickly that it cannot be reached.

Weights named by a hub tag, an ``hf-hub:`` repo or an ``hf:`` id come from the local hub cache
or from the hub. On a machine without the hub, huggingface_hub retries every request with a
back-off before it gives up, and a cached file is first re-checked online the same way. So a
loader asks here first: :func:`hub_unreachable` says in a few seconds (``HF_HUB_OFFLINE`` set,
or one short probe of the endpoint, remembered for the process) whether the hub is out of
reach; a file that is not cached then fails at once with :func:`cannot_fetch`'s one line, and a
cached one loads under :func:`hub_offline`, so nothing is retried.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from clipdistill.models.spec import ModelSpecError

#: How long the one probe of the hub may take (DNS included) before the hub counts as unreachable.
PROBE_SECONDS = 3.0
_probed: dict[str, str | None] = {}
_probe_lock = threading.Lock()


def hub_cache() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE`` / ``HF_HOME``), where weights are looked up."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def cannot_fetch(spec: str, what: str, cache: str, error: BaseException | str, local: str) -> ModelSpecError:
    """The one-line error for weights that are neither cached nor downloadable (an air-gapped
    machine): the spec, the cache looked in, why, and how to pass local weights instead."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    reason = " ".join(text.split())
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return ModelSpecError(
        f"cannot load {spec!r}: {what} could be neither found in the cache {cache} nor downloaded "
        f"({reason}); without the hub, pass local weights: {local}"
    )


def _probe(url: str, timeout: float) -> str | None:
    """``None`` when ``url`` answers an HTTP request (any status), else why not."""
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []
    silent = f"no answer within {timeout:g} s"

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered: reachable, whatever the status
        except Exception as error:  # DNS failure, refused, reset, timeout, TLS
            reason = getattr(error, "reason", error)
            # The socket's own timeout and the join below race at the same limit: one wording for both.
            timed_out = isinstance(error, TimeoutError) or isinstance(reason, TimeoutError)
            outcome.append(silent if timed_out else f"{type(error).__name__}: {error}")

    # A thread bounds the DNS lookup too, which the socket timeout does not cover.
    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return silent
    return outcome[0]


def hub_unreachable(url: str | None = None) -> str | None:
    """Why the hub (or ``url``, e.g. a weights URL's host) cannot be reached, or ``None`` when
    it can: ``HF_HUB_OFFLINE`` is honoured without any request; otherwise one HEAD request with
    a :data:`PROBE_SECONDS` limit and no retries, remembered per address for the process."""
    from huggingface_hub import constants

    if url is None and constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    target = url or hub_endpoint()
    with _probe_lock:
        if target not in _probed:
            reason = _probe(target, PROBE_SECONDS)
            _probed[target] = None if reason is None else f"{target} is unreachable: {reason}"
        return _probed[target]


def forget_probes() -> None:
    """Forget remembered probe results (a test that changes the endpoint)."""
    with _probe_lock:
        _probed.clear()


def cached_hub_file(repo_id: str, filenames: Iterable[str]) -> str | None:
    """The first of ``filenames`` of ``repo_id`` found in the local hub cache, without a request."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


@contextlib.contextmanager
def hub_offline(active: bool = True) -> Iterator[None]:
    """Within this block huggingface_hub and transformers read only the local cache (as under
    ``HF_HUB_OFFLINE=1``): loading cached files while the hub is out of reach then costs no
    retries. The setting is restored on exit."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def url_cache_file(url: str, cache_dir: str | None = None) -> Path:
    """Where open_clip keeps a weights file downloaded from a plain URL (``~/.cache/clip``)."""
    folder = Path(cache_dir) if cache_dir else Path(os.path.expanduser("~/.cache/clip"))
    return folder / os.path.basename(url)
