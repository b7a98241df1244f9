"""Scoring sample folders: the pairing rules and the class accuracy of conditional samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tfmq.errors import TfmqError
from tfmq.evaluation import SampleFolder, check_paired, evaluate_folder
from tfmq.images import save_image_folder


def _folder(path: Path, seed: int | None, count: int = 4, **metadata) -> SampleFolder:
    images = torch.rand(count, 1, 16, 16, generator=torch.Generator().manual_seed(count)) * 2 - 1
    save_image_folder(images, path, {**({} if seed is None else {"seed": seed}), **metadata})
    return SampleFolder.load(path)


def test_folders_of_one_seed_pair_and_others_are_refused(tmp_path: Path) -> None:
    first, same = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 0)
    check_paired(first, same)
    assert evaluate_folder(first, same)["psnr"] > 90  # the same images
    with pytest.raises(TfmqError, match=r"different seeds \(0 vs 1\)"):
        check_paired(first, _folder(tmp_path / "c", 1))
    with pytest.raises(TfmqError, match="same image names"):
        check_paired(first, _folder(tmp_path / "d", 0, count=5))
    check_paired(first, _folder(tmp_path / "e", None))  # no recorded seed: the names decide


def test_requested_classes_come_from_labels_or_prompts(tmp_path: Path) -> None:
    labelled = _folder(tmp_path / "labels", 0, class_labels=[1, 2, 3, 4])
    assert labelled.requested_classes.tolist() == [1, 2, 3, 4]
    prompted = _folder(tmp_path / "prompts", 0, prompts=["a photo of a bag"] * 4)
    assert prompted.requested_classes is not None and len(set(prompted.requested_classes.tolist())) == 1
    assert _folder(tmp_path / "vague", 0, prompts=["a photo"] * 4).requested_classes is None
    assert _folder(tmp_path / "short", 0, class_labels=[1]).requested_classes is None


def test_a_sampled_folder_holds_the_images_of_sample(tmp_path: Path) -> None:
    """The folder written batch by batch is the one `save_image_folder(sample(...))` writes, and a model, a
    file or a seed the images depend on changes the run's identity."""
    from tests.quant.tiny_unets import pixel_unet

    from tfmq.evaluation import model_identity, sample_folder
    from tfmq.models.architectures import fashion_ddpm_scheduler
    from tfmq.sampling import SamplerConfig, sample

    unet, scheduler, config = pixel_unet(channels=1), fashion_ddpm_scheduler(), SamplerConfig(steps=2, eta=1.0)
    done = sample_folder(unet, scheduler, tmp_path / "s", 3, seed=1, config=config, batch_size=2,
                         model_digest=model_identity(unet), metadata={"seed": 1}, progress=False)
    assert done is not None and (done.num_images, done.kept) == (3, 0)
    save_image_folder(sample(unet, scheduler, 3, seed=1, config=config, batch_size=2, progress=False),
                      tmp_path / "expected", {})
    for name in ("000000.png", "000001.png", "000002.png", "grid.png"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()
    assert SampleFolder.load(tmp_path / "s").seed == 1
    (tmp_path / "graph.onnx").write_bytes(b"graph")
    identities = {model_identity(unet), model_identity(pixel_unet(seed=1, channels=1)),
                  model_identity(unet, pixel_unet(seed=1, channels=1)), model_identity(tmp_path / "graph.onnx")}
    assert len(identities) == 4 and model_identity(pixel_unet(channels=1)) in identities
