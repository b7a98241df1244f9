import gzip

import numpy as np
import pytest

from tfmq.data import read_idx, write_idx
from tfmq.errors import TfmqError


@pytest.mark.parametrize("name", ["tiny.idx", "tiny.idx.gz"])
def test_round_trip_of_a_tiny_file(tmp_path, name):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, images)
    read = read_idx(tmp_path / name)
    assert read.shape == (2, 3, 4) and read.dtype == np.uint8
    np.testing.assert_array_equal(read, images)


def test_big_endian_ints_are_decoded(tmp_path):
    values = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "ints.idx", values)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), values)


def test_truncated_file_is_rejected(tmp_path):
    write_idx(tmp_path / "full.idx", np.zeros((4, 5, 5), np.uint8))
    raw = (tmp_path / "full.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(raw[:-7])
    with pytest.raises(TfmqError, match="truncated"):
        read_idx(tmp_path / "cut.idx")


def test_wrong_magic_is_rejected(tmp_path):
    with gzip.open(tmp_path / "bad.idx.gz", "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(TfmqError, match="magic"):
        read_idx(tmp_path / "bad.idx.gz")


def test_broken_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "broken.idx.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TfmqError, match="cannot read idx file"):
        read_idx(tmp_path / "broken.idx.gz")
