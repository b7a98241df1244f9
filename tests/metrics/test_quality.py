import math

import pytest
import torch
from safetensors.torch import save_file

from tfmq.data import load_fashion_mnist
from tfmq.errors import TfmqError
from tfmq.files import owned_safetensors
from tfmq.metrics import QualityMetrics, load_reference_statistics, paired_similarity, save_reference_statistics
from tfmq.metrics.quality import PSNR_CAP_DB, ReferenceStatistics, png_like
from tfmq.models.architectures import FASHION_RESOLUTION


@pytest.fixture(scope="module")
def metrics() -> QualityMetrics:
    return QualityMetrics()


@pytest.fixture(scope="module")
def test_images(fashion_mnist_dir) -> torch.Tensor:
    return png_like(load_fashion_mnist("test", 16, fashion_mnist_dir)[0])


def test_test_set_against_the_shipped_statistics_is_zero(metrics, test_images):
    scores = metrics.against_reference(test_images, load_reference_statistics())
    assert abs(scores["fid"]) < 1e-3 and abs(scores["sfid"]) < 1e-3
    assert scores["is"] > 5.0  # ten balanced, confidently classified classes


def test_noise_is_far_from_the_test_set(metrics, test_images):
    reference = load_reference_statistics()
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = metrics.against_reference(test_images[:1000], reference)
    fake = metrics.against_reference(noise, reference)
    # measured: real images ~0.1 (FID) / ~2 (sFID), noise ~15 / ~80
    assert fake["fid"] > 5.0 and fake["fid"] > 50 * real["fid"]
    assert fake["sfid"] > 20.0 and fake["sfid"] > 10 * real["sfid"]
    assert fake["is"] < real["is"]


def test_between_sets_orders_near_and_far(metrics, test_images):
    first, second = test_images[:1000], test_images[1000:2000]
    noisy = (second + 0.5 * torch.randn(second.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    near, far = metrics.between(first, second), metrics.between(noisy, second)
    assert near["fid_to_baseline"] < far["fid_to_baseline"]
    assert far["psnr"] < 20 and far["ssim"] < 0.9


def test_identical_sets_have_capped_psnr_and_unit_ssim(test_images):
    scores = paired_similarity(test_images[:50], test_images[:50])
    assert scores["psnr"] == PSNR_CAP_DB and scores["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_psnr_follows_its_definition():
    images = torch.zeros(3, 1, 8, 8)
    shifted = images + 0.1  # MSE 0.01 on a range of 2 -> 10 log10(4 / 0.01)
    assert paired_similarity(shifted, images)["psnr"] == pytest.approx(10 * math.log10(400), rel=1e-5)


def test_class_accuracy_counts_the_classifier_agreeing_with_the_request(fashion_mnist_dir):
    from tfmq.data import load_fashion_mnist
    from tfmq.metrics import QualityMetrics

    images, labels = load_fashion_mnist("test", 16, fashion_mnist_dir)
    images, labels = images[:200], labels[:200]
    metrics = QualityMetrics()
    right = metrics.class_accuracy(images, labels)
    wrong = metrics.class_accuracy(images, (labels + 1) % 10)
    assert right > 0.85 and wrong < 0.1


@pytest.mark.parametrize("shape, fragment", [
    ((4, 1, 64, 64), "images are 64x64, but the reference statistics were made from 16x16 images"),
    ((4, 1, 2, 2), "images are 2x2, but the reference statistics were made from 16x16 images"),
    ((4, 3, 16, 16), r"images of shape \(3, 16, 16\): the metrics read gray images"),
])
def test_images_the_reference_was_not_made_for_are_refused(metrics, shape, fragment):
    images = torch.zeros(shape)
    with pytest.raises(TfmqError, match=fragment):
        metrics.against_reference(images, load_reference_statistics())
    if shape[1] != 1:
        with pytest.raises(TfmqError, match=fragment):
            metrics.between(images, images)


def test_the_reference_records_its_resolution_and_must_match_the_network(metrics, tmp_path):
    shipped = load_reference_statistics()
    assert shipped.resolution == FASHION_RESOLUTION == metrics.resolution
    save_reference_statistics(ReferenceStatistics(shipped.tensors, 32), tmp_path / "stats.safetensors")
    assert owned_safetensors(tmp_path / "stats.safetensors")
    other = load_reference_statistics(tmp_path / "stats.safetensors")
    assert other.resolution == 32
    assert torch.equal(other.tensors["fid.features_sum"], shipped.tensors["fid.features_sum"])
    with pytest.raises(TfmqError, match="images are 32x32, but the metrics network reads 16x16 images"):
        metrics.against_reference(torch.zeros(4, 1, 32, 32), other)


def test_reference_files_without_a_resolution_or_a_statistic_are_refused(tmp_path):
    tensors = load_reference_statistics().tensors
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(TfmqError, match="record no image resolution"):
        load_reference_statistics(tmp_path / "bare.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"resolution": "16"})
    with pytest.raises(TfmqError, match="lack fid.features_sum"):
        load_reference_statistics(tmp_path / "other.safetensors")
