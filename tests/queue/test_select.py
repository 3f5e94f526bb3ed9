"""Queue selectors: patterns, ages and dates, queue names, command-line options."""

from datetime import datetime

import pytest

from pymailtools.errors import UsageError
from pymailtools.queue.envelope import DEFERRED, SENT, Envelope, Recipient
from pymailtools.queue.select import Options, Selector, parse_age

NOW = 1_800_000_000.0


def env(sender: str = "a@x.test", rcpts: tuple[str, ...] = ("r@gmail.com",),
        arrival: float = NOW - 100, reason: str = "") -> Envelope:
    return Envelope("Q1", sender, [Recipient(r, state=DEFERRED, reason=reason) for r in rcpts],
                    arrival=arrival)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("2h", 7200), ("3d", 259200), ("1h30m", 5400), ("1w", 604800),
    ("0", 0),
])
def test_ages(text: str, seconds: int) -> None:
    assert parse_age(text, NOW) == NOW - seconds


def test_absolute_dates_use_dateutil_in_local_time() -> None:
    expect = datetime(2026, 11, 1, 10, 0).timestamp()
    assert parse_age("2026-11-01 10:00", NOW) == expect
    assert parse_age("2026-11-01T10:00:00+00:00", NOW) == 1793527200.0


@pytest.mark.parametrize("bad", ["", "h", "2x", "yesterday-ish nonsense", "1h-"])
def test_bad_ages_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_age(bad, NOW)


def test_pattern_kinds() -> None:
    e = env(sender="Spammer@Example.com", rcpts=("bob@gmail.com", "eve@mail.gmail.com"))
    assert Selector(senders=["spammer@example.com"]).matches(e)  # address, any case
    assert not Selector(senders=["mmer@example.com"]).matches(e)  # an address is exact
    assert Selector(senders=["spammer"]).matches(e)  # no @: substring
    assert Selector(senders=["*@example.*"]).matches(e)  # glob on the whole address
    assert Selector(recipients=["@gmail.com"]).matches(e)  # domain
    assert not Selector(recipients=["@ail.com"]).matches(env(rcpts=("x@mail.com",)))
    assert not Selector(recipients=["@yahoo.com"]).matches(e)


def test_null_sender_and_delivered_recipients() -> None:
    bounce = env(sender="")
    assert Selector(senders=[""]).matches(bounce)
    assert Selector(senders=["MAILER-DAEMON"]).matches(bounce)
    assert not Selector(senders=[""]).matches(env())
    done = Envelope("Q2", "a@x", [Recipient("r@gmail.com", state=SENT), Recipient("o@y.test")])
    assert not Selector(recipients=["@gmail.com"]).matches(done)  # only undelivered count


def test_ages_reasons_and_combination() -> None:
    old = env(arrival=NOW - 7200, reason="450 4.2.0 Greylisted")
    assert Selector(older_than=NOW - 3600).matches(old)
    assert not Selector(newer_than=NOW - 3600).matches(old)
    assert Selector(reasons=["greylisted"]).matches(old)
    assert Selector(reasons=["450 *"]).matches(old)
    assert not Selector(reasons=["refused"]).matches(old)
    assert not Selector(reasons=["greylisted"], senders=["other@x"]).matches(old)


def test_queue_names() -> None:
    sel = Selector(queues=["active", "hold"])
    assert sel.wants_state("incoming") and sel.wants_state("hold")
    assert not sel.wants_state("maildrop")
    assert sel.matches_queue("deferred", active=True)
    assert not sel.matches_queue("deferred", active=False)
    with pytest.raises(UsageError):
        Selector(queues=["corrupt"])


def test_options_from_a_command_line() -> None:
    opts = Options()
    argv = ["--from", "x@y", "--to=@gmail.com", "--older-than", "2h", "--queue", "deferred"]
    i = 0
    while i < len(argv):
        assert Options.is_option(argv[i])
        i = opts.take(argv, i)
    sel = opts.selector(NOW)
    assert sel.older_than == NOW - 7200 and sel.queues == {"deferred"}
    assert sel.matches(env(sender="x@y", arrival=NOW - 8000))
    assert not Options.is_option("--plain") and not Options.is_option("-d")
    with pytest.raises(UsageError):
        Options().take(["--to"], 0)
    twice = Options()
    twice.take(["--older-than=1h"], 0)
    twice.take(["--older-than=2h"], 0)
    with pytest.raises(UsageError):
        twice.selector()
    assert Selector().empty and not Selector(recipients=["x"]).empty
    assert Options().selector().older_than is None
