"""The CLI in-process: the main jobs work, and every bad input is one line on stderr with exit code 2."""

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file

from tfmq.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_sample_writes_pngs_grid_and_metadata(capsys, tmp_path, tiny_model_folder):
    code, out, _ = _run(capsys, "sample", "--model", tiny_model_folder, "--num", 3, "--steps", 4, "--seed", 7,
                        "--out", tmp_path / "s", "--quiet")
    assert code == 0 and "3 images" in out
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == [".tfmq-output", "000000.png", "000001.png", "000002.png", "grid.png", "samples.json"]
    metadata = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert metadata["seed"] == 7 and metadata["sampler"]["steps"] == 4


def test_eval_against_a_baseline_of_the_same_seed(capsys, tmp_path, tiny_model_folder):
    for name in ("a", "b"):
        _run(capsys, "sample", "--model", tiny_model_folder, "--num", 4, "--steps", 3, "--out", tmp_path / name,
             "--quiet")
    code, out, _ = _run(capsys, "eval", tmp_path / "a", tmp_path / "b", "--reference", "none")
    assert code == 0
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert result["psnr"] == 100.0 and result["ssim"] == pytest.approx(1.0)
    assert "psnr" in out


def test_eval_refuses_sets_of_different_seeds(capsys, tmp_path, tiny_model_folder):
    for name, seed in (("a", 0), ("b", 1)):
        _run(capsys, "sample", "--model", tiny_model_folder, "--num", 2, "--steps", 2, "--seed", seed,
             "--out", tmp_path / name, "--quiet")
    code, _, err = _run(capsys, "eval", tmp_path / "a", tmp_path / "b", "--reference", "none")
    _assert_one_line_error(code, err, "different seeds")


def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "sample", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "neither a shipped model")
    assert not (tmp_path / "o").exists()


def test_folder_without_unet_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "sample", "--model", tmp_path / "empty", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "has no unet/config.json")


@pytest.mark.parametrize("number", ["0", "-3"])
def test_non_positive_number_of_images(capsys, tmp_path, number):
    code = main(["sample", "--num", number, "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, capsys.readouterr().err, "positive")


def test_corrupt_safetensors(capsys, tmp_path, tiny_model_folder):
    weights = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    code, _, err = _run(capsys, "sample", "--model", tiny_model_folder, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "cannot load UNet2DModel weights")
    assert not (tmp_path / "o").exists()


def test_non_image_file_in_an_eval_folder(capsys, tmp_path, tiny_model_folder):
    _run(capsys, "sample", "--model", tiny_model_folder, "--num", 2, "--steps", 2, "--out", tmp_path / "a", "--quiet")
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    code, _, err = _run(capsys, "eval", tmp_path / "a", "--reference", "none")
    _assert_one_line_error(code, err, "readme.txt is not an image")
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_corrupt_reference_statistics(capsys, tmp_path, tiny_model_folder):
    _run(capsys, "sample", "--model", tiny_model_folder, "--num", 2, "--steps", 2, "--out", tmp_path / "a", "--quiet")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "stats.safetensors"))
    (tmp_path / "stats.safetensors").write_bytes(b"broken")
    code, _, err = _run(capsys, "eval", tmp_path / "a", "--reference", tmp_path / "stats.safetensors")
    _assert_one_line_error(code, err, "cannot read reference statistics")


def _quantize(capsys, model_folder, out, *extra: str) -> tuple[int, str, str]:
    return _run(capsys, "quantize", "--model", model_folder, "--method", "rtn", "--steps", 4, "--calib-samples", 2,
                "--out", out, "--quiet", *extra)


def test_quantize_then_sample_the_same_seeds(capsys, tmp_path, tiny_model_folder):
    code, out, _ = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--w-bits", 4, "--a-bits", 8)
    assert code == 0 and "rtn" in out and "smaller" in out
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert metadata["provenance"]["quant_config"]["w_bits"] == 4 and metadata["provenance"]["calibration"]["num_samples"] == 2
    code, _, _ = _run(capsys, "sample", "--quantized", tmp_path / "q", "--num", 2, "--steps", 4,
                      "--out", tmp_path / "qi", "--quiet")
    assert code == 0
    _run(capsys, "sample", "--model", tiny_model_folder, "--num", 2, "--steps", 4, "--out", tmp_path / "fp",
         "--quiet")
    fp = json.loads((tmp_path / "fp" / "samples.json").read_text())
    quantized = json.loads((tmp_path / "qi" / "samples.json").read_text())
    assert fp["seed"] == quantized["seed"] and quantized["model"] == str(tmp_path / "q")


