"""The in-memory dataset model, image decoding, augmentation and the JSONL log reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clipdistill.data.augment import random_scale_translate
from clipdistill.data.dataset import Caption, DatasetError, ImageRecord, MissingImagesError, make_dataset
from clipdistill.data.images import load_image_tensor, open_rgb, to_unit
from clipdistill.io import append_jsonl, read_jsonl


def _record(image_id: str, split: str = "train", n: int = 2, path: str = "x.png") -> ImageRecord:
    captions = tuple(Caption(f"{image_id}#{k}", f"caption {k} of {image_id}") for k in range(n))
    return ImageRecord(image_id=image_id, path=Path(path), split=split, captions=captions)


def test_flat_views_group_captions_under_their_image() -> None:
    dataset = make_dataset("d", [_record("a", n=3), _record("b", n=1), _record("c", n=2)])
    assert dataset.text_to_image() == [0, 0, 0, 1, 2, 2]
    assert dataset.texts()[3] == "caption 0 of b"
    assert dataset.caption_ids()[:2] == ["a#0", "a#1"]
    assert dataset.n_texts() == 6 and len(dataset) == 3
    assert dataset.index_of("c") == 2


def test_split_selects_and_names_empty_splits() -> None:
    dataset = make_dataset("d", [_record("a"), _record("b", split="test")])
    assert [r.image_id for r in dataset.split("test").images] == ["b"]
    with pytest.raises(DatasetError, match=r"split 'val' of d is empty \(splits: \{'train': 1, 'test': 1\}\)"):
        dataset.split("val")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        dataset.split("dev")


def test_duplicate_ids_and_captionless_images_are_refused() -> None:
    with pytest.raises(DatasetError, match=r"duplicate image id 'a'.*#0 and #1"):
        make_dataset("d", [_record("a"), _record("a")])
    with pytest.raises(DatasetError, match="has no captions"):
        make_dataset("d", [_record("a", n=0)])
    with pytest.raises(DatasetError, match="field 'split' has value 'dev'"):
        make_dataset("d", [_record("a", split="dev")])


def test_missing_images_listed_with_count_and_first_five(tmp_path: Path) -> None:
    records = [_record(f"i{k}", path=str(tmp_path / f"i{k}.png")) for k in range(7)]
    Image.new("RGB", (4, 4)).save(tmp_path / "i3.png")
    with pytest.raises(MissingImagesError, match=r"^6 image file\(s\) .* are missing: .*i0.png.*\(and 1 more\)$"):
        make_dataset("d", records).check_files()


def test_decoding_puts_alpha_on_white_and_resizes(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "grey.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    pixels = load_image_tensor([tmp_path / "clear.png", tmp_path / "grey.png", tmp_path / "cmyk.jpg"], 12)
    assert pixels.shape == (3, 3, 12, 12) and pixels.dtype == torch.uint8
    assert int(pixels[0].min()) == 255 and int(pixels[1].max()) == 0 and int(pixels[2].max()) < 10
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot decode image .*bad.png"):
        open_rgb(tmp_path / "bad.png")


def test_augmentation_identity_and_determinism() -> None:
    torch.manual_seed(0)
    batch = to_unit(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    same = random_scale_translate(batch, scale=(1.0, 1.0), max_shift=0.0)
    assert torch.allclose(same, batch, atol=1e-5)
    a = random_scale_translate(batch, generator=torch.Generator().manual_seed(1))
    b = random_scale_translate(batch, generator=torch.Generator().manual_seed(1))
    c = random_scale_translate(batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    zoomed_out = random_scale_translate(torch.zeros(1, 3, 16, 16), scale=(1.5, 1.5), max_shift=0.0)
    assert float(zoomed_out[0, :, 0, 0].min()) == 1.0  # border filled with white, not black


def test_jsonl_reader_skips_a_torn_last_line_only(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"step": 1})
    append_jsonl(log, {"step": 2})
    with open(log, "a") as handle:
        handle.write('{"step": 3, "lo')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\nbroken\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(log)
