"""fileio: whole writes to a descriptor (short writes, full disks) and directory fsync."""

import errno
import os
from pathlib import Path

import pytest

from pymailtools.fileio import fsync_dir, replace_file, write_all
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


def test_replace_file_never_writes_into_a_leftover_temporary_file(tmp_path: Path) -> None:
    """A temporary file left by an earlier process with the same pid (and a looser mode)
    is not reused: the secret would take that file's mode with it."""
    path = tmp_path / "store.json"
    leftover = tmp_path / f"store.json.tmp{os.getpid()}"
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    replace_file(str(path), b"secret")
    assert path.read_bytes() == b"secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not leftover.exists()
