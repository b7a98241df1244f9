"""Datasets: the idx format and Fashion-MNIST on top of it."""

from tfmq.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from tfmq.data.idx import read_idx, write_idx

__all__ = ["DEFAULT_FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx", "write_idx"]
