"""Rewriting at queue entry through the installed sendmail: canonical maps and masquerading of
the envelope and the headers, virtual aliases expanded (and refused ones bounced), -bv steps."""

import subprocess
from pathlib import Path

from pymailtools.queue.envelope import BOUNCED, PENDING
from tests.conftest import Sendmail, write_toml


def sendmail_with(tmp_path: Path, config_values: dict[str, object], **keys: object) -> Sendmail:
    path = write_toml(tmp_path / "rewrite.toml", {**config_values, **keys})
    return Sendmail(path, Path(str(config_values["queue_directory"])))


def head(msg: bytes) -> str:
    return msg.split(b"\n\n", 1)[0].decode("utf-8", "surrogateescape")


def test_sendmail_t_rewrites_envelope_and_headers(tmp_path: Path,
                                                  config_values: dict[str, object]) -> None:
    sendmail = sendmail_with(
        tmp_path, config_values,
        sender_canonical_maps="inline:{ cron@host.example.test=root@host.example.test }",
        recipient_canonical_maps="inline:{ ops@host.example.test=ops-team@example.com }",
        masquerade_domains=["example.com"])
    msg = (b"From: Cron Daemon <cron@host.example.test>\n"
           b"Reply-To: =?utf-8?q?J=C3=B6rg?= <cron> (the cron)\n"
           b"To: \"Ops, the team\" <ops@host.example.test>, x@mail.example.com\n"
           b"Subject: cron@host.example.test stays in a subject\n\nbody\n")
    p = sendmail("-t", "-f", "cron@host.example.test", input=msg)
    assert p.returncode == 0, p.stderr
    ((_, env, stored),) = sendmail.entries()
    assert env.sender == "root@host.example.test"
    assert [(r.address, r.orcpt) for r in env.recipients] == [
        ("ops-team@example.com", "ops@host.example.test"),
        ("x@mail.example.com", "x@mail.example.com")]  # envelope recipients: not masqueraded
    h = head(stored)
    assert "\nFrom: Cron Daemon <root@host.example.test>\n" in h
    assert "\nReply-To: =?utf-8?q?J=C3=B6rg?= <root@host.example.test> (the cron)\n" in h
    assert '\nTo: "Ops, the team" <ops-team@example.com>, x@example.com\n' in h
    assert "\nSubject: cron@host.example.test stays in a subject\n" in h
    assert stored.endswith(b"\n\nbody\n")


def test_no_rewriting_keys_leave_headers_byte_exact(tmp_path: Path,
                                                    config_values: dict[str, object]) -> None:
    sendmail = sendmail_with(tmp_path, config_values, canonical_maps="inline:{ a@b.test=c@d }")
    msg = b"From: Cron <cron@host.example.test>\nTo:  odd ,  spacing@x.test\n\nbody\n"
    assert sendmail("-t", input=msg).returncode == 0
    ((_, _, stored),) = sendmail.entries()
    assert b"\nFrom: Cron <cron@host.example.test>\nTo:  odd ,  spacing@x.test\n" in stored


def test_virtual_alias_expansion_and_refusals(tmp_path: Path,
                                              config_values: dict[str, object]) -> None:
    virtual = tmp_path / "virtual"
    virtual.write_text("virt.test whatever\nteam@virt.test a@x.test, b@y.test\n"
                       "l1@virt.test l2@virt.test\nl2@virt.test l1@virt.test\n")
    sendmail = sendmail_with(tmp_path, config_values, virtual_alias_maps=f"texthash:{virtual}")
    p = sendmail("team@virt.test", "nobody@virt.test", "l1@virt.test",
                 input=b"Subject: v\n\nbody\n")
    assert p.returncode == 0, p.stderr
    ((_, env, stored),) = sendmail.entries()
    got = [(r.address, r.orcpt, r.state, r.status) for r in env.recipients]
    assert got == [("a@x.test", "team@virt.test", PENDING, ""),
                   ("b@y.test", "team@virt.test", PENDING, ""),
                   ("nobody@virt.test", "nobody@virt.test", BOUNCED, "5.1.1"),
                   ("l1@virt.test", "l1@virt.test", BOUNCED, "5.4.6")]
    assert "User unknown in virtual alias table" in env.recipients[2].reason
    assert "virtual alias loop" in env.recipients[3].reason


