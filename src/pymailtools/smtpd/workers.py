"""sendmail -bd with smtpd_workers above 1: the supervisor of several listener processes
sharing the bound sockets."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

from pymailtools import config as configmod
from pymailtools.config import Config
from pymailtools.errors import MailError
from pymailtools.log import Logger
from pymailtools.smtpd.clients import SharedClients
from pymailtools.smtpd.listener import KICK_CODE, SHUTDOWN_GRACE, listen, run_loop
from pymailtools.smtpd.policy import Settings

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class Supervisor:
    """The parent of smtpd_workers listener processes sharing the bound sockets (the kernel's
    accept queue is theirs to share). It starts them, restarts one that dies, passes SIGHUP on,
    and on SIGTERM stops them all, each draining as a single listener does. It alone starts
    queue runs: after mail was queued by any worker, and every -qINTERVAL. Single-threaded, so
    forking it is safe."""

    RESTART_DELAY = 1.0  # a worker that died this soon after its start waits this long
    STOP_GRACE = SHUTDOWN_GRACE + 10  # then the workers still running get SIGKILL

    def __init__(self, cfg: Config, socks: list[socket.socket], workers: int, *,
                 interval: int | None, config_path: str | None, logger: Logger) -> None:
        self.cfg = cfg
        self.socks = socks
        self.workers = workers
        self.interval = interval
        self.config_path = config_path
        self.log = logger
        self.clients = SharedClients(workers)
        self.pids: dict[int, int] = {}  # pid -> worker number
        self.started: dict[int, float] = {}  # worker number -> when it was started
        self.due: dict[int, float] = {}  # worker number -> when to restart it
        self.kick_pid: int | None = None
        self.kick_wanted = False
        self.stopping = False
        # Workers write a byte to `notes` per message queued; `alive` is never written: a
        # worker sees end of file on it when this process is gone.
        self.notes_r, self.notes_w = os.pipe()
        self.alive_r, self.alive_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.notes_r, self.notes_w, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    # --- the main loop ---------------------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.signal(s, lambda *_: None) for s in _SIGNALS}
        signal.set_wakeup_fd(self.wake_w)
        try:
            for n in range(self.workers):
                self.spawn(n)
            self.loop()
        finally:
            signal.set_wakeup_fd(-1)
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def loop(self) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        poller.register(self.notes_r, select.POLLIN)
        next_run = time.monotonic() if self.interval else None
        give_up = 0.0
        while True:
            now = time.monotonic()
            deadlines = list(self.due.values())
            if next_run is not None and not self.stopping:
                deadlines.append(next_run)
            if self.stopping:
                deadlines.append(give_up)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for fd, _ in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
                if fd == self.wake_r:
                    for signum in self._drain(self.wake_r):
                        if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                            self.stop()
                            give_up = time.monotonic() + self.STOP_GRACE
                        elif signum == signal.SIGHUP:
                            self.reload()
                elif self._drain(self.notes_r):
                    self.kick()
            self.reap()
            now = time.monotonic()
            if self.stopping:
                if not self.pids:
                    return
                if now >= give_up:
                    for pid in self.pids:
                        self.log.warning(f"worker process {pid} still running; killing it")
                        self._signal(pid, signal.SIGKILL)
                    give_up = now + 5
                continue
            for n, when in list(self.due.items()):
                if now >= when:
                    del self.due[n]
                    self.spawn(n)
            if next_run is not None and now >= next_run:
                self.kick()
                next_run = now + (self.interval or 0)

    @staticmethod
    def _drain(fd: int) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except (BlockingIOError, InterruptedError):
                return data
            if not chunk:
                return data
            data += chunk

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # --- workers ---------------------------------------------------------------------------

    def spawn(self, n: int) -> None:
        """Fork worker ``n``. Signals stay blocked across the fork until the worker's event
        loop has its handlers, so a SIGTERM or SIGHUP sent at once is not lost."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            self.log.error(f"cannot start a worker process: {e.strerror}")
            self.due[n] = time.monotonic() + self.RESTART_DELAY
            return
        if pid == 0:
            code = 1
            try:
                code = self.worker(n)
            except BaseException as e:  # a worker never returns into the command line code
                self.log.error(f"worker process failed: {e!r}")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        self.pids[pid] = n
        self.started[n] = time.monotonic()

    def worker(self, n: int) -> int:
        """The body of worker process ``n`` (in the child)."""
        signal.set_wakeup_fd(-1)
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w, self.notes_r, self.alive_w):
            os.close(fd)
        self.clients.worker = n
        notes = self.notes_w

        def queued(qid: str) -> None:
            try:
                os.write(notes, b".")
            except OSError:
                pass  # the pipe is full: a queue run is already wanted

        def ready() -> None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

        run_loop(listen(Settings(self.cfg), self.log, self.socks, self.config_path,
                            clients=self.clients,
                            queued=queued,
                            parent_fd=self.alive_r, ready=ready))
        return 0

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.kick_pid:
                self.kick_pid = None
                if self.kick_wanted and not self.stopping:
                    self.kick()
                continue
            n = self.pids.pop(pid, None)
            if n is None:
                continue
            self.clients.forget(n)
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            delay = 0.0
            if time.monotonic() - self.started.get(n, 0.0) < self.RESTART_DELAY:
                delay = self.RESTART_DELAY
            self.log.warning(f"worker process {pid} exited with {how}; starting a new one"
                             + (f" in {delay:g}s" if delay else ""))
            self.due[n] = time.monotonic() + delay

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration itself; this process re-reads it
        for the workers it will start and for queue runs. smtpd_listen and smtpd_workers
        take effect at the next start."""
        try:
            new = configmod.load(self.config_path)
            Settings(new)
        except MailError as e:
            self.log.error(f"reload failed, keeping the old configuration: {e}")
        else:
            self.cfg = new
        for pid in self.pids:
            self._signal(pid, signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM: close our copies of the sockets (no connection waits for a process that
        will not accept it), then let every worker drain."""
        self.stopping = True
        self.due.clear()
        for s in self.socks:
            s.close()
        for pid in self.pids:
            self._signal(pid, signal.SIGTERM)

    # --- queue runs ------------------------------------------------------------------------

    def kick(self) -> None:
        """Start a queue run in a helper process (wake.kick), one at a time: requests made
        while one runs are served by one more run after it."""
        if self.kick_pid is not None:
            self.kick_wanted = True
            return
        self.kick_wanted = False
        null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
        try:
            self.kick_pid = os.posix_spawn(
                sys.executable, [sys.executable, "-c", KICK_CODE, self.config_path or ""],
                os.environ, file_actions=null)
        except OSError as e:
            self.log.error(f"cannot start a queue run: {e.strerror}")
