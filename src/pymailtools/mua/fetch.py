"""mail --fetch: copy new messages from a POP3 or IMAP mailbox into the local mailbox through
the local delivery agent, remembering what was fetched, deleting on the server only what is
stored and fsynced here (never anything with ``keep``).

The order for each message makes a crash cost at most one duplicate: download; deliver
(durable when delivery returns); record its UID in the state file (atomic, fsynced); only then
DELE / \\Deleted. A crash before the record fetches that one message again; after it, the
message is known and is deleted (or kept) on the next run. POP3 deletes only when QUIT
succeeds, IMAP only at the EXPUNGE at the end, and only messages recorded as stored."""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from pymailtools.config import Config
from pymailtools.errors import EX_TEMPFAIL, DeliveryError, MailError
from pymailtools.fileio import replace_file
from pymailtools.local import mailbox
from pymailtools.mua.imap import ImapSession
from pymailtools.mua.pop3 import Pop3Session
from pymailtools.mua.remote import (
    Connection,
    Credentials,
    RemoteError,
    RemoteURL,
    account_settings,
    crlf_to_lf,
    message_limit,
)
from pymailtools.queue.store import crash_point

# Messages kept in memory below this size; larger ones go through a temporary file.
SPOOL_IN_MEMORY = 1 << 20


class FetchBusy(MailError):
    """Another mail --fetch for the same mailbox is running (75)."""

    exit_code = EX_TEMPFAIL


@dataclass
class Outcome:
    """What a fetch did: messages stored locally, deleted on the server, left there because
    they are too big."""

    fetched: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)


def state_directory() -> str:
    """Where fetch state lives: $XDG_STATE_HOME/pymailtools/fetch (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pymailtools", "fetch")


class State:
    """The UIDs fetched from one remote mailbox (POP3 UIDLs, or IMAP UIDs under one
    UIDVALIDITY), in a JSON file replaced atomically on every change."""

    def __init__(self, path: str, url: RemoteURL) -> None:
        self.path = path
        self.url = url
        self.uidvalidity = 0
        self.uids: set[str] = set()

    @classmethod
    def name_for(cls, url: RemoteURL) -> str:
        """The state file's name: the URL without its password, made safe as a file name."""
        key = f"{url.scheme}-{url.user}@{url.host}-{url.port}"
        if url.folder:
            key += "-" + url.folder
        return urllib.parse.quote(key, safe="@.-_+=")

    def load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(64 << 20))
            self.uidvalidity = int(data.get("uidvalidity", 0))
            self.uids = {str(u) for u in data["uids"]}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MailError(f"fetch state {self.path} is unreadable ({e}); move it away to "
                            "fetch everything again", EX_TEMPFAIL) from None

    def save(self) -> None:
        data = {"url": str(self.url), "uidvalidity": self.uidvalidity,
                "uids": sorted(self.uids, key=lambda u: (len(u), u))}
        replace_file(self.path, json.dumps(data, indent=0).encode() + b"\n")

    def keep_only(self, present: set[str]) -> None:
        """Forget UIDs no longer on the server (deleted there, by us or anyone)."""
        if self.uids - present:
            self.uids &= present
            self.save()


