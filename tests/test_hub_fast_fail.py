"""An unreachable hub fails in seconds with the one-line error, not after a minute of retries.

The endpoint is a local socket that accepts connections and never answers (a hub behind a
dead proxy or a black-holed route: the slow case), so nothing here touches a real network.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipdistill.models import hub
from clipdistill.models.spec import ModelSpecError


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """``HF_ENDPOINT`` pointed at a server that never answers, an empty hub cache, online mode."""
    from huggingface_hub import constants

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accepted, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    hub.forget_probes()
    yield url
    hub.forget_probes()
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


@pytest.mark.parametrize(
    ("spec", "what"),
    [
        ("openclip:RN50@openai", "the weights of tag 'openai'"),
        ("hf-hub:timm/ViT-B-16-SigLIP", "its open_clip_config.json"),
        ("hf:openai/clip-vit-base-patch32", "model 'openai/clip-vit-base-patch32'"),
    ],
)
def test_unreachable_hub_fails_in_seconds_with_one_line(
    silent_endpoint: str, tmp_path: Path, spec: str, what: str
) -> None:
    import open_clip  # noqa: F401  (imported before the clock starts: imports are not the hub's cost)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel  # noqa: F401

    from clipdistill.models.teachers import load_model

    started = time.perf_counter()
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    seconds = time.perf_counter() - started
    message = str(info.value)
    print(f"{spec}: {seconds:.2f} s")
    assert seconds < hub.PROBE_SECONDS + 4, seconds  # was about a minute of retries
    assert "\n" not in message and message.startswith(f"cannot load {spec!r}: {what}")
    assert str(tmp_path / "hub") in message and f"{silent_endpoint} is unreachable" in message
    assert "without the hub, pass local weights" in message


def test_the_probe_is_made_once(silent_endpoint: str) -> None:
    started = time.perf_counter()
    first = hub.hub_unreachable()
    middle = time.perf_counter()
    second = hub.hub_unreachable()
    assert first == second and first is not None and "no answer within" in first
    assert middle - started < hub.PROBE_SECONDS + 1 and time.perf_counter() - middle < 0.1


@pytest.mark.parametrize("raised", [TimeoutError("timed out"), "url-error"])
def test_a_socket_timeout_reads_like_a_silent_hub(monkeypatch: pytest.MonkeyPatch, raised: object) -> None:
    """The socket's timeout and the probe's own limit race: whichever fires, one wording."""
    import urllib.error
    import urllib.request

    error = urllib.error.URLError(TimeoutError("timed out")) if raised == "url-error" else raised

    def refuse(*args: object, **kwargs: object) -> None:
        raise error  # type: ignore[misc]

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert hub._probe("http://127.0.0.1:9", 2.0) == "no answer within 2 s"


def test_a_refused_connection_names_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert hub._probe("http://127.0.0.1:9", 2.0) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_hf_hub_offline_is_honoured_without_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_probe", lambda url, timeout: pytest.fail("probed while offline"))
    hub.forget_probes()
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_cached_weights_load_offline_when_the_hub_is_unreachable(silent_endpoint: str, tmp_path: Path) -> None:
    """A tag whose file is in the cache is not an error: the model then loads offline (no retries)."""
    from huggingface_hub import constants

    from clipdistill.models.openclip_model import fetch_weights

    snapshot = tmp_path / "hub" / "models--timm--resnet50_clip.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"cached")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    started = time.perf_counter()
    assert fetch_weights("RN50", "openai", "openclip:RN50@openai") is True  # load under hub_offline
    assert time.perf_counter() - started < hub.PROBE_SECONDS + 2
    before = constants.HF_HUB_OFFLINE
    with hub.hub_offline():
        assert constants.is_offline_mode()
    assert before == constants.HF_HUB_OFFLINE
