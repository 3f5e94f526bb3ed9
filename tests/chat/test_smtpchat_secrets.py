"""smtpchat keeps AUTH payloads out of transcripts unless --show-secrets asks for them: in the
scripted transcript, in --json, and for lines typed in answer to a 334 in the console."""

from __future__ import annotations

import base64
import io
import json

from pymailtools.chat.console import Console, stdin_reader
from pymailtools.chat.session import Options
from pymailtools.chat.transcript import MASK, Transcript
from tests.support.chat import smtpchat
from tests.support.smtp import PASSWORD, USER, Certs, aiosmtpd_server

PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


def test_show_secrets_shows_the_auth_payload(certs: Certs) -> None:
    with aiosmtpd_server(certs=certs, auth=True) as (port, sink):
        args = ("-s", f"127.0.0.1:{port}", "-t", "bob@example.test", "--tls", "-a", "plain",
                "-au", USER, "-ap", PASSWORD, "--json")
        hidden = smtpchat(*args)
        shown = smtpchat(*args, "--show-secrets")
    assert hidden.returncode == shown.returncode == 0, hidden.stderr + shown.stderr
    sent = [[e["text"] for e in json.loads(r.stdout)["transcript"] if e["dir"] == "send"]
            for r in (hidden, shown)]
    assert f"AUTH PLAIN {MASK}" in sent[0] and PLAIN not in hidden.stdout
    assert f"AUTH PLAIN {PLAIN}" in sent[1]
    assert len(sink.messages) == 2


def _console(port: int, lines: list[str], show: bool) -> str:
    out = io.StringIO()
    opts = Options(server=f"[127.0.0.1]:{port}", show_secrets=show)
    typed = io.BytesIO("".join(line + "\r\n" for line in lines).encode())
    # lines typed at a terminal whose transcript goes to a file: each one is echoed
    Console(opts, Transcript(out=out, err=out), False, stdin_reader(typed),
            echo_sent=True).run()
    return out.getvalue()


def test_console_masks_the_lines_answering_334() -> None:
    user, password = (base64.b64encode(x.encode()).decode() for x in (USER, PASSWORD))
    wrong = base64.b64encode(f"\0{USER}\0wrong-{PASSWORD}".encode()).decode()
    typed = ["EHLO me", "AUTH PLAIN", wrong, "AUTH LOGIN", user, password, "QUIT"]
    with aiosmtpd_server(auth=True, auth_require_tls=False) as (port, _):
        hidden = _console(port, typed, False)
        shown = _console(port, typed, True)
    assert "535 5.7.8" in hidden and "235 2.7.0 Authentication successful" in hidden
    assert hidden.count(f" -> {MASK}") == 3  # the user name too: the console cannot tell
    assert password not in hidden and wrong not in hidden and "-> QUIT" in hidden
    assert f" -> {password}" in shown and f" -> {wrong}" in shown
