"""An IMAP4rev1 client session for mail: login, folders, summaries by UID, bodies on demand,
flags, copy, append and expunge, over verified TLS; the server's bytes are held to limits.

Built on the standard library's imaplib (tags, literals, continuation requests, STARTTLS);
this module adds what imaplib leaves to its callers: parsing FETCH responses, a size limit on
every literal (checked before it is read), mailbox-name quoting, and one-line errors."""

from __future__ import annotations

import functools
import imaplib
import re
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

from pymailtools.mua.remote import (
    HEADER_LIMIT,
    SUMMARY_FIELDS,
    Connection,
    Credentials,
    MessageInfo,
    RemoteError,
    RemoteLost,
    RemoteProtocolError,
    connection_error,
)
from pymailtools.smtp import sasl

# UIDs per FETCH/STORE command: short enough for any server's line limit.
BATCH = 200

T = TypeVar("T")


class Selected(NamedTuple):
    """The state of a folder just selected: UIDVALIDITY, message count, next UID (0 when the
    server did not say) and whether it is open read-only."""

    uidvalidity: int
    exists: int
    uidnext: int
    readonly: bool


class _LimitedRead:
    """imaplib's documented ``read`` hook, refusing literals over ``literal_limit`` before
    reading a byte of them (a server announcing 2 GB gets no 2 GB buffer)."""

    literal_limit = HEADER_LIMIT
    host: str
    file: Any

    def read(self, size: int) -> bytes:
        if size > self.literal_limit:
            raise RemoteProtocolError(
                f"{self.host}: server announced a {size}-byte literal, "
                f"over the {self.literal_limit}-byte limit")
        data: bytes = self.file.read(size)
        if len(data) < size:
            raise RemoteLost(f"{self.host}: connection closed in the middle of a literal")
        return data


class _Wire(_LimitedRead, imaplib.IMAP4):
    """imaplib on a plain socket (STARTTLS later)."""


class _WireSSL(_LimitedRead, imaplib.IMAP4_SSL):
    """imaplib over TLS from the first byte."""


