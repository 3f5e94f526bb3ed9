"""Read mode of mail(1): header summary, message lists and mailx's interactive commands."""

from __future__ import annotations

import bisect
import itertools
import os
import pwd
import sys

from pymailtools import address
from pymailtools.config import Config
from pymailtools.errors import EX_NOPERM, EX_OK, MailError, UsageError
from pymailtools.mua import folder as mailfolder
from pymailtools.mua.folder import (
    DELETED,
    OLD,
    PRESERVED,
    READ,
    SAVED,
    SEEN,
    TO_MBOX,
    Entry,
    Folder,
    Headers,
    clear_of,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from email.message import Message
    from re import Match
    from typing import TextIO, TypeVar

    _K = TypeVar("_K")
    _V = TypeVar("_V")

    from pymailtools.mua.compose import Draft

EX_NOMAIL = 1
# Headers p/t show; P/T show them all (mailx "retain" list of most distributions).
SHOWN_HEADERS = ("date", "from", "to", "cc", "subject", "reply-to")
# Headers top shows above the first lines (s-nail's default for top).
TOP_HEADERS = ("from", "to", "cc", "subject")

HELP = """\
               mail commands
type|p [list]            type messages (T/P: with all headers)
next|n                   goto and type next message (Enter does the same)
-                        type the previous message
headers|h, z, z-         print the window of headers / next / previous window
from|f list              give header lines of messages
delete|d [list]          delete messages (dp/dt: and type the next)
undelete|u [list]        undelete messages
Unread|U [list]          mark messages unread
preserve|hold [list]     keep messages in the system mailbox
mbox|mb [list]           mark messages to go to ~/mbox
save|s [list] file       append messages to a file
copy|c [list] file       like save, without marking them saved
move|mv [list] file      like copy, then delete them
write|w [list] file      append message bodies (without headers) to a file
reply|r [list]           reply to the sender
Reply|R [list]           reply to the sender and all recipients
mail|m addresses         mail to specific recipients
file|folder|fi           show the mailbox name and counts
size, top [list]         message sizes / first lines
=                        current message number
quit|q                   quit, saving changes (read messages go to ~/mbox)
xit|x|exit|ex            quit, discarding changes
!command                 shell escape (interactive only)

A list is: n, n-m, ^, $, ., *, :n (new), :o (old), :r (read), :u (unread), :d (deleted),
/text (subject contains text), or a sender's address.
"""


def clean(text: str) -> str:
    """Make text safe for a terminal: controls in caret notation, never a raw escape."""
    if text.isprintable():  # nothing below applies to it: the common case, at C speed
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch in "\t\n":
            out.append(ch)
        elif o < 0x20:
            out.append("^" + chr(o + 64))
        elif o == 0x7F:
            out.append("^?")
        elif 0x80 <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif 0xD800 <= o < 0xE000:
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


_ENCODED_WORD = r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?="


def raw_value(msg: Headers, name: str) -> str | None:
    """The first ``name`` header as stored (8-bit bytes as surrogate escapes); None when absent."""
    return msg.get(name)


def _bytes_text(data: bytes) -> str:
    """8-bit header bytes as UTF-8, or as Latin-1 when they are not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _unescaped(value: str) -> str:
    """A stored header value with its 8-bit bytes decoded (RFC 2047 words left as they are)."""
    return _bytes_text(value.encode("utf-8", "surrogateescape"))


def _word(m: Match[str]) -> tuple[str, bytes] | None:
    """(charset, bytes) of one RFC 2047 encoded word; None when it does not decode."""
    import binascii  # only for encoded words

    charset, kind, data = m.group(1).split("*", 1)[0].lower(), m.group(2), m.group(3)
    try:
        if kind in "Bb":
            return charset, binascii.a2b_base64(data + "=" * (-len(data) % 4))
        return charset, binascii.a2b_qp(data.encode("ascii"), header=True)
    except (binascii.Error, ValueError):
        return None


def _charset_text(charset: str, data: bytes) -> str:
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown or non-text codec: as if the bytes were raw
        return _bytes_text(data)


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words. Adjacent words join without the space between them, and
    their bytes join before decoding, so a character split over two words survives."""
    out: list[str] = []
    run: list[tuple[str, bytes]] = []
    pos = 0
    import re  # only for text with encoded words: opening a folder does without it

    for m in re.finditer(_ENCODED_WORD, text):
        word = _word(m)
        if word is None:
            continue  # stays in the text as it is
        gap = text[pos : m.start()]
        if gap.strip() or not run:
            out.extend(_charset_text(c, d) for c, d in run)
            run = []
            out.append(gap)
        if run and run[-1][0] == word[0]:
            run[-1] = (word[0], run[-1][1] + word[1])
        else:
            run.append(word)
        pos = m.end()
    out.extend(_charset_text(c, d) for c, d in run)
    out.append(text[pos:])
    return "".join(out)


def display_text(value: str) -> str:
    """A stored header value for display: 8-bit bytes decoded, RFC 2047 words decoded,
    unfolded, terminal-safe."""
    if value.isascii() and "=?" not in value:  # nothing to decode
        return clean(" ".join(value.split()))
    return clean(" ".join(decode_words(_unescaped(value)).split()))


def header_text(msg: Headers, name: str) -> str:
    """A header's value as text (see ``display_text``); '' when absent."""
    value = raw_value(msg, name)
    return "" if value is None else display_text(value)


def header_addresses(msg: Headers, name: str) -> list[tuple[str, str]]:
    """(display name, address) of each mailbox in an address header, names decoded.

    The list is parsed before RFC 2047 words are decoded, so an encoded comma or angle
    bracket inside a name stays in the name.
    """
    value = raw_value(msg, name)
    if value is None:
        return []
    return list(_addresses(value))


def _addresses(value: str) -> tuple[tuple[str, str], ...]:
    # Cached: a big mailbox's summary meets the same few senders again and again.
    found = _ADDRESSES.get(value)
    if found is None:
        found = tuple((display_text(n), clean(a))
                      for n, a in address.parse_list(_unescaped(value)) if a)
        _remember(_ADDRESSES, value, found)
    return found


# Caches of the summary's columns, as plain dicts (functools would cost its import at start).
_ADDRESSES: dict[str, tuple[tuple[str, str], ...]] = {}
_DAY_COLUMNS: dict[tuple[int, str, int], str] = {}
_SENDER_COLUMNS: dict[str, str | None] = {}


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value


def mailbox_text(name: str, addr: str) -> str:
    """``Name <addr>`` as a header value to send: the name quoted when it needs it, left in
    plain text (the composer encodes it for the wire)."""
    if not name:
        return addr
    if any(c in name for c in '()<>[]:;@\\,."'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def sender_of(h: Headers) -> str:
    """The sender's address: the first of From:, else the From_ line's."""
    found = header_addresses(h, "From")
    if found:
        return found[0][1]
    return h.from_line.split(" ", 1)[0] if h.from_line else ""


def sender_name(h: Headers) -> str:
    """Who the summary shows: the name part of From: when there is one, else the address."""
    found = header_addresses(h, "From")
    if found and found[0][0]:
        return found[0][0]
    return sender_of(h)


def columns(ch: str) -> int:
    """Terminal columns a character takes: 2 for wide East Asian, 0 for combining marks."""
    import unicodedata  # only for text that is not ASCII

    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def fit(text: str, width: int, pad: bool = False) -> str:
    """``text`` cut to at most ``width`` columns (padded with spaces to it if ``pad``)."""
    if text.isascii():  # one column each
        text = text[:width]
        return text.ljust(width) if pad else text
    used = 0
    for i, ch in enumerate(text):
        w = columns(ch)
        if used + w > width:
            text = text[:i]
            break
        used += w
    return text + " " * (width - used) if pad else text


def date_of(h: Headers) -> str:
    """mailx's 16-column date: from the From_ line ("Mon Nov 16 10:00"), else Date:."""
    parts = h.from_line.split()
    if len(parts) >= 5 and len(parts[4]) >= 5:
        return clean(f"{parts[1]} {parts[2]} {parts[3]:>2} {parts[4][:5]}")
    value = header_text(h, "Date")
    return _plain_date(value) or _parsed_date(value)


_MONTHS = {m: n for n, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                        "sep", "oct", "nov", "dec"), 1)}
_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_SHIFT = (0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4)


