"""POP3 and IMAP by hand: reading their responses (POP3's dot-ended lists, IMAP's tags and
literals), STLS/STARTTLS, their authentication commands, and the scripted session over them."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable

from pymailtools.chat import status
from pymailtools.chat.console import Console
from pymailtools.chat.errors import ChatError, ProtocolError
from pymailtools.chat.session import Options, Session, Stop
from pymailtools.chat.transcript import MASK, Transcript
from pymailtools.smtp import sasl
from pymailtools.smtp.reply import Reply

POP3, IMAP = "pop3", "imap"
# (plain port, TLS-from-the-first-byte port), as /etc/services names them (pop3/pop3s...).
PORTS = {POP3: (110, 995), IMAP: (143, 993)}
# Responses become Replies with a class code, so the transcript colours and hints them as it
# does SMTP's: +OK / OK / an untagged line 200, a "+" continuation 300, BYE 421, -ERR / NO /
# BAD 500 (0 stays "malformed").
OK, CONTINUE, BYE, REFUSED = 200, 300, 421, 500
AUTH_TYPES = {POP3: ("PLAIN", "USER", "XOAUTH2"), IMAP: ("PLAIN", "LOGIN", "XOAUTH2")}
# A server literal or a POP3 list larger than this ends the session (out of step, or hostile).
DATA_LIMIT = 64 << 20
# Lines may be long (a FETCH of many flags, a message line): longer than SMTP's limit.
LINE_LIMIT = 1 << 20
QUIT_POINTS = {"connect": "banner", "banner": "banner", "tls": "tls", "starttls": "tls",
               "auth": "auth"}
# The exit code a refused command maps to, by its verb (interactive and piped mode).
BY_VERB = {"STLS": status.TLS, "STARTTLS": status.TLS, "AUTH": status.AUTH,
           "AUTHENTICATE": status.AUTH, "LOGIN": status.AUTH, "USER": status.AUTH,
           "PASS": status.AUTH, "APOP": status.AUTH, "QUIT": status.QUIT,
           "LOGOUT": status.QUIT}
# Typed lines whose arguments are secrets: the transcript shows the verb (and user) only.
_SECRET_VERBS = {b"PASS": 1, b"APOP": 2, b"LOGIN": 2, b"AUTH": 2, b"AUTHENTICATE": 2}
_SECRET_VERBS_TEXT = {v.decode() for v in _SECRET_VERBS}
_CAPABILITY = re.compile(rb"^(?:\* |\S+ OK \[)CAPABILITY ([^]\r\n]*)", re.IGNORECASE)
_LITERAL = re.compile(rb"~?\{(\d+)(\+?)\}$")


def default_port(protocol: str, tls_on_connect: bool) -> int:
    return PORTS[protocol][1 if tls_on_connect else 0]


def implicit_tls_port(protocol: str, port: int) -> bool:
    """Whether ``port`` is the protocol's TLS-from-the-first-byte port (995, 993)."""
    return port == PORTS[protocol][1]


def literal_at_end(line: bytes) -> tuple[int, bool] | None:
    """(size, synchronizing) of an IMAP literal announced at the end of ``line``."""
    m = _LITERAL.search(line)
    if m is None:
        return None
    return int(m.group(1)), not m.group(2)


def pop3_multiline(command: bytes) -> bool:
    """Whether +OK to ``command`` is followed by lines ending in a lone "." (RFC 1939, 2449)."""
    words = command.split()
    verb = words[0].upper() if words else b""
    if verb in (b"RETR", b"TOP", b"CAPA"):
        return True
    if verb == b"AUTH":  # without a mechanism: the list of those offered
        return len(words) == 1
    return verb in (b"LIST", b"UIDL") and len(words) == 1


def mask(line: bytes) -> str | bytes:
    """What the transcript shows of a typed command: secrets replaced by ********."""
    words = line.split(b" ")
    keep = _SECRET_VERBS.get(words[0].upper())
    if keep is None or len(words) <= keep:
        return line
    return b" ".join(words[:keep]).decode("utf-8", "replace") + " " + MASK


def quote(text: str) -> str:
    """An IMAP quoted string (RFC 3501): backslash and double quote escaped."""
    if "\r" in text or "\n" in text:
        raise ChatError("a user name or password with a line break cannot be sent",
                        status.AUTH)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def xoauth2(user: str, token: str) -> str:
    """The XOAUTH2 initial client response (Google's and Microsoft's SASL mechanism)."""
    return base64.b64encode(sasl.xoauth2(user, token)).decode("ascii")


