"""The listener's group commit: messages of one process that end together share the directory
fsyncs, and no 250 is ever sent for a message that is not durably queued."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pymailtools.config import Config
from pymailtools.errors import MailError
from pymailtools.queue import intake
from pymailtools.queue.store import Queue
from pymailtools.smtpd.protocol import QueueWriter
from pymailtools.submit import submission as submit
from tests.support.net import TIMEOUT
from tests.support.queue import complete_entries
from tests.support.smtpd import Client, listener


def writes(writer: QueueWriter, cfg: Config, queue: Queue, n: int,
           between: Any = None) -> list[str | BaseException]:
    """``n`` sessions' messages ending in the same turn of the loop (as when the loop was busy
    while their last bytes came in), each counted as receiving until then, as Server.smtp_DATA
    counts it; ``between`` runs after they are written, before the commit. The queue id, or
    the exception, of each."""
    writer.receiving += n

    async def one(i: int) -> str:
        writer.receiving -= 1
        opts = submit.Options(["root@localhost"], f"s{i}@x.test", fullname="")
        return await writer.submit(cfg, io.BytesIO(b"Subject: %d\n\nbody %d\n" % (i, i)), opts,
                                   queue)

    async def main() -> list[str | BaseException]:
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        if between is not None:
            async def run_between() -> None:
                between()
            await asyncio.ensure_future(run_between())
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, Queue, list[int]]:
    cfg = Config({"queue_directory": str(tmp_path / "q"), "syslog": False})
    queue = Queue(cfg.queue_directory)
    queue.ensure()
    sizes: list[int] = []
    real = intake.commit_group

    def recorded(q: intake.QueueDir, group: list[Any]) -> list[Exception | None]:
        sizes.append(len(group))
        return real(q, group)

    monkeypatch.setattr(intake, "commit_group", recorded)
    return cfg, queue, sizes


def test_messages_ending_together_are_committed_as_one_group(
        setup: tuple[Config, Queue, list[int]]) -> None:
    cfg, queue, sizes = setup
    ids = writes(QueueWriter(), cfg, queue, 5)
    assert sizes == [5]
    entries = complete_entries(queue)
    assert sorted(ids) == sorted(entries)  # type: ignore[type-var]
    for i, qid in enumerate(ids):
        assert entries[qid].endswith(b"body %d\n" % i)  # type: ignore[index]


def test_a_message_no_other_can_join_is_committed_at_once(
        setup: tuple[Config, Queue, list[int]]) -> None:
    """With no other session reading a message, the commit happens before submit returns:
    the coroutine finishes without giving the loop a turn."""
    cfg, queue, sizes = setup
    writer = QueueWriter()

    async def main() -> str:
        opts = submit.Options(["root@localhost"], "a@x.test", fullname="")
        coro = writer.submit(cfg, io.BytesIO(b"Subject: alone\n\nbody\n"), opts, queue)
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        return str(done.value.value)

    qid = asyncio.run(main())
    assert sizes == [1]
    assert complete_entries(queue)[qid].endswith(b"body\n")


def test_a_failing_directory_fsync_fails_every_message_of_the_group(
        setup: tuple[Config, Queue, list[int]]) -> None:
    """messages/ cannot be fsynced after the group's files were written (here: it was moved
    away, so it cannot be opened to be fsynced): every session of the group gets the error
    (handle_DATA answers it with 451), none gets a queue id, nothing is queued."""
    cfg, queue, sizes = setup
    moved = queue.root + "/moved"
    results = writes(QueueWriter(), cfg, queue, 4,
                     between=lambda: os.rename(queue.path("messages"), moved))
    assert sizes == [4]
    assert all(isinstance(r, MailError) for r in results), results
    assert queue.ids("incoming") == []


@pytest.fixture
def values(config_values: dict[str, object]) -> dict[str, object]:
    return dict(config_values, delivery_mode="queue", smtpd_workers=1)


BODY = b"y" * 99 + b"\n"
BODY *= 200


def sender(port: int, reuse: bool, accepted: list[str], stop: threading.Event) -> None:
    """Send messages until the listener is gone; the queue id of each 250 into ``accepted``."""
    c = None
    n = 0
    try:
        while not stop.is_set():
            if c is None:
                c = Client(port)
                assert c.cmd("EHLO client.example").startswith("250")
            n += 1
            assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
            assert c.cmd("RCPT TO:<root@localhost>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            reply = c.cmd(b"Subject: %d\r\n\r\n" % n + BODY.replace(b"\n", b"\r\n") + b".\r\n")
            if not reply.startswith("250 2.0.0 Ok: queued as "):
                accepted.append(f"unexpected reply: {reply}")
                return
            accepted.append(reply.rsplit(" ", 1)[1])
            if not reuse:
                c.close()
                c = None
    except (OSError, EOFError):
        return  # the listener is gone
    except AssertionError as e:
        accepted.append(f"unexpected reply: {e}")
    finally:
        if c is not None:
            c.close()


def test_a_listener_killed_anywhere_loses_no_accepted_message(
        tmp_path: Path, values: dict[str, object]) -> None:
    """Eight sessions (half on new connections, half reusing theirs) into one listener process,
    killed with SIGKILL at random moments: every message it answered 250 is a complete entry,
    and no entry lacks its message."""
    rng = random.Random(20)
    queue = Queue(str(values["queue_directory"]))
    accepted: list[str] = []
    for round_ in range(4):
        (tmp_path / f"l{round_}").mkdir()
        with listener(tmp_path / f"l{round_}", values) as lst:
            stop = threading.Event()
            threads = [threading.Thread(target=sender, args=(lst.port, i % 2 == 0, accepted, stop))
                       for i in range(8)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.0))
            os.kill(lst.proc.pid, signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
            lst.proc.wait(TIMEOUT)
        entries = complete_entries(queue)
        assert set(accepted) <= set(entries)
        assert all(data.endswith(b"\n\n" + BODY) for data in entries.values())
    assert accepted  # (the test measured something)
