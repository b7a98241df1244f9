import numpy as np
import pytest

from tfmq.data import load_fashion_mnist, write_idx
from tfmq.errors import TfmqError


def test_reads_the_debian_files(fashion_mnist_dir):
    images, labels = load_fashion_mnist("test", resolution=28, folder=fashion_mnist_dir)
    assert images.shape == (10_000, 1, 28, 28)
    assert labels.shape == (10_000,) and set(labels.unique().tolist()) == set(range(10))
    assert images.min() == -1.0 and images.max() == 1.0


def test_resizes_to_the_model_resolution(fashion_mnist_dir):
    images, _ = load_fashion_mnist("test", resolution=16, folder=fashion_mnist_dir)
    assert images.shape == (10_000, 1, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_reads_a_users_own_folder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8))
    images, labels = load_fashion_mnist("test", resolution=28, folder=tmp_path)
    assert labels.tolist() == list(range(6))
    np.testing.assert_allclose(images[:, 0].numpy(), pixels / 127.5 - 1.0, atol=1e-6)


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(TfmqError, match=str(tmp_path)):
        load_fashion_mnist("train", folder=tmp_path)


def test_mismatched_label_count_is_rejected(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(TfmqError, match="disagree"):
        load_fashion_mnist("test", folder=tmp_path)
