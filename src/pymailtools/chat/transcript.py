"""The session transcript: swaks' hint prefixes on a terminal or pipe, or JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from pymailtools.smtp.reply import Reply

# swaks' hints: 3 characters, then a space, then the text.
INFO, ERROR = "===", "***"
SEND, SEND_TLS, SEND_ODD, SEND_ODD_TLS = " ->", " ~>", "**>", "*~>"
RECV, RECV_TLS, RECV_BAD, RECV_BAD_TLS = "<- ", "<~ ", "<**", "<~*"

_COLOURS = {2: "32", 3: "36", 4: "33", 5: "31", 0: "35"}  # by reply class; 0 = malformed
MASK = "********"


def escape(text: str | bytes) -> str:
    """Remote-controlled text made safe for a terminal: controls shown as \\xHH, never raw."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\t":
            out.append(ch)
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif not ch.isprintable() and (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0):
            out.append(f"\\x{ord(ch):02x}")
        elif not ch.isprintable() and ch != " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


class Transcript:
    """Collects the session's events; prints them as they happen unless JSON is wanted."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None,
                 colour: bool = False, live: bool = True, hints: bool = True) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.colour = colour
        self.live = live
        self.hints = hints
        self.tls = False
        self.start = time.monotonic()
        self.events: list[dict[str, Any]] = []

    def _emit(self, kind: str, hint: str, text: str, stream: TextIO, code: int | None = None,
              colour: str | None = None) -> None:
        event: dict[str, Any] = {"t": round(time.monotonic() - self.start, 6), "dir": kind,
                                 "tls": self.tls, "text": text}
        if code is not None:
            event["code"] = code
        self.events.append(event)
        if not self.live:
            return
        # Errors keep their *** even in nc-like mode: they go to stderr, apart from the data.
        line = f"{hint} {text}" if self.hints or kind == "error" else text
        if colour and self.colour:
            line = f"\x1b[{colour}m{line}\x1b[0m"
        try:
            stream.write(line + "\n")
            stream.flush()
        except BrokenPipeError:
            self.live = False

    def info(self, text: str) -> None:
        if self.hints:
            self._emit("info", INFO, escape(text), self.out)
        else:
            self.events.append({"t": round(time.monotonic() - self.start, 6), "dir": "info",
                                "tls": self.tls, "text": escape(text)})

    def error(self, text: str) -> None:
        self._emit("error", ERROR, escape(text), self.err, colour="31;1")

    def sent(self, text: str | bytes, odd: bool = False) -> None:
        """A line we sent; ``odd`` marks deliberately rule-breaking bytes (swaks' "unexpected")."""
        if odd:
            hint = SEND_ODD_TLS if self.tls else SEND_ODD
        else:
            hint = SEND_TLS if self.tls else SEND
        self._emit("send", hint, escape(text), self.out)

    def received(self, reply: Reply, expected: bool = True) -> None:
        """A whole reply, its lines kept together; an error reply gets swaks' ``<**`` hint."""
        if expected and reply.code:
            hint = RECV_TLS if self.tls else RECV
        else:
            hint = RECV_BAD_TLS if self.tls else RECV_BAD
        colour = _COLOURS.get(reply.code // 100, "35")
        for line in reply.lines:
            self._emit("recv", hint, escape(line), self.out, code=reply.code, colour=colour)

    def json(self, outcome: dict[str, Any]) -> str:
        return json.dumps({"transcript": self.events, **outcome}, indent=2, ensure_ascii=False)
