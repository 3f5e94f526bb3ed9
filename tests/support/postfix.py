"""Postfix as a test peer, loopback only: its smtp-sink, and a private instance (master + smtpd)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.net import TIMEOUT, free_port, wait_for_port
from tests.support.smtp import Certs


@contextmanager
def smtp_sink(binary: str) -> Iterator[int]:
    """Postfix's smtp-sink test server (it needs -u to drop privileges when run as root)."""
    port = free_port()
    argv = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), f"127.0.0.1:{port}", "10"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port)
        yield port
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


@contextmanager
def postfix_instance(certs: Certs, extra: str = "") -> Iterator[int]:
    """A real Postfix (master + smtpd) with its own config and queue, listening on loopback,
    delivering everything to discard(8). Needs root, as Postfix's master does."""
    postfix = "/usr/sbin/postfix"
    port = free_port()
    # Not under pytest's tmp_path: its root-only parents would keep the postfix user out.
    directory = Path(tempfile.mkdtemp(prefix="smtpchat-postfix-"))
    directory.chmod(0o755)
    etc, queue, data = directory / "etc", directory / "queue", directory / "data"
    for d in (etc, queue, data):
        d.mkdir()
    os.chown(data, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
    key = etc / "key.pem"
    certs.cert.private_key_and_cert_chain_pem.write_to_path(str(key))
    sources = [Path("/etc/postfix/master.cf.proto"), Path("/etc/postfix/master.cf"),
               Path("/usr/share/postfix/master.cf.dist")]
    master = next(p for p in sources if p.exists()).read_text()
    master = re.sub(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master)
    (etc / "master.cf").write_text(master)
    (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = mx.example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_transport = discard
relay_transport = discard
alias_maps =
alias_database =
smtputf8_enable = yes
smtpd_tls_chain_files = {key}
smtpd_tls_security_level = may
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
{extra}""")
    started = subprocess.run([postfix, "-c", str(etc), "start"], check=False, timeout=TIMEOUT,
                             capture_output=True)
    try:
        if started.returncode:
            log = directory / "maillog"
            raise AssertionError("postfix did not start: "
                                 + (log.read_text() if log.exists() else started.stderr.decode()))
        wait_for_port("127.0.0.1", port)
        yield port
    finally:
        subprocess.run([postfix, "-c", str(etc), "stop"], check=False, timeout=TIMEOUT,
                       capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)