def _plain_date(value: str) -> str:
    """``_parsed_date`` of an RFC 5322 date in its usual form ([Day,] DD Mon YYYY HH:MM...),
    without the email package; '' for any other form."""
    parts = value.split(None, 5)
    if parts and parts[0].endswith(","):
        del parts[0]
    if len(parts) < 4:
        return ""
    day, mon, year, clock = parts[0], parts[1], parts[2], parts[3]
    if not (clock[2:3] == ":" and len(clock) >= 5 and (clock[:2] + clock[3:5]).isdigit()
            and day.isdigit() and len(year) == 4 and year.isdigit()):
        return ""
    key = (int(year), mon.lower(), int(day))
    column = _DAY_COLUMNS.get(key)
    if column is None:
        column = _day_column(*key)
        _remember(_DAY_COLUMNS, key, column)
    return f"{column} {clock[:5]}" if column else ""


def _day_column(year: int, mon: str, day: int) -> str:
    """"Tue Nov 14" for a date; '' when there is no such day."""
    month = _MONTHS.get(mon)
    if month is None:
        return ""
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= (28 if month == 2 and not leap else _MONTH_DAYS[month - 1]):
        return ""
    # Sakamoto's day of the week (0 = Sunday)
    y = year - (month < 3)
    weekday = (y + y // 4 - y // 100 + y // 400 + _MONTH_SHIFT[month - 1] + day) % 7
    return f"{_WEEKDAYS[weekday]} {mon.title()} {day:02d}"


def _parsed_date(value: str) -> str:
    """mailx's date column for a Date: value ("Mon Nov 16 10:00"), as the message's own zone
    gives it; '' when it does not parse."""
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value).strftime("%a %b %d %H:%M")
    except (TypeError, ValueError, IndexError):
        return ""


