"""Remote folders in read mode: an IMAP folder (flags stored on the server as \\Seen and
\\Deleted, expunged on quit; copies, folders and new mail asked of the server) and a POP3
mailbox (DELE then QUIT on quit), behind the Folder interface; a connection lost meanwhile is
made again at the next command, messages matched by UID."""

from __future__ import annotations

import io
import shlex
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pymailtools.config import Config
from pymailtools.errors import EX_TEMPFAIL, UsageError
from pymailtools.mua import reader, remote
from pymailtools.mua.folder import (
    DELETED,
    OLD,
    READ,
    SAVED,
    SEEN,
    WAS_OLD,
    WAS_SEEN,
    Entry,
    EntryList,
    Folder,
    FolderError,
    Headers,
    frame_message,
)
from pymailtools.mua.imap import BATCH, FetchData, ImapSession
from pymailtools.mua.pop3 import Pop3Session

T = TypeVar("T")
S = TypeVar("S", ImapSession, Pop3Session)
# How a folder opens another remote folder by URL (the same login, variables and warnings).
Opener = Callable[[str], "RemoteFolder[Any]"]


def _lost(e: remote.RemoteError) -> FolderError:
    return FolderError(f"{e}; mail connects again at the next command", EX_TEMPFAIL)


class RemoteFolder(Folder, Generic[S]):
    """What IMAP and POP3 folders share: the index (sizes, flags, each message's lasting id
    and number in this session) as arrays, entries as views of it, and what it takes to
    connect again."""

    session: S

    # a message's lasting id: IMAP UID, POP3 UIDL ("" when the server gives none)
    uids: list[str]
    # its number in this session (POP3 message number, IMAP sequence number when listed)
    numbers: array[int]
    sizes: array[int]
    lines: array[int]  # -1: not known (shown blank, as s-nail does) until the text is read
    flags: array[int]

    def __init__(self, url: remote.RemoteURL, creds: remote.Credentials,
                 conn: remote.Connection, limit: int) -> None:
        self.url = url
        self.path = str(url)
        self.creds = creds
        self.conn = conn
        self.limit = limit
        self.opener: Opener | None = None
        # the message fetched last: showing one asks for its header and its text
        self._last: tuple[int, bytes] = (-1, b"")

    def _index(self, rows: list[tuple[str, int, int, int]]) -> None:
        """(lasting id, number, size, flag bits) of each message, in folder order."""
        self.uids = [uid for uid, _, _, _ in rows]
        self.numbers = array("q", [n for _, n, _, _ in rows])
        self.sizes = array("q", [size for _, _, size, _ in rows])
        self.lines = array("q", [-1]) * len(rows)
        self.flags = array("H", [f for _, _, _, f in rows])
        self.entries = EntryList(self, Entry)

    def _add(self, rows: list[tuple[str, int, int, int]]) -> None:
        """Messages that arrived, after the others."""
        for uid, number, size, flags in rows:
            self.uids.append(uid)
            self.numbers.append(number)
            self.sizes.append(size)
            self.lines.append(-1)
            self.flags.append(flags)

    def _text(self, e: Entry, raw: bytes) -> bytes:
        """A message's text as fetched (LF line ends); its lines are known from now on."""
        self.lines[e.index] = raw.count(b"\n")
        self._last = (e.index, raw)
        return raw

    def _cached(self, e: Entry) -> bytes | None:
        index, raw = self._last
        return raw if index == e.index else None

    def mbox_bytes(self, e: Entry) -> bytes:
        message = self.message_bytes(e)
        return frame_message(Headers(message.partition(b"\n\n")[0]), message)

    def _live(self) -> S:
        """The session, made again when it was lost."""
        raise NotImplementedError

    def _call(self, op: Callable[[S], T]) -> T:
        """``op`` on a live session; a lost connection is reported as such (the next call
        connects again)."""
        session = self._live()
        try:
            return op(session)
        except remote.RemoteError as e:
            if "[SYS/" in str(e):  # RFC 3206: the server is going away (Dovecot on shutdown)
                session.close()
            if session.dead:
                raise _lost(e) from None
            raise

    def _retried(self, op: Callable[[S], None]) -> None:
        """``op``, and once more on a new connection when the connection was lost."""
        try:
            self._call(op)
        except FolderError:
            if not self.session.dead:
                raise
            self._call(op)

    def close(self) -> None:
        self.session.close()


def _header_block(raw: bytes) -> bytes:
    """A fetched header (CRLF, ending in a blank line) as a folder's header block."""
    block = remote.crlf_to_lf(raw)
    while block.endswith(b"\n"):
        block = block[:-1]
    return block


