from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import PixArtTransformer2DModel, Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from tests.quant.methods.helpers import unit_outputs
from tests.quant.tiny_unets import pixel_unet, text_unet, tiny_dit, tiny_pixart
from tfmq.quant.config import RTNConfig
from tfmq.quant.nn.layers import QuantLinear
from tfmq.quant.wrap import quantize_model
from tfmq.quant.tib import find_tib

# Written out, not derived: the blocks of the tiny UNets that read the time embedding, in forward order.
EXPECTED_RESNETS = (
    "down_blocks.0.resnets.0",
    "down_blocks.1.resnets.0",
    "mid_block.resnets.0",
    "mid_block.resnets.1",
    "up_blocks.0.resnets.0",
    "up_blocks.0.resnets.1",
    "up_blocks.1.resnets.0",
    "up_blocks.1.resnets.1",
)
EXPECTED_FEATURES = tuple(f"{resnet}.time_emb_proj" for resnet in EXPECTED_RESNETS)


def class_unet(seed: int = 0, **overrides: object) -> UNet2DModel:
    """pixel_unet with a class embedding (10 classes) added to the time embedding."""
    torch.manual_seed(seed)
    settings = dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=10,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return UNet2DModel(**{**settings, **overrides}).eval()


def scale_shift_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def skip_time_act_unet() -> UNet2DModel:
    model = pixel_unet()
    model.get_submodule("up_blocks.0.resnets.1").skip_time_act = True  # read at call time by diffusers
    return model