def quote_mailbox(name: str) -> str:
    """A mailbox name as an IMAP quoted string (modified UTF-7 for non-ASCII names)."""
    encoded = encode_mailbox(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    """RFC 3501 modified UTF-7: printable ASCII as is ("&" as "&-"), the rest base64 in &...-."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            import base64

            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            pending.append(c)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """The inverse of encode_mailbox (a malformed &...- run is left as it is)."""
    import base64

    def one(m: re.Match[str]) -> str:
        run = m.group(1)
        if not run:
            return "&"
        try:
            raw = base64.b64decode(run.replace(",", "/") + "=" * (-len(run) % 4))
            return raw.decode("utf-16-be")
        except ValueError:
            return m.group(0)

    return re.sub(r"&([A-Za-z0-9+,]*)-", one, name)


def uid_set(uids: Iterable[int]) -> str:
    """``1:3,7,9:10`` for the UIDs given."""
    ranges: list[str] = []
    run: list[int] = []
    for u in sorted(set(uids)):
        if run and u == run[-1] + 1:
            run.append(u)
            continue
        if run:
            ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
        run = [u]
    if run:
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
    return ",".join(ranges)


class ImapSession:
    """One logged-in IMAP connection. Open with ``ImapSession.open``, then ``select`` a folder.

    Every method raises RemoteLost (connection broken or timed out: the session is dead),
    RemoteProtocolError (the server broke the protocol or a limit: the session is dead) or
    RemoteError (the server said NO: the session goes on)."""

    def __init__(self, wire: _Wire | _WireSSL, conn: Connection) -> None:
        self.wire = wire
        self.conn = conn
        self.selected: Selected | None = None
        self.folder = ""
        self.dead = False

    # -- connecting ------------------------------------------------------------------------

    @classmethod
    def open(cls, conn: Connection, creds: Credentials) -> ImapSession:
        """Connect, secure the connection (TLS or STARTTLS) and log in."""
        host = conn.host
        wire: _Wire | _WireSSL
        try:
            if conn.implicit_tls:
                wire = _WireSSL(host, conn.port, ssl_context=conn.tls, timeout=conn.timeout)
            else:
                wire = _Wire(host, conn.port, timeout=conn.timeout)
        except (imaplib.IMAP4.error, OSError, EOFError) as e:
            raise _mapped(host, e) from None
        session = cls(wire, conn)
        try:
            if not conn.implicit_tls:
                session._starttls(creds)
            session._login(creds)
        except BaseException:
            session.close()
            raise
        return session

    def _starttls(self, creds: Credentials) -> None:
        if "STARTTLS" in self.wire.capabilities:
            try:
                self.wire.starttls(self.conn.tls)
            except (imaplib.IMAP4.error, OSError, EOFError) as e:
                raise _mapped(self.conn.host, e) from None
        elif not creds.allow_plaintext:
            raise RemoteError(f"{self.conn.host}: server offers no STARTTLS; refusing to send "
                              "credentials in plaintext (use imaps://)")

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.wire.capabilities)

    def _login(self, creds: Credentials) -> None:
        caps = self.capabilities
        if self.wire.state == "AUTH":  # PREAUTH
            return
        secret = creds.secret()
        if creds.token:
            if "AUTH=OAUTHBEARER" in caps:
                initial = sasl.oauthbearer(creds.user, secret, self.conn.host, self.conn.port)
                mech = "OAUTHBEARER"
            elif "AUTH=XOAUTH2" in caps:
                initial, mech = sasl.xoauth2(creds.user, secret), "XOAUTH2"
            else:
                raise RemoteError(f"{self.conn.host}: server offers neither XOAUTH2 nor "
                                  "OAUTHBEARER for the OAuth2 token")
            self._authenticate(mech, initial)
        elif "AUTH=PLAIN" in caps:
            self._authenticate("PLAIN", sasl.plain(creds.user, secret))
        elif "LOGINDISABLED" in caps:
            raise RemoteError(f"{self.conn.host}: server disabled LOGIN and offers no PLAIN")
        else:
            self._call("LOGIN", lambda: self.wire.login(creds.user, secret))

    def _authenticate(self, mech: str, initial: bytes) -> None:
        answers = iter([initial])

        def respond(_challenge: bytes) -> bytes:
            # After the initial response a challenge means failure (the OAuth2 error JSON):
            # an empty answer ends the exchange and the server says NO.
            return next(answers, b"")

        self._call(f"AUTHENTICATE {mech}", lambda: self.wire.authenticate(mech, respond))

    def close(self) -> None:
        """Log out (or just drop a dead connection); never raises."""
        try:
            if not self.dead:
                self.wire.logout()
        except (imaplib.IMAP4.error, OSError, EOFError, RemoteError):
            pass
        try:
            self.wire.shutdown()
        except OSError:
            pass
        self.dead = True

    # -- calling imaplib -------------------------------------------------------------------

    def _call(self, what: str, op: Callable[[], tuple[str, Any]],
              literal_limit: int = HEADER_LIMIT, *, expunges: bool = False) -> list[Any]:
        """Run one imaplib command; its data when the server said OK. ``expunges``: the
        data are the EXPUNGE responses (imaplib's expunge takes them out of the untagged
        responses, where the message count is followed)."""
        if self.dead:
            raise RemoteLost(f"{self.conn.host}: connection already lost")
        self.wire.literal_limit = literal_limit
        try:
            typ, data = op()
        except RemoteError:
            self.dead = True
            raise
        except imaplib.IMAP4.error as e:
            text = str(e)
            if isinstance(e, imaplib.IMAP4.abort) or "got more than" in text:
                self.dead = True
                raise _mapped(self.conn.host, e) from None
            if " command error: BAD" in text or "illegal in state" in text:
                raise RemoteError(f"{self.conn.host}: {what} refused: {_tail(text)}") from None
            # imaplib raises error for NO on LOGIN/AUTHENTICATE and for a few parse problems
            raise RemoteError(f"{self.conn.host}: {what} failed: {_tail(text)}") from None
        except (OSError, EOFError, ValueError) as e:
            self.dead = True
            raise _mapped(self.conn.host, e) from None
        finally:
            self.wire.literal_limit = HEADER_LIMIT
        if typ != "OK":
            raise RemoteError(f"{self.conn.host}: {what} failed: {_text(data)}")
        self._check_exists(len([d for d in data if d is not None]) if expunges else 0)
        return list(data)

    def _check_exists(self, expunges: int = 0) -> None:
        """Follow EXISTS/EXPUNGE: a count that drops by more than the expunges is a lie."""
        responses = self.wire.untagged_responses
        expunged = len(responses.pop("EXPUNGE", [])) + expunges
        counts = responses.pop("EXISTS", [])
        if self.selected is None:
            return
        exists = self.selected.exists - expunged
        for raw in counts:
            try:
                n = int(raw if isinstance(raw, bytes) else b"x")
            except (TypeError, ValueError):
                self.dead = True
                raise RemoteProtocolError(
                    f"{self.conn.host}: malformed EXISTS response: {raw!r}") from None
            if n < exists:
                self.dead = True
                raise RemoteProtocolError(
                    f"{self.conn.host}: message count went down from {exists} to {n} "
                    "without EXPUNGE")
            exists = n
        self.selected = self.selected._replace(exists=max(exists, 0))

    # -- folders ---------------------------------------------------------------------------

    def select(self, folder: str, *, readonly: bool = False) -> Selected:
        """SELECT (or EXAMINE with ``readonly``) ``folder``; its UIDVALIDITY and size."""
        self.selected = None
        name = quote_mailbox(folder)
        data = self._call("EXAMINE" if readonly else "SELECT",
                          lambda: self.wire.select(name, readonly))
        responses = self.wire.untagged_responses
        try:
            exists = int(data[0])
            uidvalidity = int(responses.pop("UIDVALIDITY", [b"0"])[-1])  # type: ignore[arg-type]
            uidnext = int(responses.pop("UIDNEXT", [b"0"])[-1])  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError):
            self.dead = True
            raise RemoteProtocolError(f"{self.conn.host}: malformed SELECT response") from None
        if not uidvalidity:
            raise RemoteError(f"{self.conn.host}: folder {folder} has no UIDVALIDITY")
        self.folder = folder
        self.selected = Selected(uidvalidity, exists, uidnext, readonly)
        return self.selected

    def list_folders(self, pattern: str = "*") -> list[str]:
        """The folder names LIST returns for ``pattern`` (decoded), \\Noselect ones left out."""
        data = self._call("LIST", lambda: self.wire.list('""', quote_mailbox(pattern)))
        names: list[str] = []
        for pieces in _responses(data):
            try:
                values = parse_values(pieces[0], pieces[1:])
            except RemoteProtocolError as e:
                self.dead = True
                raise RemoteProtocolError(f"{self.conn.host}: LIST: {e}") from None
            if len(values) != 3 or not isinstance(values[0], list):
                self.dead = True
                raise RemoteProtocolError(f"{self.conn.host}: malformed LIST response")
            flags = {str(f).lower() for f in values[0]}
            if "\\noselect" in flags or "\\nonexistent" in flags:
                continue
            name = values[2]
            names.append(decode_mailbox(name.decode("utf-8", "replace")
                                        if isinstance(name, bytes) else str(name)))
        return names

    def create(self, folder: str) -> None:
        """CREATE ``folder`` (for copies and appends to a folder not there yet)."""
        self._call("CREATE", functools.partial(self.wire.create, quote_mailbox(folder)))

    def noop(self) -> int:
        """Ask for news; the folder's message count now."""
        self._call("NOOP", self.wire.noop)
        return self._need_selected().exists

    def _need_selected(self) -> Selected:
        if self.selected is None:
            raise RemoteError(f"{self.conn.host}: no folder selected")
        return self.selected

    # -- messages --------------------------------------------------------------------------

    def index(self, after: int = 0) -> list[FetchData]:
        """UID, size and flags of every message in the selected folder (with UIDs above
        ``after``), in folder order."""
        if not self._need_selected().exists:
            return []
        return [a for a in self._fetch(f"{after + 1}:*", "(UID RFC822.SIZE FLAGS)")
                if a.uid > after]

    def summaries(self, uids: list[int], fields: tuple[str, ...] = SUMMARY_FIELDS,
                  batch: int = BATCH) -> Iterator[MessageInfo]:
        """The summary of each of ``uids`` (header fields, flags, size, arrival date),
        fetched ``batch`` at a time; a UID no longer on the server is skipped."""
        items = (f"(UID RFC822.SIZE FLAGS INTERNALDATE "
                 f"BODY.PEEK[HEADER.FIELDS ({' '.join(fields)})])")
        for start in range(0, len(uids), batch):
            chunk = uids[start:start + batch]
            got = {a.uid: a for a in self._fetch(uid_set(chunk), items)}
            for u in chunk:
                a = got.get(u)
                if a is not None:
                    yield MessageInfo(str(u), a.number, a.size, a.flags, a.section or b"",
                                      a.internaldate)

    def body(self, uid: int, limit: int, *, peek: bool = True) -> bytes:
        """The whole message ``uid`` (CRLF as on the wire); ``peek`` leaves \\Seen alone.

        Raises RemoteProtocolError when the server announces more than ``limit`` bytes (before
        reading them) and RemoteError when the message is gone."""
        item = "BODY.PEEK[]" if peek else "BODY[]"
        for a in self._fetch(str(uid), f"(UID {item})", literal_limit=limit):
            if a.uid == uid and a.section is not None:
                return a.section
        raise RemoteError(f"{self.conn.host}: message UID {uid} is no longer in {self.folder}")

    def _fetch(self, uids: str, items: str, literal_limit: int = HEADER_LIMIT
               ) -> list[FetchData]:
        self._need_selected()
        data = self._call("UID FETCH", lambda: self.wire.uid("FETCH", uids, items),
                          literal_limit)
        try:
            return [a for a in parse_fetch(data) if a.uid]
        except RemoteProtocolError as e:
            self.dead = True
            raise RemoteProtocolError(f"{self.conn.host}: {e}") from None

    def store(self, uids: Iterable[int], flags: Iterable[str], *, add: bool = True) -> None:
        """Add (or remove) ``flags`` (``\\Seen``, ``\\Deleted``, ...) on ``uids``."""
        ordered = sorted(set(uids))
        what = "+FLAGS.SILENT" if add else "-FLAGS.SILENT"
        flag_list = "(" + " ".join(flags) + ")"
        for start in range(0, len(ordered), BATCH):
            chunk = uid_set(ordered[start:start + BATCH])
            self._call("UID STORE",
                       functools.partial(self.wire.uid, "STORE", chunk, what, flag_list))

    def expunge(self, uids: Iterable[int]) -> None:
        """Remove messages marked \\Deleted: only ``uids`` when the server has UIDPLUS,
        otherwise every message so marked (plain EXPUNGE)."""
        ordered = sorted(set(uids))
        if not ordered:
            return
        if "UIDPLUS" in self.capabilities:
            for start in range(0, len(ordered), BATCH):
                chunk = uid_set(ordered[start:start + BATCH])
                self._call("UID EXPUNGE", functools.partial(self.wire.uid, "EXPUNGE", chunk))
        else:
            self._call("EXPUNGE", self.wire.expunge, expunges=True)

    def copy(self, uids: Iterable[int], folder: str) -> None:
        """COPY ``uids`` to ``folder`` on the same server."""
        target = quote_mailbox(folder)
        ordered = sorted(set(uids))
        for start in range(0, len(ordered), BATCH):
            chunk = uid_set(ordered[start:start + BATCH])
            self._call("UID COPY", functools.partial(self.wire.uid, "COPY", chunk, target))

    def append(self, folder: str, message: bytes, flags: Iterable[str] = ()) -> None:
        """APPEND ``message`` (LF or CRLF line ends) to ``folder``."""
        flag_list = "(" + " ".join(flags) + ")" if flags else None
        self._call("APPEND", lambda: self.wire.append(quote_mailbox(folder), flag_list, None,
                                                      message))


class FetchData(NamedTuple):
    """The items of one FETCH response we use (0 / None where absent)."""

    number: int
    uid: int
    size: int
    flags: frozenset[str]
    section: bytes | None  # the one BODY[...] returned, if any
    internaldate: str = ""  # as the server gives it: "06-Dec-2026 12:38:00 +0000"


class _Literal(bytes):
    """A literal's bytes among parsed values (so it is never mistaken for an atom)."""


_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\\r\n]|\\["\\])*)"|'
                    rb'([^\s()"{\[\]]+(?:\[[^\]\r\n]*\](?:<\d+>)?)?))')


