"""Small files from others (VM descriptions, price lists, webhook configurations) are read
through one bounded reader: never a hang on a FIFO, never a huge file loaded."""

from __future__ import annotations

import os

import pytest

from hypersdk.errors import InvalidParameterError
from hypersdk.smallfile import UnreadableFile, read_small_file
from hypersdk.webhooks.config import load_endpoints


def test_a_regular_file_up_to_the_limit_is_read_whole(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_small_file(f, 100) == b"x" * 100


def test_over_the_limit_is_refused_without_reading_it_all(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 101)
    with pytest.raises(UnreadableFile, match="larger than 100 bytes"):
        read_small_file(f, 100)


@pytest.mark.timeout(30)
def test_a_fifo_or_a_directory_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a plain read would wait forever
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_small_file(fifo, 100)
    with pytest.raises(UnreadableFile):
        read_small_file(tmp_path, 100)


def test_a_missing_file_stays_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "nope", 100)


def test_a_webhooks_configuration_that_is_a_fifo_or_huge_is_one_error(tmp_path):
    fifo = tmp_path / "webhooks.toml"
    os.mkfifo(fifo)
    with pytest.raises(InvalidParameterError, match="not a regular file"):
        load_endpoints(fifo)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"# " + b"x" * (2 << 20))
    with pytest.raises(InvalidParameterError, match="larger than"):
        load_endpoints(huge)
