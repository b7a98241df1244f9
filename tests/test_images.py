import json

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