def concat_class_text_unet() -> UNet2DConditionModel:
    """Text UNet whose class embedding is concatenated to the time embedding, then passed through SiLU."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4, num_class_embeds=3,
        class_embeddings_concat=True, time_embedding_act_fn="silu",
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def quantized_pixel_unet() -> UNet2DModel:
    model = quantize_model(pixel_unet(), RTNConfig(a_bits=None, weight_init="minmax"))
    assert isinstance(model.get_submodule("mid_block.resnets.0.time_emb_proj"), QuantLinear)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "pixel": pixel_unet,
    "text": text_unet,
    "class": class_unet,
    "class_timestep": lambda: class_unet(class_embed_type="timestep", num_class_embeds=None),
    "scale_shift": scale_shift_unet,
    "skip_time_act": skip_time_act_unet,
    "concat_class_text": concat_class_text_unet,
    "quantized": quantized_pixel_unet,
}


def inputs_for(model: nn.Module, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    batch = len(timesteps)
    inputs = {"sample": torch.randn(batch, config.in_channels, 8, 8, generator=generator), "timestep": timesteps}
    if isinstance(model, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.randn(batch, 3, config.cross_attention_dim, generator=generator)
    if model.class_embedding is not None:
        inputs["class_labels"] = torch.arange(batch) % 3
    return inputs


@pytest.mark.parametrize(
    ("make", "class_embedding"),
    [(pixel_unet, None), (text_unet, None), (class_unet, "class_embedding")],
    ids=["UNet2DModel", "UNet2DConditionModel", "class-conditional UNet2DModel"],
)
def test_finds_exactly_the_tib_modules(make: Callable[[], nn.Module], class_embedding: str | None) -> None:
    tib = find_tib(make())
    assert (tib.time_proj, tib.time_embedding, tib.class_embedding, tib.time_embed_act) == (
        "time_proj", "time_embedding", class_embedding, None)
    assert tib.resnets == EXPECTED_RESNETS
    assert tib.feature_names == EXPECTED_FEATURES
    assert tib.feature_reader_names == ("time_embedding.linear_2", *EXPECTED_FEATURES)
    assert tib.linear_names == ("time_embedding.linear_1", "time_embedding.linear_2", *EXPECTED_FEATURES)
    shared = ["time_proj", "time_embedding"] + ([class_embedding] if class_embedding else [])
    per_block = [f"{resnet}.{part}" for resnet in EXPECTED_RESNETS for part in ("nonlinearity", "time_emb_proj")]
    assert tib.module_names == (*shared, *per_block)


def test_finds_the_class_mlp_and_the_embedding_activation() -> None:
    assert find_tib(MODELS["class_timestep"]()).linear_names[:4] == (
        "time_embedding.linear_1", "time_embedding.linear_2", "class_embedding.linear_1", "class_embedding.linear_2")
    tib = find_tib(concat_class_text_unet())
    assert (tib.class_embedding, tib.time_embed_act) == ("class_embedding", "time_embed_act")


def test_a_quantized_copy_has_the_same_tib() -> None:
    quantized_tib, tib = find_tib(quantized_pixel_unet()), find_tib(pixel_unet())
    assert quantized_tib == tib  # names only: the model is not compared
    assert quantized_tib.model is not tib.model


@pytest.mark.parametrize("kind", list(MODELS))
def test_temporal_features_equal_those_of_a_full_forward(kind: str) -> None:
    model = MODELS[kind]()
    inputs = inputs_for(model, torch.tensor([999, 500, 3]))
    projections = [name for name, _ in model.named_modules() if name.endswith("time_emb_proj")]
    expected = unit_outputs(model, projections, [inputs])  # what a full UNet forward gives the blocks
    tib = find_tib(model)
    with torch.no_grad():
        features = tib.temporal_features(inputs["timestep"], inputs.get("class_labels"))
    assert tuple(features) == tib.feature_names
    assert set(features) == set(expected)  # the TIB misses no projection the UNet uses
    for name, feature in features.items():
        assert torch.equal(feature, expected[name]), name
    # features change with t (and with the class label, for class-conditional models)
    first = features[EXPECTED_FEATURES[0]]
    assert not torch.equal(first[0], first[1])


def test_scale_shift_features_hold_scale_and_shift() -> None:
    with torch.no_grad():
        features = find_tib(scale_shift_unet()).temporal_features(torch.tensor([10]))
    assert features["down_blocks.0.resnets.0.time_emb_proj"].shape == (1, 2 * 8)


def test_class_label_changes_the_features() -> None:
    tib = find_tib(class_unet())
    with torch.no_grad():
        features = tib.temporal_features(torch.tensor([400, 400]), torch.tensor([0, 1]))
    for feature in features.values():
        assert not torch.equal(feature[0], feature[1])


def test_runs_only_tib_modules() -> None:
    model = text_unet()
    tib = find_tib(model)
    called = []
    handles = [module.register_forward_hook(lambda *_args, name=name: called.append(name))
               for name, module in model.named_modules() if name]
    with torch.no_grad():
        tib.temporal_features(torch.tensor([7, 800]))
    for handle in handles:
        handle.remove()
    tib_roots = tib.module_names
    assert called and all(any(name == root or name.startswith(root + ".") for root in tib_roots) for name in called)
    assert not any(name.endswith(("conv1", "conv2", "conv_in", "to_q")) for name in called)


def test_class_labels_are_required_exactly_when_there_is_a_class_embedding() -> None:
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        find_tib(class_unet()).temporal_features(torch.tensor([5]))
    with pytest.raises(ValueError, match="no class embedding"):
        find_tib(pixel_unet()).temporal_features(torch.tensor([5]), torch.tensor([1]))


class ImageOnlyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ResnetBlock2D(in_channels=4, temb_channels=None, groups=2)


class TimeButNoTimedBlocks(ImageOnlyNet):
    def __init__(self) -> None:
        super().__init__()
        self.time_proj = Timesteps(8, True, 0)
        self.time_embedding = TimestepEmbedding(8, 16)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Conv2d(1, 1, 1)), "Sequential has no time embedding"),
        (ImageOnlyNet(), "ImageOnlyNet has no time embedding"),
        (TimeButNoTimedBlocks(), "TimeButNoTimedBlocks has no ResnetBlock2D with a time_emb_proj"),
    ],
)
def test_refuses_a_model_without_temporal_information(model: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_tib(model)


def test_refuses_a_time_embedding_that_reads_more_than_the_timestep() -> None:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4, time_cond_proj_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with pytest.raises(ValueError, match="UNet2DConditionModel.*timestep_cond"):
        find_tib(model)


# ----------------------------------------------------------------------------------------------------
# Diffusion transformers: the adaLN modulation path

# Written out, not derived: the tiny DiT's two blocks, each with its own embedder, and the output layer.
DIT_EMBEDDERS = ("transformer_blocks.0.norm1.emb", "transformer_blocks.1.norm1.emb")
DIT_FEATURES = ("transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1")
DIT_LINEARS = (
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
    "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2",
    "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1",
    "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2",
    *DIT_FEATURES,
)
PIXART_FEATURES = ("adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_2")
PIXART_LINEARS = ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                  "adaln_single.linear")


def _transformer_inputs(model: nn.Module, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = len(timesteps)
    inputs = {"hidden_states": torch.randn(count, 4, 8, 8, generator=generator), "timestep": timesteps}
    if isinstance(model, PixArtTransformer2DModel):
        inputs["encoder_hidden_states"] = torch.randn(count, 3, 8, generator=generator)
    else:
        inputs["class_labels"] = torch.arange(count) % 3
    return inputs


def test_finds_exactly_the_modulation_path_of_a_dit() -> None:
    tib = find_tib(tiny_dit())
    assert tib.embedders == DIT_EMBEDDERS
    assert tib.feature_names == DIT_FEATURES
    assert tib.linear_names == DIT_LINEARS
    assert tib.feature_reader_names == (DIT_LINEARS[1], DIT_LINEARS[3], *DIT_FEATURES)
    assert tib.class_conditional


def test_finds_exactly_the_modulation_path_of_pixart() -> None:
    tib = find_tib(tiny_pixart())
    assert tib.embedders == ("adaln_single.emb",)
    assert tib.feature_names == PIXART_FEATURES
    assert tib.linear_names == PIXART_LINEARS
    assert tib.feature_reader_names == ("adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear")
    assert not tib.class_conditional


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart])
def test_transformer_temporal_features_equal_those_of_a_full_forward(make: Callable[[], nn.Module]) -> None:
    model = make()
    inputs = _transformer_inputs(model, torch.tensor([999, 500, 3]))
    tib = find_tib(model)
    expected = unit_outputs(model, tib.feature_names, [inputs])
    with torch.no_grad():
        features = tib.temporal_features(inputs["timestep"], inputs.get("class_labels"))
    assert tuple(features) == tib.feature_names
    for name, feature in features.items():
        assert torch.equal(feature, expected[name]), name
        assert not torch.equal(feature[0], feature[1]), name  # they change with t


def test_a_dit_label_changes_its_features_and_is_required() -> None:
    tib = find_tib(tiny_dit())
    with torch.no_grad():
        features = tib.temporal_features(torch.tensor([400, 400]), torch.tensor([0, 3]))  # 3: the null label
    for feature in features.values():
        assert not torch.equal(feature[0], feature[1])
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        tib.temporal_features(torch.tensor([5]))
    with pytest.raises(ValueError, match="no class embedding"):
        find_tib(tiny_pixart()).temporal_features(torch.tensor([5]), torch.tensor([1]))


def test_a_quantized_transformer_has_the_same_tib() -> None:
    model = tiny_dit()
    quantized = quantize_model(model, RTNConfig(w_bits=8, a_bits=8))
    assert find_tib(quantized) == find_tib(model)
    assert all(isinstance(quantized.get_submodule(name), QuantLinear) for name in DIT_LINEARS)


def test_refuses_a_transformer_without_a_modulation_path() -> None:
    torch.manual_seed(0)
    plain = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, norm_num_groups=1)
    with pytest.raises(ValueError, match="Transformer2DModel has no adaLN modulation"):
        find_tib(plain)
    sized = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                     sample_size=8, cross_attention_dim=16, caption_channels=8, norm_num_groups=1,
                                     use_additional_conditions=True)
    with pytest.raises(ValueError, match="also reads the resolution and aspect ratio"):
        find_tib(sized)


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart])
def test_cache_sites_output_what_a_full_forward_computes_there(make: Callable[[], nn.Module]) -> None:
    model = make()
    inputs = _transformer_inputs(model, torch.tensor([999, 500, 3]))
    tib = find_tib(model)
    sites = {f"{owner}.{attribute}": owner for owner, attribute in tib.cache_sites.items()}
    expected = unit_outputs(model, list(sites), [inputs])
    with torch.no_grad():
        outputs = tib.site_outputs(inputs["timestep"])
    for site, owner in sites.items():  # a DiT runs block 0's embedder twice a forward (its block, the output layer)
        assert torch.equal(outputs[owner], expected[site][:3]), site
    # a DiT caches its time MLPs only (the label comes after them), PixArt its whole modulation path
    assert set(tib.cache_sites.values()) == ({"timestep_embedder"} if tib.class_conditional
                                             else {"timestep_embedder", "linear"})