class _Lock:
    """An exclusive lock on ``path`` held while one fetch runs."""

    def __init__(self, path: str, what: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FetchBusy(f"another mail --fetch of {what} is running") from None
        except OSError:
            os.close(self.fd)
            raise

    def release(self) -> None:
        os.close(self.fd)


class Fetcher:
    """One fetch run from ``url`` into local ``user``'s mailbox."""

    def __init__(self, config: Config, url: RemoteURL, creds: Credentials, conn: Connection,
                 *, user: str, keep: bool, state_dir: str | None = None,
                 warn: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.url = url
        self.creds = creds
        self.conn = conn
        self.user = user
        self.keep = keep
        self.warn = warn
        self.state_dir = state_dir or state_directory()
        self.limit = message_limit(config)
        self.recipient = f"{user}@{config.myhostname}"
        self.outcome = Outcome()

    def run(self) -> Outcome:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.state_dir, State.name_for(self.url))
        lock = _Lock(path + ".lock", str(self.url))
        try:
            state = State(path, self.url)
            state.load()
            if self.url.protocol == "pop3":
                self._pop3(state)
            else:
                self._imap(state)
        finally:
            lock.release()
        return self.outcome

    # -- storing one message ---------------------------------------------------------------

    def _store(self, message: BinaryIO, state: State, uid: str) -> None:
        """Deliver, then record: the order that loses nothing."""
        message.seek(0)
        sender, message = _take_return_path(message)
        mailbox.deliver(self.config, self.user, message, sender=sender,
                        recipient=self.recipient)
        self.outcome.fetched += 1
        # Test hooks (PYMAILTOOLS_TEST_CRASH_AT): die with message N stored but not recorded,
        # or recorded but not yet deleted on the server.
        crash_point(f"fetch_stored_{self.outcome.fetched}")
        state.uids.add(uid)
        state.save()
        crash_point(f"fetch_recorded_{self.outcome.fetched}")

    def _too_big(self, uid: str, size: int) -> bool:
        if size <= self.limit:
            return False
        self.outcome.skipped.append(uid)
        self.warn(f"{self.url}: message {uid} is {size} bytes, over message_size_limit "
                  f"({self.limit}): left on the server")
        return True

    # -- POP3 ------------------------------------------------------------------------------

    def _pop3(self, state: State) -> None:
        session = Pop3Session.open(self.conn, self.creds)
        try:
            uids = session.uidl()
            sizes = session.sizes()
            state.keep_only(set(uids.values()))
            deleted: list[str] = []
            try:
                for n in sorted(uids):
                    uid = uids[n]
                    if uid not in state.uids:
                        if self._too_big(uid, sizes.get(n, 0)):
                            continue
                        with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as f:
                            session.retr(n, f, self.limit)  # type: ignore[arg-type]
                            self._store(f, state, uid)  # type: ignore[arg-type]
                    if not self.keep:
                        session.dele(n)
                        deleted.append(uid)
            except RemoteError:
                raise  # the session is of no more use: no QUIT, so nothing is deleted
            except (DeliveryError, OSError):
                # Local trouble: what is stored is recorded; let QUIT delete those, then stop.
                self._pop3_quit(session, state, deleted)
                raise
            self._pop3_quit(session, state, deleted)
        finally:
            session.close()

    def _pop3_quit(self, session: Pop3Session, state: State, deleted: list[str]) -> None:
        session.quit()
        self.outcome.deleted = len(deleted)
        if deleted:
            state.keep_only(state.uids - set(deleted))

    # -- IMAP ------------------------------------------------------------------------------

    def _imap(self, state: State) -> None:
        session = ImapSession.open(self.conn, self.creds)
        try:
            selected = session.select(self.url.folder, readonly=self.keep)
            if state.uidvalidity != selected.uidvalidity:
                if state.uids:
                    self.warn(f"{self.url}: UIDVALIDITY changed from {state.uidvalidity} to "
                              f"{selected.uidvalidity}: every message counts as new")
                state.uidvalidity = selected.uidvalidity
                state.uids = set()
                state.save()
            listing = session.index()
            state.keep_only({str(a.uid) for a in listing})
            stored: list[int] = []
            try:
                for a in listing:
                    key = str(a.uid)
                    if key not in state.uids:
                        if self._too_big(key, a.size):
                            continue
                        data = session.body(a.uid, self.limit)
                        self._store(io.BytesIO(crlf_to_lf(data)), state, key)
                    stored.append(a.uid)
            finally:
                # Whatever happened, what is recorded may go (it is stored here).
                if not self.keep and stored and not session.dead:
                    session.store(stored, ["\\Deleted"])
                    session.expunge(stored)
                    self.outcome.deleted = len(stored)
        finally:
            session.close()


def _take_return_path(message: BinaryIO) -> tuple[str, BinaryIO]:
    """The envelope sender of a fetched message (its Return-Path, else its From address),
    and the message without the Return-Path fields that our delivery writes afresh."""
    head = message.read(256 << 10)
    end = head.find(b"\n\n")
    block = head if end < 0 else head[:end + 1]
    sender: str | None = None
    from_value = ""
    kept: list[bytes] = []
    dropping = False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        dropping = lname == b"return-path"
        if dropping:
            if sender is None:
                text = value.decode("utf-8", "replace").strip()
                sender = text[1:-1] if text.startswith("<") and text.endswith(">") else text
            continue
        if lname == b"from" and not from_value:
            from_value = value.decode("utf-8", "replace").strip()
        kept.append(line)
    if sender is None:
        from email.utils import parseaddr

        sender = parseaddr(from_value)[1]
    sender = "".join(c for c in sender if c.isprintable() and c not in "<> ")
    if end < 0 and len(head) == 256 << 10:
        message.seek(0)  # an oversized header block: leave it as it is
        return sender, message
    rest = head[len(block):]
    out = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)
    out.write(b"".join(kept))
    out.write(rest)
    while chunk := message.read(1 << 20):
        out.write(chunk)
    out.seek(0)
    return sender, out  # type: ignore[return-value]


def fetch(config: Config, url: RemoteURL, creds: Credentials, conn: Connection, *, user: str,
          keep: bool, state_dir: str | None = None,
          warn: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Fetch new mail from ``url`` into local ``user``'s mailbox (see the module's docstring).

    Raises RemoteError and its kinds (75 for a lost connection), DeliveryError (75/69) when
    the local mailbox refuses, FetchBusy when another fetch of the same mailbox runs."""
    return Fetcher(config, url, creds, conn, user=user, keep=keep, state_dir=state_dir,
                   warn=warn).run()


def run_for_user(config: Config, url_text: str, variables: dict[str, str], *, user: str,
                 keep: bool, warn: Callable[[str], None]) -> Outcome:
    """mail --fetch: the URL and the account (remote.account_settings), then fetch. Too-big
    messages left on the server are reported through ``warn``."""
    url, creds, conn = account_settings(config, url_text, variables, login=user, warn=warn)
    return fetch(config, url, creds, conn, user=user, keep=keep, warn=warn)
