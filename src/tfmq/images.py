"""Image folders on disk: written atomically with their metadata, read back strictly, tiled into grids; and
the batches of one being sampled, kept beside it so that an interrupted run continues."""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tfmq.errors import TfmqError
from tfmq.files import (
    add_to_output_folder,
    atomic_directory,
    check_output_folder,
    remove_output_folder,
    start_output_folder,
    write_bytes_atomic,
    write_json,
)

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


PROGRESS_KIND = "sampled batches"
PROGRESS_SUFFIX = ".tfmq-progress"
RUN_FILE = "run.json"
_BATCH_FILE = re.compile(r"batch-(\d{6,})-(\d{6,})\.safetensors")


def progress_folder(out: str | Path) -> Path:
    """Where the finished batches of an image folder `out` wait while it is sampled: beside it."""
    out = Path(out)
    return out.with_name(out.name + PROGRESS_SUFFIX)


def _pixel_digest(pixels: torch.Tensor, indices: range) -> str:
    digest = hashlib.sha256(f"{indices.start}-{indices.stop}:{tuple(pixels.shape)}".encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


class ImageBatches:
    """The batches of one image folder sampled so far, in its `progress_folder`: each batch's pixels as its PNGs
    will hold them (uint8, one safetensors file with a digest), and the run's identity in run.json (whatever
    decides the images: model, sampler, seeds, conditions). Made at the first batch, deleted by `remove` once
    the image folder is written; a folder of another run, or holding files tfmq did not write, is refused and
    left as it is."""

    def __init__(self, folder: str | Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity, sort_keys=True))  # as run.json reads back

    def finished(self) -> list[range]:
        """The batches an earlier run of this identity saved (none without a folder)."""
        check_output_folder(self.folder, PROGRESS_KIND)  # absent, empty, or ours with nothing added
        run_file = self.folder / RUN_FILE
        if not run_file.is_file():
            return []
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TfmqError(f"{run_file} is unreadable ({exc}): delete {self.folder} to start over") from exc
        if recorded != self.identity:
            differing = sorted(key for key in set(recorded) | set(self.identity)
                               if recorded.get(key) != self.identity.get(key))
            raise TfmqError(f"{self.folder} holds the images of another sampling run (its {', '.join(differing)} "
                            "differ): delete it to start over, or rerun that run's command")
        batches = (_BATCH_FILE.fullmatch(path.name) for path in self.folder.iterdir())
        return sorted((range(int(match[1]), int(match[2])) for match in batches if match), key=lambda r: r.start)

    def _file(self, indices: range) -> Path:
        return self.folder / f"batch-{indices.start:06d}-{indices.stop:06d}.safetensors"

    def save(self, indices: range, images: torch.Tensor) -> None:
        """Keep the images `indices` ([-1, 1] floats), atomically; the first batch makes the folder."""
        if not (self.folder / RUN_FILE).is_file():
            start_output_folder(self.folder, PROGRESS_KIND)
            write_json(self.folder / RUN_FILE, self.identity)
            add_to_output_folder(self.folder, RUN_FILE)
        pixels = torch.from_numpy(to_uint8(images))
        metadata = {"sha256": _pixel_digest(pixels, indices)}
        path = self._file(indices)
        write_bytes_atomic(path, lambda temporary: save_file({"pixels": pixels}, str(temporary), metadata=metadata))
        add_to_output_folder(self.folder, path.name)

    def load(self, batches: list[range]) -> torch.Tensor:
        """The images of `batches`, in order, as [-1, 1] floats (what `save_image_folder` writes as they were)."""
        pieces = []
        for indices in batches:
            path = self._file(indices)
            try:
                pixels = load_file(str(path))["pixels"]
                with safe_open(str(path), "pt") as handle:
                    metadata = handle.metadata() or {}
            except Exception as exc:  # a missing, truncated or foreign file
                raise TfmqError(f"cannot read {path}: {str(exc).splitlines()[0]}: delete {self.folder} to "
                                "start over") from exc
            if pixels.dtype != torch.uint8 or metadata.get("sha256") != _pixel_digest(pixels, indices) or (
                    pieces and pixels.shape[1:] != pieces[0].shape[1:]) or len(pixels) != len(indices):
                raise TfmqError(f"{path} is not the batch tfmq saved there: delete {self.folder} to start over")
            pieces.append(pixels)
        return from_uint8(torch.cat(pieces).numpy())

    def remove(self) -> None:
        remove_output_folder(self.folder, PROGRESS_KIND)


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
