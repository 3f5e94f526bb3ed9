"""fileio: whole writes to a descriptor (short writes, full disks) and directory fsync."""

import errno
import os
from pathlib import Path

import pytest

from pymailtools.fileio import fsync_dir, write_all
from tests.conftest import tmpfs


def test_write_all_at_the_position_and_at_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_all(fd, b"hello world")
        write_all(fd, bytearray(b"W"), 6)
        write_all(fd, memoryview(b"!!"))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"hello World!!"


def test_write_all_on_a_full_disk_raises_enospc(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "1m") as mnt:
        fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as e:
                write_all(fd, b"x" * (2 << 20))
        finally:
            os.close(fd)
    assert e.value.errno == errno.ENOSPC


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        fsync_dir(str(tmp_path / "missing"))
