"""The SMTP listener and rewriting: virtual alias recipients refused or taken at RCPT, and the
queue-entry rewriting (canonical maps, virtual aliases) applied to what it queues."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Sendmail, script, write_toml
from tests.support.smtpd import Client, listener


@pytest.fixture
def values(config_values: dict[str, object], tmp_path: Path) -> dict[str, object]:
    virtual = tmp_path / "virtual"
    virtual.write_text("virt.test anything\nteam@virt.test a@x.test, b@y.test\n"
                       "l1@virt.test l2@virt.test\nl2@virt.test l1@virt.test\n")
    return dict(config_values, delivery_mode="queue", virtual_alias_maps=f"texthash:{virtual}",
                sender_canonical_maps="inline:{ a@x.test=me@example.com }")


def entries(values: dict[str, object]) -> list[tuple[str, object, bytes]]:
    return Sendmail(Path("/nonexistent"), Path(str(values["queue_directory"]))).entries()


def test_unknown_virtual_recipient_refused_at_rcpt(tmp_path: Path,
                                                   values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        c = Client(lst.port)
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
        assert c.cmd("RCPT TO:<nobody@virt.test>") == (
            "550 5.1.1 <nobody@virt.test>: Recipient address rejected: "
            "User unknown in virtual alias table")
        reply = c.cmd("RCPT TO:<l1@virt.test>")
        assert reply.startswith("550 5.4.6 <l1@virt.test>: Recipient address rejected: "
                                "virtual alias loop"), reply
        # a virtual domain is ours: taken from any client, then expanded at queue entry
        assert c.cmd("RCPT TO:<team@virt.test>") == "250 2.1.5 Ok"
        assert c.cmd("DATA").startswith("354")
        assert c.cmd("From: a@x.test\r\nSubject: v\r\n\r\nbody\r\n.").startswith("250 2.0.0")
        c.cmd("QUIT")
        assert lst.stop() == 0
    ((_, env, message),) = entries(values)
    assert env.sender == "me@example.com"  # type: ignore[attr-defined]
    assert [(r.address, r.orcpt) for r in env.recipients] == [  # type: ignore[attr-defined]
        ("a@x.test", "team@virt.test"), ("b@y.test", "team@virt.test")]
    assert b"\nFrom: me@example.com\n" in message


def test_missing_table_stops_the_listener_at_start_up(tmp_path: Path,
                                                      values: dict[str, object]) -> None:
    path = write_toml(tmp_path / "bad.toml",
                      dict(values, virtual_alias_maps=f"hash:{tmp_path / 'nonexistent'}"))
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(path))
    r = subprocess.run([script("sendmail"), "-bs"], input=b"QUIT\r\n", capture_output=True,
                       env=env, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 78, err
    assert len(err.strip().splitlines()) == 1 and "nonexistent" in err, err
    assert b"220 " not in r.stdout
