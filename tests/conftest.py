"""Shared fixtures: a private queue and spool, real system users, and interop tool lookup."""

import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from pymailtools.config import Config
from tests.support.dns import TestDNS, start_dns
from tests.support.smtp import Certs

REQUIRE_INTEROP = os.environ.get("PYMAILTOOLS_REQUIRE_INTEROP") == "1"
BIN = Path(sys.executable).parent


def missing(msg: str) -> NoReturn:
    """Something a test needs is not here: skip locally, fail in CI
    (PYMAILTOOLS_REQUIRE_INTEROP=1), where it must be."""
    if REQUIRE_INTEROP:
        pytest.fail(msg + " but PYMAILTOOLS_REQUIRE_INTEROP=1")
    pytest.skip(msg)


def need_tool(name: str, package: str) -> str:
    """Path of a Debian tool; skip (locally) or fail (CI, PYMAILTOOLS_REQUIRE_INTEROP=1)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        missing(f"{name} not installed (apt-get install {package})")
    return path


@contextmanager
def tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A small real file system for full-disk tests (root only; skipped where it cannot be
    mounted), unmounted afterwards."""
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (creates system users, chowns mailboxes)")


def script(name: str) -> str:
    """The installed console script next to the running interpreter."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"console script {name} is not installed in {BIN} (pip install -e .)")
    return str(path)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A mail spool like Debian's /var/mail: root:mail 2775."""
    d = tmp_path / "spool"
    d.mkdir()
    if os.geteuid() == 0:
        import grp

        os.chown(d, 0, grp.getgrnam("mail").gr_gid)
        os.chmod(d, 0o2775)
    return d


@pytest.fixture
def config_values(tmp_path: Path, spool: Path) -> dict[str, object]:
    return {
        "queue_directory": str(tmp_path / "queue"),
        "mail_spool_directory": str(spool),
        "myhostname": "host.example.test",
        "mydestination": ["host.example.test", "host", "localhost"],
        "alias_maps": [str(tmp_path / "aliases")],
        "deliver_lock_delay": 0,
        "syslog": False,
        # Loopback only: a closed port, so no test ever asks a real resolver.
        "dns_nameservers": ["127.0.0.1:9"],
        "dns_timeout": 1,
    }


@pytest.fixture
def config(config_values: dict[str, object]) -> Config:
    return Config(config_values)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, values: dict[str, object]) -> Path:
    """A flat configuration file with ``values``."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def config_file(tmp_path: Path, config_values: dict[str, object],
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TOML file with the test settings, exported as PYMAILTOOLS_CONFIG."""
    path = write_toml(tmp_path / "config.toml", config_values)
    monkeypatch.setenv("PYMAILTOOLS_CONFIG", str(path))
    return path


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user can reach and write (pytest's tmp_path is root-only)."""
    need_root()
    d = Path(tempfile.mkdtemp(prefix="pmt-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_spool(world_dir: Path) -> Path:
    """A spool other users can reach: root:mail 2775, like Debian's /var/mail."""
    import grp

    spool = world_dir / "spool"
    spool.mkdir()
    os.chown(spool, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(spool, 0o2775)
    return spool


def run_as(user: pwd.struct_passwd, main: Callable[[], int], *, config: Path | None = None,
           stdin: Path | None = None, quiet: bool = False) -> int:
    """Run ``main()`` as ``user`` in a forked child and return its exit status.

    The venv's interpreter lives under /root, which other users cannot read: the child keeps
    the interpreter already loaded, so import every module ``main`` needs before calling this.
    """
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ["HOME"] = user.pw_dir
            if config is not None:
                os.environ["PYMAILTOOLS_CONFIG"] = str(config)
            if stdin is not None:
                os.dup2(os.open(stdin, os.O_RDONLY), 0)
                sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, closefd=False)))
            if quiet:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
                sys.stderr = open(os.devnull, "w")  # noqa: SIM115
            code = main()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _make_user() -> Iterator[pwd.struct_passwd]:
    need_root()
    name = "pmt" + uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture
def system_user() -> Iterator[pwd.struct_passwd]:
    """A real system user created for the test (root only) and removed afterwards."""
    yield from _make_user()


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A second real system user."""
    yield from _make_user()


class Sendmail:
    """Runs the installed sendmail console script against the test configuration."""

    def __init__(self, config_file: Path, queue_dir: Path) -> None:
        self.config_file = config_file
        self.queue_dir = queue_dir

    def __call__(self, *args: str, input: bytes = b"", mode: str = "queue",
                 env: dict[str, str] | None = None, timeout: float = 60,
                 user: str | None = None) -> subprocess.CompletedProcess[bytes]:
        e = dict(os.environ, PYMAILTOOLS_CONFIG=str(self.config_file),
                 PYMAILTOOLS_DELIVERY_MODE=mode)
        e.update(env or {})
        return subprocess.run([script("sendmail"), *args], input=input, capture_output=True,
                              timeout=timeout, env=e, user=user)

    def entries(self) -> list[tuple[str, "Envelope", bytes]]:
        """(state, envelope, message bytes) of every queue entry."""
        from pymailtools.queue.store import STATES, Queue

        q = Queue(str(self.queue_dir))
        out = []
        for state in STATES:
            for qid in q.ids(state):
                _, env = q.load(qid, state)
                out.append((state, env, q.read_message(qid)))
        return out

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the queue (path -> bytes), to prove 'nothing queued'."""
        out = {}
        for p in sorted(self.queue_dir.rglob("*")):
            if p.is_file() and p.name != "run.lock":
                out[str(p.relative_to(self.queue_dir))] = p.read_bytes()
        return out


@pytest.fixture
def sendmail(config_file: Path, config_values: dict[str, object]) -> Sendmail:
    return Sendmail(config_file, Path(str(config_values["queue_directory"])))


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    """dnsmasq serving the *.test zone (tests/support/dns.py); one per test module."""
    yield from start_dns()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A trustme CA and a certificate for 127.0.0.1 and localhost; one per test module."""
    return Certs(tmp_path_factory.mktemp("certs"))


from pymailtools.queue.envelope import Envelope  # noqa: E402  (for the annotation above)
