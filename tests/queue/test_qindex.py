"""The summary index: listings from it equal listings from the envelope files, always."""

import multiprocessing
import os
import random
from pathlib import Path

import pytest

from pymailtools.admin.listing import json_lines, listing
from pymailtools.queue import index as qindex
from pymailtools.queue.envelope import BOUNCED, DEFERRED, PENDING, SENT, Envelope, Recipient
from pymailtools.queue.ids import new_id
from pymailtools.queue.select import Selector
from pymailtools.queue.store import HOLD, INCOMING, Queue


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    q = Queue(str(tmp_path / "q"))
    q.ensure()
    return q


def put(q: Queue, env: Envelope, state: str = "deferred") -> str:
    with open(q.path("messages", env.id), "wb") as f:
        f.write(b"x" * env.size)
    q.write_envelope(env, state)
    return env.id


def entry(sender: str = "a@example.org", reason: str = "connect to x: refused",
          n: int = 1) -> Envelope:
    rcpts = [Recipient(f"r{i}@example.net", state=DEFERRED, reason=reason) for i in range(n)]
    return Envelope(new_id(), sender, rcpts, arrival=1795391852.0, size=300)


def blocks(q: Queue) -> list[str]:
    """The mailq entries (order-free: the index lists newest first, files in directory order)."""
    text = "".join(listing(q, 10**7))
    head, _, rest = text.partition("\n")
    return sorted(rest.split("\n\n")) if "Requests" in text or "Request." in text else [text]


def without_index(q: Queue) -> tuple[list[str], ...]:
    p = qindex.path(q.root)
    os.rename(p, p + ".aside")
    try:
        return with_index(q)
    finally:
        os.rename(p + ".aside", p)


def with_index(q: Queue) -> tuple[list[str], ...]:
    """The plain listings (pre-rendered text from the index) and selected ones (its fields)."""
    chosen = Selector(recipients=["*@d1.test", "r0@*"], reasons=["*full*"])
    return (blocks(q), sorted(json_lines(q, 10**7)), sorted(json_lines(q, 10**7, chosen)),
            sorted(json_lines(q, 10**7, Selector(queues=["hold"]))))


def corrupt_in_place(q: Queue, state: str, qid: str) -> None:
    """Same inode, unreadable content: only a listing that opens the file notices."""
    path = q.path(state, qid)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"#" * size)


def test_write_envelope_appends_a_line_before_publishing(queue: Queue) -> None:
    qid = put(queue, entry())
    data = Path(qindex.path(queue.root)).read_bytes().split(b"\n")
    assert data[0] == qindex.header(queue.root).rstrip(b"\n")
    ino = os.stat(queue.path("deferred", qid)).st_ino
    assert data[1].startswith(f"{ino} :{qid} ".encode())
    assert data[2] == b""


def test_listing_comes_from_the_index_not_the_files(queue: Queue) -> None:
    qid = put(queue, entry(sender="indexed@example.org"))
    corrupt_in_place(queue, "deferred", qid)
    assert "indexed@example.org" in "".join(listing(queue, 10**7))
    os.unlink(qindex.path(queue.root))  # without the index the file is read: corrupt, skipped
    assert "".join(listing(queue, 10**7)) == "Mail queue is empty\n"


def test_newest_line_wins_after_rewrites_hold_and_release(queue: Queue) -> None:
    env = entry(reason="first")
    put(queue, env)
    for reason in ("second", "third"):
        env.recipients[0].reason = reason
        queue.write_envelope(env, "deferred")
    os.rename(queue.path("deferred", env.id), queue.path(HOLD, env.id))  # postsuper -h
    text = "".join(listing(queue, 10**7))
    assert f"{env.id}!" in text and "(third)" in text and "second" not in text
    assert with_index(queue) == without_index(queue)