def test_weights_only_quantization(capsys, tmp_path, tiny_model_folder):
    code, _, _ = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--w-bits", 4, "--a-bits", "none")
    assert code == 0
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["provenance"]["quant_config"]["a_bits"] is None


@pytest.mark.parametrize("flags", [("--w-bits", "1"), ("--w-bits", "9"), ("--a-bits", "3")])
def test_unsupported_bit_widths(capsys, tmp_path, tiny_model_folder, flags):
    code, _, err = _quantize(capsys, tiny_model_folder, tmp_path / "q", *flags)
    _assert_one_line_error(code, err, "bits")
    assert not (tmp_path / "q").exists()


def test_quantized_checkpoint_on_another_base_model(capsys, tmp_path, tiny_model_folder):
    _quantize(capsys, tiny_model_folder, tmp_path / "q")
    other = tmp_path / "other"
    from diffusers import DDPMPipeline
    from tests.conftest import tiny_unet

    from tfmq.models.architectures import fashion_ddpm_scheduler
    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=fashion_ddpm_scheduler()).save_pretrained(other)
    code, _, err = _run(capsys, "sample", "--quantized", tmp_path / "q", "--model", other, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "another base model")
    assert not (tmp_path / "o").exists()


def test_tampered_quantized_checkpoint(capsys, tmp_path, tiny_model_folder):
    _quantize(capsys, tiny_model_folder, tmp_path / "q")
    weights = tmp_path / "q" / "quantized.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, _, err = _run(capsys, "sample", "--quantized", tmp_path / "q", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, "modified or truncated")



def test_quantize_with_block_reconstruction(capsys, tmp_path, tiny_model_folder):
    code, out, _ = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--method", "qdiff", "--preset", "fast")
    assert code == 0 and "qdiff" in out and "fast" in out and "--preset balanced" in out
    assert not (tmp_path / "q.tfmq-checkpoints").exists()  # the run's unit checkpoints go once it is saved
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert metadata["provenance"]["quant_config"]["recon_preset"] == "fast" and metadata["provenance"]["method_results"]["reconstruction"]


def test_every_preset_is_a_choice_of_quantize():
    from tfmq.cli import build_parser
    from tfmq.quant.reconstruction_settings import RECON_PRESETS

    for preset in RECON_PRESETS:
        assert build_parser().parse_args(["quantize", "--preset", preset, "--out", "q"]).preset == preset


def test_quantize_with_tfmq_cache_then_sample(capsys, tmp_path, tiny_model_folder):
    code, out, _ = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--method", "tfmq", "--preset", "fast",
                             "--temporal-cache", "--temporal-selection")
    assert code == 0 and "tfmq" in out and "temporal" in out
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    results = metadata["provenance"]["method_results"]
    assert results["reconstruction"][0]["name"] == "temporal_information_block"
    assert set(results["temporal_selection"]) >= set(metadata["manifest"]["temporal_caches"]["blocks"])
    code, _, _ = _run(capsys, "sample", "--quantized", tmp_path / "q", "--num", 2, "--steps", 4,
                      "--out", tmp_path / "qi", "--quiet")
    assert code == 0 and (tmp_path / "qi" / "grid.png").is_file()


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    from tests.models.tiny_pipelines import write_pipeline

    return write_pipeline("text", tmp_path_factory.mktemp("cli") / "tiny-sd")


def test_text_model_quantizes_on_a_captions_file_and_samples_with_prompts(capsys, tmp_path, text_folder):
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [{"caption": f"a photo of a {name}"}
                                                    for name in ("sneaker", "bag", "coat")]}))
    common = ("--sampler", "plms", "--steps", 3, "--quiet")
    code, out, err = _run(capsys, "quantize", "--model", text_folder, "--method", "tfmq", "--preset", "fast",
                          "--w-bits", 8, "--prompts", captions, "--num-prompts", 2, "--calib-samples", 2,
                          "--interval-length", 1, "--out", tmp_path / "q", *common)
    assert code == 0, err
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert info["provenance"]["calibration"]["guidance_scale"] == 3.0
    code, out, err = _run(capsys, "sample", "--quantized", tmp_path / "q", "--prompt", "a bag", "--prompt", "a coat",
                          "--num", 3, "--guidance-scale", 2, "--out", tmp_path / "s", *common)
    assert code == 0, err
    metadata = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert metadata["prompts"] == ["a bag", "a coat", "a bag"] and metadata["guidance_scale"] == 2.0


