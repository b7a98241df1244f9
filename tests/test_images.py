import json
import re

import pytest
import torch

from tfmq.errors import TfmqError
from tfmq.images import load_image_folder, make_grid, save_image_folder


def _images(count: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (count, 1, 6, 6)).float().div(127.5).sub(1.0)


def test_save_then_load_is_exact_for_8_bit_images(tmp_path):
    images = _images()
    save_image_folder(images, tmp_path / "out", {"seed": 4})
    names, loaded = load_image_folder(tmp_path / "out")
    assert names == [f"{i:06d}.png" for i in range(5)]
    torch.testing.assert_close(loaded, images, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "out" / "samples.json").read_text()) == {"seed": 4, "num_images": 5}


def test_an_existing_folder_is_replaced_whole(tmp_path):
    save_image_folder(_images(5), tmp_path / "out", {})
    save_image_folder(_images(2), tmp_path / "out", {})
    assert len(load_image_folder(tmp_path / "out")[0]) == 2


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):
        save_image_folder(_images(), tmp_path / "out", {"not json": object()})
    assert list(tmp_path.iterdir()) == []


def test_grid_tiles_the_images(tmp_path):
    grid = make_grid(_images(4), columns=2, scale=1, padding=1)
    assert grid.size == (2 * 7 + 1, 2 * 7 + 1)


def test_non_image_file_is_named(tmp_path):
    save_image_folder(_images(2), tmp_path / "out", {})
    (tmp_path / "out" / "notes.txt").write_text("hello")
    with pytest.raises(TfmqError, match="notes.txt is not an image"):
        load_image_folder(tmp_path / "out")


def test_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(TfmqError, match="does not exist"):
        load_image_folder(tmp_path / "none")
    with pytest.raises(TfmqError, match="no images"):
        load_image_folder(tmp_path)


def _png_claiming(path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header (IHDR, with a correct CRC) claims `width` x `height` pixels."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    chunk = data.find(b"IHDR")
    data[chunk + 4:chunk + 12] = struct.pack(">II", width, height)
    data[chunk + 17:chunk + 21] = struct.pack(">I", zlib.crc32(bytes(data[chunk:chunk + 17])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [20000, 5000])
def test_an_image_claiming_huge_size_is_refused_before_decoding(tmp_path, size):
    save_image_folder(_images(2), tmp_path / "out", {})
    _png_claiming(tmp_path / "out" / "bomb.png", size, size)
    with pytest.raises(TfmqError, match="bomb.png claims more pixels than tfmq decodes") as raised:
        load_image_folder(tmp_path / "out")
    assert "\n" not in str(raised.value)


def test_a_fifo_named_like_an_image_is_skipped_without_opening_it(tmp_path):
    import os
    import signal

    save_image_folder(_images(2), tmp_path / "out", {})
    os.mkfifo(tmp_path / "out" / "x.png")

    def hung(*_):
        raise AssertionError("load_image_folder blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        names, _ = load_image_folder(tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert names == ["000000.png", "000001.png"]


def test_color_images_are_refused_and_gray_rgb_is_read_as_gray(tmp_path):
    from PIL import Image

    gray = torch.randint(0, 256, (4, 4), dtype=torch.uint8).numpy()
    Image.fromarray(gray).convert("RGB").save(tmp_path / "a.png")
    names, images = load_image_folder(tmp_path)
    assert names == ["a.png"] and torch.equal(images[0, 0], torch.from_numpy(gray).float().div(127.5).sub(1.0))
    colored = Image.fromarray(gray).convert("RGB")
    colored.putpixel((1, 2), (255, 0, 0))
    colored.save(tmp_path / "b.png")
    with pytest.raises(TfmqError, match="b.png is a color image"):
        load_image_folder(tmp_path)


def test_an_empty_current_folder_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TfmqError, match=re.escape(f"no images in {tmp_path.resolve()}") + "$"):
        load_image_folder(".")


def test_kept_batches_read_back_as_saved_and_a_changed_one_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from tfmq.images import ImageBatches, progress_folder

    folder = progress_folder(tmp_path / "out")
    assert folder.name == "out.tfmq-progress"
    batches = ImageBatches(folder, {"seed": 0})
    assert batches.finished() == [] and not folder.exists()  # made at the first batch only
    images = _images(5)
    batches.save(range(0, 3), images[:3])
    batches.save(range(3, 5), images[3:])
    assert ImageBatches(folder, {"seed": 0}).finished() == [range(0, 3), range(3, 5)]
    torch.testing.assert_close(batches.load([range(0, 3), range(3, 5)]), images, atol=1e-6, rtol=0)
    with pytest.raises(TfmqError, match=r"another sampling run \(its seed differ\)"):
        ImageBatches(folder, {"seed": 1}).finished()
    path = folder / "batch-000003-000005.safetensors"
    pixels = load_file(str(path))["pixels"]
    save_file({"pixels": 255 - pixels}, str(path), metadata={"sha256": "0" * 64})
    with pytest.raises(TfmqError, match="not the batch tfmq saved there"):
        batches.load([range(0, 3), range(3, 5)])
    batches.remove()
    assert not folder.exists()
