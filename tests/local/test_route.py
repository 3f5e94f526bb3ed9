"""Local routing with real alias files, real users and real .forward files."""

import io
import logging
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import route
from pymailtools.local.targets import Command, File, Mailbox, Remote
from tests.conftest import need_root

User = pwd.struct_passwd


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="pmt-route-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_aliases(config: Config, text: str, *, mode: int = 0o644, owner: int = 0) -> Path:
    path = Path(config.alias_maps[0])
    path.write_text(text)
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, owner, 0)
    return path


def write_owned(path: Path, text: str, user: User, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def failure(config: Config, address: str) -> DeliveryError:
    with pytest.raises(DeliveryError) as e:
        route.resolve(config, address)
    return e.value


# -- is_local and remote -----------------------------------------------------------------------

def test_is_local(config: Config) -> None:
    assert route.is_local(config, "alice")
    assert route.is_local(config, "alice@host.example.test")
    assert route.is_local(config, "alice@HOST.example.test.")
    assert route.is_local(config, "alice@localhost")
    assert not route.is_local(config, "alice@example.com")
    assert not route.is_local(config, '"a@host.example.test"@example.com')


def test_remote_address_is_handed_on(config: Config) -> None:
    assert route.resolve(config, "bob@example.com") == [Remote("bob@example.com")]


# -- users -------------------------------------------------------------------------------------

def test_local_user_gets_mailbox(config: Config, system_user: User) -> None:
    name = system_user.pw_name
    assert route.resolve(config, name) == [Mailbox(name)]
    assert route.resolve(config, f"{name.upper()}@Host.Example.Test") == [Mailbox(name)]
    assert route.resolve(config, f'"{name}"@localhost') == [Mailbox(name)]


def test_unknown_user_is_5_1_1(config: Config) -> None:
    e = failure(config, "nosuchuser9z@host.example.test")
    assert (e.status, e.reason) == ("5.1.1", 'unknown user: "nosuchuser9z"')


@pytest.mark.parametrize("local", ["../../etc/x", "..", ".", "a/b", "-x", "user%other.test",
                                   "other.test!victim", "", "a b"])
def test_user_names_are_validated_never_paths(config: Config, local: str) -> None:
    address = f'"{local}"@localhost' if " " in local else f"{local}@localhost"
    e = failure(config, address)
    assert e.status == "5.1.3"


def test_alias_to_a_path_like_name_is_refused(config: Config) -> None:
    write_aliases(config, "alice: ../../etc/x\n")
    assert failure(config, "alice").status == "5.1.3"



def test_refused_name_is_quoted_safely(config: Config) -> None:
    """The reason goes into the log and the bounce: a quote in the name cannot end it early."""
    write_aliases(config, 'alice: "bad\\"name"\n')
    e = failure(config, "alice")
    assert (e.status, e.reason) == ("5.1.3", 'invalid user name: "bad?name"')


# -- aliases -----------------------------------------------------------------------------------

def test_alias_expansion(config: Config, system_user: User, other_user: User) -> None:
    a, b = system_user.pw_name, other_user.pw_name
    write_aliases(config, f"root: staff\nStaff: {a}, {b}@localhost,\n  ext@example.com\n")
    assert route.resolve(config, "root@host.example.test") == [
        Mailbox(a), Mailbox(b), Remote("ext@example.com")]


def test_duplicates_are_removed_and_diamonds_are_not_loops(config: Config,
                                                           system_user: User) -> None:
    u = system_user.pw_name
    write_aliases(config, f"all: x, y, {u}\nx: {u}\ny: {u}, x\n")
    assert route.resolve(config, "all") == [Mailbox(u)]


def test_alias_loop_is_5_4_6(config: Config) -> None:
    write_aliases(config, "a: b\nb: a\n")
    e = failure(config, "a@localhost")
    assert e.status == "5.4.6"
    assert "loop" in e.reason
    write_aliases(config, "a: b\nb: c\nc: a, b\n")
    assert failure(config, "a").status == "5.4.6"


def test_alias_to_itself_means_its_mailbox(config: Config, system_user: User) -> None:
    u = system_user.pw_name
    write_aliases(config, f"{u}: {u}, copy@example.com\n")
    assert route.resolve(config, u) == [Mailbox(u), Remote("copy@example.com")]


def test_backslash_user_skips_aliases(config: Config, system_user: User) -> None:
    u = system_user.pw_name
    write_aliases(config, f"{u}: \\{u}, \\archive@example.com\nlist: \\{u}\n")
    assert route.resolve(config, u) == [Mailbox(u), Remote("archive@example.com")]


def test_expansion_deeper_than_20_is_5_4_6(config: Config, system_user: User) -> None:
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(25))
    write_aliases(config, chain + f"a25: {system_user.pw_name}\n")
    assert failure(config, "a0").status == "5.4.6"
    assert route.resolve(config, "a10") == [Mailbox(system_user.pw_name)]


