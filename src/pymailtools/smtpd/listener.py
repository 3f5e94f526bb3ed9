"""sendmail -bd / -bD: the listening sockets, and one event loop serving SMTP on them."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from pymailtools import config as configmod
from pymailtools.config import SCHEMA, Config
from pymailtools.errors import ConfigError, MailError, PermissionDenied
from pymailtools.log import Logger
from pymailtools.smtpd.clients import LocalClients, SharedClients
from pymailtools.smtpd.policy import Settings
from pymailtools.smtpd.protocol import Handler, Server

SHUTDOWN_GRACE = 60.0  # seconds transactions in flight get to finish after SIGTERM


def parse_listen(item: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` -> (ip, port)."""
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(f"smtpd_listen: expected ip:port or [ipv6]:port, got {item!r}") \
            from None
    if not sep or not 0 < number < 65536:
        raise ConfigError(f"smtpd_listen: bad port in {item!r}")
    return host, number


def bind(cfg: Config, warn: Callable[[str], None] | None = None) -> list[socket.socket]:
    """Listening sockets for every smtpd_listen address (before detaching: errors show).

    With the default smtpd_listen, an address this host does not have (IPv6 turned off: no
    ::1) is skipped with a ``warn``ing, as Postfix's default inet_protocols does; an address
    the administrator named must work. Exit 77 for a port we may not bind (below 1024 without
    root), 78 for the rest."""
    default = cfg.smtpd_listen == SCHEMA["smtpd_listen"][1]
    socks = []
    try:
        for item in cfg.smtpd_listen:
            host, port = parse_listen(item)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = None
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
            except OSError as e:
                msg = f"smtpd_listen: cannot listen on {item}: {e.strerror}"
                if default and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    if s is not None:
                        socks.remove(s)
                        s.close()
                    if warn is not None:
                        warn(msg + " (skipped)")
                    continue
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise PermissionDenied(msg) from None
                raise ConfigError(msg) from None
            s.listen(128)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise ConfigError("smtpd_listen: no address to listen on")
    return socks


def worker_count(cfg: Config) -> int:
    """smtpd_workers; 0 means two listener processes per CPU this process may run on.

    Two, not one: a process writes its queue files on its event loop's thread, and while an
    fsync waits for the disk (about half of a write's time here) that process uses no CPU; a
    second process per CPU fills those waits (bench/receive -w 2,4 on two CPUs: 4 processes
    faster than 2 in each of six paired runs, by 1-39%)."""
    if cfg.smtpd_workers:
        return cfg.smtpd_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 * max(1, cpus)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop's event loop where it is installed (its transports and timers are
    C: less CPU per connection); the standard loop otherwise."""
    try:
        # optional: the standard loop when uvloop is not installed
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


QUEUE_THREADS = 16  # threaded queue writes in flight per process (QueueWriter, on a slow disk)
KICK_CODE = ("import sys; from pymailtools import config; from pymailtools.qmgr import trigger; "
             "trigger.kick(config.load(sys.argv[1] or None))")


class Kicker:
    """Starts a queue run after submissions (coalesced), in a fresh process: forking this
    multi-threaded one to run Python code, as trigger.kick() does, would not be safe."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path or ""
        self.wanted = asyncio.Event()

    def request(self, qid: str = "") -> None:
        self.wanted.set()

    async def run(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted.clear()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", KICK_CODE, self.config_path,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL)
                await proc.wait()
            except OSError:
                await asyncio.sleep(1)


async def listen(settings: Settings, logger: Logger, socks: list[socket.socket],
                  config_path: str | None, *, clients: LocalClients | SharedClients,
                  queued: Callable[[str], None] | None,
                  background: Callable[[], list[Coroutine[Any, Any, None]]] = list,
                  parent_fd: int | None = None,
                  ready: Callable[[], None] | None = None) -> None:
    """Serve SMTP on ``socks`` until SIGTERM/SIGINT (or, in a worker, until the parent is
    gone: ``parent_fd`` reads end of file), then drain: transactions in flight finish, other
    sessions get 421. SIGHUP re-reads the configuration for new connections."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="queue"))
    handler = Handler(settings, logger, queued, clients)
    # The loop accepts (in C, with uvloop) and makes the transports itself: ~12% less CPU
    # per connection than accepting in Python. Several worker processes share each socket.
    servers = [await loop.create_server(lambda: Server.fresh(handler, loop), sock=s,
                                        start_serving=False) for s in socks]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        try:
            new = Settings(configmod.load(config_path))
            if new.queue is not None and new.cfg.queue_directory != handler.cfg.queue_directory:
                new.queue.ensure()
            handler.settings = new
        except (MailError, OSError) as e:
            logger.error(f"reload failed, keeping the old configuration: {e}")
            return
        logger.info("configuration reloaded")

    loop.add_signal_handler(signal.SIGHUP, reload)
    if parent_fd is not None:
        def orphaned() -> None:
            loop.remove_reader(parent_fd)
            logger.warning("master process gone, stopping")
            stop.set()
        loop.add_reader(parent_fd, orphaned)
    if ready is not None:
        ready()
    for srv in servers:
        await srv.start_serving()
    tasks = [loop.create_task(c) for c in background()]
    await stop.wait()
    handler.draining = True
    for srv in servers:
        srv.close()  # stop accepting; this process's copy of the socket is closed
    for session in list(handler.sessions):
        if not session.in_transaction() and session.transport is not None:
            # (aiosmtpd declares a BaseTransport; a stream server's is a full Transport)
            cast(asyncio.Transport, session.transport).write(
                b"421 4.3.2 Service shutting down, closing transmission channel\r\n")
            session.close_transport()
    deadline = loop.time() + SHUTDOWN_GRACE
    while handler.sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for session in list(handler.sessions):
        session.close_transport()
    for t in tasks:
        t.cancel()
