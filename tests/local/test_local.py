"""deliver_to_user: user lookup, name checks, mbox vs Maildir, and delivery without root."""

import grp
import io
import mailbox
import multiprocessing
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local.spool import deliver_to_user, valid_user_name
from tests.conftest import need_root

CTX = multiprocessing.get_context("fork")
MESSAGE = b"Subject: hello\n\nFrom the test\n"


def send(config: Config, user: str) -> str:
    return deliver_to_user(
        config, user, io.BytesIO(MESSAGE), sender="s@example.test", recipient=f"{user}@host"
    )


def as_user(user: pwd.struct_passwd, fn: Callable[[], object], groups: list[int]) -> object:
    """Run ``fn`` in a child that has dropped to ``user`` (plus ``groups``)."""
    parent, child = CTX.Pipe()

    def target() -> None:
        os.setgroups(groups)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        try:
            child.send(fn())
        except DeliveryError as e:
            child.send(("error", e.status, e.reason))

    proc = CTX.Process(target=target)
    proc.start()
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        pytest.fail("unprivileged delivery did not finish")
    assert parent.poll(), f"child died with exit code {proc.exitcode}"
    return parent.recv()




def with_spool(config_values: dict[str, object], spool: str) -> Config:
    return Config({**config_values, "mail_spool_directory": spool})


def test_delivers_to_the_users_mbox(
    spool: Path, config: Config, system_user: pwd.struct_passwd
) -> None:
    assert send(config, system_user.pw_name) == "delivered to mailbox"
    assert send(config, system_user.pw_name) == "delivered to mailbox"
    path = spool / system_user.pw_name
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid) == (system_user.pw_uid, grp.getgrnam("mail").gr_gid)
    assert stat.S_IMODE(st.st_mode) == 0o660
    got = list(mailbox.mbox(str(path), create=False))
    assert [m["Delivered-To"] for m in got] == [f"{system_user.pw_name}@host"] * 2
    assert got[0].get_payload() == ">From the test\n"
    assert sorted(os.listdir(spool)) == [system_user.pw_name]


def test_delivers_to_maildir_when_spool_path_ends_with_slash(
    spool: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    config = with_spool(config_values, str(spool) + "/")
    assert send(config, system_user.pw_name) == "delivered to maildir"
    md = mailbox.Maildir(str(spool / system_user.pw_name), factory=None, create=False)
    (key,) = md.keys()
    assert md.get_bytes(key).endswith(MESSAGE)
    assert os.stat(spool / system_user.pw_name).st_uid == system_user.pw_uid


def test_unknown_user_is_permanent(spool: Path, config: Config) -> None:
    with pytest.raises(DeliveryError) as e:
        send(config, "nosuchuser_pmt")
    assert e.value.status == "5.1.1"
    assert e.value.reason == 'unknown user: "nosuchuser_pmt"'
    assert os.listdir(spool) == []


@pytest.mark.parametrize(
    "name", ["..", ".", "a/b", "../../etc/x", "Root", "", "-x", "a b", "x\n", "ro\0ot", "é"]
)
def test_unsafe_user_names_are_refused(
    tmp_path: Path, spool: Path, config: Config, name: str
) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DeliveryError) as e:
        send(config, name)
    assert e.value.status == "5.1.3"
    assert "\n" not in e.value.reason and "\0" not in e.value.reason
    assert os.listdir(spool) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_user_name_rule() -> None:
    assert valid_user_name("alice") and valid_user_name("_apt") and valid_user_name("a.b-c_1")
    assert not valid_user_name("1alice") and not valid_user_name("..")


def test_root_is_delivered_like_anyone(spool: Path, config: Config) -> None:
    need_root()
    assert send(config, "root") == "delivered to mailbox"
    assert os.stat(spool / "root").st_uid == 0


def test_unprivileged_cannot_create_mailbox_leaves_it_to_root(
    open_spool: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    config = with_spool(config_values, str(open_spool))
    result = as_user(system_user, lambda: send(config, system_user.pw_name), [])
    assert isinstance(result, tuple) and result[:2] == ("error", "4.3.0")
    assert "root-run queue runner will deliver it" in result[2]
    assert os.listdir(open_spool) == []


def test_unprivileged_delivery_to_own_mailbox_uses_fcntl_only(
    open_spool: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    """The spool is not writable for a dotlock (EACCES): fcntl alone, like Python's mailbox."""
    config = with_spool(config_values, str(open_spool))
    path = open_spool / system_user.pw_name
    path.write_bytes(b"")
    os.chown(path, system_user.pw_uid, system_user.pw_gid)
    os.chmod(path, 0o600)
    result = as_user(system_user, lambda: send(config, system_user.pw_name), [])
    assert result == "delivered to mailbox"
    assert sorted(os.listdir(open_spool)) == [system_user.pw_name]
    assert len(mailbox.mbox(str(path), create=False)) == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unprivileged_with_mail_group_creates_user_mail_0660(
    open_spool: Path, config_values: dict[str, object], system_user: pwd.struct_passwd
) -> None:
    """A setgid-mail style caller may create its own mailbox in the 2775 spool."""
    config = with_spool(config_values, str(open_spool))
    mail_gid = grp.getgrnam("mail").gr_gid
    result = as_user(system_user, lambda: send(config, system_user.pw_name), [mail_gid])
    assert result == "delivered to mailbox"
    st = os.stat(open_spool / system_user.pw_name)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        system_user.pw_uid,
        mail_gid,
        0o660,
    )
    assert sorted(os.listdir(open_spool)) == [system_user.pw_name]


def test_unprivileged_cannot_write_someone_elses_mailbox(
    open_spool: Path,
    config_values: dict[str, object],
    system_user: pwd.struct_passwd,
    other_user: pwd.struct_passwd,
) -> None:
    config = with_spool(config_values, str(open_spool))
    path = open_spool / other_user.pw_name
    path.write_bytes(b"")
    os.chown(path, other_user.pw_uid, grp.getgrnam("mail").gr_gid)
    os.chmod(path, 0o660)
    result = as_user(system_user, lambda: send(config, other_user.pw_name), [])
    assert isinstance(result, tuple) and result[:2] == ("error", "4.3.0")
    assert path.read_bytes() == b""
