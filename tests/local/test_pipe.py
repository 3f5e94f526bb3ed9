"""Commands and files as delivery targets: real processes, real users, real files."""

import hashlib
import io
import json
import mailbox
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.errors import DeliveryError
from pymailtools.local import pipe, route
from pymailtools.local.targets import Command, File
from tests.conftest import need_root

User = pwd.struct_passwd
PY = "/usr/bin/python3"
MESSAGE = b"From: sender@example.com\nSubject: test\n\nhello\nFrom the body\n"

# Written by the .forward program: who it ran as, where, with what environment and fds.
PROBE = """\
import json, os, sys
fds = []
for fd in range(1024):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
# The environment as exec'd: os.environ may have LC_CTYPE added by Python itself (PEP 538).
with open("/proc/self/environ", "rb") as f:
    env = dict(item.decode().split("=", 1) for item in f.read().split(b"\\0") if item)
report = {
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cwd": os.getcwd(), "env": env, "fds": fds, "argv": sys.argv,
    "stdin": sys.stdin.buffer.read().decode(), "sid": os.getsid(0) == os.getpid(),
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable directory for commands running as other users (tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="pmt-pipe-", dir="/tmp"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nobody_cmd(*argv: str) -> Command:
    pw = pwd.getpwnam("nobody")
    return Command(tuple(argv), pw.pw_uid, pw.pw_gid, "/")


def run(cmd: Command, config: Config, message: bytes = MESSAGE, **kw: str) -> None:
    pipe.run_command(cmd, io.BytesIO(message), sender=kw.get("sender", "s@example.com"),
                     recipient=kw.get("recipient", "r@host.example.test"), config=config)


def run_error(cmd: Command, config: Config, message: bytes = MESSAGE) -> DeliveryError:
    with pytest.raises(DeliveryError) as e:
        run(cmd, config, message)
    return e.value


# -- a .forward program: run as its user, clean environment and descriptors ------------------

def test_forward_command_runs_as_user_with_clean_env_and_fds(
        config: Config, system_user: User, spool: Path) -> None:
    home = Path(system_user.pw_dir)
    probe = home / "probe.py"
    probe.write_text(PROBE)
    out = home / "report.json"
    fwd = home / ".forward"
    fwd.write_text(f'"|{PY} {probe} {out}"\n')
    os.chown(fwd, system_user.pw_uid, system_user.pw_gid)
    # An fd of ours that is not close-on-exec must still not reach the command.
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_w, True)
    try:
        (target,) = route.resolve(config, system_user.pw_name + "@host.example.test")
        assert isinstance(target, Command)
        msg = io.BytesIO(MESSAGE)
        msg.read()  # run_command must rewind
        pipe.run_command(target, msg, sender="s@example.com",
                         recipient=f"{system_user.pw_name}@host.example.test", config=config)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    report = json.loads(out.read_text())
    assert report["uid"] == report["euid"] == system_user.pw_uid != 0
    assert report["gid"] == system_user.pw_gid
    assert set(report["groups"]) <= {system_user.pw_gid}  # root's groups are not inherited
    assert report["cwd"] == system_user.pw_dir
    assert sorted(report["env"]) == ["HOME", "LOGNAME", "PATH", "RECIPIENT", "SENDER", "SHELL",
                                      "USER"]
    assert report["env"]["HOME"] == system_user.pw_dir
    assert report["env"]["USER"] == report["env"]["LOGNAME"] == system_user.pw_name
    assert report["env"]["SHELL"] == system_user.pw_shell
    assert report["env"]["PATH"] == "/usr/bin:/bin"
    assert report["env"]["SENDER"] == "s@example.com"
    assert report["env"]["RECIPIENT"] == f"{system_user.pw_name}@host.example.test"
    assert report["fds"] == [0, 1, 2]
    assert report["argv"] == [str(probe), str(out)]  # sender/recipient never on the command line
    assert report["stdin"] == MESSAGE.decode()
    assert report["sid"]  # its own session: a timeout kills its whole process group


def test_root_alias_command_runs_as_nobody(config: Config, shared_dir: Path) -> None:
    need_root()
    probe = shared_dir / "probe.py"
    probe.write_text(PROBE)
    os.chmod(probe, 0o644)
    out = shared_dir / "report.json"
    path = Path(config.alias_maps[0])
    path.write_text(f'log: "|{PY} {probe} {out}"\n')
    os.chmod(path, 0o644)
    (target,) = route.resolve(config, "log")
    run(target, config)  # type: ignore[arg-type]
    report = json.loads(out.read_text())
    nobody = pwd.getpwnam("nobody")
    assert (report["uid"], report["gid"]) == (nobody.pw_uid, nobody.pw_gid)
    assert report["env"]["USER"] == "nobody"
    assert report["fds"] == [0, 1, 2]


# -- exit status mapping ---------------------------------------------------------------------

@pytest.mark.parametrize(("code", "status"), [
    (75, "4.3.0"), (71, "4.3.0"), (64, "5.3.0"), (65, "5.6.0"), (66, "5.3.0"), (67, "5.1.1"),
    (68, "5.1.2"), (69, "5.3.0"), (70, "5.3.0"), (73, "5.2.0"), (76, "5.5.0"), (77, "5.7.0"),
    (78, "5.3.5"), (1, "5.3.0"), (2, "5.3.0"), (100, "5.3.0"),
])
def test_exit_status_mapping(config: Config, code: int, status: str) -> None:
    need_root()
    e = run_error(nobody_cmd(PY, "-c", f"import sys; sys.exit({code})"), config)
    assert e.status == status
    assert f"status {code}" in e.reason
    if code not in pipe.SYS_EXITS:
        assert e.reason.startswith(f"unknown mail system error {code}")


def test_exit_zero_is_success(config: Config) -> None:
    need_root()
    run(nobody_cmd(PY, "-c", "import sys; sys.stdin.read()"), config)


def test_output_is_kept_bounded_in_one_line(config: Config) -> None:
    need_root()
    script = "import sys; print('line one'); print('\\x1b[31mtwo'); print('x' * 100000); " \
             "sys.exit(67)"
    e = run_error(nobody_cmd(PY, "-c", script), config)
    assert e.status == "5.1.1"
    assert "line one \\x1b[31mtwo" in e.reason
    assert "\n" not in e.reason and "\x1b" not in e.reason
    assert len(e.reason) < pipe.OUTPUT_LIMIT + 200


def test_enhanced_status_in_output_wins_within_its_class(config: Config) -> None:
    need_root()
    e = run_error(nobody_cmd(PY, "-c", "print('5.2.2 mailbox full'); exit(1)"), config)
    assert e.status == "5.2.2"
    e = run_error(nobody_cmd(PY, "-c", "print('4.2.2 over quota'); exit(1)"), config)
    assert e.status == "5.3.0"  # a failed exit status cannot turn into a temporary error here
    e = run_error(nobody_cmd(PY, "-c", "print('4.2.2 over quota'); exit(75)"), config)
    assert e.status == "4.2.2"


def test_killed_by_signal_is_temporary(config: Config) -> None:
    need_root()
    e = run_error(nobody_cmd(PY, "-c", "import os; os.kill(os.getpid(), 9)"), config)
    assert e.status == "4.3.0" and "signal 9" in e.reason


def test_time_limit_kills_the_process_group(config_values: dict[str, object],
                                            shared_dir: Path) -> None:
    need_root()
    config = Config({**config_values, "command_time_limit": 1})
    pidfile = shared_dir / "grandchild"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen(['/bin/sleep', '60']); open({str(pidfile)!r}, 'w')"
              ".write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    e = run_error(nobody_cmd(PY, "-c", script), config)
    assert time.monotonic() - start < 10
    assert e.status.startswith("4.") and "time limit" in e.reason
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # A killed child of a killed parent is reaped by init; give it a moment.
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the command's child survived the time limit")


def test_large_message_is_streamed(config: Config, shared_dir: Path) -> None:
    need_root()
    body = b"".join(b"line %08d of a big message\n" % i for i in range(1_000_000))  # ~29 MB
    out = shared_dir / "digest"
    script = ("import hashlib, sys; h = hashlib.sha256(); "
              "[h.update(b) for b in iter(lambda: sys.stdin.buffer.read(65536), b'')]; "
              f"print('chatter ' * 50000); open({str(out)!r}, 'w').write(h.hexdigest())")
    run(nobody_cmd(PY, "-c", script), config, body)
    assert out.read_text() == hashlib.sha256(body).hexdigest()


def test_command_that_ignores_its_input_succeeds(config: Config) -> None:
    need_root()
    run(nobody_cmd("/bin/true"), config, b"x" * (5 << 20))


def test_command_that_cannot_be_executed(config: Config, tmp_path: Path) -> None:
    need_root()
    e = run_error(nobody_cmd("/nonexistent/program"), config)
    assert e.status == "5.3.0" and "cannot execute" in e.reason
    script = tmp_path / "noexec"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o644)
    assert run_error(nobody_cmd(str(script)), config).status == "5.3.0"


def test_missing_home_directory_is_temporary(config: Config) -> None:
    need_root()
    cmd = nobody_cmd("/bin/true")._replace(home="/nonexistent/home")
    e = run_error(cmd, config)
    assert e.status == "4.3.0" and "/nonexistent/home" in e.reason


def test_relative_command_is_refused(config: Config) -> None:
    assert run_error(Command(("true",), os.geteuid(), os.getegid(), "/"), config).status \
        == "5.3.5"


def test_unprivileged_cannot_run_as_someone_else(config: Config, system_user: User,
                                                 other_user: User) -> None:
    def attempt() -> bytes:
        run(Command(("/bin/true",), other_user.pw_uid, other_user.pw_gid, "/"), config)
        return b""

    with pytest.raises(DeliveryError) as e:
        pipe.call_as(system_user.pw_uid, system_user.pw_gid, attempt)
    assert e.value.status.startswith("4.") and "root" in e.value.reason


# -- /file delivery ----------------------------------------------------------------------------

def test_file_delivery_to_root_only_file_fails_and_leaves_it_alone(
        config: Config, system_user: User, shared_dir: Path) -> None:
    """Refused, with a stand-in for /etc/shadow: root-owned 0600 in a directory users can enter."""
    os.chmod(shared_dir, 0o755)
    shadow = shared_dir / "shadow"
    shadow.write_text("root:$6$hash:19000:0:99999:7:::\n")
    os.chmod(shadow, 0o600)
    before = shadow.read_bytes()
    fwd = Path(system_user.pw_dir) / ".forward"
    fwd.write_text(f"{shadow}\n")
    os.chown(fwd, system_user.pw_uid, system_user.pw_gid)
    (target,) = route.resolve(config, system_user.pw_name)
    assert target == File(str(shadow), system_user.pw_uid, system_user.pw_gid)
    with pytest.raises(DeliveryError) as e:
        pipe.deliver_file(target, io.BytesIO(MESSAGE), sender="s@example.com",
                          recipient=system_user.pw_name, config=config)
    assert e.value.permanent and "cannot open" in e.value.reason
    assert shadow.read_bytes() == before
    assert not (shared_dir / "shadow.lock").exists()


def test_file_delivery_creates_file_as_the_user(config: Config, system_user: User) -> None:
    path = Path(system_user.pw_dir) / "archive"
    target = File(str(path), system_user.pw_uid, system_user.pw_gid)
    for _ in range(2):
        msg = io.BytesIO(MESSAGE)
        msg.read()
        pipe.deliver_file(target, msg, sender="s@example.com",
                          recipient=f"{system_user.pw_name}@host.example.test", config=config)
    st = path.stat()
    assert st.st_uid == system_user.pw_uid
    box = mailbox.mbox(str(path))
    assert len(box) == 2
    assert box[0].get_payload() == "hello\n>From the body\n"  # mboxrd quoting
    assert box[1]["Subject"] == "test"


def test_file_delivery_where_user_cannot_create(config: Config, system_user: User,
                                                shared_dir: Path) -> None:
    os.chmod(shared_dir, 0o755)
    target = File(str(shared_dir / "new"), system_user.pw_uid, system_user.pw_gid)
    with pytest.raises(DeliveryError) as e:
        pipe.deliver_file(target, io.BytesIO(MESSAGE), sender="", recipient="x", config=config)
    assert e.value.permanent
    assert not (shared_dir / "new").exists()


def test_file_delivery_to_dev_null(config: Config) -> None:
    pw = pwd.getpwnam("nobody")
    pipe.deliver_file(File("/dev/null", pw.pw_uid, pw.pw_gid), io.BytesIO(MESSAGE),
                      sender="", recipient="x", config=config)


def test_file_delivery_as_root(config: Config, tmp_path: Path) -> None:
    need_root()
    path = tmp_path / "root-archive"
    pipe.deliver_file(File(str(path), 0, 0), io.BytesIO(MESSAGE), sender="s@example.com",
                      recipient="root", config=config)
    assert len(mailbox.mbox(str(path))) == 1


# -- call_as -----------------------------------------------------------------------------------

def test_call_as_runs_with_the_users_ids(system_user: User) -> None:
    need_root()
    got = pipe.call_as(system_user.pw_uid, system_user.pw_gid,
                       lambda: f"{os.getuid()} {os.getgid()} {os.getgroups()}".encode())
    assert got.decode() == f"{system_user.pw_uid} {system_user.pw_gid} []"


def test_call_as_reports_errors(system_user: User) -> None:
    need_root()

    def os_error() -> bytes:
        raise FileNotFoundError(2, "No such file or directory", "/x")

    def bug() -> bytes:
        raise ValueError("oops")

    with pytest.raises(FileNotFoundError) as e:
        pipe.call_as(system_user.pw_uid, system_user.pw_gid, os_error)
    assert e.value.filename == "/x"
    with pytest.raises(DeliveryError) as d:
        pipe.call_as(system_user.pw_uid, system_user.pw_gid, bug)
    assert d.value.status == "4.3.0" and "oops" in d.value.reason


def test_background_child_holding_the_pipes_is_not_waited_for(config: Config,
                                                              shared_dir: Path) -> None:
    need_root()
    pidfile = shared_dir / "pid"
    script = ("import subprocess; p = subprocess.Popen(['/bin/sleep', '30'], "
              "stdin=subprocess.DEVNULL, start_new_session=True); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))")
    start = time.monotonic()
    try:
        run(nobody_cmd(PY, "-c", script), config)
        assert time.monotonic() - start < 10
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
