"""Remote folders behind read mode's Folder interface: an IMAP folder (flags stored on the
server as \\Seen and \\Deleted, expunged on quit) and a POP3 mailbox (DELE then QUIT on quit),
their index fetched once, summaries in batches, bodies on demand."""

from __future__ import annotations

import io
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping

from pymailtools.config import Config
from pymailtools.local import mbox
from pymailtools.mua import reader, remote
from pymailtools.mua.folder import (
    DELETED,
    OLD,
    READ,
    SEEN,
    WAS_OLD,
    WAS_SEEN,
    Entry,
    EntryList,
    Folder,
    FolderError,
    Headers,
)
from pymailtools.mua.imap import BATCH, ImapSession
from pymailtools.mua.pop3 import Pop3Session


class RemoteFolder(Folder):
    """What IMAP and POP3 folders share: the index (sizes, flags, each message's lasting id
    and number in this session) as arrays, entries as views of it."""

    # a message's lasting id: IMAP UID, POP3 UIDL ("" when the server gives none)
    uids: list[str]
    # its number in this session (POP3 message number, IMAP sequence number when listed)
    numbers: array[int]

    def _index(self, rows: list[tuple[str, int, int, int]]) -> None:
        """(lasting id, number, size, flag bits) of each message, in folder order."""
        self.uids = [uid for uid, _, _, _ in rows]
        self.numbers = array("q", [n for _, n, _, _ in rows])
        self.sizes = array("q", [size for _, _, size, _ in rows])
        self.lines = array("q", [0]) * len(rows)
        self.flags = array("H", [f for _, _, _, f in rows])
        self.entries = EntryList(self, Entry)


def _header_block(raw: bytes) -> bytes:
    """A fetched header (CRLF, ending in a blank line) as a folder's header block."""
    block = remote.crlf_to_lf(raw)
    while block.endswith(b"\n"):
        block = block[:-1]
    return block


def _frame(message: bytes) -> bytes:
    sender = "MAILER-DAEMON"
    rp = Headers(message.partition(b"\n\n")[0]).get("Return-Path")
    if rp:
        sender = " ".join(rp.split()).strip().strip("<>") or sender
    return mbox.frame(message, sender)


class ImapFolder(RemoteFolder):
    """One IMAP folder, selected read-write: the session's marks become \\Seen and \\Deleted
    on quit, deleted messages are expunged (by UID where the server can)."""

    def __init__(self, session: ImapSession, url: remote.RemoteURL, limit: int) -> None:
        self.session = session
        self.path = str(url)
        self.limit = limit
        session.select(url.folder)
        rows = []
        for att in session.index():
            flags = 0
            if "\\Seen" in att.flags:
                flags |= SEEN | OLD | WAS_SEEN | WAS_OLD
            elif "\\Recent" not in att.flags:
                flags |= OLD | WAS_OLD
            rows.append((str(att.uid), att.number, att.size, flags))
        self._index(rows)

    def _uid(self, e: Entry) -> int:
        return int(self.uids[e.index])

    def header_block(self, e: Entry) -> bytes:
        return next(self.header_blocks([e]))

    def header_blocks(self, entries: Iterable[Entry]) -> Iterator[bytes]:
        picked = list(entries)
        for start in range(0, len(picked), BATCH):
            chunk = picked[start:start + BATCH]
            got = {int(i.uid): i.header
                   for i in self.session.summaries([self._uid(e) for e in chunk])}
            for e in chunk:
                # a message expunged by another client meanwhile shows with empty headers
                yield _header_block(got.get(self._uid(e), b""))

    def message_bytes(self, e: Entry) -> bytes:
        return remote.crlf_to_lf(self.session.body(self._uid(e), self.limit))

    def mbox_bytes(self, e: Entry) -> bytes:
        return _frame(self.message_bytes(e))

    def changed(self) -> bool:
        return any(f & DELETED or (f & READ and not f & SEEN) for f in self.flags)

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        if before_write is not None:
            before_write()
        kept = set(keep)
        uids, flags = self.uids, self.flags
        seen = [int(uids[i]) for i in kept if flags[i] & READ and not flags[i] & SEEN]
        gone = [int(uids[i]) for i in range(len(uids)) if i not in kept]
        if seen:
            self.session.store(seen, ["\\Seen"])
        if gone:
            self.session.store(gone, ["\\Deleted"])
            self.session.expunge(gone)
        return 0

    def close(self) -> None:
        self.session.close()