def test_alias_to_unknown_user(config: Config) -> None:
    write_aliases(config, "postmaster: nosuchuser9z\n")
    e = failure(config, "postmaster")
    assert (e.status, e.reason) == ("5.1.1", 'unknown user: "nosuchuser9z"')


def test_bad_address_in_alias(config: Config) -> None:
    write_aliases(config, "a: -oQ/tmp@example.com\n")
    assert failure(config, "a").status == "5.1.3"


def test_root_owned_alias_commands_and_files_run_as_nobody(config: Config) -> None:
    need_root()
    write_aliases(config, 'log: |/usr/bin/logger -t mail, /var/tmp/mail.log\n'
                          'q: "|/usr/bin/foo \'a b\'"\n')
    nobody = pwd.getpwnam("nobody")
    home = nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/"
    assert route.resolve(config, "log") == [
        Command(("/usr/bin/logger", "-t", "mail"), nobody.pw_uid, nobody.pw_gid, home),
        File("/var/tmp/mail.log", nobody.pw_uid, nobody.pw_gid),
    ]
    assert route.resolve(config, "q")[0].argv == ("/usr/bin/foo", "a b")  # type: ignore


def test_command_in_user_owned_alias_file_is_not_run(config: Config, system_user: User,
                                                    shared_dir: Path) -> None:
    """An alias file an ordinary user owns must not give that user (or anyone) a command."""
    need_root()
    marker = shared_dir / "ran"
    write_aliases(config, f'evil: "|/usr/bin/touch {marker}"\n', owner=system_user.pw_uid)
    e = failure(config, "evil")
    assert e.status == "5.7.1"
    assert "restricted" in e.reason
    assert not marker.exists()


def test_file_in_user_owned_alias_file_is_refused(config: Config, system_user: User) -> None:
    need_root()
    write_aliases(config, "evil: /etc/passwd\n", owner=system_user.pw_uid)
    assert failure(config, "evil").status == "5.7.1"


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_writable_root_alias_file_gives_no_commands_or_files(config: Config, mode: int,
                                                            system_user: User) -> None:
    need_root()
    write_aliases(config, f"c: |/usr/bin/true\nf: /tmp/x\nok: {system_user.pw_name}\n",
                  mode=mode)
    assert failure(config, "c").status == "5.7.1"
    assert failure(config, "f").status == "5.7.1"
    assert route.resolve(config, "ok") == [Mailbox(system_user.pw_name)]


def test_allow_mail_to_settings(config_values: dict[str, object]) -> None:
    need_root()
    config = Config({**config_values, "allow_mail_to_commands": [],
                     "allow_mail_to_files": "forward"})
    write_aliases(config, "c: |/usr/bin/true\nf: /tmp/x\n")
    assert "allow_mail_to_commands" in failure(config, "c").reason
    assert failure(config, "f").status == "5.7.1"


def test_shell_syntax_in_a_trusted_alias_is_refused(config: Config) -> None:
    need_root()
    write_aliases(config, 'c: "|/usr/bin/env > /tmp/env.txt"\n')
    e = failure(config, "c")
    assert e.status == "5.3.5" and "shell" in e.reason


# -- :include: ---------------------------------------------------------------------------------

def test_include(config: Config, tmp_path: Path, system_user: User, other_user: User) -> None:
    members = tmp_path / "members"
    members.write_text(f"# list members\n{system_user.pw_name}\n{other_user.pw_name}, "
                       "ext@example.com\n")
    write_aliases(config, f"list: :include:{members}\n")
    assert route.resolve(config, "list") == [
        Mailbox(system_user.pw_name), Mailbox(other_user.pw_name), Remote("ext@example.com")]


@pytest.mark.parametrize("line", ["|/usr/bin/true", "/tmp/file", '"|/usr/bin/true"'])
def test_include_never_gives_commands_or_files(config: Config, tmp_path: Path,
                                               line: str) -> None:
    members = tmp_path / "members"
    members.write_text(line + "\n")
    write_aliases(config, f"list: :include:{members}\n")
    e = failure(config, "list")
    assert e.status == "5.7.1" and ":include:" in e.reason