def parse_values(item: bytes | tuple[bytes, bytes], rest: list[Any] | None = None) -> list[Any]:
    """Parse IMAP data as imaplib hands it (a line, or (line ending in {n}, literal) pieces)
    into nested lists of bytes (atoms, strings, literals); NIL stays the atom b"NIL"."""
    pieces: list[Any] = [item] + (rest or [])
    stream: list[bytes | _Literal] = []
    for p in pieces:
        if isinstance(p, tuple):
            head, lit = p
            m = re.search(rb"\{(\d+)\}\s*$", head)
            if not m or int(m.group(1)) != len(lit):
                raise RemoteProtocolError("malformed FETCH response (literal)")
            stream.append(head[:m.start()])
            stream.append(_Literal(lit))
        elif isinstance(p, bytes):
            stream.append(p)
        else:
            raise RemoteProtocolError("malformed response")
    root: list[Any] = []
    stack = [root]
    for chunk in stream:
        if isinstance(chunk, _Literal):
            stack[-1].append(chunk)
            continue
        pos = 0
        while pos < len(chunk):
            if chunk[pos:].strip() == b"":
                break
            m = _TOKEN.match(chunk, pos)
            if not m or m.end() == pos:
                raise RemoteProtocolError(
                    f"malformed response near {chunk[pos:pos + 40]!r}")
            pos = m.end()
            if m.group(1):
                new: list[Any] = []
                stack[-1].append(new)
                stack.append(new)
            elif m.group(2):
                if len(stack) == 1:
                    raise RemoteProtocolError("malformed response: unbalanced ')'")
                stack.pop()
            elif m.group(3) is not None:
                stack[-1].append(re.sub(rb'\\(["\\])', rb"\1", m.group(3)))
            else:
                stack[-1].append(m.group(4))
    if len(stack) != 1:
        raise RemoteProtocolError("malformed response: unbalanced '('")
    return root


