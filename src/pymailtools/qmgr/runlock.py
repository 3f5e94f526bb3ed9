"""The runner lock (``run.lock`` in the queue directory): one queue runner works at a time."""

import fcntl

from pymailtools.config import Config
from pymailtools.queue.intake import QueueDir

RUN_LOCK = "run.lock"


def open_run_lock(cfg: Config) -> int:
    return QueueDir(cfg.queue_directory).open_lock_file(RUN_LOCK)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