def test_include_problems(config: Config, tmp_path: Path) -> None:
    members = tmp_path / "members"
    write_aliases(config, f"list: :include:{members}\nrel: :include:relative/path\n")
    assert failure(config, "list").status.startswith("4.")  # missing: wait for the admin
    members.write_text("someone@example.com\n")
    os.chmod(members, 0o666)
    e = failure(config, "list")
    assert e.status.startswith("4.") and "world writable" in e.reason
    os.chmod(members, 0o664)  # a group-maintained list is fine: it can only hold addresses
    assert route.resolve(config, "list") == [Remote("someone@example.com")]
    members.write_text(f":include:{members}\n")
    assert failure(config, "list").status == "5.4.6"
    assert failure(config, "rel").status == "5.3.5"


# -- .forward ----------------------------------------------------------------------------------

def test_forward(config: Config, system_user: User, other_user: User) -> None:
    home = Path(system_user.pw_dir)
    write_owned(home / ".forward", f"# keep a copy\n\\{system_user.pw_name}\n"
                                   f"{other_user.pw_name}, away@example.com\n", system_user)
    assert route.resolve(config, system_user.pw_name) == [
        Mailbox(system_user.pw_name), Mailbox(other_user.pw_name), Remote("away@example.com")]


def test_forward_naming_yourself_means_your_mailbox(config: Config, system_user: User) -> None:
    u = system_user.pw_name
    write_owned(Path(system_user.pw_dir) / ".forward", f"{u}@localhost\n", system_user)
    assert route.resolve(config, u) == [Mailbox(u)]


def test_empty_forward_means_mailbox(config: Config, system_user: User) -> None:
    write_owned(Path(system_user.pw_dir) / ".forward", "# nothing\n\n", system_user)
    assert route.resolve(config, system_user.pw_name) == [Mailbox(system_user.pw_name)]


def test_forward_commands_and_files_run_as_the_user(config: Config, system_user: User) -> None:
    home = system_user.pw_dir
    write_owned(Path(home) / ".forward",
                '"|/usr/bin/procmail -f-", /var/tmp/archive\n', system_user)
    assert route.resolve(config, system_user.pw_name) == [
        Command(("/usr/bin/procmail", "-f-"), system_user.pw_uid, system_user.pw_gid, home),
        File("/var/tmp/archive", system_user.pw_uid, system_user.pw_gid),
    ]


def test_forward_owned_by_root_is_honoured(config: Config, system_user: User) -> None:
    path = Path(system_user.pw_dir) / ".forward"
    path.write_text("elsewhere@example.com\n")
    os.chmod(path, 0o644)
    assert route.resolve(config, system_user.pw_name) == [Remote("elsewhere@example.com")]


