"""The Temporal Information Block (TIB) of a diffusers UNet or diffusion transformer: every module whose
output depends on the timestep (and class label) alone, and the temporal features it hands to the blocks.

In diffusers the TIB is `time_proj` (sinusoidal or learned projection of t), `time_embedding` (the
Linear-SiLU-Linear MLP), the optional `class_embedding` (added to, or concatenated with, the time
embedding), the optional `time_embed_act`, and in every `ResnetBlock2D` its `nonlinearity` and
`time_emb_proj` applied to that embedding. The output of each `time_emb_proj` is one temporal feature.
Since these depend on (t, y) only, the TIB can be run on its own, without images: this is what TIAR
reconstructs as one unit and what a cache of temporal features per timestep is computed from.

A temporal feature cache replaces the TIB's modules whose output depends on the timestep alone, one row per
timestep: the TIB names them as `cache_sites`, {owner module: attribute}, with what they read and return at
given timesteps (`site_inputs`, `site_outputs`).

In a diffusion transformer the TIB is the adaLN modulation path (`AdaLNTemporalInformationBlock`): a
timestep (+ class) embedder, then Linear(SiLU(c)) giving every block its shift, scale and gate. DiT
(adaLN-Zero) gives each block its own embedder and modulation Linear, and its output layer reads block 0's
embedder through `proj_out_1`; PixArt (adaLN-single) has one embedder and one modulation Linear for all
blocks, and its output layer reads the embedding itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, TimestepEmbedding
from diffusers.models.normalization import AdaLayerNormSingle, AdaLayerNormZero
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from torch import nn

TIME_PROJ = "time_proj"
TIME_EMBEDDING = "time_embedding"
CLASS_EMBEDDING = "class_embedding"
TIME_EMBED_ACT = "time_embed_act"
TIME_MLP = "timestep_embedder"  # a transformer embedder's time MLP
# diffusers UNets run their blocks in this order; named_modules lists the mid block last.
_FORWARD_ORDER = ("down_blocks", "mid_block", "up_blocks")


def _forward_rank(name: str) -> int:
    root = name.split(".", 1)[0]
    return _FORWARD_ORDER.index(root) if root in _FORWARD_ORDER else len(_FORWARD_ORDER)


@dataclass(frozen=True)
class TemporalInformationBlock:
    """Where the TIB of `model` lives (qualified module names), and its computation.

    `resnets` are the residual blocks that read the time embedding, in forward order; each has
    one temporal feature, the output of `<resnet>.time_emb_proj` (width 2C for "scale_shift" blocks,
    which split it into scale and shift). The names are the same in a model and in its quantized copy.
    """

    model: nn.Module = field(repr=False, compare=False)
    time_proj: str
    time_embedding: str
    class_embedding: str | None
    time_embed_act: str | None
    resnets: tuple[str, ...]

    @property
    def class_conditional(self) -> bool:
        return self.class_embedding is not None

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The temporal features, named by the module producing them: one `time_emb_proj` per block."""
        return tuple(f"{resnet}.time_emb_proj" for resnet in self.resnets)

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every module of the TIB. A resnet's `nonlinearity` also serves its image path (it is stateless)."""
        shared = [name for name in (self.time_proj, self.time_embedding, self.class_embedding, self.time_embed_act)
                  if name is not None]
        per_block = [f"{resnet}.{part}" for resnet in self.resnets for part in ("nonlinearity", "time_emb_proj")]
        return tuple(shared + per_block)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every Linear of the TIB (the layers TIAR reconstructs jointly)."""
        roots = [name for name in (self.time_embedding, self.class_embedding) if name is not None]
        shared = [
            f"{root}.{name}" for root in roots
            for name, module in self.model.get_submodule(root).named_modules()
            if isinstance(module, nn.Linear)
        ]
        return tuple(shared) + self.feature_names

    @property
    def feature_reader_names(self) -> tuple[str, ...]:
        """The Linears whose input is a temporal feature that changes with t: the time MLP's second layer
        (its input is SiLU of the first) and every block's `time_emb_proj`. The first layer reads the
        fixed sinusoid, the class embedding reads labels only."""
        return (f"{self.time_embedding}.linear_2", *self.feature_names)

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def embedding(self, timesteps: torch.Tensor | int | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The time embedding every block's projection reads (time MLP, plus class embedding, then
        `time_embed_act`), one row per sample, computed as the UNet's own forward does."""
        model_class = type(self.model).__name__
        reference = next(self._module(self.time_embedding).parameters())
        timesteps = torch.as_tensor(timesteps, device=reference.device).reshape(-1)
        if self.class_embedding is None and class_labels is not None:
            raise ValueError(f"{model_class} has no class embedding: class_labels must be None")
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{model_class} is class-conditional: pass class_labels")
            class_labels = torch.as_tensor(class_labels, device=reference.device)
            if len(timesteps) == 1:  # one timestep for the whole batch, as the UNet allows
                timesteps = timesteps.expand(len(class_labels))
        projected = self._module(self.time_proj)(timesteps).to(dtype=reference.dtype)
        embedding = self._module(self.time_embedding)(projected)
        if class_labels is not None:
            config = getattr(self.model, "config", {})
            if config.get("class_embed_type") == "timestep":
                class_labels = self._module(self.time_proj)(class_labels).to(dtype=reference.dtype)
            class_embedding = self._module(self.class_embedding)(class_labels).to(dtype=reference.dtype)
            if config.get("class_embeddings_concat"):
                embedding = torch.cat([embedding, class_embedding], dim=-1)
            else:
                embedding = embedding + class_embedding
        if self.time_embed_act is not None:
            embedding = self._module(self.time_embed_act)(embedding)
        return embedding

    def temporal_features(
        self, timesteps: torch.Tensor | int | float, class_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every temporal feature for `timesteps` (and `class_labels`), without running the rest of the
        UNet: {feature name: (N, width)}, equal to what each `time_emb_proj` outputs in a full forward.

        Runs the model's modules as they are: a quantized copy gives its quantized features (one whose
        quantizers carry timestep tables needs a selected row, see `tfmq.quant.nn.temporal`).
        """
        inputs = self.projection_inputs(timesteps, class_labels)
        return {feature_name: self._module(resnet_name).time_emb_proj(inputs[resnet_name])
                for resnet_name, feature_name in zip(self.resnets, self.feature_names)}

    def projection_inputs(
        self, timesteps: torch.Tensor | int | float, class_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """{residual block: what its `time_emb_proj` reads} for `timesteps` (and `class_labels`)."""
        embedding = self.embedding(timesteps, class_labels)
        inputs = {}
        for resnet_name in self.resnets:
            resnet = self._module(resnet_name)
            inputs[resnet_name] = embedding if resnet.skip_time_act else resnet.nonlinearity(embedding)
        return inputs

    # What a temporal feature cache replaces (the module docstring).

    @property
    def cache_sites(self) -> dict[str, str]:
        """Every block's `time_emb_proj`; none in a class-conditional UNet, whose features depend on the label."""
        return {} if self.class_conditional else {resnet: "time_emb_proj" for resnet in self.resnets}

    @property
    def skippable_embedding(self) -> str | None:
        """The time MLP, which nothing reads once every block reads a cache."""
        return self.time_embedding

    def site_inputs(self, timesteps: torch.Tensor | int | float) -> dict[str, torch.Tensor]:
        return self.projection_inputs(timesteps)

    def site_outputs(self, timesteps: torch.Tensor | int | float) -> dict[str, torch.Tensor]:
        features = self.temporal_features(timesteps)
        return {resnet: features[f"{resnet}.time_emb_proj"] for resnet in self.resnets}


