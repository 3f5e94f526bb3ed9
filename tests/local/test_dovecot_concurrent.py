"""Our queue runner delivers while Dovecot's IMAP and POP3 clients read and delete: the MDA's
locks and Dovecot's agree, so no message is lost, duplicated or mangled, in the spool's mbox
and in a Maildir, and Dovecot never reports the mailbox corrupted."""

from __future__ import annotations

import poplib
import pwd
import re
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pymailtools.local import mbox
from tests.conftest import Sendmail, missing, script, write_toml
from tests.support import dovecot

COUNT = 500
BATCH = 50
PASSWORD = "pw-concurrent"
SUBJECT = re.compile(rb"^Subject: msg (\d+)\r?$", re.MULTILINE | re.IGNORECASE)


def body(n: int) -> bytes:
    """A body that exercises mboxrd quoting, blank lines and sizes that vary."""
    # up to 100 kB: Dovecot's rewrites of the mbox (expunges) take long enough to overlap
    # with our appends, were the locks not to keep them apart
    filler = b"".join(b"line %d of message %d\n" % (i, n) for i in range(n % 17 * 250))
    return (b"body %d\nFrom the start of a line\n>From quoted already\n\n" % n) + filler + (
        b"end %d\n" % n)


def message(n: int) -> bytes:
    return (b"From: sender@example.test\nSubject: msg %d\nMessage-ID: <%d.concurrent@example.test>"
            b"\n\n" % (n, n)) + body(n)


