"""Our MDA and Dovecot share the spool's mbox: Dovecot waits for the locks our delivery takes,
and our delivery appends correctly after the folder-internal pseudo message Dovecot writes."""

from __future__ import annotations

import io
import os
import poplib
import pwd
import ssl
import threading
import time
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.local import mailbox
from pymailtools.local.lock import MailboxLock
from tests.conftest import missing
from tests.support import dovecot
from tests.support.mail import mbox_messages


def _need_dovecot() -> None:
    why = dovecot.available()
    if why:
        missing(why)


def _deliver(config: Config, user: str, subjects: list[str]) -> None:
    for subject in subjects:
        msg = f"From: s@example.test\nSubject: {subject}\n\nFrom {subject}'s body\n".encode()
        note = mailbox.deliver(config, user, io.BytesIO(msg), sender="s@example.test",
                               recipient=f"{user}@host")
        assert note.startswith("delivered to")


def _subjects(server: dovecot.Dovecot, user: str) -> list[str]:
    with server.imap_client(user) as imap:
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK"
        if data[0] == b"0":
            return []
        typ, got = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].decode().strip().removeprefix("Subject: ")
                for part in got if isinstance(part, tuple)]


@pytest.mark.parametrize("held", ["both", "dotlock", "fcntl"])
def test_dovecot_waits_for_the_locks_our_delivery_takes(
        held: str, open_spool: Path, config_values: dict[str, object],
        system_user: pwd.struct_passwd) -> None:
    """The MDA's lock (fcntl + dotlock), and each half of it alone, keeps Dovecot from
    expunging until it is released: the two never write the mbox at the same time."""
    _need_dovecot()
    user = system_user.pw_name
    config = Config({**config_values, "mail_spool_directory": str(open_spool)})
    _deliver(config, user, ["one", "two", "three"])
    path = open_spool / user
    before = path.read_bytes()
    with dovecot.dovecot_server([(system_user, "pw-lock")], spool=open_spool) as server:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        lock = MailboxLock(str(path), fd, config, owner=(system_user.pw_uid,
                                                         system_user.pw_gid))
        lock.acquire()
        if held == "dotlock":
            lock._unlock_fcntl()
        elif held == "fcntl":
            os.unlink(lock.lock_path)
            lock.dotlocked = False
        done = threading.Event()
        failed: list[BaseException] = []

        def expunge_first() -> None:
            try:
                with server.imap_client(user) as imap:
                    imap.select("INBOX")
                    imap.store("1", "+FLAGS.SILENT", r"(\Deleted)")
                    imap.expunge()
                    imap.logout()
            except BaseException as e:  # noqa: BLE001 - reported below
                failed.append(e)
            done.set()

        client = threading.Thread(target=expunge_first)
        try:
            client.start()
            assert not done.wait(3), f"Dovecot expunged while our {held} lock was held"
            assert path.read_bytes() == before
        finally:
            lock.release()
            os.close(fd)
        assert done.wait(60)
        client.join()
        assert failed == []
        assert _subjects(server, user) == ["two", "three"]
        assert server.errors() == [] and server.trouble() == []


def test_delivery_after_dovecots_pseudo_message(
        open_spool: Path, config_values: dict[str, object],
        system_user: pwd.struct_passwd) -> None:
    """Once Dovecot has rewritten the mbox to start with its folder-internal data, our
    deliveries go after it, Dovecot hands out new UIDs from the ones it saved there, and
    it reports nothing wrong; the pseudo message itself is never shown to clients."""
    _need_dovecot()
    user = system_user.pw_name
    config = Config({**config_values, "mail_spool_directory": str(open_spool)})
    _deliver(config, user, ["old one", "old two"])
    with dovecot.dovecot_server([(system_user, "pw-pseudo")], spool=open_spool) as server:
        assert _subjects(server, user) == ["old one", "old two"]
        path = server.make_pseudo_message(user, append=(b"Subject: appended\n\nby IMAP\n",))
        raw = path.read_bytes()
        assert raw.startswith(b"From MAILER_DAEMON ")
        assert dovecot.PSEUDO_SUBJECT.encode() in raw.split(b"\n\n", 1)[0]
        with server.imap_client(user) as imap:
            imap.select("INBOX")
            uidvalidity = imap.response("UIDVALIDITY")[1]
            imap.logout()
        _deliver(config, user, ["new one", "new two"])
        raw = path.read_bytes()
        assert raw.count(dovecot.PSEUDO_SUBJECT.encode()) == 1
        assert raw.startswith(b"From MAILER_DAEMON ")
        # Our messages follow Dovecot's, each its own mbox entry.
        assert [m["Subject"] for m in mbox_messages(path)] == [
            dovecot.PSEUDO_SUBJECT, "appended", "new one", "new two"]
        assert _subjects(server, user) == ["appended", "new one", "new two"]
        with server.imap_client(user) as imap:
            imap.select("INBOX")
            assert imap.response("UIDVALIDITY")[1] == uidvalidity  # not reset
            typ, data = imap.uid("SEARCH", "ALL")
            uids = [int(u) for u in data[0].split()]
            assert uids == sorted(uids) and uids[0] > 2 and len(uids) == 3
            typ, got = imap.fetch("3", "(BODY.PEEK[TEXT])")
            assert got[0][1] == b">From new two's body\r\n"
            # Dovecot rewrites the file again with our messages in it: all still there.
            imap.store("1", "+FLAGS.SILENT", r"(\Deleted)")
            imap.expunge()
            imap.logout()
        _deliver(config, user, ["newest"])
        assert _subjects(server, user) == ["new one", "new two", "newest"]
        pop = poplib.POP3("127.0.0.1", server.pop3, timeout=30)
        try:
            pop.stls(ssl.create_default_context(cafile=str(server.certs.ca_file)))
            pop.user(user)
            pop.pass_("pw-pseudo")
            assert pop.stat()[0] == 3
        finally:
            pop.quit()
        time.sleep(0.2)
        assert [m["Subject"] for m in mbox_messages(path)] == [
            dovecot.PSEUDO_SUBJECT, "new one", "new two", "newest"]
        assert server.errors() == [] and server.trouble() == []
