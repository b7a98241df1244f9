"""Image folders on disk: written atomically with their metadata, read back strictly, tiled into grids."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tfmq.errors import TfmqError
from tfmq.files import atomic_directory

METADATA_FILE = "samples.json"
GRID_FILE = "grid.png"
# Far above any sample tfmq writes, far below the sizes a decompression bomb's header claims.
MAX_IMAGE_PIXELS = 4096 * 4096
_GRAY_BANDS = ("1", "L", "I", "F")  # PIL modes whose first band is a gray level (L, LA, I;16, ...)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), rounded as a PNG stores it."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> [-1, 1] float (N, C, H, W)."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(images: torch.Tensor, columns: int | None = None, scale: int = 4, padding: int = 1) -> Image.Image:
    """Tile images into one picture, enlarged `scale` times with nearest-neighbour so pixels stay visible."""
    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top:top + height, left:left + width] = image
    grid = _pil(canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


IMAGES_KIND = "images"


def save_image_folder(images: torch.Tensor, out_dir: str | Path, metadata: dict, grid_images: int = 64, *,
                      overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Write one PNG per image, a grid and samples.json into a temporary folder, then move it into place.

    A crash leaves no half-written folder that looks complete; an existing image folder tfmq wrote is
    replaced whole, anything else only with `overwrite` (see `tfmq.files`).
    """
    with atomic_directory(out_dir, kind=IMAGES_KIND, overwrite=overwrite, protected=protected) as staging:
        for index, image in enumerate(to_uint8(images)):
            _pil(image).save(staging / f"{index:06d}.png")
        make_grid(images[:grid_images]).save(staging / GRID_FILE)
        (staging / METADATA_FILE).write_text(json.dumps({**metadata, "num_images": len(images)}, indent=2))
    return Path(out_dir)


def _read_gray(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 1). The size its header claims is checked before a pixel is decoded,
    and a color image is refused rather than averaged into a gray one the metrics would score."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise TfmqError(f"{path} claims more pixels than tfmq decodes: {image.width}x{image.height}, "
                                    f"over {MAX_IMAGE_PIXELS}")
                if image.getbands()[0] in _GRAY_BANDS:
                    return np.asarray(image.convert("L"))[..., None]
                rgb = np.asarray(image.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TfmqError(f"{path} claims more pixels than tfmq decodes: {exc}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise TfmqError(f"{path} is not an image file") from exc
    if (rgb != rgb[..., :1]).any():
        raise TfmqError(f"{path} is a color image; tfmq reads gray images (equal R, G and B) only")
    return rgb[..., :1]


def load_image_folder(folder: str | Path, skip: tuple[str, ...] = ()) -> tuple[list[str], torch.Tensor]:
    """All images of a folder (sorted by name; the grid, metadata and `skip` names left out) as [-1, 1] gray.

    Only regular files are opened: a FIFO or a device under an image's name would block or never end.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise TfmqError(f"image folder {folder} does not exist")
    names, arrays = [], []
    for path in sorted(folder.iterdir()):
        if path.name in (GRID_FILE, METADATA_FILE, *skip) or path.name.startswith(".") or not path.is_file():
            continue
        arrays.append(_read_gray(path))
        names.append(path.name)
    if not arrays:
        raise TfmqError(f"no images in {folder}")
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise TfmqError(f"images in {folder} differ in size: {sorted(shapes)}")
    return names, from_uint8(np.stack(arrays))
