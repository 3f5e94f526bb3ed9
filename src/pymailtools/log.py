"""Delivery log lines in Postfix's shape, escaped so that one event is always one line."""

# Cheap to import (sendmail's submission path may log): sys only; syslog is imported on first use.
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only; importing these would cost the submission path ~5 ms
    from collections.abc import Callable, Sequence
    from types import ModuleType

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def escape(value: object) -> str:
    """``value`` as text with every non-printable character (C0 and C1 controls, DEL, line and
    paragraph separators, bidi and other format characters, lone surrogates) and the backslash
    written as a visible escape: ``\\r``, ``\\n``, ``\\t``, ``\\\\``, ``\\xNN``, ``\\uNNNN``.

    The backslash is escaped too, so a sender cannot type a literal ``\\n`` that reads like an
    escaped line break (CWE-117)."""
    s = str(value)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(_escape_char(ch) for ch in s)


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that was not UTF-8 (surrogateescape): show the byte itself.
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _guard(line: str) -> str:
    """Escape control characters but leave backslashes alone: lines made by the helpers below
    are already escaped and pass unchanged; free text still cannot break the line."""
    if line.isprintable():
        return line
    return "".join(ch if ch.isprintable() or ch == "\\" else _escape_char(ch) for ch in line)


def format_delay(seconds: float) -> str:
    """Seconds the way Postfix logs them: two significant digits, at most two decimals, the
    integer part always whole (0.02, 0.1, 1.2, 12, 345)."""
    if not seconds > 0:  # also catches NaN and a clock that went backwards
        return "0"
    decimals = 2 if seconds < 1 else 1 if seconds < 10 else 0
    text = f"{seconds:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def make_line(qid: str, *, to: str, orig_to: str | None = None, relay: str = "local",
              delay: float = 0.0, delays: "Sequence[float] | None" = None, dsn: str,
              status: str, detail: str, dkim: str = "") -> str:
    """``QID: to=<rcpt>, orig_to=<x>, relay=R, delay=D, delays=a/b/c/d, dsn=X.Y.Z,
    status=S (detail), dkim=signed``; orig_to, delays and dkim only when given (dkim last, so
    log readers that match Postfix's fields up to the status still do)."""
    fields = [f"to=<{escape(to)}>"]
    if orig_to is not None:
        fields.append(f"orig_to=<{escape(orig_to)}>")
    fields += [f"relay={escape(relay)}", f"delay={format_delay(delay)}"]
    if delays is not None:
        fields.append("delays=" + "/".join(format_delay(d) for d in delays))
    fields += [f"dsn={escape(dsn)}", f"status={escape(status)} ({escape(detail)})"]
    if dkim:
        fields.append(f"dkim={escape(dkim)}")
    return f"{escape(qid)}: " + ", ".join(fields)


def queue_active(qid: str, sender: str, size: int, nrcpt: int) -> str:
    """``QID: from=<sender>, size=N, nrcpt=M (queue active)`` (Postfix's qmgr)."""
    return f"{escape(qid)}: from=<{escape(sender)}>, size={int(size)}, nrcpt={int(nrcpt)} " \
           "(queue active)"


def pickup(qid: str, uid: int, sender: str) -> str:
    """``QID: uid=N from=<sender>`` (Postfix's pickup, for a local submission)."""
    return f"{escape(qid)}: uid={int(uid)} from=<{escape(sender)}>"


def message_id(qid: str, msgid: str) -> str:
    """``QID: message-id=<id>`` (Postfix's cleanup); ``msgid`` is given with or without <>."""
    bare = msgid.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    return f"{escape(qid)}: message-id=<{escape(bare)}>"


def expired(qid: str, sender: str) -> str:
    """``QID: from=<sender>, status=expired, returned to sender`` (Postfix's qmgr)."""
    return f"{escape(qid)}: from=<{escape(sender)}>, status=expired, returned to sender"


def bounce_notice(qid: str, bounce_id: str, *, delayed: bool = False) -> str:
    """``QID: sender non-delivery notification: BOUNCEID`` (or ``sender delay notification``)."""
    kind = "delay" if delayed else "non-delivery"
    return f"{escape(qid)}: sender {kind} notification: {escape(bounce_id)}"


def removed(qid: str) -> str:
    """``QID: removed``: the entry left the queue (delivered, bounced or deleted)."""
    return f"{escape(qid)}: removed"


def held(qid: str) -> str:
    """``QID: placed on hold`` (postsuper -h)."""
    return f"{escape(qid)}: placed on hold"


def released(qid: str) -> str:
    """``QID: released from hold`` (postsuper -H)."""
    return f"{escape(qid)}: released from hold"


# Set by a queue runner: called once, before the routing modules' first warning goes to
# Python logging, to send those warnings to the runner's log (so that a run with none never
# loads logging).
before_library_warning: "Callable[[], None] | None" = None


def library_warning(name: str, text: str) -> None:
    """A warning of the library module ``name`` (the routing of local recipients), through
    Python logging's logger ``name``."""
    global before_library_warning
    import logging  # only when there is something to warn about

    hook, before_library_warning = before_library_warning, None
    if hook is not None:
        hook()
    logging.getLogger(name).warning("%s", text)


class Logger:
    """Writes log lines to syslog (facility mail, ident ``pymailtools/<prog>``) and, when
    verbose, to stderr as ``<prog>: <line>``. Warnings and errors carry Postfix's
    ``warning:`` / ``error:`` prefix, which log readers match on."""

    def __init__(self, prog: str, *, to_syslog: bool, verbose: bool) -> None:
        self.prog = prog
        self.to_syslog = to_syslog
        self.verbose = verbose
        self._syslog: ModuleType | None = None

    def info(self, line: str) -> None:
        self._emit("info", "", line)

    def warning(self, line: str) -> None:
        self._emit("warning", "warning: ", line)

    def error(self, line: str) -> None:
        self._emit("err", "error: ", line)

    def _emit(self, level: str, prefix: str, line: str) -> None:
        text = prefix + _guard(line)
        if self.to_syslog:
            mod = self._open()
            # syslog.syslog passes the text through "%s", so a % in it is harmless.
            mod.syslog(getattr(mod, "LOG_" + level.upper()), text)
        if self.verbose:
            try:
                print(f"{self.prog}: {text}", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                # A closed or broken stderr must not abort a delivery that is being logged.
                pass

    def _open(self) -> "ModuleType":
        if self._syslog is None:
            # syslog only once a line goes there (syslog = no never opens it)
            import syslog

            # Postfix's shape: "postfix/smtp[PID]: ..." -> "pymailtools/runner[PID]: ...".
            syslog.openlog(f"pymailtools/{self.prog}", syslog.LOG_PID, syslog.LOG_MAIL)
            self._syslog = syslog
        return self._syslog
