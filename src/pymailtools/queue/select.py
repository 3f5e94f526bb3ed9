"""Queue selectors: --from, --to, --older-than, --newer-than, --queue, --reason."""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

from pymailtools.errors import UsageError
from pymailtools.queue.envelope import Envelope

# Names the selectors and postsuper accept; "active" = an incoming or deferred entry that a
# runner holds locked right now (we have no active directory).
QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_GLOB = frozenset("*?[")
NULL_SENDER_NAMES = ("", "<>", "mailer-daemon")


def parse_age(text: str, now: float | None = None) -> float:
    """The cut-off time for an AGE: ``90``, ``90s``, ``2h``, ``1h30m``, ``3d``, ``1w``, or an
    absolute date (``2026-11-01 10:00``, local time unless it names a zone)."""
    now = time.time() if now is None else now
    s = text.strip()
    total, digits, ok = 0, "", bool(s)
    for ch in s:
        if ch.isascii() and ch.isdigit():
            digits += ch
        elif ch in _UNITS and digits:
            total += int(digits) * _UNITS[ch]
            digits = ""
        else:
            ok = False
            break
    if ok:
        return now - (total + int(digits or 0))
    return _parse_date(text)


def _parse_date(text: str) -> float:
    from dateutil import parser  # ~30 ms of imports: only when a date is given

    try:
        when = parser.parse(text)
    except (ValueError, OverflowError):
        raise UsageError(f"invalid age or date: {text!r} (use 2h, 3d or a date such as "
                         f"\"2026-11-01 10:00\")") from None
    return when.timestamp()


def _matcher(pattern: str) -> tuple[str, str]:
    """(kind, lowered pattern): glob, domain, address or substring."""
    p = pattern.lower()
    if any(c in _GLOB for c in p):
        return "glob", p
    if p.startswith("@"):
        return "domain", p
    if "@" in p:
        return "address", p
    return "substring", p


def _match(kind: str, p: str, value: str) -> bool:
    v = value.lower()
    if kind == "glob":
        return fnmatchcase(v, p)
    if kind == "domain":
        return v.endswith(p)
    if kind == "address":
        return v == p
    return p in v


class Selector:
    """Which queue entries a command applies to; an empty selector matches everything."""

    def __init__(self, *, senders: list[str] | None = None, recipients: list[str] | None = None,
                 older_than: float | None = None, newer_than: float | None = None,
                 queues: list[str] | None = None, reasons: list[str] | None = None) -> None:
        for q in queues or ():
            if q not in QUEUE_NAMES:
                raise UsageError(f"invalid queue name: {q} (one of {', '.join(QUEUE_NAMES)})")
        self.senders = [_matcher(p) for p in senders or () if p.lower() not in NULL_SENDER_NAMES]
        self.null_sender = any(p.lower() in NULL_SENDER_NAMES for p in senders or ())
        self.recipients = [_matcher(p) for p in recipients or ()]
        self.reasons = [("glob", p.lower()) if any(c in _GLOB for c in p) else
                        ("substring", p.lower()) for p in reasons or ()]
        self.older_than = older_than
        self.newer_than = newer_than
        self.queues = frozenset(queues or ())

    @property
    def empty(self) -> bool:
        return not (self.senders or self.null_sender or self.recipients or self.reasons
                    or self.queues or self.older_than is not None
                    or self.newer_than is not None)

    @property
    def needs_envelope(self) -> bool:
        """Whether matching needs the envelope (not just the state and id)."""
        return bool(self.senders or self.null_sender or self.recipients or self.reasons
                    or self.older_than is not None or self.newer_than is not None)

    def wants_state(self, state: str) -> bool:
        """Could an entry in this state directory match? ("active" lives in two of them.)"""
        if not self.queues:
            return True
        if state in self.queues:
            return True
        return "active" in self.queues and state in ("incoming", "deferred")

    def matches_queue(self, state: str, active: bool) -> bool:
        if not self.queues:
            return True
        name = "active" if active else state
        return name in self.queues

    def matches(self, env: Envelope) -> bool:
        """Sender, recipient, reason and age tests (each list: any pattern; all lists: and)."""
        return self.matches_fields(env.arrival, env.sender,
                                   [(r.address, r.reason) for r in env.recipients if not r.done])

    def matches_fields(self, arrival: float, sender: str,
                       pending: list[tuple[str, str]]) -> bool:
        """``matches`` on the fields a listing has: pending = (address, reason) per recipient
        not yet done."""
        if self.older_than is not None and not arrival < self.older_than:
            return False
        if self.newer_than is not None and not arrival > self.newer_than:
            return False
        if self.senders or self.null_sender:
            s = sender
            if not ((self.null_sender and not s) or
                    (s and any(_match(k, p, s) for k, p in self.senders))):
                return False
        if self.recipients and not any(_match(k, p, a) for a, _ in pending
                                       for k, p in self.recipients):
            return False
        if self.reasons and not any(_match(k, p, r) for _, r in pending if r
                                    for k, p in self.reasons):
            return False
        return True


LONG_OPTIONS = {"--from": "senders", "--to": "recipients", "--older-than": "older",
                "--newer-than": "newer", "--queue": "queues", "--reason": "reasons"}


class Options:
    """Selector options as they are met on a command line (``--to X`` or ``--to=X``)."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {v: [] for v in LONG_OPTIONS.values()}

    @staticmethod
    def is_option(arg: str) -> bool:
        return arg.partition("=")[0] in LONG_OPTIONS

    def take(self, argv: list[str], i: int) -> int:
        """Consume the selector option at argv[i]; return the index after it."""
        name, eq, value = argv[i].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UsageError(f"option {name} requires an argument")
            value = argv[i + 1]
            i += 1
        self.values[LONG_OPTIONS[name]].append(value)
        return i + 1

    def selector(self, now: float | None = None) -> Selector:
        now = time.time() if now is None else now
        v = self.values
        for key, flag in (("older", "--older-than"), ("newer", "--newer-than")):
            if len(v[key]) > 1:
                raise UsageError(f"{flag} given more than once")
        older = parse_age(v["older"][0], now) if v["older"] else None
        newer = parse_age(v["newer"][0], now) if v["newer"] else None
        return Selector(senders=v["senders"], recipients=v["recipients"], older_than=older,
                        newer_than=newer, queues=v["queues"], reasons=v["reasons"])
