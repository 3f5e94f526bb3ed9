"""Starting delivery after a submission: wake the active runner or start one, detached.

Never a process per message: the runner lock (``run.lock``) is taken *before* the runner is
started and inherited by it, so between a submitter's check and the runner's start there is
no window in which a second submitter would start another one.
"""

import os
import sys

from pymailtools.config import Config
from pymailtools.queue.intake import QueueDir

# The detached runner _spawn_runner() starts: a fresh interpreter that reads the configuration
# again (argv: config path or "", the inherited run.lock descriptor, the package's sys.path
# entry). -I: no PYTHON* variables and no current directory on sys.path, as fits a daemon.
SPAWN_CODE = ("import sys; sys.argv[3] in sys.path or sys.path.append(sys.argv[3]); "
              "from pymailtools import config; "
              "from pymailtools.qmgr.trigger import run_spawned; "
              "run_spawned(config.load(sys.argv[1] or None), int(sys.argv[2]))")


def kick(cfg: Config, config_path: str | None = None, *, spawn: bool = False) -> None:
    """Make sure a runner will deliver what was just queued, without making the caller wait.

    The entry was renamed into incoming/ before this is called; if the lock is held, the
    runner holding it re-scans incoming/ after releasing the lock, so it sees the entry.
    ``spawn``: start the runner as a fresh interpreter (posix_spawn, no copy of this process)
    that loads the configuration again, from ``config_path`` or where ``load()`` finds it;
    for a short-lived caller such as sendmail this costs the caller far less than a fork.
    """
    queue = QueueDir(cfg.queue_directory)
    if not queue.direct_access():
        return  # maildrop submission: the root runner (cron `sendmail -q`, -bd) picks it up
    try:
        fd = queue.try_run_lock()
    except OSError:
        return
    if fd is None:
        return
    if spawn:
        try:
            _spawn_runner(fd, config_path)
        except OSError:
            pass  # no runner now: the entry waits in incoming/ for the next queue run
        finally:
            os.close(fd)  # the runner holds the lock through its copy of the descriptor
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


def _spawn_runner(lock_fd: int, config_path: str | None) -> None:
    """Start the detached runner: its own session, stdio on /dev/null, holding ``lock_fd``."""
    # The sys.path entry this package was imported from, so the runner finds the same one.
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    null = [(os.POSIX_SPAWN_OPEN, std, os.devnull, os.O_RDWR, 0) for std in (0, 1, 2)]
    os.set_inheritable(lock_fd, True)
    os.posix_spawn(sys.executable,
                   [sys.executable, "-I", "-c", SPAWN_CODE, config_path or "", str(lock_fd), top],
                   os.environ, file_actions=null, setsid=True)


def run_spawned(cfg: Config, lock_fd: int) -> None:
    """The spawned runner's body: deliver until nothing new is due, then release the lock."""
    # not on the submission path: only the spawned runner loads the runner
    from pymailtools.qmgr.runner import Runner

    os.set_inheritable(lock_fd, False)
    Runner(cfg, prog="sendmail").background(lock_fd)


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
    queue = QueueDir(cfg.queue_directory)
    if not queue.direct_access():
        return 0
    # only foreground delivery (-odi, -v) runs the runner in this process
    from pymailtools.qmgr.runner import Runner

    Runner(cfg, prog=prog, verbose=verbose).run(ids=[qid], force=True)
    return 0
