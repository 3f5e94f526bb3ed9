"""smtp_generic_maps: the addresses of a message as it leaves over SMTP (envelope and headers).

Local mail keeps the local names (``root@host.localdomain``); only what goes out to another
host is rewritten (``me@example.com``). The body is never touched: only the header block is
parsed, so a 10 MB message costs what its headers cost.
"""

from pymailtools import rewrite
from pymailtools.config import Config


class Generic:
    """smtp_generic_maps of one configuration, opened once for a queue run."""

    def __init__(self, cfg: Config) -> None:
        self.rw = rewrite.GenericMaps(cfg)  # smtp_generic_maps only

    def address(self, addr: str) -> str:
        """An envelope address as it goes out ("" — the null sender — stays as it is)."""
        return self.rw.smtp_generic(addr) if addr else addr

    def data(self, data: bytes) -> bytes:
        """SMTP DATA content (CRLF, dot-stuffed, terminated) with the addresses of its
        address headers rewritten; the same object when nothing changed."""
        end = data.find(b"\r\n\r\n")
        if end < 0:  # no body: the headers run up to the terminating ".\r\n"
            end = len(data) - 5 if data.endswith(b"\r\n.\r\n") else -1
            if end < 0:
                return data
        head = data[: end + 2]
        headers: list[bytes] = []
        for line in head.split(b"\r\n")[:-1]:
            if line[:1] in (b" ", b"\t") and headers:
                headers[-1] += b"\r\n" + line
            else:
                headers.append(line)
        new = [self.rw.generic_header(h) for h in headers]
        if new == headers:
            return data
        return b"\r\n".join(new) + b"\r\n" + data[end + 2 :]
