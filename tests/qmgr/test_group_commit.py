"""Group commit in the queue runner: consecutive deliveries into one mailbox share its locks
and one fsync, and their queue entries are updated only after it. A message that fails in the
middle of a group is taken out alone; a crash before the fsync or before the queue update
delivers the group again (at least once), never loses a message."""

import os
import pwd
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Sendmail, need_root, need_tool, script, tmpfs, write_toml
from tests.local.test_stale_lock import bodies, raw_messages, s_nail_messages


def small(i: int) -> bytes:
    return b"Subject: small %d\n\nFrom the body of message %d\nlast line\n" % (i, i)


BIG = b"Subject: big\n\n" + (b"y" * 80 + b"\n") * 30_000  # 2.4 MB: more than the 1 MB disk


def queue(sendmail: Sendmail, user: str, messages: list[bytes]) -> None:
    for m in messages:
        p = sendmail("-i", user, input=m)
        assert p.returncode == 0, p.stderr


def subjects(box: Path) -> list[str]:
    return [s for s, _ in bodies(box)]


def test_a_failing_message_in_a_group_is_taken_out_alone(
        tmp_path: Path, config_values: dict[str, object], system_user: pwd.struct_passwd) -> None:
    """Message 3 of 5 does not fit on the disk: the two before it stay delivered once, it is
    deferred (4.2.2, as a single delivery's would be), the two after it are delivered."""
    with tmpfs(tmp_path, "1m") as mnt:
        os.chmod(mnt, 0o1777)
        config = write_toml(tmp_path / "small.toml",
                            {**config_values, "mail_spool_directory": str(mnt)})
        sendmail = Sendmail(config, Path(str(config_values["queue_directory"])))
        name = system_user.pw_name
        queue(sendmail, name, [small(0), small(1), BIG, small(3), small(4)])
        p = sendmail("-q", "-v")
        assert p.returncode == 0, p.stderr
        box = mnt / name
        assert subjects(box) == ["small 0", "small 1", "small 3", "small 4"]
        ((state, env, _),) = sendmail.entries()
        assert state == "deferred"
        assert env.recipients[0].status == "4.2.2"
        assert not Path(str(box) + ".lock").exists()
        assert s_nail_messages(box, tmp_path) == raw_messages(box)


