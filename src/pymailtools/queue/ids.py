"""Queue ids: short, time-ordered, never reused, and validated strictly before any path join."""

import os
import time

from pymailtools.errors import InvalidQueueId

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MAX_LENGTH = 32
TIME_DIGITS = 9  # base-62 microseconds since the epoch: sortable until the year 8000+
RANDOM_DIGITS = 5


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def new_id() -> str:
    """A 14-character id: microsecond timestamp then randomness, in [0-9A-Za-z]."""
    micros = time.time_ns() // 1000
    rand = int.from_bytes(os.urandom(4), "big")
    return _base62(micros, TIME_DIGITS) + _base62(rand, RANDOM_DIGITS)


def is_valid(qid: object) -> bool:
    """True for 1-32 ASCII letters and digits only (str.isalnum() would accept '١٢٣')."""
    # isascii() first: for ASCII text isalnum() is exactly [0-9A-Za-z]; alone it would accept
    # Arabic-Indic digits and full-width letters.
    return isinstance(qid, str) and 0 < len(qid) <= MAX_LENGTH and qid.isascii() and qid.isalnum()


def check(qid: str) -> str:
    """Return ``qid`` or raise InvalidQueueId (exit 64)."""
    if not is_valid(qid):
        raise InvalidQueueId(f"invalid queue id: {qid!r}" if not qid.isprintable() else
                             f"invalid queue id: {qid}")
    return qid


def arrival_time(qid: str) -> float | None:
    """The submission time encoded in an id of ours, or None for a foreign one."""
    if len(qid) != TIME_DIGITS + RANDOM_DIGITS or not is_valid(qid):
        return None
    n = 0
    for c in qid[:TIME_DIGITS]:
        n = n * 62 + ALPHABET.index(c)
    return n / 1e6