def _from_line(arrived: str) -> bytes:
    """A From_ line dated when the message arrived (INTERNALDATE): the summary's date column
    shows it, as for an mbox and as s-nail shows it; b"" when the date does not parse."""
    import datetime

    try:
        when = datetime.datetime.strptime(arrived.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return b""
    return f"From MAILER-DAEMON {when.strftime('%a %b %e %H:%M:%S %Y')}\r\n".encode()


def _flag_bits(att: FetchData) -> int:
    if "\\Seen" in att.flags:
        return SEEN | OLD | WAS_SEEN | WAS_OLD
    return 0 if "\\Recent" in att.flags else OLD | WAS_OLD


class ImapFolder(RemoteFolder[ImapSession]):
    """One IMAP folder, selected read-write: the session's marks become \\Seen and \\Deleted
    on quit, deleted messages are expunged (by UID where the server can). Messages are named
    by UID only, so a message another client expunged is never taken for another."""

    def __init__(self, session: ImapSession, url: remote.RemoteURL, creds: remote.Credentials,
                 conn: remote.Connection, limit: int) -> None:
        super().__init__(url, creds, conn, limit)
        self.session = session
        self.uidvalidity = session.select(url.folder).uidvalidity
        self._index([(str(att.uid), att.number, att.size, _flag_bits(att))
                     for att in session.index()])

    def _live(self) -> ImapSession:
        """The session; a new one (logged in, the folder selected again) when the old one
        was lost."""
        if not self.session.dead:
            return self.session
        session = ImapSession.open(self.conn, self.creds)
        try:
            selected = session.select(self.url.folder)
        except BaseException:
            session.close()
            raise
        if selected.uidvalidity != self.uidvalidity:
            session.close()
            raise FolderError(f"{self.path}: the server renumbered the folder (UIDVALIDITY "
                              "changed) while disconnected; nothing is stored: quit with x "
                              "and open it again")
        self.session = session
        return session

    def _uid(self, e: Entry) -> int:
        return int(self.uids[e.index])

    def header_block(self, e: Entry) -> bytes:
        # all of the header (a summary fetches only the fields it shows): p shows Reply-To,
        # P every field, and a reply follows Reply-To and References
        raw = self.message_bytes(e)
        cut = raw.find(b"\n\n")
        return raw if cut < 0 else raw[:cut]

    def header_blocks(self, entries: Iterable[Entry]) -> Iterator[bytes]:
        picked = list(entries)
        for start in range(0, len(picked), BATCH):
            uids = [self._uid(e) for e in picked[start:start + BATCH]]
            got = {int(i.uid): _from_line(i.arrived) + i.header for i in self._summaries(uids)}
            for u in uids:
                # a message expunged by another client meanwhile shows with empty headers
                yield _header_block(got.get(u, b""))

    def _summaries(self, uids: list[int]) -> list[remote.MessageInfo]:
        return self._call(lambda s: list(s.summaries(uids)))

    def message_bytes(self, e: Entry) -> bytes:
        cached = self._cached(e)
        if cached is not None:
            return cached
        uid = self._uid(e)
        return self._text(e, remote.crlf_to_lf(self._call(lambda s: s.body(uid, self.limit))))

    def copy_to(self, indices: list[int], folder: str) -> None:
        """COPY messages to ``folder`` on this server, creating it when the server says
        it does not exist (TRYCREATE)."""
        uids = [int(self.uids[i]) for i in indices]

        def copy(session: ImapSession) -> None:
            try:
                session.copy(uids, folder)
            except remote.RemoteError as e:
                if "TRYCREATE" not in str(e) or session.dead:
                    raise
                session.create(folder)
                session.copy(uids, folder)

        self._call(copy)

    def folder_names(self) -> list[str]:
        return sorted(self._call(lambda s: s.list_folders()))

    def newmail(self) -> int:
        """Ask the server for news (NOOP); messages that arrived are added. Their count."""
        last = max(map(int, self.uids), default=0)

        def check(session: ImapSession) -> list[FetchData]:
            if session.noop() == 0:
                return []
            return [a for a in session.index(after=last) if a.uid > last]

        found = self._call(check)
        self._add([(str(a.uid), a.number, a.size, _flag_bits(a)) for a in found])
        return len(found)

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

        def apply(session: ImapSession) -> None:
            if seen:
                session.store(seen, ["\\Seen"])
            if gone:
                session.store(gone, ["\\Deleted"])
                session.expunge(gone)

        try:
            # by UID: nothing a lost connection did is done twice or to another message
            self._retried(apply)
        except (FolderError, remote.RemoteError) as e:
            raise FolderError(f"{e}; not stored on the server: {len(gone)} deletion(s), "
                              f"{len(seen)} read mark(s)", EX_TEMPFAIL) from None
        for i in range(len(flags)):
            if flags[i] & READ:
                flags[i] |= SEEN
        return 0

    def switch(self, folder: str) -> ImapFolder:
        """Another folder of this account, on the same connection; this one stays selected
        when the other cannot be."""
        session = self._live()
        try:
            box = ImapFolder(session, self.url._replace(folder=folder), self.creds,
                             self.conn, self.limit)
        except remote.RemoteError:
            if not session.dead:
                session.select(self.url.folder)
            raise
        box.opener = self.opener
        return box


class Pop3Folder(RemoteFolder[Pop3Session]):
    """A POP3 mailbox: no flags on the server; deleted messages are DELEted on quit and gone
    only once QUIT succeeds. Messages are matched by UIDL when the connection is made again."""

    def __init__(self, session: Pop3Session, url: remote.RemoteURL, creds: remote.Credentials,
                 conn: remote.Connection, limit: int) -> None:
        super().__init__(url, creds, conn, limit)
        self.session = session
        uids = session.uidl()
        sizes = session.sizes()
        self._index([(uids.get(n, ""), n, sizes.get(n, 0), 0) for n in sorted(sizes)])

    def _live(self) -> Pop3Session:
        """The session; a new one when the old one was lost, message numbers found again by
        UIDL (0: no longer on the server)."""
        if not self.session.dead:
            return self.session
        if "" in self.uids:
            raise FolderError(f"{self.path}: the server gives no UIDL, so messages cannot be "
                              "matched on a new connection: quit and open it again")
        session = Pop3Session.open(self.conn, self.creds)
        try:
            numbers = {uid: n for n, uid in session.uidl().items()}
        except BaseException:
            session.close()
            raise
        self.numbers = array("q", [numbers.get(uid, 0) for uid in self.uids])
        self.session = session
        return session

    def _number(self, i: int) -> int:
        n = self.numbers[i]
        if not n:
            raise FolderError(f"{self.path}: message {i + 1} is no longer on the server")
        return n

    def header_block(self, e: Entry) -> bytes:
        return _header_block(self._call(lambda s: s.header(self._number(e.index))))

    def message_bytes(self, e: Entry) -> bytes:
        cached = self._cached(e)
        if cached is not None:
            return cached
        out = io.BytesIO()
        self._call(lambda s: s.retr(self._number(e.index), out, self.limit))
        return self._text(e, out.getvalue())

    def changed(self) -> bool:
        return any(f & DELETED for f in self.flags)

    def save(self, config: Config, keep: list[int],
             before_write: Callable[[], None] | None = None) -> int:
        if before_write is not None:
            before_write()
        kept = set(keep)
        gone = [i for i in range(len(self.numbers)) if i not in kept]

        def apply(session: Pop3Session) -> None:
            for i in gone:
                if self.numbers[i]:  # 0: gone meanwhile (maybe by our own lost QUIT)
                    session.dele(self.numbers[i])
            session.quit()

        try:
            # DELE counts only after QUIT, and a message a lost QUIT did delete is no longer
            # listed on the new connection: none is deleted twice
            self._retried(apply)
        except remote.RemoteError as e:
            raise FolderError(f"{e}: nothing was deleted on the server",
                              e.exit_code) from None
        except FolderError as e:
            raise FolderError(f"{e}; nothing was deleted on the server ({len(gone)} "
                              "deletion(s) not done)", e.exit_code) from None
        return 0


def open_folder(config: Config, url: remote.RemoteURL, creds: remote.Credentials,
                conn: remote.Connection) -> RemoteFolder[Any]:
    """Log in and load the index of the remote folder ``url``."""
    session: Pop3Session | ImapSession
    limit = remote.message_limit(config)
    if url.protocol == "pop3":
        session = Pop3Session.open(conn, creds)
    else:
        session = ImapSession.open(conn, creds)
    try:
        if isinstance(session, Pop3Session):
            return Pop3Folder(session, url, creds, conn, limit)
        return ImapFolder(session, url, creds, conn, limit)
    except BaseException:
        session.close()
        raise


class RemoteSession(reader.Session):
    """Read mode on a remote folder: the local commands, and what only the server does:
    copies within it (COPY), its folders (LIST), new mail (NOOP), switching to another of
    its folders or to another account."""

    box: RemoteFolder[Any]

    COMMANDS = {**reader.Session.COMMANDS, "folders": "c_folders", "newmail": "c_newmail",
                "newm": "c_newmail"}

    def _server_folder(self, target: str) -> str | None:
        """The folder of this IMAP account a target names (``+name``, or a URL of the same
        account); None for anything else (a local file, another account)."""
        if target.startswith("+"):
            if not isinstance(self.box, ImapFolder):
                raise UsageError("a POP3 mailbox has no other folders")
            if not target[1:]:
                raise UsageError("+: no folder name")
            return target[1:]
        if remote.is_remote(target) and isinstance(self.box, ImapFolder):
            url = remote.parse_url(target)
            here = self.box.url
            if url.protocol == "imap" and (url.host, url.port) == (here.host, here.port) \
                    and url.user in ("", here.user):
                return url.folder
        return None

    def save_to(self, args: str, mark: bool) -> list[int]:
        words = shlex.split(args)
        folder = self._server_folder(words[-1]) if words else None
        if folder is None:
            return super().save_to(args, mark)
        assert isinstance(self.box, ImapFolder)
        picked = self.select(" ".join(words[:-1]))
        self.box.copy_to(picked, folder)
        n = len(picked)
        self.say(f'"{reader.clean(words[-1])}" [Copied on the server] {n} '
                 f"message{'' if n == 1 else 's'}")
        if mark:
            for i in picked:
                self.box.flags[i] |= SAVED
        return picked

    def c_folders(self, args: str) -> None:
        if not isinstance(self.box, ImapFolder):
            raise UsageError("a POP3 mailbox has no other folders")
        for name in self.box.folder_names():
            self.say(reader.clean(name))

    def c_newmail(self, args: str) -> None:
        if not isinstance(self.box, ImapFolder):
            raise UsageError("POP3 shows new mail only to a new session: quit and open the "
                             "mailbox again")
        before = len(self.box.flags)
        n = self.box.newmail()
        if not n:
            self.say("No new mail.")
            return
        self.say(f"{n} new message{'' if n == 1 else 's'}")
        self.emit_summaries(range(before, before + n))

    def c_folder(self, args: str) -> None:
        words = shlex.split(args)
        if not words:
            super().c_folder(args)
            return
        target = words[0]
        folder = self._server_folder(target)
        if folder is None and not remote.is_remote(target):
            raise UsageError("from a remote folder mail switches only to remote folders; "
                             "quit and use mail -f for a local one")
        old = self.box
        if old.opener is None:
            raise UsageError("switching folders is not possible here")
        self.quit()  # this folder's changes stored first, as s-nail does
        if folder is not None:
            assert isinstance(old, ImapFolder)
            box: RemoteFolder[Any] = old.switch(folder)
        else:
            box = old.opener(target)
            old.close()
        self.reset(box)
        self.banner()


def start(cfg: Config, url_text: str, *, headers_only: bool, check_only: bool,
          show_headers: bool, variables: dict[str, str], login: str, prog: str,
          warn: Callable[[str], None]) -> int:
    """mail -f URL: read a remote folder as a local one (``-H`` prints the summary and
    exits, ``-e`` says whether there is mail)."""

    def opener(text: str) -> RemoteFolder[Any]:
        url, creds, conn = remote.account_settings(cfg, text, variables, login=login,
                                                   warn=warn)
        box = open_folder(cfg, url, creds, conn)
        box.opener = opener
        return box

    return reader.start(cfg, folder=None, user=None, headers_only=headers_only,
                        check_only=check_only, show_headers=show_headers,
                        variables=variables, prog=prog, warn=warn, opened=opener(url_text),
                        session_class=RemoteSession)


def append_copy(cfg: Config, url_text: str, variables: Mapping[str, str],
                message: bytes, *, warn: Callable[[str], None]) -> None:
    """record=imaps://…/Sent: APPEND ``message`` (marked \\Seen) to that folder, creating
    it when the server says it does not exist (TRYCREATE)."""
    append_messages(cfg, url_text, variables, [(message, ["\\Seen"])], warn=warn)


def append_messages(cfg: Config, url_text: str, variables: Mapping[str, str],
                    messages: list[tuple[bytes, list[str]]], *,
                    warn: Callable[[str], None]) -> None:
    """APPEND ``messages`` (each with its flags) to the IMAP folder ``url_text``, creating
    it when the server says it does not exist (TRYCREATE); the account's warnings go to
    ``warn``."""
    import os

    from pymailtools.submit import submission

    url, creds, conn = remote.account_settings(
        cfg, url_text, variables, login=submission.login_name(os.getuid())[0], warn=warn)
    if url.protocol != "imap":
        raise UsageError(f"{url}: messages can be stored only in an IMAP folder")
    session = ImapSession.open(conn, creds)
    try:
        for n, (message, flags) in enumerate(messages):
            try:
                session.append(url.folder, message, flags)
            except remote.RemoteError as e:
                if n or "TRYCREATE" not in str(e) or session.dead:
                    raise
                session.create(url.folder)
                session.append(url.folder, message, flags)
    finally:
        session.close()
