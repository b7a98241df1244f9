"""Load a diffusion model by zoo name or from a local folder in the diffusers layout, offline.

Layouts: `DDPMPipeline` / `DDIMPipeline` (unet, scheduler), `LDMPipeline` (unet, vqvae, scheduler),
`StableDiffusionPipeline` (unet, vae, text_encoder, tokenizer, scheduler), `DiTPipeline` (transformer, vae,
scheduler), or a bare `unet/` + `scheduler/` folder. Each component is read from its own subfolder with `local_files_only`, so a broken
one is named in the error and nothing is fetched from a hub; a Stable Diffusion safety checker is not
loaded (it is no part of what is quantized). An original single-file Stable Diffusion v1 checkpoint loads
with a folder of its pipeline's configs (`tfmq.models.single_file`).

No code from a folder ever runs: components must be concrete diffusers or transformers classes (no Auto
class, no pipeline), a config asking for custom code (`auto_map`) is refused, and transformers is told
`trust_remote_code=False`, so it never prompts "[y/N]" either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from tfmq.devices import module_device, module_dtype
from tfmq.errors import TfmqError
from tfmq.sampling.guidance import Conditioning

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
ZOO_MODELS = ("fashion-ddpm", "fashion-ldm", "fashion-cond", "fashion-dit")
CALIBRATION_PROMPTS_FILE = "calibration_prompts.txt"
DENOISER_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel,
                    "DiTTransformer2DModel": DiTTransformer2DModel}
# The files of a component folder that can ask for custom code (`auto_map`).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "scheduler_config.json")
# The components each supported pipeline needs besides its denoiser and scheduler.
PIPELINE_COMPONENTS = {
    "DDPMPipeline": (),
    "DDIMPipeline": (),
    "LDMPipeline": ("vqvae",),
    "StableDiffusionPipeline": ("vae", "text_encoder", "tokenizer"),
    "DiTPipeline": ("vae",),
}
# The folder (and pipeline argument) of each layout's denoiser, where it is not `unet`.
DENOISER_FOLDERS = {"DiTPipeline": "transformer"}
UNET = "unet"


@dataclass
class DiffusionModel:
    """A denoiser (`unet`: a diffusers UNet or diffusion transformer) with the noise schedule it was trained
    with and, for latent or text-conditional models, the full-precision parts around it (autoencoder, text
    encoder, tokenizer); `source` names where it came from, `layout` the diffusers pipeline class of its
    folder."""

    unet: nn.Module
    scheduler: DDPMScheduler
    source: str
    layout: str = "DDPMPipeline"
    components: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    config_folder: Path | None = None  # the configs a single-file checkpoint (`source`) was built with

    @property
    def reference(self) -> dict[str, str]:
        """What `load_model` needs to load this model again: {"source"} and, for a single file, {"config"}."""
        reference = {"source": self.source}
        if self.config_folder is not None:
            reference["config"] = str(self.config_folder.resolve())
        return reference

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move the UNet (cast to `dtype` if given) and the networks around it to `device`, in place. The
        autoencoder and text encoder keep their dtype: they run once per image, not once per step."""
        self.unet.to(device=device, dtype=dtype)
        for component in self.components.values():
            if isinstance(component, nn.Module):
                component.to(device)
        return self

    def calibration_prompts(self) -> list[str] | None:
        """The prompts a text-conditional model folder suggests for calibration (`calibration_prompts.txt`),
        used when the user gives none."""
        from tfmq.data.captions import read_prompts

        path = None if self.folder is None else self.folder / CALIBRATION_PROMPTS_FILE
        if self.conditioning_kind != "text" or path is None or not path.is_file():
            return None
        return read_prompts(path, limit=None)

    @property
    def autoencoder(self) -> nn.Module | None:
        return self.components.get("vae", self.components.get("vqvae"))

    @property
    def conditioning_kind(self) -> str | None:
        """"text" (cross-attention on a prompt), "class" (class labels) or None (unconditional)."""
        if "text_encoder" in self.components:
            return "text"
        config = self.unet.config
        if getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None):
            return "class"
        return None

    @property
    def num_classes(self) -> int:
        """Labels a class-conditional model draws; the label after them is the null label of the unconditional
        branch: a UNet's last class embedding (the LDM ImageNet convention: 1000 classes + 1), a DiT's extra
        row of its label tables."""
        config = self.unet.config
        if getattr(config, "num_embeds_ada_norm", None):
            return int(config.num_embeds_ada_norm)
        return int(config.num_class_embeds) - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the sampler's latents, as the diffusers pipelines decode them."""
        autoencoder = self.autoencoder
        with torch.no_grad():
            latents = latents.to(module_device(autoencoder), module_dtype(autoencoder))
            return autoencoder.decode(latents / autoencoder.config.scaling_factor).sample.clamp(-1.0, 1.0)

    @property
    def decoder(self):
        """What `tfmq.sample` takes as `decoder`: None for a pixel-space model."""
        return None if self.autoencoder is None else self.decode

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states, padded as the Stable Diffusion pipeline pads."""
        tokenizer = self.components["tokenizer"]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        encoder = self.components["text_encoder"]
        return encoder(ids.to(module_device(encoder)))[0]

    def conditioning(
        self, num_images: int, *, prompts: list[str] | None = None, labels: list[int] | None = None,
        guidance_scale: float = 1.0,
    ) -> Conditioning | None:
        """One condition per image, cycling through `prompts` or `labels` (default: every class in turn),
        with the unconditional branch ("" or the null label) the guidance needs. None if unconditional."""
        kind = self.conditioning_kind
        if kind is None:
            if prompts or labels or guidance_scale != 1.0:
                raise TfmqError(f"{self.source} is unconditional: it takes no prompt, class label or guidance")
            return None
        if kind == "text":
            if labels:
                raise TfmqError(f"{self.source} is text-conditional: give prompts, not class labels")
            if not prompts:
                raise TfmqError(f"{self.source} is text-conditional: give at least one prompt")
            chosen = cycled(prompts, num_images)
            return Conditioning({"encoder_hidden_states": self.encode_prompts(chosen)},
                                {"encoder_hidden_states": self.encode_prompts([""])}, guidance_scale)
        if prompts:
            raise TfmqError(f"{self.source} is class-conditional: give class labels, not prompts")
        labels = labels or list(range(self.num_classes))
        bad = [label for label in labels if not 0 <= label < self.num_classes]
        if bad:
            raise TfmqError(f"class labels {bad} out of range: {self.source} draws classes 0..{self.num_classes - 1}")
        chosen = torch.as_tensor(cycled(labels, num_images), device="cpu")
        return Conditioning({"class_labels": chosen}, {"class_labels": torch.tensor([self.num_classes], device="cpu")},
                            guidance_scale)

    def pipeline(self, unet: nn.Module | None = None):
        """The diffusers pipeline of this model's layout around `unet` (a quantized twin drops in)."""
        import diffusers

        if self.layout not in PIPELINE_COMPONENTS:
            raise TfmqError(f"{self.source} is a bare UNet folder: it has no pipeline")
        pipeline_class = getattr(diffusers, self.layout)
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
            if self.layout == "StableDiffusionPipeline" else {}
        denoiser = {DENOISER_FOLDERS.get(self.layout, UNET): unet if unet is not None else self.unet}
        return pipeline_class(**denoiser, scheduler=self.components["scheduler"],
                              **{name: self.components[name] for name in PIPELINE_COMPONENTS[self.layout]}, **extra)


