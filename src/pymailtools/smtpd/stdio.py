"""sendmail -bs: one SMTP session on standard input and output, queueing as sendmail -bm does."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from pymailtools.config import Config
from pymailtools.log import Logger
from pymailtools.qmgr import trigger as wake
from pymailtools.smtpd.policy import Settings
from pymailtools.smtpd.protocol import Handler, Server


class _StdioTransport(asyncio.Transport):
    """A transport over fds 0 and 1 (pipes, files, terminals or an inetd socket)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Server) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.closing = False
        self.resume = threading.Event()
        self.resume.set()
        self.done: asyncio.Future[None] = loop.create_future()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        try:
            while view:
                view = view[os.write(1, view):]
        except OSError:
            self.close()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.resume.set()
            self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        self.protocol.connection_lost(None)
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.resume.clear()

    def resume_reading(self) -> None:
        self.resume.set()

    def is_reading(self) -> bool:
        return self.resume.is_set()

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def feed(self, data: bytes) -> None:
        if not self.closing:
            self.protocol.data_received(data)

    async def end_of_input(self) -> None:
        """Input ended: let the session answer everything it has read, then close it (aiosmtpd
        itself would drop pipelined commands still buffered at end of file)."""
        reader = self.protocol._reader
        while not self.closing:
            # Waiting for more input: what is left (nothing, or a last line without its
            # CRLF) can never be a whole command.
            if reader._waiter is not None:  # type: ignore[attr-defined]  # private in asyncio
                self.close()
                break
            await asyncio.sleep(0.01)

    def pump(self) -> None:
        """Reader thread: stdin -> the protocol, honouring pause_reading()."""
        while True:
            self.resume.wait()
            if self.closing:
                return
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                self.loop.call_soon_threadsafe(
                    lambda: self.loop.create_task(self.end_of_input()))
                return
            self.loop.call_soon_threadsafe(self.feed, data)


def serve_stdio(cfg: Config, *, verbose: bool = False) -> int:
    """sendmail -bs: an SMTP session on stdin/stdout, queueing as sendmail -bm does."""
    settings = Settings(cfg, stdio=True)
    logger = Logger("smtpd", to_syslog=cfg.syslog, verbose=verbose)
    queued: list[str] = []

    async def session() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler(settings, logger, queued.append)
        server = Server(handler, loop=loop)
        transport = _StdioTransport(loop, server)
        server.connection_made(transport)
        threading.Thread(target=transport.pump, daemon=True, name="stdin").start()
        await transport.done
        await asyncio.sleep(0)

    asyncio.run(session())
    if queued and cfg.delivery_mode != "queue":
        wake.kick(cfg)
    return 0
