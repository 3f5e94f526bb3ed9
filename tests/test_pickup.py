"""Maildrop: unprivileged submission, and pickup treating every maildrop file as hostile."""

import os
import pwd
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.queue.envelope import Envelope, Recipient
from pymailtools.queue.store import CORRUPT, INCOMING, MAILDROP, MAILDROP_TRAILER, Queue
from pymailtools.submit.pickup import pickup
from tests.support.cli import submit_as

MESSAGE = b"Subject: from a user\n\nhello\n"




@pytest.fixture
def queue(world_dir: Path) -> Queue:
    q = Queue(str(world_dir / "queue"))
    q.ensure()
    return q


@pytest.fixture
def cfg(world_dir: Path, queue: Queue) -> Config:
    return Config({"queue_directory": queue.root, "myhostname": "host.example.test",
                   "mail_spool_directory": str(world_dir / "spool"), "syslog": False})


def write_config(world_dir: Path, cfg: Config) -> Path:
    p = world_dir / "config.toml"
    p.write_text(f'queue_directory = "{cfg.queue_directory}"\nmyhostname = "host.example.test"\n'
                 f'syslog = false\n')
    p.chmod(0o644)
    return p


def maildrop_file(env: Envelope, message: bytes) -> bytes:
    body = env.to_bytes()
    return message + body + MAILDROP_TRAILER + f"{len(message)} {len(body)}\n".encode()


def test_unprivileged_user_submits_through_maildrop(system_user: pwd.struct_passwd,
                                                    world_dir: Path, queue: Queue,
                                                    cfg: Config) -> None:
    msg = world_dir / "msg"
    msg.write_bytes(MESSAGE)
    msg.chmod(0o644)
    rc = submit_as(system_user, write_config(world_dir, cfg), ["-i", "rcpt@example.test"], msg)
    assert rc == 0
    dropped = list(Path(queue.root, MAILDROP).iterdir())
    assert len(dropped) == 1 and dropped[0].stat().st_uid == system_user.pw_uid
    assert queue.ids(INCOMING) == []
    assert pickup(queue, cfg, Logger("test", to_syslog=False, verbose=False)) == 1
    assert list(Path(queue.root, MAILDROP).iterdir()) == []
    (qid,) = queue.ids(INCOMING)
    _, env = queue.load(qid)
    assert env.uid == system_user.pw_uid and env.user == system_user.pw_name
    assert env.sender == f"{system_user.pw_name}@host.example.test"
    assert queue.read_message(qid).endswith(b"\n\nhello\n")


def test_owner_not_content_gives_identity(system_user: pwd.struct_passwd, queue: Queue,
                                          cfg: Config) -> None:
    env = Envelope("Fake", "someone@x.test", [Recipient("r@example.test")], uid=0, user="root")
    path = Path(queue.root, MAILDROP, "AAAAFAKE01")
    path.write_bytes(maildrop_file(env, MESSAGE))
    os.chown(path, system_user.pw_uid, system_user.pw_gid)
    assert pickup(queue, cfg, Logger("test", to_syslog=False, verbose=False)) == 1
    (qid,) = queue.ids(INCOMING)
    _, got = queue.load(qid)
    assert (got.uid, got.user, got.origin) == (system_user.pw_uid, system_user.pw_name,
                                               "maildrop")


def _hostile(queue: Queue, tmp: Path, kind: str) -> Path:
    drop = Path(queue.root, MAILDROP)
    name = drop / f"HOSTILE{kind.upper()}"
    if kind == "symlink":
        secret = tmp / "secret"
        secret.write_text("TOPSECRET\n")
        name.symlink_to(secret)
    elif kind == "hardlink":
        target = drop.parent / "rootfile"
        env = Envelope("x", "a@x.test", [Recipient("r@example.test")])
        target.write_bytes(maildrop_file(env, MESSAGE))
        os.link(target, name)
    elif kind == "fifo":
        os.mkfifo(name)
    elif kind == "sparse":
        with open(name, "wb") as f:
            f.truncate(5 * 1024**3)
    elif kind == "truncated":
        env = Envelope("x", "a@x.test", [Recipient("r@example.test")])
        name.write_bytes(maildrop_file(env, MESSAGE)[:-30])
    elif kind == "garbage":
        name.write_bytes(os.urandom(3000))
    elif kind == "injected":
        env = Envelope("x", "a@x.test", [Recipient("r@example.test\r\nRCPT TO:<v@y.test>")])
        name.write_bytes(maildrop_file(env, MESSAGE))
    return name


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "sparse", "truncated",
                                  "garbage", "injected"])
def test_hostile_maildrop_files_go_to_corrupt(queue: Queue, cfg: Config, world_dir: Path,
                                              kind: str) -> None:
    bad = _hostile(queue, world_dir, kind)
    good = Envelope("x", "a@x.test", [Recipient("ok@example.test")])
    Path(queue.root, MAILDROP, "ZZZGOOD").write_bytes(maildrop_file(good, MESSAGE))
    taken = pickup(queue, cfg, Logger("test", to_syslog=False, verbose=False))
    assert taken == 1  # the good file still goes through
    assert not os.path.lexists(bad)
    assert os.path.lexists(Path(queue.root, CORRUPT, f"maildrop-{bad.name}"))
    (qid,) = queue.ids(INCOMING)
    _, env = queue.load(qid)
    assert [r.address for r in env.recipients] == ["ok@example.test"]
    assert b"TOPSECRET" not in queue.read_message(qid)