def cycled(items: list, count: int) -> list:
    """`count` items taken from `items` in turn: image i gets item i mod len(items)."""
    return [items[index % len(items)] for index in range(count)]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A zoo name maps to the shipped folder; anything else must be an existing local folder or a
    single-file checkpoint."""
    from tfmq.models.single_file import SINGLE_FILE_SUFFIXES

    if str(name_or_path) in ZOO_MODELS:
        return ZOO_DIR / str(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(ZOO_MODELS)
        raise TfmqError(f"model {name_or_path!s} is neither a shipped model ({known}) nor an existing folder or file")
    if not path.is_dir() and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise TfmqError(f"model path {path} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); "
                        "give a folder in the diffusers layout (unet/, scheduler/) or a single-file checkpoint")
    return path


def _read_json(path: Path) -> dict:
    """A config file as a JSON object, refused when it asks for custom code."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TfmqError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise TfmqError(f"{path} is not a JSON object but a {type(config).__name__}")
    if "auto_map" in config:
        raise TfmqError(f"{path} asks for custom code (auto_map); tfmq never runs code from a model folder")
    return config


def _class_name(config: dict, path: Path, default: str) -> str:
    name = config.get("_class_name", default)
    if not isinstance(name, str):
        raise TfmqError(f"{path} names its class {json.dumps(name)}, not a class name of diffusers")
    return name