def test_single_file_checkpoint_quantizes_samples_and_exports_like_its_folder(capsys, tmp_path, text_folder):
    """A CompVis-layout .safetensors with its config folder gives the same quantized images as the diffusers
    folder it was written from, and every later command finds it from what quantize and export recorded."""
    from tests.models.original_checkpoint import single_file_model

    from tfmq.images import load_image_folder

    checkpoint, configs = single_file_model(text_folder, tmp_path / "released")
    common = ("--sampler", "plms", "--steps", 3, "--quiet")
    images = {}
    models = {"file": ("--model", checkpoint, "--model-config", configs), "folder": ("--model", text_folder)}
    for name, model in models.items():
        code, _, err = _run(capsys, "quantize", *model, "--w-bits", 8, "--calib-samples", 2, "--interval-length", 1,
                            "--prompt", "a coat", "--out", tmp_path / f"q-{name}", *common)
        assert code == 0, err
        code, _, err = _run(capsys, "sample", "--quantized", tmp_path / f"q-{name}", "--prompt", "a bag", "--num", 2,
                            "--out", tmp_path / f"s-{name}", *common)
        assert code == 0, err
        images[name] = load_image_folder(tmp_path / f"s-{name}", skip=("samples.json", "grid.png"))[1]
    assert torch.equal(images["file"], images["folder"])
    base = json.loads((tmp_path / "q-file" / "quantization.json").read_text())["provenance"]["base_model"]
    assert base["source"] == str(checkpoint.resolve()) and base["config"] == str(configs.resolve())
    code, _, err = _run(capsys, "export", tmp_path / "q-file", "--out", tmp_path / "unet.onnx", "--exact-convs",
                        "--prompt", "a bag", "--sampler", "plms", "--steps", 3)
    assert code == 0, err
    code, _, err = _run(capsys, "sample", "--engine", "onnxruntime", "--onnx", tmp_path / "unet.onnx",
                        "--prompt", "a bag", "--num", 2, "--out", tmp_path / "s-onnx", *common)
    assert code == 0, err
    code, _, err = _run(capsys, "quantize", "--model", checkpoint, "--out", tmp_path / "q", *common)
    _assert_one_line_error(code, err, "--model-config")


@pytest.mark.parametrize("argv, fragment", [
    (("--prompt", "a bag"), "unconditional"),
    (("--class-label", "3"), "unconditional"),
    (("--guidance-scale", "2"), "unconditional"),
])
def test_conditions_for_an_unconditional_model_are_errors(capsys, tmp_path, tiny_model_folder, argv, fragment):
    code, _, err = _run(capsys, "sample", "--model", tiny_model_folder, "--num", 1, "--steps", 2,
                        "--out", tmp_path / "s", *argv)
    _assert_one_line_error(code, err, fragment)


def test_text_model_without_prompts_or_with_labels_is_an_error(capsys, tmp_path, text_folder):
    code, _, err = _run(capsys, "sample", "--model", text_folder, "--num", 1, "--steps", 2, "--out", tmp_path / "s")
    _assert_one_line_error(code, err, "give at least one prompt")
    code, _, err = _run(capsys, "sample", "--model", text_folder, "--num", 1, "--steps", 2, "--out", tmp_path / "s",
                        "--class-label", "1")
    _assert_one_line_error(code, err, "give prompts, not class labels")