def plain(user: str, password: str) -> str:
    return base64.b64encode(sasl.plain(user, password)).decode("ascii")


class MraSession(Session):
    """A POP3 or IMAP connection: the SMTP session's connecting, TLS and transcript, with
    this protocol's responses; ``run()`` is the scripted mode and returns its exit code."""

    def __init__(self, opts: Options, transcript: Transcript, protocol: str) -> None:
        super().__init__(opts, transcript)
        self.protocol = protocol
        self.quit_point = QUIT_POINTS.get(opts.quit_after or "", None)
        self.tag: str | None = None  # IMAP: the command whose tagged response is awaited
        self.tags = 0
        self.last = b""  # POP3: the last command, which says if its answer is a list
        self.capabilities: set[str] = set()

    # --- sending ---------------------------------------------------------------------------

    def send_line(self, raw: bytes, shown: str | bytes | None = None, echo: bool = True,
                  new: bool = True) -> None:
        """Send one line; ``new``: it starts a command (IMAP: a tag is put before it)."""
        assert self.wire is not None
        if new and self.protocol == IMAP:
            self.tags += 1
            self.tag = f"a{self.tags:03d}"
            raw = self.tag.encode() + b" " + raw
            if isinstance(shown, str):
                shown = f"{self.tag} {shown}"
            elif shown is not None:
                shown = self.tag.encode() + b" " + shown
        elif new:
            self.last = raw
        self.wire.send(raw + b"\r\n")
        if echo:
            self.t.sent(raw if shown is None or self.opts.show_secrets else shown)

    def command(self, line: str, shown: str | bytes | None = None) -> Reply:
        """Send a whole command and read its response (what scripted mode and /auth use)."""
        self.send_line(line.encode("utf-8"), shown)
        return self.read_reply()

    def answer(self, line: str, shown: str | None = None) -> Reply:
        """Answer a "+" continuation (a SASL step) and read what follows."""
        self.send_line(line.encode("ascii"), shown, new=False)
        return self.read_reply()

    # --- reading ---------------------------------------------------------------------------

    def read_reply(self) -> Reply:
        assert self.wire is not None
        lines: list[bytes] = []
        try:
            reply = self._read_pop3(lines) if self.protocol == POP3 else self._read_imap(lines)
        except ChatError:
            if lines:  # what came before the server stopped or broke the rules
                self.t.received(Reply(0, lines), expected=False)
            raise
        self.t.received(reply, expected=reply.ok)
        if self.protocol == IMAP:
            self._learn(reply.lines)
        return reply

    def _learn(self, lines: list[bytes]) -> None:
        """IMAP servers list their capabilities unasked too (in the greeting, after a
        login): keep the latest list, so /auth knows whether SASL-IR may be used."""
        for line in lines:
            m = _CAPABILITY.search(line)
            if m:
                self.capabilities = {w.upper() for w in m.group(1).decode("ascii",
                                                                          "replace").split()}

    def _deadline(self) -> float | None:
        return None if self.opts.timeout is None else time.monotonic() + self.opts.timeout

    def _read_pop3(self, lines: list[bytes]) -> Reply:
        assert self.wire is not None
        deadline = self._deadline()
        first = self.wire.read_line(deadline, LINE_LIMIT)
        lines.append(first)
        if first.startswith(b"-ERR"):
            return Reply(REFUSED, lines)
        if first[:1] == b"+" and first[:3] != b"+OK":
            return Reply(CONTINUE, lines)
        if not first.startswith(b"+OK"):
            return Reply(0, lines)
        if pop3_multiline(self.last):
            self.last = b""
            size = 0
            while True:
                line = self.wire.read_line(deadline, LINE_LIMIT)
                lines.append(line)
                if line == b".":
                    break
                size += len(line) + 2
                if size > DATA_LIMIT:
                    raise ProtocolError(f"multi-line response larger than {DATA_LIMIT} bytes")
        return Reply(OK, lines)

    def _read_imap(self, lines: list[bytes]) -> Reply:
        """Lines up to this command's tagged response (or a "+" continuation); without a
        command outstanding (the greeting, something unsolicited), one line."""
        assert self.wire is not None
        deadline = self._deadline()
        size = 0
        while True:
            before = len(lines)
            line = self._imap_line(deadline, lines)
            size += sum(len(x) + 2 for x in lines[before:])
            if size > DATA_LIMIT:
                raise ProtocolError(f"response larger than {DATA_LIMIT} bytes")
            if self.tag is None:
                word = line.split(b" ", 2)[1:2]
                if line.startswith(b"* BYE"):
                    return Reply(BYE, lines)
                if line.startswith(b"* ") and word and word[0].upper() in (b"OK", b"PREAUTH"):
                    return Reply(OK, lines)
                if line.startswith(b"* "):
                    return Reply(REFUSED if word and word[0].upper() in (b"NO", b"BAD")
                                 else OK, lines)
                return Reply(0, lines)
            if line[:1] == b"+":
                return Reply(CONTINUE, lines)
            if line.startswith(self.tag.encode() + b" "):
                self.tag = None
                result = line.split(b" ", 2)[1:2]
                ok = bool(result) and result[0].upper() == b"OK"
                return Reply(OK if ok else REFUSED, lines)
            if not line.startswith(b"* "):
                return Reply(0, lines)

    def _imap_line(self, deadline: float | None, lines: list[bytes]) -> bytes:
        """One response line, with any literals in it ({N} at a physical line's end) read
        whole; everything goes to ``lines`` as it will be shown, and the first physical line
        (the one that says what the response is) is returned."""
        assert self.wire is not None
        line = first = self.wire.read_line(deadline, LINE_LIMIT)
        lines.append(line)
        while (literal := literal_at_end(line)) is not None:
            if literal[0] > DATA_LIMIT:
                raise ProtocolError(f"the server announced a literal of {literal[0]} bytes, "
                                    f"more than smtpchat accepts ({DATA_LIMIT})")
            data = self.wire.read_exact(literal[0], deadline)
            line = self.wire.read_line(deadline, LINE_LIMIT)  # what follows the literal
            lines.extend((data + line).split(b"\r\n"))
        return first

    # --- the scripted session --------------------------------------------------------------

    def _capabilities(self) -> None:
        if self.protocol == POP3:
            reply = self.command("CAPA")
            found = [ln.decode("utf-8", "replace") for ln in reply.lines[1:-1]] \
                if reply.positive else []
            words = [w.upper() for ln in found for w in ln.split()[:1]]
            sasl = [ln.split()[1:] for ln in found if ln.upper().startswith("SASL")]
            self.capabilities = set(words) | {"AUTH=" + m.upper() for ms in sasl for m in ms}
        else:
            self.command("CAPABILITY")  # read_reply keeps what it lists

    def _starttls(self) -> None:
        o = self.opts
        self.stage = "tls"
        verb = "STLS" if self.protocol == POP3 else "STARTTLS"
        if verb not in self.capabilities:
            if o.tls == "optional":
                self.t.info(f"Host did not advertise {verb}; continuing without TLS")
                return
            raise self._fail(status.TLS, f"Host did not advertise {verb}")
        if not self.command(verb).positive:
            if o.tls == "optional":
                return
            raise self._fail(status.TLS, f"{verb} attempted but failed")
        assert self.server is not None
        self.handshake(self.server.host)
        self._stop_after("tls")
        self._capabilities()

    def _mechanisms(self) -> list[str]:
        caps = self.capabilities
        offered = {m for m in AUTH_TYPES[self.protocol] if f"AUTH={m}" in caps}
        if self.protocol == POP3 and not caps:
            offered = set(AUTH_TYPES[POP3])  # CAPA refused (RFC 1939 server): just try
        elif self.protocol == POP3 and "USER" in caps:
            offered.add("USER")
        if self.protocol == IMAP and "LOGINDISABLED" not in caps:
            offered.add("LOGIN")
        wanted = self.opts.auth or [m for m in AUTH_TYPES[self.protocol] if m != "XOAUTH2"]
        return [m for m in wanted if m in offered]

    def _auth(self) -> None:
        o = self.opts
        self.stage = "auth"
        mechanisms = self._mechanisms()
        if not mechanisms:
            raise self._fail(status.AUTH, "Host did not advertise a requested authentication "
                             "type (" + ", ".join(o.auth or AUTH_TYPES[self.protocol]) + ")")
        if not self.t.tls and not o.auth_plaintext:
            raise self._fail(status.AUTH, "Refusing to send credentials without TLS "
                             "(use --tls, or --auth-plaintext to allow it)")
        for mech in mechanisms:
            if authenticate(self, mech, o.auth_user, o.auth_password):
                return
        raise self._fail(status.AUTH, "No authentication type succeeded")

    def _quit(self) -> Reply | None:
        try:
            return self.command("QUIT" if self.protocol == POP3 else "LOGOUT")
        except ChatError:
            return None

    def _run(self) -> int:
        o = self.opts
        banner = self.connect()
        if not banner.positive:
            raise self._fail(status.BANNER, quit=False)
        self._stop_after("banner")
        self.stage = "capabilities"
        self._capabilities()
        if o.tls in ("required", "optional"):
            self._starttls()
        self._stop_after("tls")
        if o.auth is not None:
            self._auth()
        self._stop_after("auth")
        for line in o.commands:
            self.stage = "command"
            reply = self.command(line, mask(line.encode("utf-8")))
            if reply.code == CONTINUE:
                # a script has nothing to answer with: "*" cancels in both protocols (an
                # empty line would be an answer), and what the server says to it ends the
                # command
                reply = self.answer("*", None)
                if reply.code == CONTINUE:  # not cancelled: a LOGOUT now would be an answer
                    raise ProtocolError(f"The server went on with {line.split(' ', 1)[0]} "
                                        "after it was cancelled")
            if not reply.positive:
                raise self._fail(status.COMMAND, f"The server refused {line.split(' ', 1)[0]}")
        self.stage = "quit"
        bye = self._quit()
        if bye is not None and not bye.positive:
            self.error = "Unexpected reply to " + ("QUIT" if self.protocol == POP3 else "LOGOUT")
            self.t.error(self.error)
            return status.QUIT
        return status.OK


