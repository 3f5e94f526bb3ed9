"""sendmail -bd / -bD: the listener in this process, or the supervisor of smtpd_workers
listener processes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.smtpd.clients import LocalClients
from pymailtools.smtpd.listener import Kicker, listen, run_loop, worker_count
from pymailtools.smtpd.policy import Settings
from pymailtools.smtpd.workers import Supervisor


def serve(cfg: Config, socks: list[socket.socket], *, interval: int | None,
          config_path: str | None, verbose: bool = False) -> int:
    """Run the listener on ``socks`` until SIGTERM: in-flight transactions finish, new commands
    get 421. SIGHUP re-reads the configuration for new connections. With ``interval`` the queue
    is also run that often (sendmail -bd -q15m). With smtpd_workers above 1 this process is
    the supervisor of that many listener processes (``Supervisor``)."""
    workers = worker_count(cfg)
    logger = Logger("smtpd", to_syslog=cfg.syslog, verbose=verbose)
    names = ", ".join(cfg.smtpd_listen)
    if workers > 1:
        logger.info(f"daemon started -- listening on {names} ({workers} processes)")
        code = Supervisor(cfg, socks, workers, interval=interval, config_path=config_path,
                          logger=logger).run()
        logger.info("daemon stopped")
        return code
    kicker = Kicker(config_path)

    def background() -> list[Coroutine[Any, Any, None]]:
        tasks = [kicker.run()]
        if interval:
            async def periodic() -> None:
                while True:
                    kicker.request()
                    await asyncio.sleep(interval)
            tasks.append(periodic())
        return tasks

    logger.info(f"daemon started -- listening on {names}")
    run_loop(listen(Settings(cfg), logger, socks, config_path, clients=LocalClients(),
                        queued=kicker.request, background=background))
    logger.info("daemon stopped")
    return 0
