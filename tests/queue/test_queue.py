"""The queue module: atomic states, locks, corrupt entries, and listing without reading bodies."""

import os
import threading
import time
from pathlib import Path

import pytest

from pymailtools.admin.listing import listing
from pymailtools.config import Config
from pymailtools.errors import InvalidQueueId
from pymailtools.qmgr.runner import Runner
from pymailtools.queue.envelope import DEFERRED, Envelope, Recipient
from pymailtools.queue.store import CORRUPT, INCOMING, EntryBusy, EntryNotFound, Queue


def make_entry(q: Queue, body: bytes = b"Subject: t\n\nb\n", rcpt: str = "r@example.test",
               ) -> str:
    sub = q.submission()
    sub.write(body)
    return sub.commit(Envelope("", "s@x.test", [Recipient(rcpt)], arrival=time.time()))


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    return q


def test_commit_publishes_message_then_envelope(queue: Queue) -> None:
    qid = make_entry(queue)
    assert queue.ids(INCOMING) == [qid]
    state, env = queue.load(qid)
    assert state == INCOMING and env.size == len(b"Subject: t\n\nb\n")
    assert not any(Path(queue.root, "tmp").iterdir())


def test_a_new_entry_is_one_file_under_two_names(queue: Queue) -> None:
    """Message, envelope and trailer in one file, messages/ID and incoming/ID: one fsync of one
    file per message. The runner's first state change writes a plain envelope beside it."""
    body = b"Subject: t\n\nb\n" * 100
    qid = make_entry(queue, body)
    msg, env_file = os.stat(queue.path("messages", qid)), os.stat(queue.path(INCOMING, qid))
    assert (msg.st_ino, msg.st_nlink) == (env_file.st_ino, 2)
    raw = Path(queue.path("messages", qid)).read_bytes()
    _, env = queue.load(qid)
    envelope = env.to_bytes()
    assert raw == body + envelope + b"pymailtools-entry %d %d\n" % (len(body), len(envelope))
    assert queue.read_message(qid) == body
    env.recipients[0].state = DEFERRED
    queue.save(env, INCOMING, "deferred")
    assert Path(queue.path("deferred", qid)).read_bytes() == env.to_bytes()
    assert os.stat(queue.path("messages", qid)).st_nlink == 1
    assert queue.load(qid) == ("deferred", env)
    assert queue.read_message(qid) == body


def test_the_message_reader_ends_where_the_message_ends(queue: Queue) -> None:
    body = b"".join(b"line %d\n" % i for i in range(20000))
    qid = make_entry(queue, body)
    _, env = queue.load(qid)
    fd = queue.lock(qid)
    try:
        with queue.message(fd, env) as f:
            assert list(f) == body.splitlines(keepends=True)
            assert f.read() == b"" and f.tell() == len(body)
            f.seek(-6, os.SEEK_END)
            assert f.read() == b"19999\n"
            f.seek(0)
            assert f.read(5) == b"line " and f.readline() == b"0\n"
            f.seek(0)
            assert f.read() == body
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", [b"pymailtools-entry 1 2\n", b"pymailtools-entry x\n", b""])
def test_a_bad_trailer_goes_to_corrupt(queue: Queue, config_values: dict[str, object],
                                       damage: bytes) -> None:
    cfg = Config({**config_values, "queue_directory": queue.root})
    qid = make_entry(queue)
    p = Path(queue.path(INCOMING, qid))
    data = p.read_bytes()
    p.write_bytes(data[: data.rindex(b"pymailtools-entry")] + damage)
    assert Runner(cfg).run().corrupt == 1
    assert sorted(os.listdir(Path(queue.root, CORRUPT))) == [qid, qid + ".msg"]


def test_listing_without_the_index_reads_new_entries_envelopes(queue: Queue) -> None:
    qid = make_entry(queue, b"Subject: t\n\n" + b"x" * 5000 + b"\n")
    os.unlink(Path(queue.root, "summaries"))
    text = "".join(listing(queue, 10**7))
    assert f"{qid}        5013 " in text and "s@x.test" in text and "r@example.test" in text


def test_save_moves_and_rewrites_with_mtime_as_next_try(queue: Queue) -> None:
    qid = make_entry(queue)
    _, env = queue.load(qid)
    env.recipients[0].state = DEFERRED
    env.recipients[0].next_try = time.time() + 1000
    queue.save(env, INCOMING, "deferred")
    assert queue.find(qid) == "deferred"
    st = os.stat(queue.path("deferred", qid))
    assert abs(st.st_mtime - env.recipients[0].next_try) < 1
    assert queue.due() == []
    assert queue.due(now=time.time() + 2000) == [("deferred", qid)]


def test_lock_is_exclusive(queue: Queue) -> None:
    qid = make_entry(queue)
    fd = queue.lock(qid)
    try:
        with pytest.raises(EntryBusy):
            queue.lock(qid)
    finally:
        os.close(fd)
    os.close(queue.lock(qid))