def test_export_then_sample_on_the_integer_engines_matches_the_fake_quant_images(capsys, tmp_path,
                                                                                 tiny_model_folder):
    from tfmq.images import load_image_folder

    common = ("--steps", 4, "--quiet")
    code, _, err = _run(capsys, "quantize", "--model", tiny_model_folder, "--w-bits", 8, "--calib-samples", 2,
                        "--out", tmp_path / "q", *common)
    assert code == 0, err
    code, out, err = _run(capsys, "export", tmp_path / "q", "--out", tmp_path / "unet.onnx", "--calibration-images", 2,
                          "--steps", 4)
    assert code == 0 and "unet.onnx" in out, err
    code, _, err = _run(capsys, "export", tmp_path / "q", "--out", tmp_path / "typo.onnx", "--exact-convs",
                        "*conv_shortcutt", "--calibration-images", 2, "--steps", 4)
    _assert_one_line_error(code, err, "'*conv_shortcutt' matches none of the")
    assert not (tmp_path / "typo.onnx").exists()
    for engine, folder in (("torch", "fake"), ("onnxruntime", "int8"), ("inductor", "compiled")):
        extra = ("--onnx", tmp_path / "unet.onnx") if engine == "onnxruntime" else ("--quantized", tmp_path / "q")
        code, _, err = _run(capsys, "sample", "--engine", engine, *extra, "--num", 3, "--out", tmp_path / folder,
                            *common)
        assert code == 0, err
    _, fake = load_image_folder(tmp_path / "fake", skip=("samples.json", "grid.png"))

    def psnr(folder: str) -> float:
        _, images = load_image_folder(tmp_path / folder, skip=("samples.json", "grid.png"))
        return float(10 * torch.log10(4 / (fake - images).pow(2).mean().clamp_min(1e-12)))

    # PNG-rounded images of one seed: the integer engines stay close. How close depends on the float summation
    # order of the calibration (onnxruntime on this project's CPU: 29.6 dB when torch runs one thread, 34.1 dB
    # with two); the compiled engine has no output grids, so only codes that flip move its images.
    assert psnr("int8") > 25 and psnr("compiled") > max(35, psnr("int8"))
    code, _, err = _run(capsys, "bench", "--quantized", tmp_path / "q", "--onnx", tmp_path / "unet.onnx", "--inductor",
                        "--batch", 3, "--repeats", 1, "--json", tmp_path / "bench.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["engine"] for row in rows][-1] == "inductor int8" and all(row["ms_per_step"] > 0 for row in rows)
    code, _, err = _run(capsys, "sample", "--engine", "onnxruntime", "--onnx", tmp_path / "unet.onnx", "--num", 1,
                        "--steps", 5, "--out", tmp_path / "other", "--quiet")
    _assert_one_line_error(code, err, "serves the timesteps of sampler")


def test_a_dit_exports_and_samples_its_class_labels_on_onnxruntime(capsys, tmp_path):
    from tests.models.tiny_pipelines import write_pipeline
    from tfmq.images import load_image_folder

    folder = write_pipeline("dit", tmp_path / "dit")
    common = ("--steps", 3, "--quiet")
    code, _, err = _run(capsys, "quantize", "--model", folder, "--method", "rtn", "--w-bits", 8, "--calib-samples", 2,
                        "--out", tmp_path / "q", *common)
    assert code == 0, err
    code, out, err = _run(capsys, "export", tmp_path / "q", "--out", tmp_path / "dit.onnx", "--calibration-images", 2,
                          "--steps", 3)
    assert code == 0 and "dit.onnx" in out, err
    labels = ("--class-label", 0, "--class-label", 2, "--guidance-scale", 2)
    graph = ("--onnx", tmp_path / "dit.onnx")
    for engine, extra in (("torch", ("--quantized", tmp_path / "q")), ("onnxruntime", graph), ("openvino", graph)):
        code, _, err = _run(capsys, "sample", "--engine", engine, *extra, "--num", 2, "--out", tmp_path / engine,
                            *labels, *common)
        assert code == 0, err
    images = {engine: load_image_folder(tmp_path / engine, skip=("samples.json", "grid.png"))[1]
              for engine in ("torch", "onnxruntime", "openvino")}

    def psnr(engine: str) -> float:
        return float(10 * torch.log10(4 / (images[engine] - images["torch"]).pow(2).mean().clamp_min(1e-12)))
    # PNG-rounded images of the same seeds: onnxruntime's are the fake-quant model's (measured: identical);
    # OpenVINO rounds some integer products its own way (measured 61 dB)
    assert psnr("onnxruntime") > 40 and psnr("openvino") > 40
    metadata = json.loads((tmp_path / "onnxruntime" / "samples.json").read_text())
    assert metadata["class_labels"] == [0, 2]
    code, _, err = _run(capsys, "sample", "--engine", "onnxruntime", "--onnx", tmp_path / "dit.onnx", "--num", 1,
                        "--class-label", 10, "--out", tmp_path / "bad", *common)
    _assert_one_line_error(code, err, "class labels [10] out of range")
    code, _, err = _run(capsys, "bench", "--quantized", tmp_path / "q", "--onnx", tmp_path / "dit.onnx", "--batch", 2,
                        "--repeats", 1, "--runtimes", "onnxruntime", "openvino", "--json", tmp_path / "bench.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["engine"] for row in rows] == ["torch fp32", "torch fake-quant", "onnxruntime int8 dit.onnx",
                                              "openvino int8 dit.onnx"]


def test_onnxruntime_engine_without_a_graph_is_an_error(capsys, tmp_path):
    code, _, err = _run(capsys, "sample", "--engine", "onnxruntime", "--num", 1, "--out", tmp_path / "s")
    _assert_one_line_error(code, err, "needs --onnx")


def test_integer_graph_options_on_the_fp32_export_are_an_error(capsys, tmp_path, tiny_model_folder):
    for option in (("--exact-convs",), ("--exact-convs", "*conv1"), ("--requantize-weights",)):
        code, _, err = _run(capsys, "export", "--model", tiny_model_folder, "--out", tmp_path / "fp32.onnx", *option)
        _assert_one_line_error(code, err, "format 'fp32' has neither")
        assert not (tmp_path / "fp32.onnx").exists()


def test_bench_times_every_engine_against_fp32_torch(capsys, tmp_path, tiny_model_folder):
    code, _, err = _run(capsys, "export", "--model", tiny_model_folder, "--out", tmp_path / "fp32.onnx")
    assert code == 0, err
    code, out, err = _run(capsys, "bench", "--model", tiny_model_folder, "--onnx", tmp_path / "fp32.onnx",
                          "--batch", 2, "--repeats", 2, "--json", tmp_path / "bench.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["engine"] for row in rows] == ["torch fp32", "onnxruntime fp32 fp32.onnx"]
    assert rows[0]["speedup_vs_torch_fp32"] == 1.0 and all(row["ms_per_step"] > 0 for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_eval_runs_its_feature_network_on_the_device_named(capsys, tmp_path, tiny_model_folder):
    for name in ("a", "b"):
        _run(capsys, "sample", "--model", tiny_model_folder, "--num", 3, "--steps", 2, "--out", tmp_path / name,
             "--quiet")
    code, _, err = _run(capsys, "eval", tmp_path / "a", tmp_path / "b", "--reference", "none", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["psnr"] == 100.0
    (tmp_path / "a" / "metrics.json").unlink()
    code, _, err = _run(capsys, "eval", tmp_path / "a", tmp_path / "b", "--reference", "none", "--device", "cuda")
    _assert_one_line_error(code, err, "no CUDA GPU")
    assert not (tmp_path / "a" / "metrics.json").exists()


SAMPLE_ARGS = ("--num", 5, "--batch-size", 2, "--steps", 3, "--seed", 2, "--device", "cpu", "--quiet")


def interrupted(run: Callable[[], int], after: int) -> int:
    """The exit code of `run()` (a `tfmq sample`) stopped by Ctrl-C right after its `after`-th batch is kept."""
    from tfmq.images import ImageBatches

    save = ImageBatches.save
    saved = []

    def save_then_stop(self, indices, images):
        save(self, indices, images)
        saved.append(indices)
        if len(saved) == after:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageBatches, "save", save_then_stop)
        return run()


def sampled_batches(patch: pytest.MonkeyPatch) -> list[range]:
    """The images of every batch sampled from now on, as long as `patch` lasts."""
    import tfmq.evaluation

    batches = []
    sample_batch = tfmq.evaluation.sample_batch

    def counted(unet, scheduler, config, seed, indices, *args, **kwargs):
        batches.append(indices)
        return sample_batch(unet, scheduler, config, seed, indices, *args, **kwargs)

    patch.setattr(tfmq.evaluation, "sample_batch", counted)
    return batches


def _folder_bytes(folder) -> dict[str, bytes]:
    """Every file of an image folder, samples.json without its timing."""
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "samples.json"}
    metadata = json.loads((folder / "samples.json").read_text())
    assert metadata.pop("seconds") >= 0
    return {**files, "samples.json": json.dumps(metadata, sort_keys=True).encode()}


def test_an_interrupted_sample_continues_to_the_folder_of_an_uninterrupted_run(capsys, monkeypatch, tmp_path,
                                                                               tiny_model_folder):
    argv = ("--model", tiny_model_folder, *SAMPLE_ARGS)
    assert _run(capsys, "sample", *argv, "--out", tmp_path / "whole")[0] == 0
    assert not (tmp_path / "whole.tfmq-progress").exists()
    assert interrupted(lambda: _run(capsys, "sample", *argv, "--out", tmp_path / "s")[0], after=2) == 130
    assert not (tmp_path / "s").exists()
    kept = sorted(path.name for path in (tmp_path / "s.tfmq-progress").iterdir())
    assert kept == [".tfmq-output", "batch-000000-000002.safetensors", "batch-000002-000004.safetensors", "run.json"]
    sampled = sampled_batches(monkeypatch)
    code, out, err = _run(capsys, "sample", *argv, "--out", tmp_path / "s")
    assert code == 0, err
    assert sampled == [range(4, 5)] and "5 images" in out and "4 kept from an interrupted run" in out
    assert _folder_bytes(tmp_path / "s") == _folder_bytes(tmp_path / "whole")
    assert not (tmp_path / "s.tfmq-progress").exists()
    code, _, _ = _run(capsys, "eval", tmp_path / "s", tmp_path / "whole", "--reference", "none", "--device", "cpu")
    assert code == 0 and json.loads((tmp_path / "s" / "metrics.json").read_text())["psnr"] == 100.0


def test_batches_of_another_run_are_refused_and_left_as_they_are(capsys, tmp_path, tiny_model_folder):
    from diffusers import DDPMPipeline
    from tests.conftest import tiny_unet

    from tfmq.models.architectures import fashion_ddpm_scheduler

    argv = ("--model", tiny_model_folder, *SAMPLE_ARGS, "--out", tmp_path / "s")
    assert interrupted(lambda: _run(capsys, "sample", *argv)[0], after=1) == 130
    progress = tmp_path / "s.tfmq-progress"
    before = {path.name: path.read_bytes() for path in progress.iterdir()}
    code, _, err = _run(capsys, "sample", *argv, "--seed", 3)
    _assert_one_line_error(code, err, "holds the images of another sampling run (its seed differ)")
    other = tmp_path / "other"
    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=fashion_ddpm_scheduler()).save_pretrained(other)
    code, _, err = _run(capsys, "sample", *argv, "--model", other)
    _assert_one_line_error(code, err, "(its model differ)")
    (progress / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "sample", *argv)
    _assert_one_line_error(code, err, "it holds files tfmq did not write (notes.txt)")
    assert {path.name: path.read_bytes() for path in progress.iterdir()} == {**before, "notes.txt": b"mine"}
    assert not (tmp_path / "s").exists()


def test_the_cli_names_the_files_it_checks_as_the_modules_that_write_them():
    """The CLI checks paths before the heavy modules load, under the names those modules write."""
    from tfmq import cli, command_inputs, evaluation
    from tfmq.export import metadata

    assert command_inputs.ONNX_DATA_SUFFIX == metadata.DATA_SUFFIX and cli.METRICS_FILE == evaluation.METRICS_FILE


def test_a_schedule_free_quantization_samples_and_exports_for_any_sampler(capsys, tmp_path, tiny_model_folder):
    code, _, err = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--method", "tfmq", "--preset", "fast",
                             "--temporal-cache", "--schedule-free", "--fsc-fill", "nearest")
    assert code == 0, err
    metadata = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert metadata["provenance"]["quant_config"]["train_timesteps"] == 1000
    assert len(metadata["manifest"]["timestep_tables"]["schedule"]) == 1000
    code, _, err = _run(capsys, "export", tmp_path / "q", "--out", tmp_path / "unet.onnx", "--exact-convs")
    assert code == 0, err
    for engine, extra in (("torch", ("--quantized", tmp_path / "q")), ("onnxruntime", ("--onnx", tmp_path / "unet.onnx"))):
        for sampler in (("--sampler", "dpm-solver", "--steps", 5), ("--sampler", "plms", "--steps", 6)):
            out = tmp_path / f"{engine}-{sampler[1]}"
            code, _, err = _run(capsys, "sample", "--engine", engine, *extra, *sampler, "--num", 2, "--out", out,
                                "--quiet")
            assert code == 0 and (out / "grid.png").is_file(), err


def test_fsc_fill_without_schedule_free_is_an_error(capsys, tmp_path, tiny_model_folder):
    code, _, err = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--method", "tfmq", "--fsc-fill", "linear")
    _assert_one_line_error(code, err, "--fsc-fill fills the rows of --schedule-free tables")


def test_a_sampler_the_tables_do_not_serve_is_a_one_line_error(capsys, tmp_path, tiny_model_folder):
    code, _, err = _quantize(capsys, tiny_model_folder, tmp_path / "q", "--fsc-scope", "temporal")
    assert code == 0, err
    code, _, err = _run(capsys, "sample", "--quantized", tmp_path / "q", "--steps", 5, "--num", 2,
                        "--out", tmp_path / "i", "--quiet")
    _assert_one_line_error(code, err, "not among the 4 the model was calibrated for (50, 200, 450)")
    assert not (tmp_path / "i").exists()
