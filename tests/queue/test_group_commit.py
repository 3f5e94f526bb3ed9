"""Group commit (intake.commit_group): several direct submissions made durable together, with
one fsync of messages/ and one of incoming/, keep every guarantee of one commit each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pymailtools.errors import QueueWriteError
from pymailtools.queue import index, intake
from pymailtools.queue.envelope import Envelope, Recipient
from pymailtools.queue.store import Queue
from tests.support.queue import complete_entries

ROOT = Path(__file__).resolve().parents[2]


def staged(q: Queue, n: int) -> list[tuple[intake.Submission, Envelope]]:
    """``n`` submissions written (not yet committed), each with its envelope."""
    group = []
    for i in range(n):
        sub = q.submission()
        sub.write(b"Subject: %d\n\nmessage %d\n" % (i, i))
        group.append((sub, Envelope("", f"s{i}@x.test", [Recipient(f"r{i}@y.test")])))
    return group


def indexed(q: Queue) -> list[str]:
    """The ids the summary index has a line for (only while the index is trusted)."""
    parsed = [index.parse(line) for line in index._index_lines(q.root)]
    return sorted(p[1] for p in parsed if p is not None)


def test_a_group_is_queued_whole_and_indexed(tmp_path: Path) -> None:
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    group = staged(q, 5)
    assert intake.commit_group(q, group) == [None] * 5
    entries = complete_entries(q)
    assert {sub.id for sub, _ in group} == set(entries)
    for i, (sub, env) in enumerate(group):
        assert entries[sub.id] == b"Subject: %d\n\nmessage %d\n" % (i, i)
        assert sub.fd == -1  # let go of
        assert env.id == sub.id
    # one index line each, describing the published entries
    assert indexed(q) == sorted(entries)


def test_one_bad_message_fails_alone(tmp_path: Path) -> None:
    """A message whose envelope cannot be written is aborted; the rest of its group is queued."""
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    group = staged(q, 3)
    group[1][1].warned = "not a number"  # type: ignore[assignment]
    errors = intake.commit_group(q, group)
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None
    assert set(complete_entries(q)) == {group[0][0].id, group[2][0].id}
    assert not os.path.exists(q.path("messages", group[1][0].id))


def test_a_failing_directory_fsync_fails_every_message_of_the_group(tmp_path: Path) -> None:
    """messages/ cannot be fsynced (here: it is no longer where it was, so it cannot be opened
    to be fsynced): no message of the group is queued, each gets the error."""
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    group = staged(q, 4)
    os.rename(q.path("messages"), str(tmp_path / "q" / "moved"))
    errors = intake.commit_group(q, group)
    assert all(isinstance(e, QueueWriteError) for e in errors), errors
    assert q.ids("incoming") == []
    assert all(sub.fd == -1 for sub, _ in group)


CRASHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from pymailtools.queue import intake
    from pymailtools.queue.envelope import Envelope, Recipient
    from pymailtools.queue.store import Queue
    q = Queue(sys.argv[1])
    group = []
    for i in range(4):
        sub = q.submission()
        sub.write(b"Subject: crash\\n\\n" + b"x" * 100000 + b"\\n")
        group.append((sub, Envelope("", "a@x.test", [Recipient("b@y.test")])))
    errors = intake.commit_group(q, group)
    print(" ".join(sub.id for (sub, _), e in zip(group, errors) if e is None), flush=True)
""")


@pytest.mark.parametrize(("point", "published"), [
    ("before_fsync", 0),  # the first file not yet fsynced
    ("before_rename", 0),  # the first file fsynced, messages/ not yet
    ("before_envelope", 0),  # every file and messages/ durable, no name in incoming/ yet
    ("before_dir_fsync", 4),  # every name in incoming/, which is not yet fsynced
    ("after_commit", 4),
])
def test_killed_during_a_group_commit(tmp_path: Path, point: str, published: int) -> None:
    """SIGKILL at each step of a group commit: nothing was reported queued, and the queue holds
    only complete entries (message, envelope and index line), never a name in incoming/
    without its message."""
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    p = subprocess.run([sys.executable, "-c", CRASHER, q.root, str(ROOT / "src")],
                       capture_output=True, env=dict(os.environ, PYMAILTOOLS_TEST_CRASH_AT=point),
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert p.stdout == b""  # killed before any message was reported queued
    entries = complete_entries(q)
    assert len(entries) == published
    assert all(data.endswith(b"x" * 100000 + b"\n") for data in entries.values())
    if published:
        assert indexed(q) == sorted(entries)
