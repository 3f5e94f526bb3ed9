"""Maildrop pickup: move ordinary users' submissions into the queue, treating them as hostile.

Every maildrop file is validated by queue/maildrop.py; what it refuses goes to corrupt/, with a
warning. The submitter's identity is the file's owner, never what the file says.
"""

import os
import pwd

from pymailtools import log as logline
from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.queue import maildrop
from pymailtools.queue.envelope import CorruptEnvelope
from pymailtools.queue.maildrop import Dropped
from pymailtools.queue.store import MAILDROP, Queue, Submission


def pickup(queue: Queue, cfg: Config, log: Logger) -> int:
    """Move every complete maildrop file into the queue; return how many were taken."""
    # Submissions still being written (ID.PID.tmp) are left alone; debris of dead ones goes.
    maildrop.purge(queue)
    taken = 0
    for name in list(maildrop.names(queue)):
        try:
            fd = maildrop.open_file(queue, name)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning(f"maildrop/{name}: refused ({e.strerror}); moved to corrupt/")
            maildrop.quarantine(queue, name)
            continue
        try:
            try:
                dropped = maildrop.read(fd, cfg.message_size_limit)
            except (CorruptEnvelope, OSError, UnicodeError) as e:
                log.warning(f"maildrop/{name}: refused ({e}); moved to corrupt/")
                maildrop.quarantine(queue, name)
                continue
            qid = _requeue(queue, fd, dropped)
        finally:
            os.close(fd)
        maildrop.remove(queue, name)
        log.info(logline.pickup(qid, dropped.owner, dropped.envelope.sender))
        taken += 1
    return taken


def _requeue(queue: Queue, fd: int, dropped: Dropped) -> str:
    """Queue the message of a validated maildrop file as its owner's submission."""
    env = dropped.envelope
    env.uid = dropped.owner
    try:
        env.user = pwd.getpwuid(dropped.owner).pw_name
    except KeyError:
        env.user = str(dropped.owner)
    env.origin = MAILDROP
    sub = Submission(queue, maildrop=False)
    offset = 0
    try:
        while offset < dropped.message_size:
            chunk = os.pread(fd, min(1 << 20, dropped.message_size - offset), offset)
            if not chunk:
                raise CorruptEnvelope("file shrank while being read")
            sub.write(chunk)
            offset += len(chunk)
    except BaseException:
        sub.abort()
        raise
    return sub.commit(env)