def test_locked_entry_is_skipped_by_runner(queue: Queue,
                                           config_values: dict[str, object]) -> None:
    cfg = Config({**config_values, "queue_directory": queue.root})
    qid = make_entry(queue)
    fd = queue.lock(qid)
    try:
        stats = Runner(cfg).run()
    finally:
        os.close(fd)
    assert stats.busy == 1 and queue.ids(INCOMING) == [qid]


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "١٢٣"])
def test_paths_refuse_bad_ids(queue: Queue, bad: str) -> None:
    with pytest.raises(InvalidQueueId):
        queue.path(INCOMING, bad)
    with pytest.raises(InvalidQueueId):
        queue.find(bad)


def test_missing_entry(queue: Queue) -> None:
    with pytest.raises(EntryNotFound):
        queue.find("ABCDEF")
    with pytest.raises(EntryNotFound):
        queue.lock("ABCDEF")


def test_torn_envelope_goes_to_corrupt(queue: Queue, config_values: dict[str, object]) -> None:
    cfg = Config({**config_values, "queue_directory": queue.root})
    good = make_entry(queue)
    bad = make_entry(queue)
    p = Path(queue.path(INCOMING, bad))
    p.write_bytes(p.read_bytes()[:-10])
    orphan = make_entry(queue)
    os.unlink(queue.path("messages", orphan))
    stats = Runner(cfg).run()
    assert stats.corrupt == 2
    assert sorted(os.listdir(Path(queue.root, CORRUPT))) == sorted([bad, bad + ".msg", orphan])
    assert queue.find(good) == "deferred"  # remote recipient: processed normally


def test_listing_reads_no_message_body(queue: Queue) -> None:
    """Message files replaced by FIFOs: opening one would block, so listing must not."""
    ids = [make_entry(queue, rcpt=f"r{i}@example.test") for i in range(500)]
    for qid in ids:
        os.unlink(queue.path("messages", qid))
        os.mkfifo(queue.path("messages", qid))
    result: list[str] = []

    def work() -> None:
        result.append("".join(listing(queue, 10**7)))
        result.append(str(len(queue.due())))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "listing opened a message file"
    text, due = result
    assert text.count("@example.test\n") == 500 and due == "500"
    assert text.endswith("in 500 Requests.\n")


def test_attempt_history_is_recorded_and_removed_with_the_entry(
        queue: Queue, config_values: dict[str, object]) -> None:
    cfg = Config({**config_values, "queue_directory": queue.root})
    qid = make_entry(queue, rcpt="x@example.com")
    Runner(cfg).run()
    (a,) = queue.history(qid)
    # The test resolver is a closed loopback port: a temporary DNS failure.
    assert (a.recipient, a.status) == ("x@example.com", "deferred")
    assert a.reason and a.dsn.startswith("4.")
    Runner(cfg).run(force=True)
    assert [h.status for h in queue.history(qid)] == ["deferred", "deferred"]
    fd = queue.lock(qid)
    try:
        queue.remove(qid, queue.find(qid))
    finally:
        os.close(fd)
    assert queue.history(qid) == [] and not os.listdir(Path(queue.root, "history"))


def test_history_lines_survive_hostile_text(queue: Queue) -> None:
    from pymailtools.queue.store import Attempt

    qid = make_entry(queue)
    queue.add_history(qid, Attempt(1.5, "a b\r\nc", "h[1.2.3.4]:25", "deferred", "4.0.0",
                                   "450 go\naway\x00"))
    (a,) = queue.history(qid)
    assert (a.recipient, a.reason) == ("a b\r\nc", "450 go\naway\x00")


def test_a_message_that_looks_like_an_envelope_is_still_a_message(queue: Queue) -> None:
    body = Envelope("Fake1", "evil@x.test", [Recipient("victim@y.test")]).to_bytes()
    qid = make_entry(queue, body)
    state, env = queue.load(qid)
    assert (state, env.id, env.sender, env.size) == (INCOMING, qid, "s@x.test", len(body))
    assert queue.read_message(qid) == body


def test_a_new_entry_is_never_seen_locked(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message file is locked while it is written (purges keep off) but not once a state
    file names it: a runner that found a new entry locked would skip it until its next run."""
    real_link, probes = os.link, []

    def link(src: str, dst: str) -> None:
        qid = os.path.basename(src)
        try:
            os.close(queue.lock(qid))
            probes.append("free")
        except EntryBusy:
            probes.append("locked")
        real_link(src, dst)

    sub = queue.submission()
    sub.write(b"Subject: t\n\nb\n")
    with pytest.raises(EntryBusy):  # while it is written
        queue.lock(sub.id)
    monkeypatch.setattr(os, "link", link)
    sub.commit(Envelope("", "s@x.test", [Recipient("r@example.test")]))
    assert probes == ["free"]


def test_a_failing_run_lock_leaves_no_descriptor_open(queue: Queue,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """flock failing otherwise than 'held by another' (ENOLCK, EINTR) must not leak the lock
    file's descriptor into a long-running listener or runner."""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    for _ in range(3):
        with pytest.raises(OSError):
            queue.try_run_lock()
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before
    fd = queue.try_run_lock()  # and the lock still works afterwards
    assert fd is not None
    os.close(fd)