def _load_denoiser(folder: Path, subfolder: str) -> nn.Module:
    """The UNet or diffusion transformer of `folder/subfolder` (or of `folder` itself, a bare model folder)."""
    model_dir = folder / subfolder if (folder / subfolder).is_dir() else folder
    if not (model_dir / "config.json").is_file():
        raise TfmqError(f"{folder} has no {subfolder}/config.json (nor a model config.json of its own)")
    class_name = _class_name(_read_json(model_dir / "config.json"), model_dir / "config.json", "UNet2DModel")
    if class_name not in DENOISER_CLASSES:
        raise TfmqError(f"{model_dir} holds a {class_name}; tfmq quantizes {', '.join(DENOISER_CLASSES)}")
    try:
        model = DENOISER_CLASSES[class_name].from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises OSError, ValueError, SafetensorError... for bad weights
        raise TfmqError(f"cannot load {class_name} weights from {model_dir}: {str(exc).splitlines()[0]}") from exc
    return model.eval().requires_grad_(False)


def _component_class(folder: Path, name: str, library: str, class_name: str) -> type:
    """The class model_index.json names for component `name`: a concrete diffusers model or scheduler, or a
    transformers model or tokenizer. Auto classes and pipelines are refused, for they can run code."""
    import diffusers
    import transformers
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    transformers.utils.logging.disable_progress_bar()  # one bar per weights file is noise on stderr
    allowed = {"diffusers": (diffusers, (ModelMixin, SchedulerMixin)),
               "transformers": (transformers, (PreTrainedModel, PreTrainedTokenizerBase))}
    module, bases = allowed.get(library, (None, ()))
    component_class = getattr(module, class_name, None) if module is not None else None
    if not (isinstance(component_class, type) and issubclass(component_class, bases)):
        raise TfmqError(f"{folder}/model_index.json names {library}.{class_name} for {name}, which tfmq cannot load")
    for config_file in CONFIG_FILES:
        if (folder / name / config_file).is_file():
            _read_json(folder / name / config_file)  # refuses a config that asks for custom code
    return component_class


def _load_component(folder: Path, name: str, library: str, class_name: str) -> Any:
    """Component `name` of a pipeline folder, by the library and class its model_index.json names."""
    from diffusers import ModelMixin, SchedulerMixin

    component_class = _component_class(folder, name, library, class_name)
    if issubclass(component_class, ModelMixin):
        # without `accelerate` diffusers warns at length before loading the plain way; ask for that way
        options = {"low_cpu_mem_usage": False}
    elif issubclass(component_class, SchedulerMixin):
        options = {}  # diffusers has no trust_remote_code here: its concrete classes run no folder code
    else:
        options = {"trust_remote_code": False}
    try:
        component = component_class.from_pretrained(folder / name, local_files_only=True, **options)
    except Exception as exc:  # each library raises its own errors for missing or bad files
        raise TfmqError(f"cannot load {name} from {folder / name}: {str(exc).splitlines()[0]}") from exc
    if isinstance(component, nn.Module):
        component = component.eval().requires_grad_(False)
    return component


def _pipeline_index(folder: Path) -> tuple[str, dict]:
    """The pipeline class of a folder's model_index.json (a supported one) and the whole index."""
    index = _read_json(folder / "model_index.json")
    layout = _class_name(index, folder / "model_index.json", "")
    if layout not in PIPELINE_COMPONENTS:
        known = ", ".join(PIPELINE_COMPONENTS)
        raise TfmqError(f"{folder} holds a {layout or 'pipeline of unknown class'}; tfmq loads {known}")
    for name in PIPELINE_COMPONENTS[layout]:
        _check_entry(folder, index, name, layout)
    return layout, index


