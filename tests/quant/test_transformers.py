"""Diffusion transformers through the methods: the text-conditional PixArt (adaLN-single, learned variance)
quantized, saved, loaded and sampled, and run inside PixArtAlphaPipeline; the temporal feature caches of
DiT and PixArt; DiT's family runs with the pipeline folders in tests/models/test_families.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, PixArtAlphaPipeline
from tests.models.tiny_pipelines import tiny_autoencoder
from tests.quant.tiny_unets import one_thread, tiny_dit, tiny_pixart

from tfmq.denoiser import denoiser_call
from tfmq.models.architectures import latent_scheduler
from tfmq.quant.api import quantize, relative_output_error
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import RTNConfig, TFMQConfig, config_for
from tfmq.quant.methods.tfmq import temporal_cache_stats
from tfmq.quant.nn.step_table import StepTable
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import quant_layers, quantize_model
from tfmq.sampling import Conditioning, SamplerConfig, sample

SAMPLER = SamplerConfig(steps=4)
CAPTION_WIDTH = 8


def _captions(count: int, seed: int = 0) -> Conditioning:
    generator = torch.Generator().manual_seed(seed)
    return Conditioning({"encoder_hidden_states": torch.randn(count, 3, CAPTION_WIDTH, generator=generator)},
                        {"encoder_hidden_states": torch.zeros(1, 3, CAPTION_WIDTH)}, guidance_scale=2.0)


@pytest.fixture(scope="module")
def pixart():
    with one_thread():
        model = tiny_pixart(caption_width=CAPTION_WIDTH)
        calibration = collect_calibration(model, latent_scheduler(), 4, SAMPLER, 2, progress=False,
                                          conditioning=_captions(4))
        held_out = collect_calibration(model, latent_scheduler(), 2, SAMPLER, 1, seed=1, progress=False,
                                       conditioning=_captions(2, seed=1))
    return model, calibration, held_out


@pytest.mark.parametrize("method", ["rtn", "qdiff", "tfmq"])
def test_pixart_quantizes_saves_loads_and_w8a8_stays_close(pixart, tmp_path, method):
    model, calibration, held_out = pixart
    settings = {} if method == "rtn" else {"recon_weight_iters": 4, "recon_act_iters": 2}
    with one_thread():
        quantized = quantize(model, config_for(method, {"w_bits": 8, "a_bits": 8, **settings}), calibration,
                             progress=False)
        names = {name for name, _ in quant_layers(quantized)}
        # every Linear of the transformer: caption projection, adaLN, attention, MLP; the first and last layer
        # (patch embedding, output) stay in full precision by default, as a UNet's conv_in and conv_out
        assert {"caption_projection.linear_1", "adaln_single.linear", "transformer_blocks.0.attn1.to_q",
                "transformer_blocks.1.attn2.to_k", "transformer_blocks.1.ff.net.2"} <= names
        assert not names & {"pos_embed.proj", "proj_out"}
        loaded = load_quantized(save_quantized(quantized, tmp_path / "q"), model)
        run = {"config": SAMPLER, "progress": False, "seed": 3, "conditioning": _captions(2, seed=2)}
        images = sample(quantized, latent_scheduler(), 2, **run)
        assert images.shape == (2, 4, 8, 8)  # epsilon only, of the 8 channels a learned-variance model returns
        assert torch.equal(sample(loaded, latent_scheduler(), 2, **run), images)
        error = relative_output_error(loaded, model, held_out)
    # measured 3.7 % on this random transformer; a broken conditioning or quantizer gives tens of percent
    assert error < 0.1, error


def test_a_quantized_pixart_runs_inside_pixart_alpha_pipeline(pixart):
    model, calibration, _ = pixart
    with one_thread():
        quantized = quantize(model, TFMQConfig(w_bits=8, a_bits=8, recon_weight_iters=2, recon_act_iters=1,
                                               fsc_scope="all", train_timesteps=1000), calibration, progress=False)
        pipeline = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_autoencoder(), transformer=quantized,
                                       scheduler=DDIMScheduler.from_config(latent_scheduler().config))
        captions = _captions(2).per_image["encoder_hidden_states"]
        images = pipeline(prompt_embeds=captions, prompt_attention_mask=torch.ones(2, 3, dtype=torch.long),
                          num_inference_steps=3, guidance_scale=1.0, height=16, width=16,
                          use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 1


def _labels(count: int) -> Conditioning:
    return Conditioning({"class_labels": torch.arange(count) % 3}, {"class_labels": torch.tensor([3])},
                        guidance_scale=2.0)


@pytest.mark.parametrize(("make", "conditioning", "sites"), [
    (tiny_dit, _labels, {"transformer_blocks.0.norm1.emb": "timestep_embedder",
                         "transformer_blocks.1.norm1.emb": "timestep_embedder"}),
    (tiny_pixart, _captions, {"adaln_single.emb": "timestep_embedder", "adaln_single": "linear"}),
])
def test_a_transformer_temporal_cache_serves_the_full_precision_values_and_survives_a_checkpoint(
        tmp_path, make, conditioning, sites):
    model = make()
    with one_thread():
        calibration = collect_calibration(model, latent_scheduler(), 2, SAMPLER, 1, progress=False,
                                          conditioning=conditioning(2))
        config = TFMQConfig(w_bits=4, a_bits=8, recon_weight_iters=2, recon_act_iters=1, temporal_cache=True,
                            temporal_selection=True)
        quantized = quantize(model, config, calibration, progress=False)
        cached = {owner: getattr(quantized.get_submodule(owner), attribute) for owner, attribute in sites.items()}
        assert all(isinstance(cache, StepTable) for cache in cached.values())
        assert find_tib(quantized).cache_sites == sites
        reference = find_tib(model).site_outputs(calibration.schedule)
        for owner, cache in cached.items():  # every row within half a step of its own 8-bit grid
            assert torch.all((cache.values() - reference[owner]).abs() <= cache.scale[:, None] / 2 + 1e-6), owner
        stats = temporal_cache_stats(quantized)
        assert stats.values == sum(values.numel() for values in reference.values())
        assert quantized.tfmq_info.method_results["temporal_cache"]["cached_blocks"] == list(sites)
        loaded = load_quantized(save_quantized(quantized, tmp_path / "q"), model)
        run = {"config": SAMPLER, "progress": False, "seed": 4, "conditioning": conditioning(2)}
        assert torch.equal(sample(loaded, latent_scheduler(), 2, **run), sample(quantized, latent_scheduler(), 2, **run))


def test_the_first_and_last_layer_stay_full_precision_unless_the_rules_say_otherwise():
    dit = {name for name, _ in quant_layers(quantize_model(tiny_dit(), RTNConfig()))}
    assert "proj_out_1" in dit and not dit & {"pos_embed.proj", "proj_out_2"}  # proj_out_1: the output modulation
    everything = {name for name, _ in quant_layers(quantize_model(tiny_pixart(), RTNConfig(layers=())))}
    assert {"pos_embed.proj", "proj_out"} <= everything


@torch.no_grad()
def test_a_guided_learned_variance_transformer_takes_its_output_correction_on_every_channel(pixart, tmp_path):
    model, calibration, _ = pixart
    with one_thread():
        quantized = quantize(model, RTNConfig(w_bits=4, a_bits=8, output_correction=True), calibration, progress=False)
        assert quantized.output_correction.channels == 8  # epsilon and the variance: all the model returns
        for inputs in calibration.timestep_groups():  # both branches of the guided set, as the model saw them
            error = denoiser_call(quantized, inputs) - denoiser_call(model, inputs)
            assert error.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        loaded = load_quantized(save_quantized(quantized, tmp_path / "q"), model)
        run = {"config": SAMPLER, "progress": False, "seed": 3, "conditioning": _captions(2, seed=2)}
        assert torch.equal(sample(loaded, latent_scheduler(), 2, **run), sample(quantized, latent_scheduler(), 2, **run))
