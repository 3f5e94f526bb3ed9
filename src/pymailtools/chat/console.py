"""Interactive and piped mode: type SMTP at a server like nc, with STARTTLS, AUTH and DATA help."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import BinaryIO

from pymailtools.chat import status
from pymailtools.chat.compose import lines_of
from pymailtools.chat.errors import ChatError, ConnectionLost
from pymailtools.chat.session import Options, Session, Stop, authenticate
from pymailtools.chat.transcript import MASK, Transcript
from pymailtools.smtp.reply import Reply

HELP = """\
Lines you type are sent to the server with CRLF; each reply is shown in full.
After DATA is answered with 354, type the message and end it with a line holding only ".";
lines starting with "." are dot-stuffed for you.
Local commands:
  /starttls             upgrade the connection to TLS (typing STARTTLS does the same)
  /auth plain USER      authenticate with AUTH PLAIN; the password is asked without echo
  /auth login USER      the same with AUTH LOGIN (also: /auth cram-md5 USER)
  /data FILE            send FILE as the message (DATA, the file dot-stuffed, then ".")
  /quit                 send QUIT and leave (end of input does the same)
  /help                 this text
  //TEXT                send "/TEXT" to the server
"""


class Console:
    """The session loop. ``interactive``: a person at a terminal (prompt, hints, dot-stuffing);
    otherwise lines come from a pipe and go out exactly as read, like nc."""

    def __init__(self, opts: Options, transcript: Transcript, interactive: bool,
                 read_line: Callable[[str], bytes | None],
                 ask_password: Callable[[str], str] | None = None,
                 echo_sent: bool = False) -> None:
        self.opts = opts
        self.t = transcript
        self.session = Session(opts, transcript)
        self.interactive = interactive
        self.read_line = read_line
        self.ask_password = ask_password
        self.echo_sent = echo_sent
        self.in_data = False
        self.in_auth = False  # the server asked (334) for the next line of an AUTH exchange
        self.quit_sent = False
        self.first_error = status.OK

    # --- helpers ---------------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        return (" ~> " if self.t.tls else " -> ") if self.interactive else ""

    def _note(self, verb: str, reply: Reply) -> None:
        """Remember the first refusal: the session's exit code, as swaks would give it."""
        if not reply.ok and self.first_error == status.OK:
            self.first_error = status.BY_VERB.get(verb, status.CONNECTION_LOST)

    def _send(self, raw: bytes, shown: str | bytes | None, echo: bool) -> None:
        wire = self.session.wire
        assert wire is not None
        wire.send(raw + b"\r\n")
        if echo:
            self.t.sent(raw if shown is None or self.opts.show_secrets else shown)

    def _exchange(self, raw: bytes, shown: str | bytes | None = None, echo: bool = True) -> Reply:
        self._send(raw, shown, echo)
        return self.session.read_reply()

    def _cmd(self, line: str, shown: str | None) -> Reply:
        """A command smtpchat sends on the user's behalf: always shown."""
        reply = self._exchange(line.encode("utf-8"), shown, echo=True)
        self._note(line.split(" ", 1)[0].upper(), reply)
        return reply

    def _show_pending(self) -> None:
        """Show what the server sent on its own (a 421 on idle timeout, a close)."""
        wire = self.session.wire
        assert wire is not None
        while not wire.closed and wire.pending():
            reply = self.session.read_reply()
            self._note("", reply)
            self._closing(reply)

    def _closing(self, reply: Reply) -> None:
        """421 means the server is closing the connection (RFC 5321 3.8): stop sending."""
        if reply.code == 421:
            self.t.error("Remote host is closing the connection (421)")
            raise Stop(self.first_error or status.CONNECTION_LOST)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except Stop as stop:
            return stop.code
        except ChatError as e:
            self.t.error(str(e))
            if isinstance(e, ConnectionLost) and self.quit_sent:
                return self.first_error
            return self.first_error or e.exit_code
        except KeyboardInterrupt:
            self.t.error("Interrupted")
            return status.INTERRUPTED
        finally:
            if self.session.wire is not None:
                self.session.wire.close()
                self.t.info("Connection closed with remote host.")

    def _run(self) -> int:
        self._greeted(self.session.connect())
        if self.interactive:
            self.t.info("Type /help for local commands.")
        while not self.quit_sent:
            self._show_pending()
            line = self.read_line(self.prompt)
            # The server may have spoken (or hung up) while we waited for the user: show that
            # before sending anything, so a reply is never paired with the wrong command.
            self._show_pending()
            if line is None:  # end of input
                self._end_of_input()
                break
            self._handle(line)
        return self.first_error

    def _greeted(self, banner: Reply) -> None:
        if not banner.positive:
            self.first_error = status.BANNER

    def _end_of_input(self) -> None:
        """Ctrl-D at the prompt says QUIT; piped input just ends (like nc)."""
        if self.interactive and not self.in_data:
            self._cmd("QUIT", None)
            self.quit_sent = True

    def _handle(self, line: bytes) -> None:
        if self.in_data:
            self._data_line(line)
            return
        if line.startswith(b"/") and not line.startswith(b"//"):
            self._local(line.decode("utf-8", "replace").split())
            return
        if line.startswith(b"//"):
            line = line[1:]
        self._command(line)

    def _data_line(self, line: bytes) -> None:
        echo = self.echo_sent
        if line == b".":
            self.in_data = False
            reply = self._exchange(line, echo=echo)
            self._note("BDAT", reply)  # the final dot maps like BDAT LAST: message refused
            return
        if self.interactive and line.startswith(b"."):
            line = b"." + line
        self._send(line, None, echo)

    def _command(self, line: bytes) -> None:
        """A line typed (or piped) outside the message: sent, and its reply read."""
        echo = self.echo_sent
        if self.in_auth:
            # a response in an AUTH exchange: base64 of a password or token
            reply = self._exchange(line, shown=MASK if line != b"*" else None, echo=echo)
            self.in_auth = reply.code == 334
            self._note("AUTH", reply)
            self._closing(reply)
            return
        reply = self._exchange(line, shown=_mask_auth(line), echo=echo)
        verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        self.in_auth = verb == "AUTH" and reply.code == 334
        self._note(verb, reply)
        self._closing(reply)
        self._after(verb, reply)

    def _after(self, verb: str, reply: Reply) -> None:
        if verb == "DATA" and reply.code == 354:
            self.in_data = True
        elif verb == "STARTTLS" and reply.code == 220:
            self._upgrade("Send EHLO again: the server forgot everything said before TLS.")
        elif verb == "QUIT":
            self.quit_sent = True

    def _upgrade(self, hint: str) -> None:
        """Start TLS on the live connection, the server having agreed; a failure ends it."""
        assert self.session.server is not None
        try:
            self.session.handshake(self.session.server.host)
        except ChatError as e:
            self.t.error(str(e))
            raise Stop(self.first_error or status.TLS) from None
        if self.interactive:
            self.t.info(hint)

    # --- local commands --------------------------------------------------------------------

    def _local(self, words: list[str]) -> None:
        name = words[0].lower()
        if name == "/help":
            for text in HELP.splitlines():
                self.t.info(text)
        elif name == "/quit":
            self._cmd("QUIT", None)
            self.quit_sent = True
        elif name == "/starttls":
            reply = self._cmd("STARTTLS", None)
            self._after("STARTTLS", reply)
        elif name == "/auth":
            self._auth(words[1:])
        elif name == "/data":
            self._data_file(words[1:])
        else:
            self.t.error(f"Unknown local command {words[0]}; /help lists them")

    def _auth(self, args: list[str]) -> None:
        got = self._credentials(args, ("PLAIN", "LOGIN", "CRAM-MD5"))
        if got is not None:
            mech, user, password = got
            if authenticate(self._cmd, mech, user, password):
                self.t.info(f"Authenticated as {user} with {mech}")

    def _credentials(self, args: list[str], kinds: tuple[str, ...]) -> tuple[str, str, str] | None:
        """/auth's mechanism, user and password (asked without echo); None, said why, when
        the arguments are wrong or credentials may not be sent."""
        usage = f"Usage: /auth {'|'.join(k.lower() for k in kinds)} USER"
        if not args or args[0].upper() not in kinds:
            self.t.error(usage)
            return None
        mech = args[0].upper()
        user = args[1] if len(args) > 1 else self.opts.auth_user
        if not user:
            self.t.error(usage)
            return None
        if not self.t.tls and not self.opts.auth_plaintext:
            self.t.error("Refusing to send credentials without TLS: use /starttls first "
                         "(or start smtpchat with --auth-plaintext)")
            return None
        password = self.opts.auth_password
        if not password:
            if self.ask_password is None:
                self.t.error("No terminal to ask for the password on: use --auth-password")
                return None
            password = self.ask_password(f"Password for {user}: ")
        return mech, user, password

    def _data_file(self, args: list[str]) -> None:
        if len(args) != 1:
            self.t.error("Usage: /data FILE")
            return
        try:
            with open(args[0], "rb") as f:
                content = f.read()
        except OSError as e:
            self.t.error(f"Cannot read {args[0]}: {e.strerror}")
            return
        reply = self._cmd("DATA", None)
        if reply.code != 354:
            return
        lines = lines_of(content)
        wire = self.session.wire
        assert wire is not None
        wire.send(b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
                  + b".\r\n")
        self.t.sent(f"{len(lines)} lines sent")
        self.t.sent(".")
        reply = self.session.read_reply()
        self._note("BDAT", reply)