def batches() -> list[range]:
    """Messages 1 to COUNT-1: most in -bs sessions of BATCH, a tenth one sendmail each,
    interleaved so deliveries go on all through the test."""
    singles = [range(n, n + 1) for n in range(1, COUNT // 10)]
    bulk = [range(n, min(n + BATCH, COUNT)) for n in range(COUNT // 10, COUNT, BATCH)]
    out: list[range] = []
    step = max(1, len(singles) // max(1, len(bulk)))
    for i, batch in enumerate(bulk):
        out += [*singles[i * step:(i + 1) * step], batch]
    return out + singles[len(bulk) * step:]


def smtp_session(user: str, numbers: range) -> bytes:
    lines = [b"HELO client.example.test"]
    for n in numbers:
        lines += [b"MAIL FROM:<sender@example.test>", b"RCPT TO:<%s>" % user.encode(), b"DATA"]
        lines += [b"." + ln if ln.startswith(b".") else ln
                  for ln in message(n).split(b"\n")[:-1]]
        lines.append(b".")
    lines.append(b"QUIT")
    return b"\r\n".join(lines) + b"\r\n"


def number(raw: bytes, stored: Callable[[bytes], bytes]) -> int:
    """The message's number, checking its body arrived as ``stored`` keeps it."""
    head, _, got = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    m = SUBJECT.search(head)
    assert m, raw[:500]
    n = int(m.group(1))
    assert got.rstrip(b"\n") == stored(body(n)).rstrip(b"\n"), (n, got[:300])
    return n


def as_stored(maildir: bool) -> Callable[[bytes], bytes]:
    """A body as Dovecot serves it back: exactly, from a Maildir; from an mbox with our
    mboxrd quoting left in, as Dovecot takes no '>' off a quoted From line (so its clients
    see '>From ' for 'From ', as with any mbox, and '>>From ' for '>From ')."""
    return (lambda b: b) if maildir else mbox.quote


class Tally:
    """What the clients saw and removed, kept under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.imap_expunged: Counter[int] = Counter()
        self.pop_deleted: Counter[int] = Counter()
        self.seen: set[int] = set()
        self.failures: list[str] = []


def imap_client(server: dovecot.Dovecot, user: str, tally: Tally, stop: threading.Event,
                stored: Callable[[bytes], bytes]) -> None:
    """Read everything new; expunge every message whose number is 0 mod 3; mark the others
    seen (Dovecot then rewrites their Status header in the mbox). One pass after ``stop``."""
    with server.imap_client(user) as imap:
        imap.select("INBOX")
        done: dict[bytes, int] = {}
        last = False
        while not last:
            last = stop.is_set()
            # SEARCH answers from the session's view as of its last sync (the end of the
            # previous command): NOOP syncs first, so the last pass sees all delivered mail.
            typ, data = imap.noop()
            assert typ == "OK", data
            typ, data = imap.uid("SEARCH", "ALL")
            assert typ == "OK", data
            uids = [u for u in data[0].split() if u not in done]
            for chunk in range(0, len(uids), 50):
                part = b",".join(uids[chunk:chunk + 50]).decode()
                typ, got = imap.uid("FETCH", part, "(UID BODY[])")
                assert typ == "OK", got
                for item in got:
                    if not isinstance(item, tuple):
                        continue
                    uid = re.search(rb"UID (\d+)", item[0])
                    assert uid, item[0]
                    done[uid.group(1)] = number(item[1], stored)
            doomed = [u for u in uids if u in done and done[u] % 3 == 0]
            with tally.lock:
                tally.seen.update(done[u] for u in uids if u in done)
            if doomed:
                typ, resp = imap.uid("STORE", b",".join(doomed).decode(), "+FLAGS.SILENT",
                                     r"(\Deleted)")
                assert typ == "OK", resp
                typ, resp = imap.expunge()
                assert typ == "OK", resp
                with tally.lock:
                    tally.imap_expunged.update(done[u] for u in doomed)
            if not last:
                time.sleep(0.05)
        imap.logout()


def pop_client(server: dovecot.Dovecot, user: str, tally: Tally, stop: threading.Event,
               stored: Callable[[bytes], bytes]) -> None:
    """Poll like a POP3 reader that leaves mail on the server: log in, RETR what UIDL says
    is new, DELE those 1 mod 3, QUIT; the deletions count only once QUIT has said +OK."""
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_file))
    known: dict[bytes, int] = {}
    last = False
    while not last:
        last = stop.is_set()
        pop = poplib.POP3("127.0.0.1", server.pop3, timeout=60)
        pop.stls(ctx)
        pop.user(user)
        pop.pass_(PASSWORD)
        deleted = []
        for entry in pop.uidl()[1]:
            msgno, uidl = entry.split()
            if uidl not in known:
                try:
                    lines = pop.retr(int(msgno))[1]
                except poplib.error_proto as e:
                    # An IMAP client expunged it meanwhile: Dovecot says so (a Maildir is not
                    # locked for the POP3 session).
                    assert b"expunged" in e.args[0], e
                    continue
                known[uidl] = number(b"\n".join(lines) + b"\n", stored)
            if known[uidl] % 3 == 1:
                pop.dele(int(msgno))
                deleted.append(known[uidl])
        assert pop.quit().startswith(b"+OK")
        with tally.lock:
            tally.pop_deleted.update(deleted)
            tally.seen.update(known.values())
        if not last:
            time.sleep(0.1)


def guarded(fn: Callable[..., None], tally: Tally, *args: object) -> Callable[[], None]:
    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            with tally.lock:
                tally.failures.append(f"{fn.__name__}: {e!r}")
    return run


def queue_runner(sendmail: Sendmail, stop: threading.Event) -> None:
    """cron's `sendmail -q`, run again as soon as the last run ends."""
    while not stop.is_set():
        p = sendmail("-q", timeout=120)
        assert p.returncode == 0, p.stderr
        time.sleep(0.2)


@pytest.fixture
def mra_sendmail(tmp_path: Path, config_values: dict[str, object], open_spool: Path,
                 request: pytest.FixtureRequest) -> Iterator[Sendmail]:
    values = dict(config_values, mail_spool_directory=str(open_spool),
                  # the real pacing: a busy mailbox is retried after a second, not at once
                  deliver_lock_delay="1s")
    if request.param == "maildir":
        values["home_mailbox"] = "Maildir/"
    config = write_toml(tmp_path / "mra.toml", values)
    yield Sendmail(config, Path(str(values["queue_directory"])))


@pytest.mark.parametrize("mra_sendmail", ["mbox", "maildir"], indirect=True)
def test_delivery_while_imap_and_pop3_clients_delete(
        mra_sendmail: Sendmail, open_spool: Path, system_user: pwd.struct_passwd,
        request: pytest.FixtureRequest) -> None:
    why = dovecot.available()
    if why:
        missing(why)
    sendmail = mra_sendmail
    user = system_user.pw_name
    maildir = request.node.callspec.params["mra_sendmail"] == "maildir"
    location = "maildir:~/Maildir" if maildir else ""
    stored = as_stored(maildir)
    started = time.monotonic()
    with dovecot.dovecot_server([(system_user, PASSWORD)], spool=open_spool,
                                mail_location=location,
                                # Dovecot writes each flag change into the mbox at once and
                                # rereads the file on every change: many more rewrites while
                                # we append (without our locks, messages run together)
                                extra="mbox_lazy_writes = no\nmbox_dirty_syncs = no\n") as server:
        tally = Tally()
        stop_clients, stop_runner = threading.Event(), threading.Event()
        first = sendmail(user, input=message(0))  # the mailbox exists before the clients start
        assert first.returncode == 0, first.stderr
        assert sendmail("-q").returncode == 0
        clients = [threading.Thread(target=guarded(imap_client, tally, server, user, tally,
                                                   stop_clients, stored)),
                   threading.Thread(target=guarded(pop_client, tally, server, user, tally,
                                                   stop_clients, stored))]
        runner = threading.Thread(target=guarded(queue_runner, tally, sendmail, stop_runner))
        for t in [*clients, runner]:
            t.start()
        try:
            def submit(numbers: range) -> None:
                if len(numbers) == 1:  # a program's own submission: one sendmail per message
                    p = sendmail("-i", user, input=message(numbers[0]))
                else:  # a batch over SMTP on standard input, as -bs clients do
                    p = sendmail("-bs", input=smtp_session(user, numbers))
                assert p.returncode == 0, p.stderr

            with ThreadPoolExecutor(3) as pool:
                list(pool.map(submit, batches()))
        finally:
            stop_runner.set()
            runner.join(120)
        # What a busy mailbox deferred: flushed now, as an admin would (postqueue -f).
        for _ in range(10):
            if not sendmail.entries():
                break
            p = subprocess.run([script("postqueue"), "-f"], capture_output=True, timeout=120,
                               env={"PYMAILTOOLS_CONFIG": str(sendmail.config_file),
                                    "PATH": "/usr/bin:/bin"})
            assert p.returncode == 0, p.stderr
        assert sendmail.entries() == []
        stop_clients.set()  # each client makes one last pass over what is there now
        for t in clients:
            t.join(120)
        assert not any(t.is_alive() for t in clients), "a client did not finish its last pass"
        assert tally.failures == []
        # What is left, as Dovecot serves it.
        with server.imap_client(user) as imap:
            imap.select("INBOX", readonly=True)
            typ, got = imap.fetch("1:*", "(BODY.PEEK[])")
            assert typ == "OK"
            left = Counter(number(item[1], stored) for item in got if isinstance(item, tuple))
        errors, trouble = server.errors(), server.trouble()
    # Dovecot's complaints first: a resync after a mangled mbox renumbers UIDs, which shows
    # below only as messages a client never got to
    assert errors == [] and trouble == []
    everything = set(range(COUNT))
    assert tally.seen == everything
    assert tally.imap_expunged == Counter({n: 1 for n in everything if n % 3 == 0})
    assert tally.pop_deleted == Counter({n: 1 for n in everything if n % 3 == 1})
    assert left == Counter({n: 1 for n in everything if n % 3 == 2})
    if maildir:
        assert not (open_spool / user).exists()
    assert time.monotonic() - started < 120
