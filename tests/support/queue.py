"""Queue contents for tests: entries put in place by hand, messages submitted, states read back,
and one queue run."""

from __future__ import annotations

import io

from pymailtools.config import Config
from pymailtools.qmgr.runner import Runner, Stats
from pymailtools.queue.envelope import DEFERRED, Envelope, Recipient
from pymailtools.queue.store import STATES, Queue
from pymailtools.submit.submission import Options, submit

REFUSED = "connect to 127.0.0.1[127.0.0.1]:9: Connection refused"
SENDER = "alice@sender.test"
MSG = b"Subject: remote\nMessage-ID: <remote-1@sender.test>\n\nHello\n.\nbye\n"


def put(q: Queue, qid: str, sender: str, rcpts: list[Recipient], *, state: str = "deferred",
        arrival: float = 1795391852.0, size: int = 262) -> str:
    """An entry with a chosen id and size (message file of that size, envelope in state)."""
    with open(q.path("messages", qid), "wb") as f:
        f.write(b"x" * size)
    q.write_envelope(Envelope(qid, sender, rcpts, arrival=arrival, size=size), state)
    return qid


def deferred(addr: str, reason: str = REFUSED) -> Recipient:
    """A recipient deferred for ``reason``."""
    return Recipient(addr, state=DEFERRED, reason=reason)


def queue(cfg: Config, *rcpts: str, sender: str = SENDER, msg: bytes = MSG) -> str:
    """Submit ``msg`` for ``rcpts`` as sendmail -i would; its queue id."""
    return submit(cfg, io.BytesIO(msg), Options(list(rcpts), sender=sender, ignore_dots=True))


def entries(cfg: Config) -> list[tuple[str, Envelope]]:
    """(state, envelope) of every entry in the queue."""
    q = Queue(cfg.queue_directory)
    return [(s, q.load(i, s)[1]) for s in STATES for i in q.ids(s)]


def states(cfg: Config, qid: str) -> dict[str, str]:
    """Recipient -> state of entry ``qid``; {} when the entry is gone (all done)."""
    for _, env in entries(cfg):
        if env.id == qid:
            return {r.address: r.state for r in env.recipients}
    return {}


def run(cfg: Config, *, force: bool = False) -> Stats:
    """One queue run; with ``force``, entries not yet due are tried too."""
    return Runner(cfg).run(force=force)


def complete_entries(q: Queue) -> dict[str, bytes]:
    """Every published entry's message; each must load and match its envelope's size."""
    found = {}
    for state in STATES:
        for qid in q.ids(state):
            _, env = q.load(qid, state)
            data = q.read_message(qid)
            assert len(data) == env.size
            found[qid] = data
    return found