def _mask_auth(line: bytes) -> str | bytes:
    """What the transcript shows of a typed line: AUTH's initial response masked."""
    words = line.split(b" ", 2)
    if len(words) == 3 and words[0].upper() == b"AUTH":
        return b" ".join(words[:2]).decode("ascii", "replace") + " " + MASK
    return line


def stdin_reader(stream: BinaryIO | None = None) -> Callable[[str], bytes | None]:
    """Lines from a pipe, without their ending (LF, CRLF): the nc-like mode."""
    src = stream or sys.stdin.buffer

    def read(prompt: str) -> bytes | None:
        line = src.readline()
        if not line:
            return None
        if line.endswith(b"\n"):
            line = line[:-1]
        return line[:-1] if line.endswith(b"\r") else line

    return read


_SECRET = ("AUTH", "PASS", "APOP", "LOGIN")


def terminal_reader() -> Callable[[str], bytes | None]:
    """Lines typed at a terminal with readline editing and history (login lines kept out of it)."""
    history: Callable[[str], None] | None = None
    try:
        # line editing only for a person at a terminal
        import readline
    except ImportError:  # Python built without readline: plain input() still works
        pass
    else:
        readline.set_auto_history(False)
        history = readline.add_history

    def read(prompt: str) -> bytes | None:
        try:
            text = input(prompt)
        except EOFError:
            sys.stdout.write("\n")
            return None
        # secrets stay out of the history: SMTP's AUTH, POP3's PASS/APOP, IMAP's LOGIN
        if history is not None and text.strip() and not text.upper().startswith(_SECRET):
            history(text)
        return text.encode("utf-8", "surrogateescape")

    return read
