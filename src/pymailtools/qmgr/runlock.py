"""The runner lock (``run.lock`` in the queue directory): one queue runner works at a time."""

import fcntl
import os

from pymailtools.config import Config

RUN_LOCK = "run.lock"


def open_run_lock(cfg: Config) -> int:
    return os.open(os.path.join(cfg.queue_directory, RUN_LOCK),
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