@dataclass(frozen=True)
class AdaLNTemporalInformationBlock:
    """The TIB of a diffusion transformer: its timestep (+ class) embedders and the Linears that turn their
    embedding into the blocks' and the output layer's modulation (qualified module names).

    `features` maps each temporal feature, named by the Linear producing it, to the embedder it reads and
    whether it reads Linear(SiLU(c)) of the embedding c (a modulation Linear) or is the embedder's own last
    Linear (PixArt's output layer reads the embedding itself). The names are the same in a model and in its
    quantized copy.
    """

    model: nn.Module = field(repr=False, compare=False)
    embedders: tuple[str, ...]
    features: dict[str, tuple[str, bool]]
    class_conditional: bool

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every Linear of the TIB (the layers TIAR reconstructs jointly): the embedders' and the modulations'
        (those a cache stands in for are no longer there)."""
        linears = {name for name, module in self.model.named_modules() if isinstance(module, nn.Linear)}
        inside = [f"{embedder}.{name}" for embedder in self.embedders
                  for name, module in self.model.get_submodule(embedder).named_modules() if isinstance(module, nn.Linear)]
        return tuple(inside) + tuple(name for name in self.feature_names if name not in inside and name in linears)

    @property
    def feature_reader_names(self) -> tuple[str, ...]:
        """The Linears whose input changes with t: each embedder's second time-MLP layer and every modulation
        Linear (the first layer reads the bounded sinusoid, the label table reads labels only). A time MLP
        a cache stands in for has no layers to read anything."""
        modules = dict(self.model.named_modules())
        second_layers = tuple(name for embedder in self.embedders
                              if (name := f"{embedder}.{TIME_MLP}.linear_2") in modules)
        return second_layers + tuple(name for name, (_, modulation) in self.features.items() if modulation)

    # What a temporal feature cache replaces (the module docstring).

    @property
    def cache_sites(self) -> dict[str, str]:
        """Every embedder's time MLP (`timestep_embedder`: the label is added after it, so it depends on t
        alone) and, without class labels, every modulation Linear too (PixArt's `adaln_single.linear`)."""
        sites = {embedder: TIME_MLP for embedder in self.embedders}
        if not self.class_conditional:
            sites.update(name.rpartition(".")[::2] for name, (_, modulation) in self.features.items() if modulation)
        return sites

    @property
    def skippable_embedding(self) -> str | None:
        return None  # the sinusoid is all that is left to compute

    def _time_mlp_input(self, embedder: str, timesteps: torch.Tensor) -> torch.Tensor:
        module = self.model.get_submodule(embedder)
        return module.time_proj(timesteps).to(next(module.parameters()).dtype)

    def _sites(self, timesteps: torch.Tensor | int | float) -> dict[str, tuple[torch.Tensor, nn.Module]]:
        """{owner: (what the site module reads at `timesteps`, the site module)}."""
        reference = next(self.model.get_submodule(self.embedders[0]).parameters())
        timesteps = torch.as_tensor(timesteps, device=reference.device).reshape(-1)
        sites = {}
        for owner, attribute in self.cache_sites.items():
            module = getattr(self.model.get_submodule(owner), attribute)
            if attribute == TIME_MLP:
                sites[owner] = (self._time_mlp_input(owner, timesteps), module)
            else:
                embedder = self.features[f"{owner}.{attribute}"][0]
                sites[owner] = (F.silu(self.embedding(embedder, timesteps, None)), module)
        return sites

    def site_inputs(self, timesteps: torch.Tensor | int | float) -> dict[str, torch.Tensor]:
        return {owner: site_input for owner, (site_input, _) in self._sites(timesteps).items()}

    def site_outputs(self, timesteps: torch.Tensor | int | float) -> dict[str, torch.Tensor]:
        return {owner: module(site_input) for owner, (site_input, module) in self._sites(timesteps).items()}

    def embedding(self, embedder: str, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The embedding c of `embedder` for (timesteps, class_labels), one row per sample, as the model's
        forward computes it."""
        module = self.model.get_submodule(embedder)
        dtype = next(module.parameters()).dtype
        if isinstance(module, CombinedTimestepLabelEmbeddings):
            if class_labels is None:
                raise ValueError(f"{type(self.model).__name__} is class-conditional: pass class_labels")
            return module(timesteps, torch.as_tensor(class_labels, device=timesteps.device), hidden_dtype=dtype)
        if class_labels is not None:
            raise ValueError(f"{type(self.model).__name__} has no class embedding: class_labels must be None")
        return module(timesteps, resolution=None, aspect_ratio=None, batch_size=len(timesteps), hidden_dtype=dtype)

    def temporal_features(
        self, timesteps: torch.Tensor | int | float, class_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every temporal feature for `timesteps` (and `class_labels`) without the image path: {feature name:
        (N, width)}, equal to what each Linear outputs in a full forward. Runs the model's modules as they are."""
        reference = next(self.model.get_submodule(self.embedders[0]).parameters())
        timesteps = torch.as_tensor(timesteps, device=reference.device).reshape(-1)
        if class_labels is not None and len(timesteps) == 1:
            timesteps = timesteps.expand(len(class_labels))
        embeddings = {embedder: self.embedding(embedder, timesteps, class_labels) for embedder in self.embedders}
        features = {}
        for name, (embedder, modulation) in self.features.items():
            embedding = embeddings[embedder]
            features[name] = self.model.get_submodule(name)(F.silu(embedding)) if modulation else embedding
        return features


def _adaln_tib(model: nn.Module) -> AdaLNTemporalInformationBlock:
    """The adaLN modulation path of a DiT (adaLN-Zero in every block) or PixArt (adaLN-single) transformer."""
    model_class = type(model).__name__
    modules = dict(model.named_modules())
    single = modules.get("adaln_single")
    if isinstance(single, AdaLayerNormSingle):
        if single.emb.use_additional_conditions:
            raise ValueError(f"{model_class}'s modulation also reads the resolution and aspect ratio "
                             "(use_additional_conditions): its temporal features are not a function of the timestep")
        features = {"adaln_single.linear": ("adaln_single.emb", True),
                    "adaln_single.emb.timestep_embedder.linear_2": ("adaln_single.emb", False)}
        return AdaLNTemporalInformationBlock(model, ("adaln_single.emb",), features, class_conditional=False)
    blocks = [name for name, module in modules.items() if isinstance(module, AdaLayerNormZero)]
    if not blocks:
        raise ValueError(f"{model_class} has no adaLN modulation (AdaLayerNormZero per block or AdaLayerNormSingle): "
                         "its blocks read no temporal features, so it has no Temporal Information Block")
    refused = [name for name in blocks if not isinstance(modules[name].emb, CombinedTimestepLabelEmbeddings)]
    if refused:
        raise ValueError(f"{model_class}'s {refused[0]} reads an embedding made elsewhere (not its own timestep + "
                         "class embedder): not supported")
    features = {f"{block}.linear": (f"{block}.emb", True) for block in blocks}
    if isinstance(modules.get("proj_out_1"), nn.Linear):  # DiT's output layer reads the first block's embedder
        features["proj_out_1"] = (f"{blocks[0]}.emb", True)
    return AdaLNTemporalInformationBlock(model, tuple(f"{block}.emb" for block in blocks), features,
                                         class_conditional=True)


def find_tib(model: nn.Module) -> TemporalInformationBlock | AdaLNTemporalInformationBlock:
    """The TIB of a diffusers UNet2DModel / UNet2DConditionModel or diffusion transformer (DiT, PixArt), or
    of its quantized copy.

    Refuses, naming the model class, a model without a time embedding or without residual blocks that
    read it, and models whose time embedding also depends on other inputs (`timestep_cond`, added
    text/image embeddings) or reaches blocks other than ResnetBlock2D: for those the temporal features
    would not be a function of (t, y), or not all of them would be found.
    """
    if hasattr(model, "transformer_blocks"):
        return _adaln_tib(model)
    model_class = type(model).__name__
    modules = dict(model.named_modules())
    time_proj, time_embedding = modules.get(TIME_PROJ), modules.get(TIME_EMBEDDING)
    if time_proj is None or not isinstance(time_embedding, TimestepEmbedding):
        raise ValueError(
            f"{model_class} has no time embedding (a `{TIME_PROJ}` and a TimestepEmbedding `{TIME_EMBEDDING}`): "
            "it is not a diffusers UNet with a Temporal Information Block"
        )
    config = getattr(model, "config", {})
    if time_embedding.cond_proj is not None:
        raise ValueError(f"{model_class}'s time embedding also reads `timestep_cond` (time_cond_proj_dim): "
                         "its temporal features are not a function of the timestep")
    if config.get("addition_embed_type") is not None:
        raise ValueError(f"{model_class} adds a {config.get('addition_embed_type')!r} embedding to the time "
                         "embedding: its temporal features are not a function of the timestep and class")
    conditional_norms = [name for name, module in modules.items() if isinstance(module, ResnetBlockCondNorm2D)]
    if conditional_norms:
        raise ValueError(f"{model_class} feeds the time embedding to normalisation layers ({conditional_norms[0]}, "
                         "resnet_time_scale_shift 'ada_group' / 'spatial'): not supported")
    resnets = tuple(sorted(
        (name for name, module in modules.items()
         if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None),
        key=_forward_rank,
    ))
    if not resnets:
        raise ValueError(f"{model_class} has no ResnetBlock2D with a time_emb_proj: no block reads the time "
                         "embedding, so there are no temporal features")
    return TemporalInformationBlock(
        model=model,
        time_proj=TIME_PROJ,
        time_embedding=TIME_EMBEDDING,
        class_embedding=CLASS_EMBEDDING if modules.get(CLASS_EMBEDDING) is not None else None,
        time_embed_act=TIME_EMBED_ACT if modules.get(TIME_EMBED_ACT) is not None else None,
        resnets=resnets,
    )


def check_temporal_cache_supported(model: nn.Module, tib: TemporalInformationBlock | AdaLNTemporalInformationBlock) -> None:
    """Refuse a temporal feature cache where the TIB has no module whose output depends on the timestep
    alone: a class-conditional UNet adds the label before every block's projection, and a cache per
    (timestep, class) is not supported."""
    if not tib.cache_sites:
        raise ValueError(f"{type(model).__name__} is class-conditional: its temporal features depend on the label, "
                         "and a temporal feature cache per (timestep, class) is not supported; use temporal_cache=False")
