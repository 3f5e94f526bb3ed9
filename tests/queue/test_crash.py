"""Crash safety: sendmail killed with SIGKILL anywhere leaves no entry or one complete entry."""

import os
import pwd
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pymailtools.queue.envelope import Envelope, Recipient
from pymailtools.queue.store import STATES, Queue
from tests.conftest import Sendmail, script

BODY = b"".join(b"line %07d of a large message, all of it must arrive\n" % i for i in range(60000))
MESSAGE = b"Subject: big\n\n" + BODY


def assert_queue_consistent(queue_dir: Path) -> list[Envelope]:
    """Every entry is complete: envelope parses, message size matches, body intact."""
    q = Queue(str(queue_dir))
    found = []
    for state in STATES:
        for qid in q.ids(state):
            _, env = q.load(qid, state)
            data = q.read_message(qid)
            assert len(data) == env.size
            assert data.endswith(b"\n\n" + BODY)
            found.append(env)
    return found


@pytest.mark.parametrize(
    ("point", "queued"),
    [("after_open", 0), ("after_headers", 0), ("mid_write", 0), ("before_fsync", 0),
     ("before_rename", 0), ("before_envelope", 0), ("after_commit", 1)],
)
def test_kill_at_each_step(sendmail: Sendmail, point: str, queued: int) -> None:
    p = sendmail("-i", "u@x.test", input=MESSAGE, env={"PYMAILTOOLS_TEST_CRASH_AT": point})
    assert p.returncode == -signal.SIGKILL
    assert len(assert_queue_consistent(sendmail.queue_dir)) == queued


def test_kill_at_random_moments(sendmail: Sendmail) -> None:
    rng = random.Random(42)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file),
               PYMAILTOOLS_DELIVERY_MODE="queue")
    completed = 0
    for _ in range(40):
        proc = subprocess.Popen([script("sendmail"), "-i", "u@x.test"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        assert proc.stdin is not None
        deadline = time.monotonic() + rng.uniform(0.0, 0.25)
        view = memoryview(MESSAGE)
        try:
            while view and time.monotonic() < deadline:
                proc.stdin.write(view[:65536])
                view = view[65536:]
            if not view:
                proc.stdin.close()
                time.sleep(rng.uniform(0, 0.05))
        except BrokenPipeError:
            pass
        proc.kill()
        proc.wait()
        if proc.returncode == 0:
            completed += 1
        entries = assert_queue_consistent(sendmail.queue_dir)
        # Exit 0 was only ever reported for a message that is complete in the queue.
        assert len(entries) >= completed
    assert_queue_consistent(sendmail.queue_dir)


def test_leftovers_are_purged_not_delivered(sendmail: Sendmail) -> None:
    for point in ("before_rename", "before_envelope"):
        sendmail("-i", "u@x.test", input=MESSAGE, env={"PYMAILTOOLS_TEST_CRASH_AT": point})
    q = Queue(str(sendmail.queue_dir))
    assert len(list((sendmail.queue_dir / "messages").iterdir())) == 2  # written in place
    assert q.due() == []
    assert q.purge(grace=3600) == []  # too young: a submission may still be running
    assert len(q.purge(grace=0, now=time.time() + 1)) == 2
    assert not any((sendmail.queue_dir / "tmp").iterdir())
    assert not any((sendmail.queue_dir / "messages").iterdir())


def test_a_submission_in_progress_is_never_purged(sendmail: Sendmail) -> None:
    """The message file is written under its final name before any state file names it; its
    lock, held until it is published, keeps the purge of orphans away however old it is."""
    q = Queue(str(sendmail.queue_dir))
    q.ensure()
    sub = q.submission()
    sub.write(b"Subject: slow\n\nstill coming\n")
    assert q.purge(grace=0, now=time.time() + 7200) == []
    sub.write(b"more\n")
    qid = sub.commit(Envelope("", "a@x.test", [Recipient("u@x.test")]))
    assert q.read_message(qid) == b"Subject: slow\n\nstill coming\nmore\n"
    assert q.due() == [("incoming", qid)]


def test_runner_never_delivers_a_fragment(sendmail: Sendmail, spool: Path,
                                          system_user: pwd.struct_passwd) -> None:
    import mailbox

    name = system_user.pw_name
    for point in ("after_open", "mid_write", "before_fsync", "before_rename",
                  "before_envelope", "after_commit", ""):
        p = sendmail("-i", name, input=MESSAGE, env={"PYMAILTOOLS_TEST_CRASH_AT": point})
        assert p.returncode == (0 if point == "" else -signal.SIGKILL)
    assert sendmail("-q").returncode == 0
    box = mailbox.mbox(str(spool / name), create=False)
    bodies = [box.get_bytes(k).split(b"\n\n", 1)[1] for k in box.keys()]
    box.close()
    assert len(bodies) == 2  # after_commit and the uninterrupted one; nothing else
    assert all(b.rstrip(b"\n") == BODY.rstrip(b"\n") for b in bodies)