def test_one_lock_and_one_fsync_per_group(sendmail: Sendmail, spool: Path,
                                          system_user: pwd.struct_passwd,
                                          tmp_path: Path) -> None:
    """40 messages for one mailbox: two groups (the bound is 32), so two dotlocks and two
    fsyncs of the mailbox, where one at a time made 40 of each."""
    strace = need_tool("strace", "strace")
    name = system_user.pw_name
    count = 40
    queue(sendmail, name, [small(i) for i in range(count)])
    trace = tmp_path / "trace"
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file))
    p = subprocess.run([strace, "-f", "-y", "-e", "trace=fsync,openat", "-o", str(trace),
                        script("sendmail"), "-q"], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    box = spool / name
    assert subjects(box) == [f"small {i}" for i in range(count)]
    assert sendmail.entries() == []
    text = trace.read_text()
    fsyncs = re.findall(r"fsync\(\d+<" + re.escape(str(box)) + r">\)", text)
    dotlocks = re.findall(r'openat\([^"]*"' + re.escape(str(box)) + r'\.lock", [^)]*O_CREAT',
                          text)
    assert (len(fsyncs), len(dotlocks)) == (2, 2)


@pytest.mark.parametrize("where", ["group_before_sync", "group_synced"])
@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_crash_delivers_the_group_again_never_loses_it(
        tmp_path: Path, config_values: dict[str, object], spool: Path,
        system_user: pwd.struct_passwd, where: str, kind: str) -> None:
    """Killed before the group's fsync, or after it and before the queue update: every entry
    is still queued, and the next run delivers the group again (a duplicate each, the
    at-least-once outcome). The dead runner's dotlock holds nothing up."""
    need_root()
    values = dict(config_values)
    if kind == "maildir":
        values["home_mailbox"] = "Maildir/"
    config = write_toml(tmp_path / f"{kind}.toml", values)
    sendmail = Sendmail(config, Path(str(values["queue_directory"])))
    name = system_user.pw_name
    queue(sendmail, name, [small(i) for i in range(5)])

    killed = sendmail("-q", env={"PYMAILTOOLS_TEST_CRASH_AT": where})
    assert killed.returncode == -signal.SIGKILL
    assert len(sendmail.entries()) == 5

    def delivered() -> list[str]:
        if kind == "mbox":
            return sorted(subjects(spool / name))
        new = Path(system_user.pw_dir) / "Maildir" / "new"
        found = [re.search(rb"^Subject: (.*)$", f.read_bytes(), re.M) for f in new.iterdir()]
        return sorted(m.group(1).decode() for m in found if m)

    # A kill loses nothing the kernel has (a power cut could lose what was not synced).
    assert delivered() == [f"small {i}" for i in range(5)]
    p = sendmail("-q")
    assert p.returncode == 0, p.stderr
    assert sendmail.entries() == []
    assert delivered() == sorted([f"small {i}" for i in range(5)] * 2)
    if kind == "mbox":
        assert not Path(str(spool / name) + ".lock").exists()
        assert s_nail_messages(spool / name, tmp_path) == raw_messages(spool / name)


def test_a_failed_group_fsync_defers_the_recipient_whose_next_target_synced_it(
        config_values: dict[str, object], spool: Path, system_user: pwd.struct_passwd,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An alias to a mailbox and a command: the command's delivery syncs the mailbox's group
    first. When that fsync fails the message is taken back out of the mailbox, so the
    recipient is deferred (the command runs again next time), never reported sent."""
    need_root()
    from pymailtools.config import Config
    from tests.support import queue as support_queue

    cfg = Config(config_values)
    name = system_user.pw_name
    box = spool / name
    aliases = Path(cfg.alias_maps[0])
    aliases.write_text(f'pair: {name}, "|/bin/true"\n')
    os.chmod(aliases, 0o644)
    qid = support_queue.queue(cfg, "pair")
    real_fsync = os.fsync
    failed: list[int] = []

    def failing_fsync(fd: int) -> None:
        # The mailbox's first fsync fails (an I/O error of the disk), as the group's would.
        if not failed and os.readlink(f"/proc/self/fd/{fd}") == str(box):
            failed.append(fd)
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    stats = support_queue.run(cfg)
    assert failed
    assert (stats.delivered, stats.deferred) == (0, 1)
    assert support_queue.states(cfg, qid) == {"pair": "deferred"}
    assert box.read_bytes() == b""


@pytest.mark.parametrize("other", ["someone@remote.example.test", "command"])
def test_a_failing_queue_update_of_the_group_leaves_no_entry_locked(
        config_values: dict[str, object], system_user: pwd.struct_passwd,
        monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    """The group is committed before a full batch of remote entries is sent, and before an
    entry that waits for no group is updated: when a group entry's update fails there, the
    entry after it (in the batch, or on its own) is closed, its lock released, too."""
    from pymailtools.config import Config
    from pymailtools.qmgr import runner as runner_module
    from pymailtools.queue.store import EntryBusy, Queue
    from tests.support import queue as support_queue

    cfg = Config(config_values)
    if other == "command":  # its delivery syncs the group first: it waits for none
        need_root()
        aliases = Path(cfg.alias_maps[0])
        aliases.write_text('command: "|/bin/true"\n')
        os.chmod(aliases, 0o644)
    local = support_queue.queue(cfg, system_user.pw_name)
    remote = support_queue.queue(cfg, other)
    monkeypatch.setattr(runner_module, "BATCH", 1)
    real_finish = runner_module.Runner._finish

    def failing_finish(self: runner_module.Runner, entry: runner_module._Entry) -> None:
        if entry.qid == local:
            raise OSError(28, "No space left on device")
        real_finish(self, entry)

    monkeypatch.setattr(runner_module.Runner, "_finish", failing_finish)
    with pytest.raises(OSError):
        support_queue.run(cfg)
    q = Queue(cfg.queue_directory)
    for qid in (local, remote):
        try:
            fd = q.lock(qid)
        except EntryBusy:
            pytest.fail(f"{qid} is still locked")
        os.close(fd)
