"""Dovecot, the MRA people run, serves what our local delivery writes: mbox in the spool and
Maildir in the home, over IMAP and POP3 (with and without TLS)."""

from __future__ import annotations

import imaplib
import io
import os
import poplib
import pwd
import ssl
from pathlib import Path

from pymailtools.config import Config
from pymailtools.local import mailbox
from tests.conftest import missing
from tests.support import dovecot


def _deliver(config: Config, user: str, n: int) -> None:
    for i in range(n):
        msg = f"From: s@example.test\nSubject: message {i}\n\nbody {i}\n".encode()
        note = mailbox.deliver(config, user, io.BytesIO(msg), sender="s@example.test",
                               recipient=f"{user}@host")
        assert note.startswith("delivered to")


def _need_dovecot() -> None:
    why = dovecot.available()
    if why:
        missing(why)


def test_mbox_in_the_spool_over_imaps_and_pop3(
        open_spool: Path, config_values: dict[str, object],
        system_user: pwd.struct_passwd) -> None:
    _need_dovecot()
    config = Config({**config_values, "mail_spool_directory": str(open_spool)})
    _deliver(config, system_user.pw_name, 3)
    with dovecot.dovecot_server([(system_user, "pw-1")], spool=open_spool) as server:
        ctx = ssl.create_default_context(cafile=str(server.certs.ca_file))
        with imaplib.IMAP4_SSL("127.0.0.1", server.imaps, ssl_context=ctx) as imap:
            imap.login(system_user.pw_name, "pw-1")
            typ, data = imap.select("INBOX", readonly=True)
            assert typ == "OK" and data[0] == b"3"
            typ, got = imap.fetch("1:3", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            subjects = [part[1].strip() for part in got if isinstance(part, tuple)]
            assert subjects == [b"Subject: message 0", b"Subject: message 1",
                                b"Subject: message 2"]
        pop = poplib.POP3("127.0.0.1", server.pop3, timeout=30)
        try:
            pop.stls(ctx)
            pop.user(system_user.pw_name)
            pop.pass_("pw-1")
            count, _size = pop.stat()
            assert count == 3
            assert b"body 2" in b"\n".join(pop.retr(3)[1])
        finally:
            pop.quit()
        assert server.errors() == []


def test_maildir_in_the_home_over_imap(
        config_values: dict[str, object], system_user: pwd.struct_passwd) -> None:
    _need_dovecot()
    config = Config({**config_values, "home_mailbox": "Maildir/"})
    _deliver(config, system_user.pw_name, 2)
    assert len(os.listdir(Path(system_user.pw_dir) / "Maildir" / "new")) == 2
    with dovecot.dovecot_server([(system_user, "pw-2")],
                                mail_location="maildir:~/Maildir") as server:
        with imaplib.IMAP4("127.0.0.1", server.imap) as imap:
            imap.starttls(ssl.create_default_context(cafile=str(server.certs.ca_file)))
            imap.login(system_user.pw_name, "pw-2")
            typ, data = imap.select("INBOX")
            assert typ == "OK" and data[0] == b"2"
        assert server.errors() == []