def summary(e: Entry, h: Headers, num: int, current: bool, width: int) -> str:
    value = h.get("Subject")
    subject = "" if value is None else display_text(value)
    value = h.get("From")
    sender = None if value is None else _sender_column(value)
    if sender is None:
        sender = fit(sender_name(h), 18, pad=True)
    lines = e.lines  # -1: not known (a remote message not read yet): blank, as s-nail
    line = (f"{'>' if current else ' '}{e.letter()}{num:3d} {sender} "
            f"{date_of(h)[:16]:<16} {f'{lines:4d}' if lines >= 0 else '    '}/{e.size:<5d} "
            f"{subject}")
    # One column short of the width, as s-nail: a full last column makes terminals wrap.
    return fit(line, width - 1).rstrip()


def _sender_column(value: str) -> str | None:
    """``sender_name``'s column for a From: field's value; None when it has no address."""
    # Cached: a big mailbox's summary meets the same few senders again and again.
    if value in _SENDER_COLUMNS:
        return _SENDER_COLUMNS[value]
    found = _addresses(value)
    column = fit(found[0][0] or found[0][1], 18, pad=True) if found else None
    _remember(_SENDER_COLUMNS, value, column)
    return column


def resolve_mailbox(cfg: Config, folder: str | None, user: str | None) -> tuple[str, str, bool]:
    """(path, user name, whether it is the system mailbox) for -f / -u / the default."""
    me = pwd.getpwuid(os.getuid()).pw_name if _has_passwd() else str(os.getuid())
    if folder is not None:
        path = folder or os.environ.get("MBOX") or os.path.expanduser("~/mbox")
        if path.startswith("%"):
            return resolve_mailbox(cfg, None, path[1:] or None)
        return os.path.expanduser(path), me, False
    # the spool only for the system mailbox: reading a -f folder does without its imports
    from pymailtools.local.spool import mailbox_path, valid_user_name

    if user is not None and user != me:
        if os.geteuid() != 0:
            raise MailError(f"{user}: only root may read another user's mailbox", EX_NOPERM)
        if not valid_user_name(user):
            raise UsageError(f"invalid user name: {user!r}")
        return mailbox_path(cfg, user)[0], user, True
    env = os.environ.get("MAIL")
    if env and user is None:
        return env, me, True
    return mailbox_path(cfg, me)[0], me, True


def _has_passwd() -> bool:
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    return True


def start(cfg: Config, *, folder: str | None, user: str | None, headers_only: bool,
          check_only: bool, show_headers: bool, variables: dict[str, str], prog: str,
          warn: Callable[[str], None], opened: Folder | None = None,
          session_class: type[Session] | None = None,
          before_send: Callable[[], None] | None = None) -> int:
    """Read mode on the folder -f / -u / the default names, or on ``opened`` (a remote
    folder already logged into) with the commands of ``session_class``; ``before_send`` is
    called before a message composed in the session is sent. The folder the session ends
    on is closed."""
    if opened is not None:
        box, path, name, system = opened, opened.path, "", False
    else:
        path, name, system = resolve_mailbox(cfg, folder, user)
        if system and not os.path.exists(path):
            if not check_only:
                print(f"No mail for {name}", file=sys.stderr)
            return EX_NOMAIL
        box = mailfolder.load(path, cfg)
    session: Session | None = None
    try:
        if check_only:
            return EX_OK if box.entries else EX_NOMAIL
        if not box.entries:
            if system:
                print(f"No mail for {name}", file=sys.stderr)
            else:
                print(f'"{path}": 0 messages')
            return EX_NOMAIL
        session = (session_class or Session)(cfg, box, system=system, variables=variables,
                                             prog=prog, warn=warn, before_send=before_send)
        if headers_only:
            session.emit_summaries(range(len(box.entries)))
            return EX_OK
        return session.loop(show_headers)
    finally:
        (box if session is None else session.box).close()