def _responses(data: list[Any]) -> Iterator[list[Any]]:
    """imaplib's untagged data regrouped one response each: (line, literal) tuples and the
    line that ends the response."""
    pending: list[Any] = []
    for item in data:
        if item is None:
            continue
        pending.append(item)
        if isinstance(item, tuple):
            continue  # its trailer (maybe with another literal) follows
        yield pending
        pending = []
    if pending:
        raise RemoteProtocolError("malformed response (truncated after a literal)")


def parse_fetch(data: list[Any]) -> list[FetchData]:
    """The FETCH responses imaplib collected (lines and (line, literal) tuples in order)."""
    return [_one_fetch(pieces) for pieces in _responses(data)]


def _one_fetch(pieces: list[Any]) -> FetchData:
    values = parse_values(pieces[0], pieces[1:])
    if len(values) != 2 or not isinstance(values[1], list) or not isinstance(values[0], bytes):
        raise RemoteProtocolError("malformed FETCH response")
    try:
        number = int(values[0])
    except ValueError:
        raise RemoteProtocolError("malformed FETCH response (message number)") from None
    atts = values[1]
    if len(atts) % 2:
        raise RemoteProtocolError("malformed FETCH response (odd item list)")
    uid = size = 0
    flags: frozenset[str] = frozenset()
    section: bytes | None = None
    internaldate = ""
    for name, value in zip(atts[0::2], atts[1::2], strict=True):
        if not isinstance(name, bytes) or isinstance(name, _Literal):
            raise RemoteProtocolError("malformed FETCH response (item name)")
        key = name.upper()
        try:
            if key == b"UID":
                uid = _number(value)
            elif key == b"RFC822.SIZE":
                size = _number(value)
            elif key == b"FLAGS":
                if not isinstance(value, list):
                    raise ValueError
                flags = frozenset(f.decode("ascii", "replace") for f in value)
            elif key == b"INTERNALDATE":
                if isinstance(value, list):
                    raise ValueError
                internaldate = value.decode("ascii", "replace")
            elif key.startswith(b"BODY["):
                if isinstance(value, list):
                    raise ValueError
                section = None if value == b"NIL" and not isinstance(value, _Literal) \
                    else bytes(value)
        except (ValueError, AttributeError):
            raise RemoteProtocolError(
                f"malformed FETCH response ({key.decode('ascii', 'replace')})") from None
    return FetchData(number, uid, size, flags, section, internaldate)


