"""Maildir delivery against real directories, real users and real mail readers."""

import errno
import io
import mailbox
import os
import pwd
import re
import stat
import subprocess
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import maildir
from tests.conftest import need_root, need_tool, tmpfs

SENDER = "sender@example.test"


def head(user: pwd.struct_passwd, sender: str = SENDER) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {user.pw_name}@host.example.test\n".encode()


def deliver(
    path: Path, message: bytes | io.RawIOBase, config: Config, user: pwd.struct_passwd
) -> None:
    body = io.BytesIO(message) if isinstance(message, bytes) else message
    maildir.deliver(
        str(path) + "/",
        body,  # type: ignore[arg-type]
        sender=SENDER,
        recipient=f"{user.pw_name}@host.example.test",
        uid=user.pw_uid,
        gid=user.pw_gid,
        config=config,
    )


def listing(path: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(path / sub)) for sub in ("tmp", "new", "cur")}


def make_maildir(path: Path, user: pwd.struct_passwd) -> None:
    for d in (path, path / "tmp", path / "new", path / "cur"):
        d.mkdir()
        os.chown(d, user.pw_uid, user.pw_gid)
        os.chmod(d, 0o700)


@pytest.fixture
def box(spool: Path, system_user: pwd.struct_passwd) -> Path:
    return spool / system_user.pw_name


MESSAGES = [
    b"From: a@example.test\nStatus: RO\nSubject: one\n\nFrom x\n>From y\n",
    b"Subject: two\n\nno final newline",
    b"Subject: crlf\r\n\r\nkept\r\n",
]


def test_messages_arrive_unchanged(
    box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    for m in MESSAGES:
        deliver(box, m, config, system_user)
    md = mailbox.Maildir(str(box), factory=None, create=False)
    got = sorted(md.get_bytes(key) for key in md.keys())
    assert got == sorted(head(system_user) + m for m in MESSAGES)
    assert listing(box)["tmp"] == [] and listing(box)["cur"] == []


def test_created_with_owner_and_mode_under_umask_000(
    box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    need_root()
    old = os.umask(0)
    try:
        deliver(box, b"Subject: x\n\ny\n", config, system_user)
    finally:
        os.umask(old)
    for d in (box, box / "tmp", box / "new", box / "cur"):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode)
        assert (st.st_uid, st.st_gid) == (system_user.pw_uid, system_user.pw_gid), d
        assert stat.S_IMODE(st.st_mode) == 0o700, d
    (name,) = listing(box)["new"]
    st = os.lstat(box / "new" / name)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (system_user.pw_uid, 0o600, 1)


def test_file_names_are_unique_and_well_formed(
    box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    for i in range(200):
        deliver(box, b"Subject: %d\n\nx\n" % i, config, system_user)
    names = listing(box)["new"]
    assert len(names) == 200
    pattern = r"\d+\.M\d{1,6}P%dQ\d+\.host\.example\.test" % os.getpid()
    assert all(re.fullmatch(pattern, n) for n in names), names[:3]


def test_host_name_slash_and_colon_are_escaped() -> None:
    name = maildir.unique_name("odd/host:name")
    assert name.endswith(".odd\\057host\\072name")
    assert "/" not in name and ":" not in name


@pytest.mark.parametrize("which", ["tmp", "new", "cur", ""])
def test_symlinked_maildir_parts_are_refused(
    tmp_path: Path, box: Path, config: Config, system_user: pwd.struct_passwd, which: str
) -> None:
    """new/ (or any part) pointing elsewhere, even to a directory the user owns."""
    elsewhere = tmp_path / "elsewhere"
    make_maildir(elsewhere, system_user)
    if which:
        make_maildir(box, system_user)
        os.rmdir(box / which)
        (box / which).symlink_to(elsewhere / which)
    else:
        box.symlink_to(elsewhere)
    with pytest.raises(DeliveryError) as e:
        deliver(box, b"Subject: x\n\ny\n", config, system_user)
    assert e.value.status == "4.2.0"
    assert "symbolic link" in e.value.reason
    assert listing(elsewhere) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.parametrize("which", ["tmp", "new", ""])
def test_maildir_parts_owned_by_someone_else_are_refused(
    box: Path,
    config: Config,
    system_user: pwd.struct_passwd,
    other_user: pwd.struct_passwd,
    which: str,
) -> None:
    make_maildir(box, system_user)
    os.chown(box / which, other_user.pw_uid, other_user.pw_gid)
    with pytest.raises(DeliveryError) as e:
        deliver(box, b"Subject: x\n\ny\n", config, system_user)
    assert e.value.status == "4.2.0"
    assert "not owned by recipient" in e.value.reason
    assert listing(box) == {"tmp": [], "new": [], "cur": []}


def test_maildir_part_that_is_a_file_is_refused(
    box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    make_maildir(box, system_user)
    os.rmdir(box / "new")
    (box / "new").write_bytes(b"")
    with pytest.raises(DeliveryError) as e:
        deliver(box, b"Subject: x\n\ny\n", config, system_user)
    assert e.value.status.startswith("4.") and "not a directory" in e.value.reason
    assert os.listdir(box / "tmp") == []


class FailingMessage(io.RawIOBase):
    """A queued message whose storage fails after ``good`` bytes."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.good:
            raise OSError(errno.EIO, "Input/output error")
        n = min(size, self.good - self.pos)
        self.pos += n
        return b"x" * n


def test_read_error_leaves_no_file_behind(
    box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    deliver(box, b"Subject: ok\n\ny\n", config, system_user)
    before = listing(box)
    with pytest.raises(DeliveryError) as e:
        deliver(box, FailingMessage(3_000_000), config, system_user)
    assert e.value.status == "4.3.0"
    assert "cannot read queued message" in e.value.reason
    assert listing(box) == before


def test_full_disk_leaves_no_file_behind(
    tmp_path: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    with tmpfs(tmp_path, "1m") as mnt:
        path = mnt / "Maildir"
        deliver(path, b"Subject: 0\n\nbody\n", config, system_user)
        with pytest.raises(DeliveryError) as e:
            deliver(path, b"Subject: big\n\n" + b"y" * 2_000_000, config, system_user)
        assert e.value.status == "4.2.2"
        assert len(listing(path)["new"]) == 1 and listing(path)["tmp"] == []


@pytest.mark.interop
def test_s_nail_lists_the_maildir(
    tmp_path: Path, box: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    snail = need_tool("s-nail", "s-nail")
    for i in range(3):
        deliver(
            box, f"From: a@b.test\nSubject: maildir {i}\n\nFrom x\n".encode(), config, system_user
        )
    out = subprocess.run(
        [snail, "-N", "-H", "-f", f"maildir://{box}"],
        env={"MAILRC": "/dev/null", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    lines = sorted(ln for ln in out.stdout.decode().splitlines() if ln.strip())
    assert len(lines) == 3, out
    for i, line in enumerate(sorted(lines, key=lambda ln: ln.split()[-1])):
        assert f"maildir {i}" in line