class Session:
    """One reading session over a folder: the current message, marks, and the command loop."""

    def __init__(self, cfg: Config, box: Folder, *, system: bool, variables: dict[str, str],
                 prog: str, warn: Callable[[str], None], inp: TextIO | None = None,
                 out: TextIO | None = None,
                 before_send: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.system = system
        self.vars = variables
        self.prog = prog
        self.warn = warn  # the front end's: "prog: warning: …" on stderr
        # the front end's too: what sending needs that reading does without
        self.before_send = before_send
        self.inp = inp or sys.stdin
        self.out = out or sys.stdout
        self.tty = self.inp.isatty() and self.out.isatty()
        self.reset(box)
        self._console = None
        if self.out.isatty() and not os.environ.get("NO_COLOR"):
            # rich only for a colour terminal
            from rich.console import Console

            self._console = Console(file=self.out, highlight=False, soft_wrap=True)

    def reset(self, box: Folder) -> None:
        """Read ``box`` from now on: its first new message current, else its first unread."""
        self.box = box
        # flag bits rather than entries: the loops over every message run at C speed mostly
        first = clear_of(box.flags, OLD | READ).find(1)
        if first < 0:
            first = max(0, clear_of(box.flags, SEEN).find(1))
        self.dot = first
        self.dot_shown = False
        self.window = 0

    # --- output ---------------------------------------------------------------------------

    @property
    def width(self) -> int:
        if self.out.isatty():
            import shutil

            return shutil.get_terminal_size((80, 24)).columns
        try:
            return max(20, int(os.environ.get("COLUMNS", "80")))
        except ValueError:
            return 80

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def headers_of(self, indices: Iterable[int]) -> Iterable[tuple[int, Headers]]:
        """(index, headers) of each message in ``indices``, fetched in batches."""
        entries = self.box.entries
        picked = list(indices)
        blocks = self.box.header_blocks(entries[i] for i in picked)
        return zip(picked, map(Headers, blocks), strict=True)

    def emit_summaries(self, indices: Iterable[int]) -> None:
        entries = self.box.entries
        width = self.width
        if self._console is None:
            write = self.out.write
            for i, h in self.headers_of(indices):
                write(summary(entries[i], h, i + 1, i == self.dot, width) + "\n")
            self.out.flush()
            return
        # rich only for a colour terminal (a console exists)
        from rich.text import Text

        for i, h in self.headers_of(indices):
            e = entries[i]
            line = summary(e, h, i + 1, i == self.dot, width)
            style = "bold" if e.is_new else "dim" if e.deleted else ""
            if i == self.dot:
                style = (style + " reverse").strip()
            self._console.print(Text(line, style=style))
        self.out.flush()

    def banner(self) -> None:
        entries = self.box.entries
        n = len(entries)
        flags = self.box.flags
        new = clear_of(flags, OLD | READ).count(1)
        unread = clear_of(flags, SEEN | READ).count(1)
        text = f'"{self.box.path}": {n} message{"" if n == 1 else "s"}'
        if new:
            text += f" {new} new"
        if unread > new:  # (mailx's rule: not when they could all be the new ones)
            text += f" {unread} unread"
        self.say(clean(text))

    def screen(self) -> int:
        """Header lines per window: the terminal's height less 4; without a terminal, s-nail's
        22 (a 24-line screen less the banner's lines), so that a big folder opened from a
        script does not print a line per message."""
        if not self.out.isatty():
            return 22
        import shutil

        return max(5, shutil.get_terminal_size((80, 24)).lines - 4)

    def headers(self, start: int | None = None) -> None:
        visible = self._undeleted()
        if not visible:
            self.say("No more mail.")
            return
        size = self.screen()
        if start is None:
            pos = bisect.bisect_left(visible, self.dot)  # the first at or after dot, else 0
            start = (0 if pos == len(visible) else pos // size) * size
        self.window = max(0, min(start, len(visible) - 1))
        self.emit_summaries(visible[self.window : self.window + size])

    def _undeleted(self) -> Sequence[int]:
        """Indices of the messages not deleted, in order."""
        keep = clear_of(self.box.flags, DELETED)
        if keep.find(0) < 0:
            return range(len(keep))
        return list(itertools.compress(itertools.count(), keep))

    # --- message lists --------------------------------------------------------------------

    def select(self, spec: str, *, deleted: bool = False) -> list[int]:
        """Indices for a mailx message list; the current message when ``spec`` is empty."""
        entries, flags = self.box.entries, self.box.flags
        usable = range(len(flags)) if deleted else self._undeleted()
        if not spec.strip():
            if deleted or not flags[self.dot] & DELETED:
                return [self.dot]
            raise UsageError("No applicable messages")
        out: list[int] = []
        for tok in spec.split():
            if tok == "*":
                out.extend(usable)
            elif tok == "$":
                out.extend(usable[-1:])
            elif tok == "^":
                out.extend(usable[:1])
            elif tok == ".":
                out.append(self.dot)
            elif tok.startswith(":") and len(tok) == 2:
                tests: dict[str, Callable[[Entry], bool]] = {
                    # new: not old, even once read in this session (as s-nail selects)
                    "n": lambda e: not e.old, "o": lambda e: e.old,
                    "r": lambda e: e.seen or e.read, "u": lambda e: not (e.seen or e.read),
                    "d": lambda e: e.deleted}
                test = tests.get(tok[1])
                if test is None:
                    raise UsageError(f"Unknown colon modifier: {tok}")
                pool = range(len(entries)) if tok == ":d" else usable
                out.extend(i for i in pool if test(entries[i]))
            elif tok.startswith("/"):
                needle = tok[1:].lower()
                out.extend(i for i, h in self.headers_of(usable)
                           if needle in header_text(h, "Subject").lower())
            elif "-" in tok and tok.replace("-", "").isdigit():
                a, _, b = tok.partition("-")
                lo, hi = int(a), int(b)
                for n in (lo, hi):
                    if not 1 <= n <= len(entries):
                        raise UsageError(f"{n}: Invalid message number")
                out.extend(i for i in range(lo - 1, hi)
                           if deleted or not flags[i] & DELETED)
            elif tok.isdigit():
                n = int(tok)
                if not 1 <= n <= len(entries):
                    raise UsageError(f"{n}: Invalid message number")
                if not deleted and flags[n - 1] & DELETED:
                    raise UsageError(f"{n}: Inappropriate message")
                out.append(n - 1)
            else:
                needle = tok.lower()
                out.extend(i for i, h in self.headers_of(usable)
                           if needle in sender_of(h).lower())
        result = list(dict.fromkeys(out))  # each once, in order
        if not result:
            raise UsageError("No applicable messages")
        return result

    # --- display --------------------------------------------------------------------------

    def render(self, e: Entry, all_headers: bool) -> str:
        h = e.headers
        out = [f"From {clean(h.from_line)}"] if h.from_line else []
        if all_headers:
            for name, value in h.raw_items():
                out.append(f"{clean(name)}: {display_text(value)}")
        else:
            out.extend(shown_headers(h, SHOWN_HEADERS))
        out.append("")
        out.append(body_text(e))
        return "\n".join(out)

    def show(self, i: int, all_headers: bool = False) -> None:
        e = self.box.entries[i]
        e.read = True
        self.dot = i
        self.dot_shown = True
        text = f"Message {i + 1}:\n" + self.render(e, all_headers)
        self.page(text)

    def page(self, text: str) -> None:
        if self.out.isatty() and text.count("\n") > self.screen():
            pager = os.environ.get("PAGER") or "more"
            import shlex
            import subprocess

            try:
                subprocess.run(shlex.split(pager), input=text.encode("utf-8", "replace"),
                               check=False)
                return
            except OSError:
                pass
        self.say(text)

    # --- the loop -------------------------------------------------------------------------

    def loop(self, show_headers: bool) -> int:
        if self.tty:
            self.say("pymailtools mail.  Type ? for help.")
        self.banner()
        if show_headers:
            self.headers()
        while True:
            if self.tty:
                self.out.write("& ")
                self.out.flush()
            line = self.inp.readline()
            if not line:
                return self.quit()
            line = line.strip()
            try:
                result = self.command(line)
            except MailError as e:
                self.say(str(e))
                continue
            if result is not None:
                return result

    def command(self, line: str) -> int | None:
        if line.startswith("!"):
            if not self.tty:
                raise UsageError("shell escapes are only run from a terminal")
            import subprocess

            subprocess.run(line[1:], shell=True, check=False)  # noqa: S602 (typed by the user)
            self.say("!")
            return None
        if line.startswith("#"):
            return None
        if line == "" or line == "+":
            self.next()
            return None
        if line[0] == "-" and (len(line) == 1 or line[1:].isdigit()):
            self.previous()
            return None
        if line[0].isdigit() or line[0] in "$^.":
            idx = self.select(line)
            self.show(idx[0])
            return None
        head = line.split(None, 1)
        cmd, args = head[0], head[1] if len(head) > 1 else ""
        handler = self.COMMANDS.get(cmd)
        if handler is None:
            raise UsageError(f'Unknown command: "{clean(cmd)}"')
        result: int | None = getattr(self, handler)(args)
        return result

    COMMANDS = {
        "h": "c_headers", "headers": "c_headers", "z": "c_scroll", "z-": "c_scroll_back",
        "f": "c_from", "from": "c_from", "p": "c_print", "t": "c_print", "print": "c_print",
        "type": "c_print", "P": "c_print_all", "T": "c_print_all", "Print": "c_print_all",
        "Type": "c_print_all", "n": "c_next", "next": "c_next", "d": "c_delete",
        "delete": "c_delete", "dp": "c_delete_print", "dt": "c_delete_print",
        "u": "c_undelete", "undelete": "c_undelete", "U": "c_unread", "unread": "c_unread",
        "pre": "c_preserve", "preserve": "c_preserve", "ho": "c_preserve", "hold": "c_preserve",
        "mb": "c_mbox", "mbox": "c_mbox", "s": "c_save", "save": "c_save", "c": "c_copy",
        "copy": "c_copy", "w": "c_write", "write": "c_write", "r": "c_reply",
        "reply": "c_reply", "R": "c_reply_all", "Reply": "c_reply_all", "m": "c_mail",
        "mail": "c_mail", "fi": "c_folder", "file": "c_folder", "fo": "c_folder",
        "folder": "c_folder", "=": "c_dot", "size": "c_size", "si": "c_size", "top": "c_top",
        "to": "c_top", "q": "c_quit", "quit": "c_quit", "x": "c_exit", "ex": "c_exit",
        "exit": "c_exit", "xit": "c_exit", "?": "c_help", "help": "c_help", "list": "c_help",
        "mv": "c_move", "move": "c_move",
    }

    def next(self) -> None:
        entries = self.box.entries
        if not self.dot_shown and not entries[self.dot].deleted:
            self.show(self.dot)
            return
        for i in range(self.dot + 1, len(entries)):
            if not entries[i].deleted:
                self.show(i)
                return
        self.say("At EOF")

    def previous(self) -> None:
        for i in range(self.dot - 1, -1, -1):
            if not self.box.entries[i].deleted:
                self.show(i)
                return
        self.say("Referencing before 1")

    def c_headers(self, args: str) -> None:
        if args:
            self.dot = self.select(args)[0]
        self.headers()

    def c_scroll(self, args: str) -> None:
        self.headers(self.window + self.screen())

    def c_scroll_back(self, args: str) -> None:
        self.headers(max(0, self.window - self.screen()))

    def c_from(self, args: str) -> None:
        if not args:
            return self.c_folder(args)
        self.emit_summaries(self.select(args, deleted=":d" in args))
        return None

    def c_print(self, args: str) -> None:
        for i in self.select(args):
            self.show(i)

    def c_print_all(self, args: str) -> None:
        for i in self.select(args):
            self.show(i, all_headers=True)

    def c_next(self, args: str) -> None:
        if args:
            self.show(self.select(args)[0])
        else:
            self.next()

    def c_delete(self, args: str) -> None:
        for i in self.select(args):
            self.box.entries[i].deleted = True
        self._advance()

    def _advance(self) -> bool:
        flags = self.box.flags
        if not flags[self.dot] & DELETED:
            return True
        for i in itertools.chain(range(self.dot + 1, len(flags)), range(self.dot - 1, -1, -1)):
            if not flags[i] & DELETED:
                self.dot = i
                self.dot_shown = False
                return True
        return False

    def c_delete_print(self, args: str) -> None:
        self.c_delete(args)
        if self._advance() and not self.box.entries[self.dot].deleted:
            self.show(self.dot)
        else:
            self.say("At EOF")

    def c_undelete(self, args: str) -> None:
        picked = self.select(args or ":d", deleted=True) if args else [self.dot]
        for i in picked:
            self.box.entries[i].deleted = False
        self.dot = picked[-1]

    def c_unread(self, args: str) -> None:
        for i in self.select(args):
            e = self.box.entries[i]
            e.read = e.seen = False
            e.old = True

    def c_preserve(self, args: str) -> None:
        for i in self.select(args):
            self.box.entries[i].preserved = True

    def c_mbox(self, args: str) -> None:
        for i in self.select(args):
            self.box.entries[i].to_mbox = True

    def _list_and_file(self, args: str) -> tuple[list[int], str]:
        import shlex  # only for commands that name a file

        words = shlex.split(args)
        if not words:
            raise UsageError("No file specified.")
        path = words[-1]
        spec = " ".join(words[:-1])
        return self.select(spec), os.path.expanduser(path)

    def _append(self, path: str, chunks: list[bytes], lines: int, size: int) -> None:
        created = mailfolder.append_mbox(path, chunks, self.cfg)
        self.say(f'"{clean(path)}" [{"New file" if created else "Appended"}] {lines}/{size}')

    def c_save(self, args: str) -> None:
        self.save_to(args, mark=True)

    def save_to(self, args: str, mark: bool) -> list[int]:
        """Append the listed messages to the file (or IMAP folder URL) ``args`` ends with
        (marked saved with ``mark``); the indices of the messages."""
        picked, path = self._list_and_file(args)
        if "://" in path:
            self._append_remote(path, picked)
        else:
            data = [self.box.mbox_bytes(self.box.entries[i]) for i in picked]
            self._append(path, data, sum(d.count(b"\n") for d in data), sum(map(len, data)))
        if mark:
            for i in picked:
                self.box.entries[i].saved = True
        return picked

    def _append_remote(self, url: str, picked: list[int]) -> None:
        """APPEND messages to an IMAP folder (another account's, or from a local folder)."""
        from pymailtools.mua import remote, remotefolder  # the IMAP client only when asked for

        entries = self.box.entries
        remotefolder.append_messages(self.cfg, url, self.vars, [
            (entries[i].message_bytes, ["\\Seen"] if entries[i].seen or entries[i].read else [])
            for i in picked], warn=self.warn)
        n = len(picked)
        shown = str(remote.parse_url(url))  # without a password the URL may carry
        self.say(f'"{clean(shown)}" [Appended] {n} message{"" if n == 1 else "s"}')

    def c_copy(self, args: str) -> None:
        self.save_to(args, mark=False)

    def c_move(self, args: str) -> None:
        """s-nail's mv: copy, then mark deleted."""
        for i in self.save_to(args, mark=False):
            self.box.entries[i].deleted = True
        self._advance()

    def c_write(self, args: str) -> None:
        picked, path = self._list_and_file(args)
        bodies = []
        for i in picked:
            msg = self.box.entries[i].message_bytes
            bodies.append(msg[mailfolder.body_start(msg) :])
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        created = os.fstat(fd).st_size == 0
        with os.fdopen(fd, "ab") as f:
            f.write(b"".join(bodies))
        size = sum(map(len, bodies))
        lines = sum(b.count(b"\n") for b in bodies)
        self.say(f'"{clean(path)}" [{"New file" if created else "Appended"}] {lines}/{size}')
        for i in picked:
            self.box.entries[i].saved = True

    def c_reply(self, args: str, everyone: bool = False) -> None:
        from pymailtools.mua.compose import Draft, reply_subject

        e = self.box.entries[self.select(args)[0]]
        h = e.headers
        found = header_addresses(h, "Reply-To") or header_addresses(h, "From")
        to = ", ".join(mailbox_text(n, a) for n, a in found)
        draft = Draft(to=[to] if to else [], subject=reply_subject(header_text(h, "Subject")))
        if everyone:
            me = pwd.getpwuid(os.getuid()).pw_name if _has_passwd() else ""
            replied = {a.lower() for _, a in found}
            others = [mailbox_text(n, a)
                      for n, a in header_addresses(h, "To") + header_addresses(h, "Cc")
                      if a.split("@")[0] != me and a.lower() not in replied]
            if others:
                draft.cc.append(", ".join(others))
        msgid = header_text(h, "Message-ID")
        if msgid:
            draft.headers.append(("In-Reply-To", msgid))
            refs = header_text(h, "References")
            draft.headers.append(("References", f"{refs} {msgid}".strip()))
        e.read = True
        self._compose(draft)

    def c_reply_all(self, args: str) -> None:
        self.c_reply(args, everyone=True)

    def c_mail(self, args: str) -> None:
        if not args.strip():
            raise UsageError("No recipients specified")
        from pymailtools.mua.compose import Draft

        self._compose(Draft(to=[args]))

    def _compose(self, draft: Draft) -> None:
        # composing only: reading pays for neither the composer nor the submission code
        from pymailtools.mua import outbox, tilde

        self.say(f"To: {clean(', '.join(draft.to))}")
        if draft.cc:
            self.say(f"Cc: {clean(', '.join(draft.cc))}")
        composer = tilde.Composer(draft, self.inp, self.out,
                                  escape=self.vars.get("escape", "~")[:1] if self.tty else "")
        if draft.subject:
            self.say(f"Subject: {clean(draft.subject)}")
        outcome = composer.run(ask_subject=not draft.subject)
        if outcome != tilde.SEND:
            return
        if self.before_send is not None:
            self.before_send()
        sender = self.vars.get("from", "")
        server = self.vars.get("smtp") or (self.vars.get("mta") if "://" in
                                           self.vars.get("mta", "") else None)
        outbox.send_draft(self.cfg, draft, sender, server=server, variables=self.vars,
                          verbose=False, prog=self.prog, warn=self.warn)

    def c_folder(self, args: str) -> None:
        if args:
            raise UsageError("switching folders is not supported; quit and use mail -f")
        self.banner()

    def c_dot(self, args: str) -> None:
        self.say(str(self.dot + 1))

    def c_size(self, args: str) -> None:
        for i in self.select(args):
            self.say(f"{i + 1}: {self.box.entries[i].size}")

    def c_top(self, args: str) -> None:
        for i in self.select(args):
            e = self.box.entries[i]
            body = body_text(e).split("\n")[:5]
            self.say("\n".join([f"Message {i + 1}:", *shown_headers(e.headers, TOP_HEADERS), "",
                                *body]))

    def c_help(self, args: str) -> None:
        self.say(HELP.rstrip("\n"))

    def c_exit(self, args: str) -> int:
        return EX_OK

    def c_quit(self, args: str) -> int:
        return self.quit()

    def quit(self) -> int:
        """mailx's q: drop deleted, move read messages to ~/mbox (system mailbox, no hold)."""
        entries, flags = self.box.entries, self.box.flags
        hold = "hold" in self.vars
        keepsave = "keepsave" in self.vars
        moved: list[int] = []
        keep: list[int] = []
        if not self.system:  # a folder keeps all but the deleted
            keep = [i for i, f in enumerate(flags) if not f & DELETED]
        else:
            for i, f in enumerate(flags):
                if f & DELETED:
                    continue
                if not f & PRESERVED and (f & TO_MBOX or (
                        f & READ and not hold and not f & SAVED)):
                    moved.append(i)
                elif f & SAVED and not keepsave and not f & PRESERVED:
                    continue
                else:
                    keep.append(i)
        if not self.box.changed() and len(keep) == len(flags):
            return EX_OK
        mbox = os.environ.get("MBOX") or os.path.expanduser("~/mbox")
        if moved and os.path.abspath(mbox) == os.path.abspath(self.box.path):
            keep = [i for i, f in enumerate(flags) if not f & DELETED]
            moved = []

        def copy_to_mbox() -> None:
            if moved:
                mailfolder.append_mbox(mbox, [self.box.mbox_bytes(entries[i]) for i in moved],
                                       self.cfg)

        arrived = self.box.save(self.cfg, keep, copy_to_mbox)
        if moved:
            n = len(moved)
            self.say(f"Saved {n} message{'' if n == 1 else 's'} in {clean(mbox)}")
        if self.system:
            n = len(keep)
            self.say(f"Held {n} message{'' if n == 1 else 's'} in {clean(self.box.path)}")
        if arrived:
            self.say("You have new mail.")
        return EX_OK


def shown_headers(h: Headers, names: tuple[str, ...]) -> list[str]:
    """``Name: value`` lines of the headers ``names`` that the message has, decoded."""
    out = []
    for name in names:
        value = header_text(h, name)
        if value:
            out.append(f"{name.title() if name != 'cc' else 'Cc'}: {value}")
    return out


def body_text(e: Entry) -> str:
    """The text to show for a message: its text part decoded, other parts listed."""
    import email
    import email.policy

    data = e.message_bytes
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
    except Exception:
        return clean(data.decode("utf-8", "replace"))
    if not msg.is_multipart():
        if msg.get_content_maintype() in ("text", "message") or not msg.get("Content-Type"):
            return clean(_decoded(msg))
        return _attachment_line(msg, 1)
    out: list[str] = []
    shown = False
    n = 0
    for part in msg.walk():
        if part.is_multipart():
            continue
        n += 1
        is_attachment = (part.get("Content-Disposition", "").lower().startswith("attachment")
                         or part.get_filename() is not None)
        if not shown and part.get_content_type() == "text/plain" and not is_attachment:
            out.append(clean(_decoded(part)))
            shown = True
        else:
            out.append(_attachment_line(part, n))
    return "\n".join(out)


def _decoded(part: Message) -> str:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _attachment_line(part: Message, n: int) -> str:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    size = len(data) if isinstance(data, bytes) else 0
    name = part.get_filename() or ""
    name = display_text(name) if name else "(no name)"
    return f"[-- Attachment #{n}: {name} ({clean(part.get_content_type())}, {size} bytes) --]"