def authenticate(session: MraSession, mech: str, user: str, password: str,
                 note: Callable[[str, Reply], None] | None = None) -> bool:
    """One login with ``mech`` (PLAIN, XOAUTH2; POP3's USER/PASS, IMAP's LOGIN), the secret
    never shown. XOAUTH2's ``password`` is the OAuth2 access token. ``note(verb, reply)``
    sees each response (the console counts refusals with it)."""
    def cmd(line: str, shown: str | None = None) -> Reply:
        reply = session.command(line, shown)
        if note is not None:
            note(line.split(" ", 1)[0].upper(), reply)
        return reply

    pop3 = session.protocol == POP3
    verb = "AUTH" if pop3 else "AUTHENTICATE"
    if mech in ("PLAIN", "XOAUTH2"):
        response = plain(user, password) if mech == "PLAIN" else xoauth2(user, password)
        if pop3 or "SASL-IR" in session.capabilities:
            reply = cmd(f"{verb} {mech} {response}", f"{verb} {mech} {MASK}")
        else:
            reply = cmd(f"{verb} {mech}")
            if reply.code == CONTINUE:
                reply = session.answer(response, MASK)
        if reply.code == CONTINUE:
            # XOAUTH2's error details come as a continuation: an empty answer (what the
            # mechanism asks for) gets the refusal
            reply = session.answer("", None)
            if note is not None:
                note(verb, reply)
            return False
    elif mech == "USER" and pop3:
        reply = cmd(f"USER {user}")
        if reply.positive:
            reply = cmd(f"PASS {password}", f"PASS {MASK}")
    elif mech == "LOGIN" and not pop3:
        reply = cmd(f"LOGIN {quote(user)} {quote(password)}", f"LOGIN {quote(user)} {MASK}")
    else:
        return False
    return reply.positive