def test_bad_table_is_a_config_error_and_nothing_is_queued(
        tmp_path: Path, config_values: dict[str, object]) -> None:
    sendmail = sendmail_with(tmp_path, config_values,
                             sender_canonical_maps=f"hash:{tmp_path / 'missing'}")
    p = sendmail("u@x.test", input=b"Subject: t\n\nb\n")
    assert p.returncode == 78, p.stderr
    err = p.stderr.decode()
    assert err.startswith("sendmail: ") and len(err.strip().splitlines()) == 1, err
    assert sendmail.entries() == []


def test_bv_prints_each_rewriting_step(tmp_path: Path, config_values: dict[str, object]) -> None:
    virtual = tmp_path / "virtual"
    virtual.write_text("staff@host.example.test root@host.example.test, ext@remote.test\n")
    sendmail = sendmail_with(
        tmp_path, config_values, recipient_delimiter="+",
        canonical_maps="inline:{ boss@host.example.test=staff@host.example.test }",
        virtual_alias_maps=f"texthash:{virtual}")
    p = sendmail("-bv", "boss@host.example.test")
    out = p.stdout.decode()
    assert "boss@host.example.test: canonical_maps: boss@host.example.test -> " \
        "staff@host.example.test" in out
    assert "boss@host.example.test: virtual_alias_maps: staff@host.example.test -> " \
        "root@host.example.test, ext@remote.test" in out
    assert "root@host.example.test: " in out and "ext@remote.test: " in out
    p = sendmail("-bv", "root+tag@host.example.test")
    assert "recipient_delimiter: root+tag -> root (extension tag)" in p.stdout.decode()


def assert_refused(sendmail: Sendmail, p: "subprocess.CompletedProcess[bytes]",
                   code: int) -> str:
    assert p.returncode == code, p.stderr  # never 75: PHP's mail() takes 75 for "queued"
    err = p.stderr.decode()
    assert err.startswith("sendmail: ") and len(err.strip().splitlines()) == 1, err
    assert sendmail.entries() == []
    return err


def test_over_long_address_with_a_regexp_canonical_map(tmp_path: Path,
                                                       config_values: dict[str, object]) -> None:
    canonical = tmp_path / "canonical"
    canonical.write_text("/^(.*)@old\\.test$/ $1@new.test\n")
    sendmail = sendmail_with(tmp_path, config_values, canonical_maps=f"regexp:{canonical}")
    long = "a" * 290 + "@old.test"  # a valid address, longer than a pattern table's keys
    for args in (("-f", long, "u@x.test"), (long,)):
        p = sendmail(*args, input=b"Subject: t\n\nbody\n")
        assert "longer than 256" in assert_refused(sendmail, p, 65)
    p = sendmail("-f", "a@old.test", "u@x.test",
                 input=f"From: <{long}>\nTo: <b@old.test>\n\nbody\n".encode())
    assert p.returncode == 0, p.stderr
    ((_, env, stored),) = sendmail.entries()
    assert env.sender == "a@new.test"
    assert f"\nFrom: <{long}>\nTo: <b@new.test>\n".encode() in stored  # left as written


def test_virtual_alias_limit_is_not_exit_75(tmp_path: Path,
                                            config_values: dict[str, object]) -> None:
    wide = tmp_path / "virtual"
    wide.write_text("big@wide.test " + ", ".join(f"m{i}@x.test" for i in range(20)) + "\n")
    sendmail = sendmail_with(tmp_path, config_values, virtual_alias_maps=f"texthash:{wide}",
                             virtual_alias_expansion_limit=10)
    p = sendmail("big@wide.test", input=b"Subject: t\n\nbody\n")
    err = assert_refused(sendmail, p, 69)
    assert "not queued" in err and "expansion size" in err


def test_broken_generic_maps_do_not_stop_submission(tmp_path: Path,
                                                    config_values: dict[str, object]) -> None:
    sendmail = sendmail_with(tmp_path, config_values,
                             canonical_maps="inline:{ a@x.test=b@x.test }",
                             smtp_generic_maps=f"hash:{tmp_path / 'missing'}")
    p = sendmail("a@x.test", input=b"Subject: t\n\nbody\n")
    assert p.returncode == 0, p.stderr
    ((_, env, _),) = sendmail.entries()
    assert [r.address for r in env.recipients] == ["b@x.test"]
