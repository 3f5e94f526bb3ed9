"""smtp_generic_maps end to end: cron mail submitted with ``sendmail -t`` leaves for an aiosmtpd
relay as me@example.com (envelope and From:) while the local copy keeps the local name; and
virtual aliases delivered to real local mailboxes, a virtual loop bounced once; a broken
canonical map never stops it, and a broken password table never shows its secret."""

import pwd
from pathlib import Path

from pymailtools.queue.store import Queue
from tests.conftest import Sendmail, write_toml
from tests.support.mail import mbox_messages
from tests.support.net import free_port
from tests.support.smtp import Server


def sendmail_with(tmp_path: Path, config_values: dict[str, object], **keys: object) -> Sendmail:
    path = write_toml(tmp_path / "generic.toml", {**config_values, **keys})
    return Sendmail(path, Path(str(config_values["queue_directory"])))


def test_cron_mail_leaves_as_me_at_example_com(tmp_path: Path, spool: Path,
                                               config_values: dict[str, object],
                                               system_user: pwd.struct_passwd) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        sendmail = sendmail_with(
            tmp_path, config_values, relayhost=f"[127.0.0.1]:{port}",
            smtp_tls_security_level="none", myorigin="host.localdomain",
            mydestination=["host.localdomain", "localhost"],
            sender_canonical_maps="inline:{ cron@host.localdomain=root@host.localdomain }",
            smtp_generic_maps=("inline:{ root@host.localdomain=me@example.com, "
                               "@host.localdomain=@example.com }"))
        user = system_user.pw_name
        msg = (f"From: Cron Daemon <cron>\nTo: {user}, admin@remote.test\n"
               "Subject: Cron <root@host> backup\n\n" + "0123456789\n" * 1000).encode()
        p = sendmail("-t", "-i", "-f", "cron", input=msg)
        assert p.returncode == 0, p.stderr
        p = sendmail("-q")
        assert p.returncode == 0, p.stderr
        (m,) = relay.messages
        assert m.sender == "me@example.com" and m.rcpts == ["admin@remote.test"]
        head, _, body = m.content.partition(b"\r\n\r\n")
        assert b"\r\nFrom: Cron Daemon <me@example.com>\r\n" in head
        # a local name in To: goes out qualified and mapped as well; the subject is text
        assert f"\r\nTo: {user}@example.com, admin@remote.test\r\n".encode() in head
        assert b"\r\nSubject: Cron <root@host> backup\r\n" in head
        assert body == b"0123456789\r\n" * 1000
        (local,) = mbox_messages(spool / user)
        assert local["From"] == "Cron Daemon <root@host.localdomain>"
        assert local["To"] == f"{user}, admin@remote.test"
        assert local["Return-Path"] == "<root@host.localdomain>"
        assert sendmail.entries() == []
    finally:
        relay.stop()


def test_virtual_alias_one_to_many_and_a_loop_bounced(tmp_path: Path, spool: Path,
                                                      config_values: dict[str, object],
                                                      system_user: pwd.struct_passwd,
                                                      other_user: pwd.struct_passwd) -> None:
    a, b = system_user.pw_name, other_user.pw_name
    virtual = tmp_path / "virtual"
    virtual.write_text(f"virt.test virtual\nteam@virt.test {a}, {b}@host.example.test\n"
                       "l1@virt.test l2@virt.test\nl2@virt.test l1@virt.test\n")
    sendmail = sendmail_with(tmp_path, config_values, virtual_alias_maps=f"texthash:{virtual}")
    p = sendmail("-f", a, "team@virt.test", "l1@virt.test", input=b"Subject: v\n\nbody\n")
    assert p.returncode == 0, p.stderr
    assert sendmail("-q").returncode == 0
    assert sendmail("-q").returncode == 0  # nothing left to go round
    got_b = mbox_messages(spool / b)
    assert [m["Subject"] for m in got_b] == ["v"]
    got_a = mbox_messages(spool / a)
    assert sorted(m["Subject"] or "" for m in got_a if m["Subject"] == "v") == ["v"]
    (dsn,) = [m for m in got_a if m.get_content_type() == "multipart/report"]
    report = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = report.as_string()
    assert "Status: 5.4.6" in text and "l1@virt.test" in text
    assert sendmail.entries() == []


def test_broken_canonical_maps_do_not_stop_generic_remote_delivery(
        tmp_path: Path, config_values: dict[str, object]) -> None:
    port = free_port()
    relay = Server("127.0.0.1", port)
    try:
        keys: dict[str, object] = dict(
            relayhost=f"[127.0.0.1]:{port}", smtp_tls_security_level="none",
            smtp_generic_maps="inline:{ root@host.example.test=me@example.com }")
        sendmail = sendmail_with(tmp_path, config_values, **keys)
        p = sendmail("-f", "root@host.example.test", "admin@remote.test",
                     input=b"From: root@host.example.test\n\nbody\n")
        assert p.returncode == 0, p.stderr
        # the queue run's configuration has a canonical map that cannot be opened
        broken = sendmail_with(tmp_path, config_values, **keys,
                               canonical_maps=f"hash:{tmp_path / 'missing'}")
        p = broken("-q")
        assert p.returncode == 0, p.stderr
        (m,) = relay.messages
        assert m.sender == "me@example.com" and m.rcpts == ["admin@remote.test"]
        assert b"\r\nFrom: me@example.com\r\n" in m.content
        assert sendmail.entries() == []
    finally:
        relay.stop()


def test_broken_password_table_never_shows_the_password(
        tmp_path: Path, config_values: dict[str, object]) -> None:
    regexp = tmp_path / "sasl_passwd"
    regexp.write_text("/relay/ user:pa$!x-s3cret\n")  # "$!": bad replacement syntax
    specs = [f"regexp:{regexp}", "inline:{ [127.0.0.1]=user:pa$!x-s3cret, oops-s3cret }",
             "inline:{ [127.0.0.1]=user:pa$!x-s3cret"]
    for spec in specs:
        sendmail = sendmail_with(tmp_path, config_values, relayhost="[127.0.0.1]:9",
                                 smtp_tls_security_level="none",
                                 smtp_sasl_password_maps=spec)
        p = sendmail("admin@remote.test", input=b"Subject: t\n\nbody\n")
        assert p.returncode == 0, p.stderr
        p = sendmail("-q", "-v")  # the log lines on stderr too
        out = p.stdout + p.stderr
        assert b"remote delivery disabled" in out, out
        assert b"s3cret" not in out, out
        ((state, env, _),) = sendmail.entries()
        assert state == "deferred" and "smtp_sasl_password_maps" in env.recipients[0].reason
        for name, data in sendmail.snapshot().items():
            assert b"s3cret" not in data, (spec, name)
        Queue(str(config_values["queue_directory"])).remove(env.id, "deferred")
