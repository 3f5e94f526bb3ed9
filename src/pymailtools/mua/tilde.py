"""Interactive compose: body lines from a terminal, with mailx's tilde escapes."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from typing import TextIO

from pymailtools.errors import MailError
from pymailtools.mua.compose import Attachment, Draft, check_header_text

HELP = """-------------------- ~ ESCAPES ----------------------------
~~              Quote a single tilde
~a file         Attach a file
~b users        Add users to "blind" cc list
~c users        Add users to cc list
~e              Edit the message body with $EDITOR
~h              Prompt for to list, subject and cc list
~p              Print the message buffer
~q              Abort message, save it to dead.letter
~r file, ~< file  Read a file into the message buffer
~s subject      Set subject
~t users        Add users to to list
~v              Edit the message body with $VISUAL
~w file         Write the message body to a file
~x              Abort message, do not save it
~! command      Run a shell command
~.              End of message (so does . alone or ^D)
----------------------------------------------------------
"""

SEND, ABORT, DEAD = "send", "abort", "dead"


class Composer:
    """Reads body lines from ``inp`` and applies escapes to ``draft``; ``run`` says what next."""

    def __init__(self, draft: Draft, inp: TextIO, out: TextIO, *, escape: str = "~") -> None:
        self.draft = draft
        self.inp = inp
        self.out = out
        self.escape = escape
        self.lines: list[str] = [draft.body.decode("utf-8", "replace")] if draft.body else []

    def say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def ask(self, prompt: str, default: str = "") -> str:
        self.say(prompt + default)
        line = self.inp.readline()
        if not line:
            self.say("\n")
        line = line.rstrip("\n")
        value = line if line else default
        check_header_text(value, prompt.rstrip(": "))
        return value

    def run(self, ask_subject: bool) -> str:
        if ask_subject and not self.draft.subject:
            self.draft.subject = self.ask("Subject: ")
        while True:
            line = self.inp.readline()
            if not line:  # ^D at the start of a line
                break
            text = line.rstrip("\n")
            if text == ".":
                break
            if self.escape and text.startswith(self.escape) and len(text) >= 2:
                if text[1] == self.escape:
                    self.lines.append(text[1:] + "\n")
                    continue
                outcome = self.command(text[1], text[2:].strip())
                if outcome == "end":
                    break
                if outcome in (ABORT, DEAD):
                    return outcome
                continue
            self.lines.append(text + "\n")
        self.sync()
        self.say("EOT\n")
        return SEND

    def sync(self) -> None:
        self.draft.body = "".join(self.lines).encode("utf-8", "surrogateescape")

    def command(self, c: str, arg: str) -> str:
        d = self.draft
        try:
            if c == ".":
                return "end"
            if c == "x":
                return ABORT
            if c == "q":
                self.sync()
                return DEAD
            if c == "s":
                d.subject = check_header_text(arg, "subject")
            elif c in "tcb" and arg:
                getattr(d, {"t": "to", "c": "cc", "b": "bcc"}[c]).append(
                    check_header_text(arg, "address"))
            elif c == "h":
                d.to = [v for v in [self.ask("To: ", ", ".join(d.to))] if v]
                d.subject = self.ask("Subject: ", d.subject)
                d.cc = [v for v in [self.ask("Cc: ", ", ".join(d.cc))] if v]
                d.bcc = [v for v in [self.ask("Bcc: ", ", ".join(d.bcc))] if v]
            elif c == "a" and arg:
                att = Attachment.from_path(os.path.expanduser(arg))
                d.attachments.append(att)
                self.say(f"{arg}: attached ({len(att.data)} bytes)\n")
            elif c in "r<" and arg:
                self.read_file(os.path.expanduser(arg))
            elif c == "w" and arg:
                self.sync()
                with open(os.path.expanduser(arg), "wb") as f:
                    f.write(d.body)
                self.say(f'"{arg}" {len(self.lines)}/{len(d.body)}\n')
            elif c == "p":
                self.print_message()
            elif c in "ev":
                self.edit(os.environ.get("VISUAL" if c == "v" else "EDITOR") or "vi")
            elif c == "!" and arg:
                subprocess.run(arg, shell=True, check=False)  # noqa: S602 (typed by the user)
                self.say("!\n")
            elif c == "?":
                self.say(HELP)
            else:
                self.say(f"Unknown tilde escape: {self.escape}{c}{' ' + arg if arg else ''}\n")
        except MailError as e:
            self.say(f"{e}\n")
        except OSError as e:
            self.say(f"{arg}: {e.strerror}\n")
        return ""

    def read_file(self, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8", "surrogateescape")
        if text and not text.endswith("\n"):
            text += "\n"
        self.lines.append(text)
        self.say(f'"{path}" {text.count(chr(10))}/{len(data)}\n')

    def print_message(self) -> None:
        d = self.draft
        self.sync()
        out = ["-------\nMessage contains:\n"]
        for name, values in (("To", d.to), ("Cc", d.cc), ("Bcc", d.bcc)):
            if values:
                out.append(f"{name}: {', '.join(values)}\n")
        if d.subject:
            out.append(f"Subject: {d.subject}\n")
        for a in d.attachments:
            out.append(f"Attachment: {a.filename} ({a.maintype}/{a.subtype}, "
                       f"{len(a.data)} bytes)\n")
        out.append("\n" + d.body.decode("utf-8", "replace"))
        out.append("(continue)\n")
        self.say("".join(out))

    def edit(self, editor: str) -> None:
        self.sync()
        fd, path = tempfile.mkstemp(prefix="mail-", suffix=".txt")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.draft.body)
            subprocess.run([*shlex.split(editor), path], check=False)
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        finally:
            os.unlink(path)
        self.lines = [text] if text else []
        self.say("(continue)\n")


def save_dead_letter(draft: Draft, path: str) -> None:
    """Append the aborted message to dead.letter (private to the user), as mailx does."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as f:
        head = []
        if draft.to:
            head.append(f"To: {', '.join(draft.to)}\n")
        if draft.cc:
            head.append(f"Cc: {', '.join(draft.cc)}\n")
        if draft.subject:
            head.append(f"Subject: {draft.subject}\n")
        f.write("".join(head).encode("utf-8", "surrogateescape") + b"\n" + draft.body + b"\n")
