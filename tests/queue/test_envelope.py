"""Envelope records: exact round trip for hostile strings, torn files recognised."""

import random

import pytest

from pymailtools.queue.envelope import CorruptEnvelope, Envelope, Recipient, peek


def _random_text(rng: random.Random) -> str:
    alphabet = "ab%: \r\n\x00\x1b\x7f\t<>@é€\udcff" + "".join(chr(i) for i in range(32))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def test_round_trip_of_hostile_strings() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        rcpts = [Recipient(_random_text(rng), _random_text(rng), "failure", "deferred",
                           rng.randint(0, 9), rng.random() * 1e9, rng.random(),
                           "4.2.0", _random_text(rng)) for _ in range(rng.randint(1, 4))]
        env = Envelope("ABC123", _random_text(rng), rcpts, arrival=rng.random() * 1e9, uid=7,
                       user=_random_text(rng), size=rng.randint(0, 10**9),
                       envid=_random_text(rng), ret="hdrs", warned=True)
        data = env.to_bytes()
        back = Envelope.from_bytes(data)
        assert back == env
        # No value can add a record: exactly one line per field plus one per recipient.
        assert data.count(b"\n") == 12 + len(rcpts)
        # the runner's quick look reads the same id, sender and recipients
        assert peek(data) == (env.id, env.sender,
                              [(r.state, r.next_try, r.address) for r in rcpts])


def test_every_truncation_is_detected() -> None:
    env = Envelope("ABC", "s@x.test", [Recipient("r@y.test"), Recipient("q@y.test")], size=5)
    data = env.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(CorruptEnvelope):
            Envelope.from_bytes(data[:cut])


@pytest.mark.parametrize(
    "junk", [b"", b"hello\n", b"\x00" * 50, b"pymailtools-envelope 1\nend 0\n"])
def test_foreign_files_rejected(junk: bytes) -> None:
    with pytest.raises(CorruptEnvelope):
        Envelope.from_bytes(junk)
    with pytest.raises(CorruptEnvelope):
        peek(junk)


def test_quote_short_cut_gives_the_escaping_loops_answer() -> None:
    """quote() skips its character loop for plain printable ASCII; every other string still
    gets %XX for %, white space, controls and DEL, and nothing else is touched."""
    from pymailtools.queue.envelope import quote, unquote

    def reference(s: str) -> str:
        return ":" + "".join(ch if 0x21 <= ord(ch) <= 0x7E and ch != "%" or ord(ch) > 0x7F
                             else f"%{ord(ch):02X}" for ch in s)

    rng = random.Random(7)
    samples = ["", "a@b.test", "user%host@x", "a b", "x\x7f", "é", "~!#$&'*+/=?^_`{|}"]
    samples += [_random_text(rng) for _ in range(5000)]
    samples += ["".join(chr(rng.randrange(0x20, 0x80)) for _ in range(8)) for _ in range(5000)]
    for s in samples:
        assert quote(s) == reference(s), repr(s)
        assert unquote(quote(s)) == s