def _check_entry(folder: Path, index: dict, name: str, layout: str) -> None:
    """Refuse a model_index.json entry for `name` that is missing or not a ["library", "ClassName"] pair."""
    entry = index.get(name)
    if not entry or (isinstance(entry, list) and entry[0] is None):
        raise TfmqError(f"{folder}/model_index.json has no {name}, which a {layout} needs")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise TfmqError(f"{folder}/model_index.json gives {name} as {json.dumps(entry)[:60]}, "
                        'not ["library", "ClassName"]')


def _training_schedule(folder: Path, layout: str, components: dict[str, Any]) -> DDPMScheduler:
    """The noise schedule tfmq's samplers read (betas, T, clipping), as a DDPMScheduler; a pipeline also
    keeps its own scheduler among `components`."""
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise TfmqError(f"{folder} has no scheduler config (expected scheduler/scheduler_config.json)")
    scheduler_config = _read_json(scheduler_file)
    if layout in PIPELINE_COMPONENTS:
        components["scheduler"] = _load_component(folder, "scheduler", "diffusers",
                                                  _class_name(scheduler_config, scheduler_file, "DDPMScheduler"))
    try:
        return DDPMScheduler.from_config(scheduler_config)
    except Exception as exc:  # diffusers checks nothing first: bad values fail deep inside torch
        raise TfmqError(f"cannot build the noise schedule of {scheduler_file}: {str(exc).splitlines()[0]}") from exc


def load_model(name_or_path: str | Path, config: str | Path | None = None) -> DiffusionModel:
    """Load a pipeline folder of a supported layout (see the module docstring), a bare UNet folder, or a
    single-file Stable Diffusion v1 checkpoint with `config`, the folder of its pipeline's configs."""
    path = resolve_model_path(name_or_path)
    if path.is_file():
        return _load_single_file(path, config)
    if config is not None:
        raise TfmqError(f"a config folder goes with a single-file checkpoint; {path} is a folder with its own configs")
    source = str(name_or_path) if str(name_or_path) in ZOO_MODELS else str(path.resolve())
    layout, components = "unet", {}
    if (path / "model_index.json").is_file():
        layout, index = _pipeline_index(path)
        for name in PIPELINE_COMPONENTS[layout]:
            components[name] = _load_component(path, name, *index[name])
    unet = _load_denoiser(path, DENOISER_FOLDERS.get(layout, UNET))
    scheduler = _training_schedule(path, layout, components)
    return DiffusionModel(unet=unet, scheduler=scheduler, source=source, layout=layout, components=components,
                          folder=path)


def _load_single_file(path: Path, config: str | Path | None) -> DiffusionModel:
    """A Stable Diffusion v1 checkpoint file: networks from its weights, everything else from `config`."""
    from tfmq.models.single_file import SUPPORTED_LAYOUT, check_stable_diffusion_v1, load_network, read_checkpoint

    if config is None:
        raise TfmqError(
            f"{path} is a single-file checkpoint: also give the folder of its pipeline's diffusers configs "
            "(--model-config: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, no weights needed)")
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise TfmqError(f"config folder {folder} has no model_index.json")
    layout, index = _pipeline_index(folder)
    if layout != SUPPORTED_LAYOUT:
        raise TfmqError(f"single-file checkpoints load as a {SUPPORTED_LAYOUT}; {folder} describes a {layout}")
    _check_entry(folder, index, "unet", layout)
    checkpoint = read_checkpoint(path)
    check_stable_diffusion_v1(checkpoint, path)
    networks = {name: load_network(name, _component_class(folder, name, *index[name]), folder, checkpoint, path)
                for name in ("unet", "vae", "text_encoder")}
    del checkpoint
    unet = networks.pop("unet")
    components = {**networks, "tokenizer": _load_component(folder, "tokenizer", *index["tokenizer"])}
    scheduler = _training_schedule(folder, layout, components)
    return DiffusionModel(unet=unet, scheduler=scheduler, source=str(path.resolve()), layout=layout,
                          components=components, folder=folder, config_folder=folder)