def test_forward_owned_by_another_user_is_ignored(config: Config, system_user: User,
                                                  other_user: User,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    write_owned(Path(system_user.pw_dir) / ".forward", "|/usr/bin/true\n", other_user)
    with caplog.at_level(logging.WARNING, "pymailtools"):
        assert route.resolve(config, system_user.pw_name) == [Mailbox(system_user.pw_name)]
    assert "bad owner" in caplog.text


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_writable_forward_is_ignored(config: Config, system_user: User, mode: int,
                                     caplog: pytest.LogCaptureFixture) -> None:
    write_owned(Path(system_user.pw_dir) / ".forward", "|/usr/bin/true\n", system_user, mode)
    with caplog.at_level(logging.WARNING, "pymailtools"):
        assert route.resolve(config, system_user.pw_name) == [Mailbox(system_user.pw_name)]
    assert "writable" in caplog.text


def test_forward_that_is_not_a_file_is_ignored(config: Config, system_user: User) -> None:
    (Path(system_user.pw_dir) / ".forward").mkdir()
    assert route.resolve(config, system_user.pw_name) == [Mailbox(system_user.pw_name)]


def test_forward_is_read_with_the_users_permissions(config: Config, system_user: User,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Root may read a root-owned 0600 .forward; the user may not, so it does not count."""
    path = Path(system_user.pw_dir) / ".forward"
    path.write_text("elsewhere@example.com\n")
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, "pymailtools"):
        assert route.resolve(config, system_user.pw_name) == [Mailbox(system_user.pw_name)]
    assert "Permission denied" in caplog.text


def test_forward_include_is_read_as_the_user(config: Config, system_user: User,
                                             shared_dir: Path) -> None:
    secret = shared_dir / "shadow"
    secret.write_text("root:$6$secrethash:19000:0:99999:7:::\n")
    os.chmod(secret, 0o600)
    write_owned(Path(system_user.pw_dir) / ".forward", f":include:{secret}\n", system_user)
    e = failure(config, system_user.pw_name)
    assert e.status.startswith("4.") and "Permission denied" in e.reason
    assert "secrethash" not in e.reason


def test_forward_loop_between_users(config: Config, system_user: User,
                                    other_user: User) -> None:
    write_owned(Path(system_user.pw_dir) / ".forward", other_user.pw_name + "\n", system_user)
    write_owned(Path(other_user.pw_dir) / ".forward", system_user.pw_name + "\n", other_user)
    assert failure(config, system_user.pw_name).status == "5.4.6"


def test_alias_to_self_still_reads_forward(config: Config, system_user: User) -> None:
    u = system_user.pw_name
    write_aliases(config, f"{u}: {u}\n")
    write_owned(Path(system_user.pw_dir) / ".forward", "fwd@example.com\n", system_user)
    assert route.resolve(config, u) == [Remote("fwd@example.com")]


def test_forward_path_variables(config_values: dict[str, object], system_user: User,
                                shared_dir: Path) -> None:
    need_root()
    forwards = shared_dir / "forwards"
    forwards.mkdir()
    os.chmod(forwards, 0o755)
    config = Config({**config_values,
                     "forward_path": [f"{forwards}/$user", "${home}/.forward"]})
    write_owned(forwards / system_user.pw_name, "first@example.com\n", system_user)
    write_owned(Path(system_user.pw_dir) / ".forward", "second@example.com\n", system_user)
    assert route.resolve(config, system_user.pw_name) == [Remote("first@example.com")]
    (forwards / system_user.pw_name).unlink()
    assert route.resolve(config, system_user.pw_name) == [Remote("second@example.com")]


# -- explain (sendmail -bv) --------------------------------------------------------------------

def test_explain(config: Config, system_user: User) -> None:
    u = system_user.pw_name
    write_aliases(config, f"root: {u}\nlist: {u}, ext@example.com\n")
    spool = config.mail_spool_directory
    assert route.explain(config, f"{u}@host.example.test") == (
        f"{u}@host.example.test: deliverable: local mailbox {spool}/{u}")
    assert route.explain(config, "root") == f"root: aliased to {u}"
    assert route.explain(config, "list") == f"list: aliased to {u}, ext@example.com"
    with pytest.raises(ValueError):
        route.explain(config, "x@example.com")
    write_owned(Path(system_user.pw_dir) / ".forward", "away@example.com\n", system_user)
    assert route.explain(config, u) == f"{u}: forwarded to away@example.com"
    with pytest.raises(DeliveryError) as e:
        route.explain(config, "nosuchuser9z")
    assert e.value.status == "5.1.1"


# -- Delivered-To loops ------------------------------------------------------------------------

MESSAGE = (b"Received: from x\r\n"
           b"Delivered-To: other@host.example.test\r\n"
           b"DELIVERED-TO:\r\n <Alice@Host.Example.Test>\r\n"
           b"Subject: hi\r\n"
           b"\r\n"
           b"Delivered-To: bob@host.example.test\r\n")


def test_delivered_to_loop() -> None:
    msg = io.BytesIO(MESSAGE)
    msg.seek(5)
    assert route.delivered_to_loop(msg, "alice@host.example.test")
    assert msg.tell() == 5  # position restored
    assert route.delivered_to_loop(msg, "other@HOST.example.test")
    assert not route.delivered_to_loop(msg, "bob@host.example.test")  # body, not header
    assert not route.delivered_to_loop(msg, "carol@host.example.test")
    assert not route.delivered_to_loop(io.BytesIO(b""), "alice")


def test_delivered_to_loop_last_header_and_long_lines() -> None:
    assert route.delivered_to_loop(io.BytesIO(b"Subject: x\nDelivered-To: a@b\n"), "a@b")
    # A header-like text inside an over-long line is not a header.
    long = b"X-Long: " + b"y" * 9000 + b"Delivered-To: a@b\n\nbody\n"
    assert not route.delivered_to_loop(io.BytesIO(long), "a@b")


def test_delivered_to_found_past_the_first_read_and_in_a_small_message() -> None:
    # A header block longer than the quick first look is still searched line by line.
    header = b"".join(b"X-Filler-%d: %s\n" % (i, b"z" * 200) for i in range(400))
    assert route.delivered_to_loop(io.BytesIO(header + b"Delivered-To: a@b\n\nbody\n"), "a@b")
    assert not route.delivered_to_loop(io.BytesIO(header + b"\nDelivered-To: a@b\n"), "a@b")
    small = io.BytesIO(b"Subject: x\n\nDelivered-To: a@b\n")
    small.seek(3)
    assert not route.delivered_to_loop(small, "a@b")
    assert small.tell() == 3


def test_delivered_to_scan_is_bounded() -> None:
    header = b"".join(b"X-Filler-%d: %s\n" % (i, b"z" * 200) for i in range(10000))
    msg = io.BytesIO(header + b"Delivered-To: a@b\n\n")
    assert not route.delivered_to_loop(msg, "a@b")
