"""relay_domains: the listener accepts mail for them from any client (Postfix's
reject_unauth_destination), while every other remote domain stays closed to strangers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Sendmail
from tests.support.smtpd import Client, listener


@pytest.fixture
def values(config_values: dict[str, object], tmp_path: Path) -> dict[str, object]:
    listed = tmp_path / "relay-domains.list"
    listed.write_text("# a list file, as Postfix reads /path entries\nfromfile.test\n")
    table = tmp_path / "relay-domains.map"
    table.write_text("fromtable.test   OK\n")
    return dict(config_values, delivery_mode="queue", mynetworks=["127.0.0.1/32"],
                relay_domains=["relayed.test", ".subsonly.test", str(listed),
                               f"texthash:{table}"])


@pytest.mark.parametrize("rcpt, accepted", [
    ("a@relayed.test", True),
    ("a@deep.er.relayed.test", True),  # a name matches its subdomains too
    ("a@RELAYED.Test", True),
    ("a@subsonly.test", False),  # .name: only the subdomains
    ("a@x.subsonly.test", True),
    ("a@fromfile.test", True),
    ("a@fromtable.test", True),
    ("a@x.fromtable.test", True),
    ("a@other.test", False),
    ("a@relayed.test.other.test", False),
    ("a@notrelayed.test", False),
    ("a%other.test@relayed.test", False),  # no routing through a relay domain
    ("other.test!a@relayed.test", False),
])
def test_relay_domains_from_outside_mynetworks(tmp_path: Path, values: dict[str, object],
                                               rcpt: str, accepted: bool) -> None:
    with listener(tmp_path, values) as lst:
        c = Client(lst.port, source="127.0.0.2")
        assert c.cmd("EHLO client.example").startswith("250")
        assert c.cmd("MAIL FROM:<stranger@outside.test>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{rcpt}>")
        if accepted:
            assert reply.startswith("250 2.1.5"), reply
        else:
            assert reply == f"554 5.7.1 <{rcpt}>: Relay access denied", reply
        c.cmd("QUIT")
        c.close()


def test_relayed_mail_is_queued(tmp_path: Path, values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        c = Client(lst.port, source="127.0.0.2")
        assert c.cmd("EHLO client.example").startswith("250")
        assert c.cmd("MAIL FROM:<stranger@outside.test>").startswith("250")
        assert c.cmd("RCPT TO:<a@relayed.test>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<b@other.test>").startswith("554 5.7.1")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd("Subject: hi\r\n\r\nbody\r\n.").startswith("250 2.0.0 Ok: queued as ")
        c.cmd("QUIT")
        c.close()
        assert lst.stop() == 0
    queued = Sendmail(Path("/nonexistent"), Path(str(values["queue_directory"]))).entries()
    ((_, env, _),) = queued
    assert [r.address for r in env.recipients] == ["a@relayed.test"]


def test_unreadable_relay_domains_file_stops_the_listener(tmp_path: Path,
                                                         values: dict[str, object]) -> None:
    values["relay_domains"] = [str(tmp_path / "nonexistent")]
    with pytest.raises(AssertionError, match="listener exited 78") as e:
        with listener(tmp_path, values):
            pass
    assert "relay_domains" in str(e.value) and "Traceback" not in str(e.value)