class Pop3Folder(RemoteFolder):
    """A POP3 mailbox: no flags on the server; deleted messages are DELEted on quit and gone
    only once QUIT succeeds."""

    def __init__(self, session: Pop3Session, url: remote.RemoteURL, limit: int) -> None:
        self.session = session
        self.path = str(url)
        self.limit = limit
        uids = session.uidl()
        sizes = session.sizes()
        self._index([(uids.get(n, ""), n, sizes.get(n, 0), 0) for n in sorted(sizes)])

    def _number(self, e: Entry) -> int:
        return self.numbers[e.index]

    def header_block(self, e: Entry) -> bytes:
        n = self._number(e)
        info = self.session.summaries([n], {}, {})[0]
        return _header_block(info.header)

    def message_bytes(self, e: Entry) -> bytes:
        out = io.BytesIO()
        self.session.retr(self._number(e), out, self.limit)
        return out.getvalue()

    def mbox_bytes(self, e: Entry) -> bytes:
        return _frame(self.message_bytes(e))

    def changed(self) -> bool:
        return any(f & DELETED for f in self.flags)

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        if before_write is not None:
            before_write()
        kept = set(keep)
        gone = [self.numbers[i] for i in range(len(self.numbers)) if i not in kept]
        try:
            for n in gone:
                self.session.dele(n)
            self.session.quit()
        except remote.RemoteError as e:
            raise FolderError(f"{e}: nothing was deleted on the server",
                              e.exit_code) from None
        return 0

    def close(self) -> None:
        self.session.close()


def open_folder(config: Config, url: remote.RemoteURL, creds: remote.Credentials,
                conn: remote.Connection) -> Folder:
    """Log in and load the index of the remote folder ``url``."""
    session: Pop3Session | ImapSession
    if url.protocol == "pop3":
        session = Pop3Session.open(conn, creds)
    else:
        session = ImapSession.open(conn, creds)
    try:
        if isinstance(session, Pop3Session):
            return Pop3Folder(session, url, remote.message_limit(config))
        return ImapFolder(session, url, remote.message_limit(config))
    except BaseException:
        session.close()
        raise


def start(cfg: Config, url_text: str, *, headers_only: bool, check_only: bool,
          show_headers: bool, variables: dict[str, str], login: str, prog: str,
          warn: Callable[[str], None]) -> int:
    """mail -f URL: read a remote folder as a local one (``-H`` prints the summary and
    exits, ``-e`` says whether there is mail)."""
    url, creds, conn = remote.account_settings(cfg, url_text, variables, login=login, warn=warn)
    box = open_folder(cfg, url, creds, conn)
    return reader.start(cfg, folder=None, user=None, headers_only=headers_only,
                        check_only=check_only, show_headers=show_headers,
                        variables=variables, prog=prog, opened=box)


def append_copy(cfg: Config, url_text: str, variables: Mapping[str, str],
                message: bytes) -> None:
    """record=imaps://…/Sent: APPEND ``message`` (marked \\Seen) to that folder, creating
    it when the server says it does not exist (TRYCREATE)."""
    import os
    import sys

    from pymailtools.submit import submission

    def warn(text: str) -> None:
        print(f"mail: warning: {text}", file=sys.stderr)

    url, creds, conn = remote.account_settings(
        cfg, url_text, variables, login=submission.login_name(os.getuid())[0], warn=warn)
    session = ImapSession.open(conn, creds)
    try:
        try:
            session.append(url.folder, message, ["\\Seen"])
        except remote.RemoteError as e:
            if "TRYCREATE" not in str(e) or session.dead:
                raise
            session.create(url.folder)
            session.append(url.folder, message, ["\\Seen"])
    finally:
        session.close()