def test_untrusted_header_is_ignored(queue: Queue) -> None:
    qid = put(queue, entry())
    p = Path(qindex.path(queue.root))
    lines = p.read_bytes().split(b"\n", 1)
    p.write_bytes(b"pymailtools-summaries 1 another-boot 1 2\n" + lines[1])  # after a crash
    corrupt_in_place(queue, "deferred", qid)
    assert "".join(listing(queue, 10**7)) == "Mail queue is empty\n"  # the file was read


def test_torn_last_line_and_garbage_are_skipped(queue: Queue) -> None:
    env = entry(sender="right@example.org")
    put(queue, env)
    ino = os.stat(queue.path("deferred", env.id)).st_ino
    forged = Envelope(env.id, "torn@example.org", env.recipients, arrival=env.arrival, size=1)
    with open(qindex.path(queue.root), "ab") as f:
        f.write(b"garbage line\n\xff\xfe :x\n" + qindex.record(forged, ino).rstrip(b"\n"))
    text = "".join(listing(queue, 10**7))
    assert "right@example.org" in text and "torn@example.org" not in text


def test_a_line_for_the_inode_under_another_id_does_not_match(queue: Queue) -> None:
    env = entry(sender="real@example.org")
    put(queue, env)
    ino = os.stat(queue.path("deferred", env.id)).st_ino
    other = Envelope(new_id(), "ghost@example.org", env.recipients, arrival=1.0, size=7)
    with open(qindex.path(queue.root), "ab") as f:
        f.write(qindex.record(other, ino))  # newer, same inode, another id
    text = "".join(listing(queue, 10**7))
    assert "real@example.org" in text and "ghost" not in text and other.id not in text


def test_failed_append_removes_the_index(queue: Queue, tmp_path: Path) -> None:
    put(queue, entry())
    p = qindex.path(queue.root)
    os.unlink(p)
    os.symlink(tmp_path / "elsewhere", p)  # O_NOFOLLOW: the append fails
    qid = put(queue, entry(sender="after@example.org"))
    assert not os.path.lexists(p) and not (tmp_path / "elsewhere").exists()
    assert "after@example.org" in "".join(listing(queue, 10**7))  # read from the file
    qid2 = put(queue, entry(sender="fresh@example.org"))  # a new index, with its header
    assert Path(p).read_bytes().startswith(qindex.header(queue.root))
    text = "".join(listing(queue, 10**7))
    assert qid in text and qid2 in text


def test_same_listing_with_and_without_index_under_random_operations(queue: Queue) -> None:
    rnd = random.Random(7)
    words = ["refused", "4.4.1 timed out", "100% full", "tab\there", "caf\u00e9", "a%20b",
             "ctl\x01", "", "x" * 90]
    live: dict[str, str] = {}
    for step in range(400):
        op = rnd.random()
        if op < 0.35 or not live:
            rcpts = [Recipient(f"{rnd.choice(words).replace(' ', '')}{i}@d{rnd.randrange(5)}.test",
                               state=rnd.choice([PENDING, DEFERRED, DEFERRED, SENT, BOUNCED]),
                               reason=rnd.choice(words)) for i in range(rnd.randrange(1, 4))]
            rcpts[0].state = DEFERRED
            env = Envelope(new_id(), rnd.choice(["", "s@example.org", "sp ace@x"]), rcpts,
                           arrival=1795391852.0 + rnd.randrange(100000),
                           size=rnd.randrange(1, 5000))
            state = rnd.choice([INCOMING, "deferred", HOLD])
            live[put(queue, env, state)] = state
        elif op < 0.65:  # the runner records a new attempt
            qid = rnd.choice(sorted(live))
            _, env = queue.load(qid, live[qid])
            env.recipients[0].reason = rnd.choice(words)
            queue.save(env, live[qid], "deferred")
            live[qid] = "deferred"
        elif op < 0.8:  # hold or release: a rename, the inode stays
            qid = rnd.choice(sorted(live))
            dst = "deferred" if live[qid] == HOLD else HOLD
            os.rename(queue.path(live[qid], qid), queue.path(dst, qid))
            live[qid] = dst
        elif op < 0.95:
            qid = rnd.choice(sorted(live))
            queue.remove(qid, live.pop(qid))
        else:
            qindex.rebuild(queue.root)
        if step % 40 == 39:
            got = with_index(queue)
            assert got == without_index(queue)
            assert len(got[1]) == len(live)


