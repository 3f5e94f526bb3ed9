"""A private Dovecot (IMAP + POP3, plain/STARTTLS and implicit TLS) on loopback, as the MRA that
serves the mailboxes our MDA writes.

Started as ``dovecot -c DIR/dovecot.conf -F`` with its own base and state directories, a
passwd-file user database (real system users' uids: Dovecot refuses mail access as root) and a
trustme certificate; nothing of the system's Dovecot configuration is read or touched.
"""

from __future__ import annotations

import imaplib
import io
import os
import pwd
import re
import shutil
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import TIMEOUT, free_port, wait_for_port
from tests.support.smtp import Certs

DOVECOT = "/usr/sbin/dovecot"
# Subject of the message Dovecot (like UW-IMAP) keeps first in an mbox it has rewritten.
PSEUDO_SUBJECT = "DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA"
# What Dovecot logs (at any level) when a mailbox changed under it in a way it did not expect.
_TROUBLE = re.compile(r"corrupt|was modified|reappeared|inconsistent|broken|Expunged message",
                      re.IGNORECASE)


@dataclass
class Account:
    """One mail user Dovecot knows: a real system user, and the password Dovecot checks."""

    name: str
    password: str
    uid: int
    gid: int
    home: str


@dataclass
class Dovecot:
    """A running private Dovecot: its ports, the CA that signed its certificate, its log."""

    directory: Path
    certs: Certs
    spool: Path
    imap: int  # plain IMAP (STARTTLS offered)
    imaps: int  # IMAP over TLS from the first byte
    pop3: int  # plain POP3 (STLS offered)
    pop3s: int  # POP3 over TLS from the first byte
    accounts: dict[str, Account] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.directory / "dovecot.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def errors(self) -> list[str]:
        """Log lines Dovecot wrote at level Error, Panic or Fatal (corruption, lock trouble)."""
        return [line for line in self.log_text().splitlines()
                if any(f" {lvl}: " in line for lvl in ("Error", "Panic", "Fatal"))]

    def trouble(self) -> list[str]:
        """Log lines, at any level, saying a mailbox was corrupted or changed under Dovecot
        ("mbox file was modified while we were syncing", "Expunged message reappeared")."""
        return [line for line in self.log_text().splitlines() if _TROUBLE.search(line)]

    def imap_client(self, user: str) -> imaplib.IMAP4_SSL:
        """A logged-in IMAP client (implicit TLS, the certificate verified) for ``user``."""
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_file))
        client = imaplib.IMAP4_SSL("127.0.0.1", self.imaps, ssl_context=ctx, timeout=TIMEOUT)
        client.login(user, self.accounts[user].password)
        return client

    def kick(self, user: str) -> None:
        """Drop every connection ``user`` has (doveadm kick): a client sees the server go
        away in the middle of its session."""
        r = subprocess.run(["doveadm", "-c", str(self.directory / "dovecot.conf"), "kick",
                            user], capture_output=True, timeout=TIMEOUT)
        if r.returncode != 0:
            raise AssertionError(f"doveadm kick: {r.stderr.decode(errors='replace')}")

    def make_pseudo_message(self, user: str, append: tuple[bytes, ...] = ()) -> Path:
        """Have Dovecot rewrite ``user``'s mbox INBOX so it starts with its folder-internal
        pseudo message (PSEUDO_SUBJECT), as it does on a real server; returns the mbox path.

        Dovecot 2.3 writes that message when an IMAP client expunges every message of the
        mbox (and when it APPENDs to an empty one): so this expunges all of INBOX, then
        APPENDs ``append`` (RFC 5322 messages) after the pseudo message, in Dovecot's own
        mbox framing (X-UID, Status, Content-Length headers)."""
        with self.imap_client(user) as client:
            typ, data = client.select("INBOX")
            if typ != "OK":
                raise AssertionError(f"SELECT INBOX: {data!r}")
            if data[0] != b"0":
                client.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
                client.expunge()
            client.close()
            for raw in append:
                typ, data = client.append("INBOX", None, None,
                                          raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
                if typ != "OK":
                    raise AssertionError(f"APPEND: {data!r}")
            client.logout()
        path = self.spool / user
        if PSEUDO_SUBJECT.encode() not in path.read_bytes()[:1000]:
            raise AssertionError(f"Dovecot wrote no pseudo message into {path}")
        return path


def available() -> str | None:
    """Why a private Dovecot cannot run here (None when it can)."""
    if not os.path.exists(DOVECOT):
        return "dovecot not installed (apt-get install dovecot-imapd dovecot-pop3d)"
    if not os.path.exists("/usr/lib/dovecot/pop3") or not os.path.exists("/usr/lib/dovecot/imap"):
        return "dovecot's imap or pop3 server missing (apt-get install dovecot-imapd dovecot-pop3d)"
    if os.geteuid() != 0:
        return "a private Dovecot needs root (it switches to the mail users' uids)"
    return None


@contextmanager
def dovecot_server(users: list[tuple[pwd.struct_passwd, str]], *, spool: Path | None = None,
                   mail_location: str = "", extra: str = "") -> Iterator[Dovecot]:
    """Run Dovecot for ``users`` ((system user, password) pairs) until the block ends.

    ``mail_location`` defaults to mbox in ``spool`` (``mbox:~/mail:INBOX=SPOOL/%u``, the
    layout our local delivery writes); pass ``maildir:~/Maildir`` for Maildir homes.
    ``extra`` is appended to the configuration."""
    # Not under pytest's tmp_path: its root-only parents would keep Dovecot's users out.
    directory = Path(tempfile.mkdtemp(prefix="pymailtools-dovecot-"))
    directory.chmod(0o755)
    try:
        certs = Certs(directory)
        cert, key = directory / "cert.pem", directory / "key.pem"
        certs.cert.cert_chain_pems[0].write_to_path(str(cert))
        certs.cert.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        if spool is None:
            spool = directory / "spool"
            spool.mkdir()
            spool.chmod(0o1777)
        accounts: dict[str, Account] = {}
        lines = []
        for pw, password in users:
            accounts[pw.pw_name] = Account(pw.pw_name, password, pw.pw_uid, pw.pw_gid, pw.pw_dir)
            lines.append(f"{pw.pw_name}:{{PLAIN}}{password}:{pw.pw_uid}:{pw.pw_gid}::"
                         f"{pw.pw_dir}::")
        passwd = directory / "passwd"
        passwd.write_text("\n".join(lines) + "\n")
        passwd.chmod(0o644)
        ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}
        location = mail_location or f"mbox:~/mail:INBOX={spool}/%u"
        conf = directory / "dovecot.conf"
        conf.write_text(f"""\
instance_name = dovecot-{uuid.uuid4().hex[:8]}
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
info_log_path = {directory}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
disable_plaintext_auth = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = {location}
mail_privileged_group = mail
mbox_write_locks = dotlock fcntl
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {ports['imap']}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ports['imaps']}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {ports['pop3']}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {ports['pop3s']}
    ssl = yes
  }}
}}
{extra}
""")
        server = Dovecot(directory, certs, spool, accounts=accounts, **ports)
        proc = subprocess.Popen([DOVECOT, "-c", str(conf), "-F"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            # the plain listeners greet; the TLS ones wait for a handshake, so a greeting on
            # the plain ones (started by the same master) is the sign it is ready
            for port in (ports["imap"], ports["pop3"]):
                try:
                    wait_for_port("127.0.0.1", port, timeout=30)
                except Exception:
                    proc.kill()
                    out = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
                    raise AssertionError(
                        f"dovecot did not start: {out}{server.log_text()}") from None
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(TIMEOUT)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def serving(user: pwd.struct_passwd, password: str, spool: Path, config_values: dict[str, object],
            messages: list[bytes]) -> Iterator[Dovecot]:
    """Dovecot serving ``user``'s mbox in ``spool``, into which our MDA first delivered
    ``messages``; skipped (failed in CI) where Dovecot cannot run; its log must stay free of
    errors."""
    from pymailtools.config import Config
    from pymailtools.local import mailbox
    from tests.conftest import missing

    why = available()
    if why:
        missing(why)
    config = Config({**config_values, "mail_spool_directory": str(spool)})
    for msg in messages:
        mailbox.deliver(config, user.pw_name, io.BytesIO(msg), sender="s@example.test",
                        recipient=f"{user.pw_name}@host")
    with dovecot_server([(user, password)], spool=spool) as server:
        yield server
        assert server.errors() == []