MRA_HELP = """\
Lines you type are sent with CRLF; each response is shown whole ({tags}).
Local commands:
  /starttls             {stls}, then start TLS on the connection
  /auth plain USER      {plain}; the password is asked without echo
  {other:21} {other_text}
  /auth xoauth2 USER    {xoauth2} (the password is the OAuth2 access token)
  /quit                 send {quit} and leave (end of input does the same)
  /help                 this text
  //TEXT                send "/TEXT" to the server
"""


class MraConsole(Console):
    """The console for POP3 and IMAP: IMAP tags put before each command, literals you type
    ({N} at a line's end) sent after the server's "+", AUTH continuations answered by the
    next line you type, and the exit code of the first refusal by its verb."""

    def __init__(self, opts: Options, transcript: Transcript, interactive: bool,
                 read_line: Callable[[str], bytes | None], protocol: str,
                 ask_password: Callable[[str], str] | None = None,
                 echo_sent: bool = False) -> None:
        super().__init__(opts, transcript, interactive, read_line, ask_password, echo_sent)
        self.session: MraSession = MraSession(opts, transcript, protocol)
        self.protocol = protocol
        self.literal = 0  # bytes of a literal still to come from the lines typed
        self.open_verb = ""  # a command sent in part (a literal, a continuation pending)

    def _note(self, verb: str, reply: Reply) -> None:
        if not reply.ok and self.first_error == status.OK:
            self.first_error = BY_VERB.get(verb, status.COMMAND)

    def _closing(self, reply: Reply) -> None:
        if reply.code == BYE and not self.quit_sent:
            self.t.error("Remote host is closing the connection (BYE)")
            raise Stop(self.first_error or status.CONNECTION_LOST)

    def _show_pending(self) -> None:
        wire = self.session.wire
        assert wire is not None
        while not wire.closed and wire.pending() and not self.open_verb:
            reply = self.session.read_reply()
            self._closing(reply)

    def _greeted(self, banner: Reply) -> None:
        super()._greeted(banner)
        self._closing(banner)  # * BYE instead of a greeting

    def _end_of_input(self) -> None:
        if self.interactive and not self.open_verb:
            self._local(["/quit"])

    def _handle(self, line: bytes) -> None:
        if self.open_verb:
            self._go_on(line, self.echo_sent)
        else:
            super()._handle(line)

    def _command(self, line: bytes) -> None:
        self._start(line, self.echo_sent)

    def _start(self, line: bytes, echo: bool) -> None:
        verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        self.open_verb = verb
        self.session.send_line(line, mask(line), echo)
        self._after_line(line)

    def _go_on(self, line: bytes, echo: bool) -> None:
        """A line that continues the open command: literal bytes, or a continuation answer."""
        data = line + b"\r\n"
        shown: str | bytes = MASK if self.open_verb in _SECRET_VERBS_TEXT else line
        self.session.send_line(line, shown, echo, new=False)
        if self.literal >= len(data):
            self.literal -= len(data)
            return
        rest, self.literal = data[self.literal:-2], 0
        self._after_line(rest)

    def _after_line(self, tail: bytes) -> None:
        """After a line went out: wait for "+" after a literal, read the response at the end."""
        literal = literal_at_end(tail) if self.protocol == IMAP else None
        if literal is not None:
            size, synchronizing = literal
            if synchronizing:
                reply = self.session.read_reply()
                if reply.code != CONTINUE:  # refused before the literal was sent
                    self._finish(reply)
                    return
            self.literal = size
            return
        reply = self.session.read_reply()
        if reply.code == CONTINUE:
            return  # the next line typed answers it (AUTH, AUTHENTICATE, IDLE...)
        self._finish(reply)

    def _finish(self, reply: Reply) -> None:
        verb, self.open_verb = self.open_verb, ""
        self._note(verb, reply)
        self._closing(reply)
        if verb in ("STLS", "STARTTLS") and reply.positive:
            self.session.capabilities = set()  # what was said before TLS no longer holds
            self._upgrade("Ask for the capabilities again: they may have changed with TLS.")
        elif verb in ("QUIT", "LOGOUT"):
            self.quit_sent = True

    # --- local commands --------------------------------------------------------------------

    def _local(self, words: list[str]) -> None:
        name = words[0].lower()
        pop3 = self.protocol == POP3
        if name == "/help":
            text = MRA_HELP.format(
                tags="POP3" if pop3 else "IMAP tags a001, a002... are added for you; a line "
                "ending in {N} is followed by N bytes you type, line ends counted",
                stls="send STLS" if pop3 else "send STARTTLS",
                plain="AUTH PLAIN" if pop3 else "AUTHENTICATE PLAIN",
                other="/auth user USER" if pop3 else "/auth login USER",
                other_text="USER and PASS" if pop3 else "LOGIN with the user and password",
                xoauth2="AUTH XOAUTH2" if pop3 else "AUTHENTICATE XOAUTH2",
                quit="QUIT" if pop3 else "LOGOUT")
            for text_line in text.splitlines():
                self.t.info(text_line)
        elif name in ("/quit", "/starttls"):
            verb = "QUIT" if pop3 else "LOGOUT"
            if name == "/starttls":
                verb = "STLS" if pop3 else "STARTTLS"
            self._start(verb.encode(), echo=True)
        elif name == "/auth":
            self._auth(words[1:])
        else:
            self.t.error(f"Unknown local command {words[0]}; /help lists them")

    def _auth(self, args: list[str]) -> None:
        got = self._credentials(args, AUTH_TYPES[self.protocol])
        if got is not None:
            mech, user, password = got
            if authenticate(self.session, mech, user, password, self._note):
                self.t.info(f"Authenticated as {user} with {mech}")