def test_rebuild_compacts_and_indexes_entries_written_without_a_line(queue: Queue) -> None:
    env = entry()
    put(queue, env)
    for i in range(50):
        env.recipients[0].reason = f"attempt {i}"
        queue.write_envelope(env, "deferred")
    stray = entry(sender="old-version@example.org")
    with open(queue.path("messages", stray.id), "wb") as f:
        f.write(b"x" * stray.size)
    with open(queue.path("deferred", stray.id), "wb") as f:
        f.write(stray.to_bytes())  # as a version without the index wrote it
    before = os.path.getsize(qindex.path(queue.root))
    assert qindex.rebuild(queue.root) == 2
    lines = Path(qindex.path(queue.root)).read_bytes().splitlines()
    assert len(lines) == 3 and os.path.getsize(qindex.path(queue.root)) < before / 10
    assert b"attempt%2049" in lines[1] + lines[2]
    corrupt_in_place(queue, "deferred", stray.id)  # now listed from its new line
    assert "old-version@example.org" in "".join(listing(queue, 10**7))


def _submit_many(root: str, count: int) -> None:
    q = Queue(root)
    for _ in range(count):
        put(q, entry())


def test_rebuild_loses_no_line_appended_meanwhile(queue: Queue) -> None:
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_submit_many, args=(queue.root, 150)) for _ in range(3)]
    for w in writers:
        w.start()
    rebuilds = 0
    while any(w.is_alive() for w in writers) or rebuilds < 3:
        qindex.rebuild(queue.root)
        rebuilds += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    live = qindex.Live(queue.root)
    assert len(live) == 450
    listed = sum(1 for _ in qindex.rows(queue.root, live, "deferred"))
    assert listed == 450, f"{450 - listed} entries lost their index line over {rebuilds} rebuilds"


def test_maybe_rebuild_only_when_grown_or_untrusted(queue: Queue) -> None:
    env = entry(n=20, reason="r" * 200)
    put(queue, env)
    assert not qindex.maybe_rebuild(queue.root)  # small: one stat, nothing else
    line = qindex.record(env, os.stat(queue.path("deferred", env.id)).st_ino)
    with open(qindex.path(queue.root), "ab") as f:
        f.write(line * ((5 << 20) // len(line)))  # 5 MiB of retries of one entry
    assert qindex.maybe_rebuild(queue.root)
    assert os.path.getsize(qindex.path(queue.root)) < 2 * len(line) + 200
    p = Path(qindex.path(queue.root))
    p.write_bytes(b"pymailtools-summaries 1 old-boot 1 2\n" + p.read_bytes().split(b"\n", 1)[1])
    assert qindex.maybe_rebuild(queue.root)  # distrusted after a reboot: rebuilt at once
    assert p.read_bytes().startswith(qindex.header(queue.root))


def test_newest_line_for_a_reused_inode_wins(queue: Queue) -> None:
    env = entry(sender="s@example.org", reason="current")
    put(queue, env)
    ino = os.stat(queue.path("deferred", env.id)).st_ino
    stale = Envelope(env.id, "s@example.org", [Recipient("r0@example.net", state=DEFERRED,
                                                          reason="stale")],
                     arrival=env.arrival, size=env.size)
    p = qindex.path(queue.root)
    head, _, lines = Path(p).read_bytes().partition(b"\n")
    # the same inode described twice (a file freed and its inode reused): the later line wins
    Path(p).write_bytes(head + b"\n" + b"filler\n" + qindex.record(stale, ino) + lines)
    text = "".join(listing(queue, 10**7))
    assert "(current)" in text and "stale" not in text
