"""Starting delivery after a submission: wake the active runner or start one, detached.

Never a process per message: the runner lock (``run.lock``) is taken *before* forking and
inherited by the detached runner, so between a submitter's check and the runner's start
there is no window in which a second submitter would start another one.
"""

import os

from pymailtools.config import Config
from pymailtools.qmgr.runlock import open_run_lock, try_lock
from pymailtools.queue.store import Queue


def kick(cfg: Config) -> None:
    """Make sure a runner will deliver what was just queued, without making the caller wait.

    The entry was renamed into incoming/ before this is called; if the lock is held, the
    runner holding it re-scans incoming/ after releasing the lock, so it sees the entry.
    """
    queue = Queue(cfg.queue_directory)
    if not queue.direct_access():
        return  # maildrop submission: the root runner (cron `sendmail -q`, -bd) picks it up
    try:
        fd = open_run_lock(cfg)
    except OSError:
        return
    if not try_lock(fd):
        os.close(fd)
        return
    if not detach():
        os.close(fd)  # the detached runner holds the lock through its copy of the fd
        return
    code = 1
    try:
        # not on the submission path: only the detached child loads the runner
        from pymailtools.qmgr.runner import Runner

        Runner(cfg, prog="sendmail").background(fd)
        code = 0
    finally:
        os._exit(code)


def detach() -> bool:
    """Fork a daemon: True in it (own session, stdio on /dev/null), False in the caller once
    the intermediate child is reaped. The daemon must end with os._exit()."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return False
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        # cron waits for EOF on the job's stdout/stderr: a daemon must not keep them open.
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
    except BaseException:
        os._exit(1)
    return True


def deliver_now(cfg: Config, qid: str, *, verbose: bool, prog: str) -> int:
    """-odi / -v: deliver this entry in the foreground (other entries are left to the runner)."""
    queue = Queue(cfg.queue_directory)
    if not queue.direct_access():
        return 0
    # only foreground delivery (-odi, -v) runs the runner in this process
    from pymailtools.qmgr.runner import Runner

    Runner(cfg, prog=prog, verbose=verbose).run(ids=[qid], force=True)
    return 0
