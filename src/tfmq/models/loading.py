"""Load a diffusion model by zoo name or from a local folder in the diffusers layout, offline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from tfmq.errors import TfmqError

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
ZOO_MODELS = ("fashion-ddpm",)


@dataclass
class DiffusionModel:
    """A UNet with the noise schedule it was trained with; `source` names where it came from."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    source: str


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A zoo name maps to the shipped folder; anything else must be an existing local folder."""
    if str(name_or_path) in ZOO_MODELS:
        return ZOO_DIR / str(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(ZOO_MODELS)
        raise TfmqError(f"model {name_or_path!s} is neither a shipped model ({known}) nor an existing folder")
    if not path.is_dir():
        raise TfmqError(f"model path {path} is a file; give a folder in the diffusers layout (unet/, scheduler/)")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TfmqError(f"cannot read {path}: {exc}") from exc


def load_model(name_or_path: str | Path) -> DiffusionModel:
    """Load `unet/` and `scheduler/` of a DDPM/DDIM pipeline folder (or a bare UNet folder + default schedule)."""
    folder = resolve_model_path(name_or_path)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise TfmqError(f"{folder} has no UNet config (expected unet/config.json)")
    config = _read_json(unet_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise TfmqError(f"{unet_dir} holds a {config.get('_class_name')}, not a UNet2DModel")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises OSError, ValueError, SafetensorError... for bad weights
        raise TfmqError(f"cannot load UNet weights from {unet_dir}: {str(exc).splitlines()[0]}") from exc
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise TfmqError(f"{folder} has no scheduler config (expected scheduler/scheduler_config.json)")
    scheduler = DDPMScheduler.from_config(_read_json(scheduler_file))
    source = str(name_or_path) if str(name_or_path) in ZOO_MODELS else str(folder.resolve())
    return DiffusionModel(unet=unet.eval().requires_grad_(False), scheduler=scheduler, source=source)