def _number(value: Any) -> int:
    if not isinstance(value, bytes) or isinstance(value, _Literal) or not value.isdigit():
        raise ValueError
    return int(value)


def _text(data: list[Any]) -> str:
    parts = [d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d)
             for d in data if d is not None]
    return " ".join(parts)[:200] or "(no text)"


def _tail(text: str) -> str:
    return text.split("=> ", 1)[-1][:200]


def _mapped(host: str, e: BaseException) -> RemoteError:
    """An imaplib or socket failure as our error."""
    # a certificate that fails verification is a ValueError too: ssl first
    if isinstance(e, ssl.SSLError) or not isinstance(e, (imaplib.IMAP4.error, ValueError)):
        return connection_error(host, e)
    text = str(e)
    if isinstance(e, imaplib.IMAP4.abort):
        if "EOF" in text:
            return RemoteLost(f"{host}: connection closed by the server")
        if "socket error" in text:
            return RemoteLost(f"{host}: connection lost: {_tail(text)}")
        if "unexpected" in text or "more than" in text:
            return RemoteProtocolError(f"{host}: not IMAP: {_tail(text)}")
        return RemoteLost(f"{host}: server closed the session: {_tail(text)}")
    if isinstance(e, ValueError):
        return RemoteProtocolError(f"{host}: malformed response: {text[:200]}")
    if "more than" in text or "not IMAP4" in text:  # an imaplib.IMAP4.error by now
        return RemoteProtocolError(f"{host}: not IMAP: {_tail(text)}")
    return RemoteError(f"{host}: {_tail(text)}")
