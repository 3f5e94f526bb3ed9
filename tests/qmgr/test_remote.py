"""Remote delivery end to end: the queue runner, a real DNS server (dnsmasq) and real SMTP servers
(aiosmtpd, a byte-exact fault server) on 127.0.0.x. Every recipient's final state is asserted,
and whether the sender got a bounce."""

import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymailtools.config import Config
from pymailtools.qmgr.runner import Runner
from pymailtools.queue.store import Queue
from tests.conftest import Sendmail, write_toml
from tests.support.dns import TestDNS
from tests.support.mail import mbox_messages
from tests.support.net import free_port
from tests.support.queue import MSG, SENDER, entries, queue, run, states
from tests.support.smtp import (
    GREETING,
    FaultServer,
    Received,
    Server,
    accept_until_data,
    delivered,
)

ALL_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7",
             "127.0.0.8", "127.0.0.10", "::1")


@pytest.fixture
def port() -> int:
    return free_port(ALL_HOSTS)


@pytest.fixture
def cfg(config_values: dict[str, object], dns_server: TestDNS, port: int) -> Config:
    values = dict(config_values)
    values.update({
        "dns_nameservers": [dns_server.nameserver], "dns_timeout": 3, "smtp_port": port,
        # short, but with margin for a loaded 2-core machine
        "smtp_connect_timeout": 5, "smtp_helo_timeout": 10, "smtp_mail_timeout": 10,
        "smtp_rcpt_timeout": 10, "smtp_data_init_timeout": 10, "smtp_data_xfer_timeout": 10,
        "smtp_data_done_timeout": 10, "smtp_starttls_timeout": 10,
    })
    return Config(values)


@pytest.fixture
def servers() -> Iterator[list[Server | FaultServer]]:
    started: list[Server | FaultServer] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def inbox(port: int, servers: list) -> Server:
    """The sender's MX (sender.test): bounces arrive here, really delivered."""
    s = Server("127.0.0.10", port)
    servers.append(s)
    return s


BOUNCES: list[Server] = []


@pytest.fixture(autouse=True)
def _bounce_box(inbox: Server) -> Iterator[None]:
    BOUNCES.append(inbox)
    yield
    BOUNCES.remove(inbox)


def bounces(cfg: Config) -> list[Received]:
    """DSNs delivered to the sender's MX, and any still queued (there should be none)."""
    assert [env for _, env in entries(cfg) if env.sender == ""] == []
    got = BOUNCES[-1].messages
    assert all(m.sender == "<>" and m.rcpts == [SENDER] for m in got)
    return got


def bounce_text(cfg: Config, m: Received) -> str:
    return m.content.decode("utf-8", "replace")


def sink(servers: list, host: str, port: int, **kw: object) -> Server:
    s = Server(host, port, **kw)
    servers.append(s)
    return s


def fault(servers: list, host: str, port: int, *scripts: list) -> FaultServer:
    f = FaultServer(*scripts, host=host, port=port)
    servers.append(f)
    return f


# -- MX selection ------------------------------------------------------------------------------

def test_best_preference_mx_gets_the_mail_byte_exact(cfg: Config, port: int,
                                                     servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx2 = sink(servers, "127.0.0.3", port)
    qid = queue(cfg, "bob@good.test", "carol@good.test")
    stats = run(cfg)
    assert stats.delivered == 2 and states(cfg, qid) == {}
    assert mx2.messages == []
    (m,) = mx1.messages  # one transaction with both recipients
    assert m.rcpts == ["bob@good.test", "carol@good.test"] and m.sender == SENDER
    stored = Path(cfg.queue_directory)  # the entry is gone; compare with what we queued
    assert not list((stored / "messages").iterdir())
    # CRLF on the wire, the lone "." line dot-stuffed and unstuffed by the server
    assert m.content.endswith(b"\r\n\r\nHello\r\n.\r\nbye\r\n")
    assert b"Subject: remote\r\n" in m.content


def test_first_mx_refuses_connection_second_gets_it(cfg: Config, port: int,
                                                    servers: list) -> None:
    mx2 = sink(servers, "127.0.0.3", port)  # nothing on 127.0.0.2
    qid = queue(cfg, "bob@good.test")
    assert run(cfg).delivered == 1
    assert states(cfg, qid) == {} and len(mx2.messages) == 1


def test_first_mx_answers_421_second_gets_it(cfg: Config, port: int, servers: list) -> None:
    busy = fault(servers, "127.0.0.2", port, [("send", b"421 4.3.2 busy\r\n")])
    mx2 = sink(servers, "127.0.0.3", port)
    qid = queue(cfg, "bob@good.test")
    assert run(cfg).delivered == 1
    assert busy.connections == 1 and len(mx2.messages) == 1 and states(cfg, qid) == {}


def test_implicit_mx_a_record(cfg: Config, port: int, servers: list) -> None:
    a = sink(servers, "127.0.0.4", port)
    queue(cfg, "bob@aonly.test")
    assert run(cfg).delivered == 1
    assert a.messages[0].rcpts == ["bob@aonly.test"]


def test_cname_is_followed(cfg: Config, port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    queue(cfg, "bob@alias.test")
    assert run(cfg).delivered == 1 and mx1.messages[0].rcpts == ["bob@alias.test"]


def test_every_address_of_an_mx_host_is_tried_ipv6_too(cfg: Config, port: int,
                                                       servers: list) -> None:
    v6 = sink(servers, "::1", port)  # 127.0.0.8 refuses
    queue(cfg, "bob@dual.test")
    assert run(cfg).delivered == 1 and len(v6.messages) == 1


def test_null_mx_bounces_without_connecting(cfg: Config) -> None:
    qid = queue(cfg, "bob@nullmx.test")
    stats = run(cfg)
    assert stats.bounced == 1 and states(cfg, qid) == {}
    (b,) = bounces(cfg)
    text = bounce_text(cfg, b)
    assert "Status: 5.1.10" in text and "nullMX" in text


def test_nxdomain_bounces(cfg: Config) -> None:
    queue(cfg, "bob@nx.test")
    assert run(cfg).bounced == 1
    (b,) = bounces(cfg)
    assert "Status: 5.1.2" in bounce_text(cfg, b)


@pytest.mark.parametrize("domain", ["servfail.test", "badmx.test"])
def test_servfail_and_garbage_defer(cfg: Config, domain: str) -> None:
    before = time.time()
    qid = queue(cfg, f"bob@{domain}")
    assert run(cfg).deferred == 1
    ((state, env),) = entries(cfg)
    (r,) = env.recipients
    assert state == "deferred" and r.state == "deferred" and r.status == "4.4.3"
    assert r.next_try >= before + cfg.minimal_backoff_time
    assert bounces(cfg) == [] and env.id == qid


def test_dns_timeout_defers_within_the_lifetime(cfg: Config) -> None:
    queue(cfg, "bob@timeout.test")
    t = time.monotonic()
    assert run(cfg).deferred == 1
    assert time.monotonic() - t < cfg.dns_timeout + 5
    ((_, env),) = entries(cfg)
    assert env.recipients[0].status == "4.4.3" and bounces(cfg) == []


def test_mx_pointing_at_ourselves_bounces_as_loop(cfg: Config) -> None:
    queue(cfg, "bob@loop.test")
    assert run(cfg).bounced == 1
    assert "Status: 5.4.6" in bounce_text(cfg, bounces(cfg)[0])


# -- per-recipient replies ---------------------------------------------------------------------

def test_550_for_one_of_three(cfg: Config, port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx1.handler.rcpt_reply = lambda a, e: "550 5.1.1 no such user" if a.startswith("b@") \
        else None
    qid = queue(cfg, "a@good.test", "b@good.test", "c@good.test")
    stats = run(cfg)
    assert stats.bounced == 1 and states(cfg, qid) == {}
    assert mx1.handler.by_rcpt() == {"a@good.test": 1, "c@good.test": 1}
    (b,) = bounces(cfg)
    text = bounce_text(cfg, b)
    assert "Final-Recipient: rfc822; b@good.test" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "a@good.test" not in text.split("Final-Recipient")[1]


@pytest.mark.parametrize("reply", ["450 4.2.0 mailbox busy", "451 4.3.0 try later",
                                   "552 5.2.2 mailbox full"])
def test_temporary_rcpt_reply_defers_only_that_recipient(cfg: Config, port: int,
                                                         servers: list, reply: str) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx1.handler.rcpt_reply = lambda a, e: reply if a.startswith("b@") else None
    qid = queue(cfg, "a@good.test", "b@good.test", "c@good.test")
    run(cfg)
    assert states(cfg, qid) == {"a@good.test": "sent", "b@good.test": "deferred",
                                "c@good.test": "sent"}
    ((_, env),) = entries(cfg)
    b = env.recipients[1]
    assert b.reason == reply and b.status.startswith("4.")
    assert bounces(cfg) == []
    # The next run (forced, as postqueue -f) retries only b.
    mx1.handler.rcpt_reply = lambda a, e: None
    run(cfg, force=True)
    assert mx1.handler.by_rcpt() == {"a@good.test": 1, "b@good.test": 1, "c@good.test": 1}
    assert entries(cfg) == []


def test_452_after_some_recipients_continues_at_once(cfg: Config, port: int,
                                                     servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx1.handler.rcpt_reply = lambda a, e: "452 4.5.3 too many recipients" \
        if len(e.rcpt_tos) >= 3 else None
    rcpts = [f"u{i}@good.test" for i in range(8)]
    qid = queue(cfg, *rcpts)
    stats = run(cfg)
    assert stats.delivered == 8 and states(cfg, qid) == {}
    assert [len(m.rcpts) for m in mx1.messages] == [3, 3, 2]


def test_recipient_limit_splits_transactions(config_values: dict, cfg: Config, port: int,
                                             servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    rcpts = [f"u{i}@good.test" for i in range(120)]
    queue(cfg, *rcpts)
    assert run(cfg).delivered == 120
    assert sorted(len(m.rcpts) for m in mx1.messages) == [20, 50, 50]


def test_552_at_end_of_data_bounces_all(cfg: Config, port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx1.handler.data_reply = lambda e: "552 5.3.4 message too big"
    qid = queue(cfg, "a@good.test", "b@good.test")
    assert run(cfg).bounced == 2 and states(cfg, qid) == {}
    (b,) = bounces(cfg)
    text = bounce_text(cfg, b)
    assert text.count("Status: 5.3.4") == 2


def test_several_messages_share_one_session(config_values: dict, cfg: Config, port: int,
                                            servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    for i in range(5):
        queue(cfg, f"u{i}@good.test")
    assert run(cfg).delivered == 5
    assert len(mx1.messages) == 5 and mx1.handler.sessions <= 2  # slow start: no burst


def test_concurrency_grows_with_the_backlog_within_the_limit(config_values: dict, cfg: Config,
                                                              port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    limited = Config({**config_values, "dns_nameservers": cfg.dns_nameservers,
                      "smtp_port": port, "default_destination_concurrency_limit": 3})
    for i in range(60):
        queue(limited, f"u{i}@good.test")
    assert run(limited).delivered == 60
    assert len(mx1.messages) == 60 and 2 <= mx1.handler.sessions <= 3


def test_pipelining_and_extensions_on_the_wire(cfg: Config, port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    queue(cfg, "bob@good.test", msg=b"Subject: 8bit\n\ncaf\xc3\xa9\n")
    queue(cfg, "j\u00f6rg@good.test")
    assert run(cfg).delivered == 2
    cmds = mx1.handler.commands
    mails = [c for c in cmds if c.startswith("MAIL")]
    assert any("BODY=8BITMIME" in c and "SIZE=" in c for c in mails)
    assert any("SMTPUTF8" in c for c in mails)
    assert mx1.handler.by_rcpt()["j\u00f6rg@good.test"] == 1


def test_utf8_address_without_smtputf8_bounces_5_6_7(cfg: Config, port: int,
                                                     servers: list) -> None:
    sink(servers, "127.0.0.2", port, enable_SMTPUTF8=False)
    queue(cfg, "j\u00f6rg@good.test")
    assert run(cfg).bounced == 1
    assert "Status: 5.6.7" in bounce_text(cfg, bounces(cfg)[0])


# -- faults (byte-exact server) ----------------------------------------------------------------

def test_421_greeting_on_the_only_mx_defers(cfg: Config, port: int, servers: list) -> None:
    f = fault(servers, "127.0.0.6", port, [("send", b"421 4.3.2 go away\r\n")])
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).deferred == 1
    assert states(cfg, qid) == {"bob@fault.test": "deferred"} and bounces(cfg) == []
    assert f.connections == 1
    ((_, env),) = entries(cfg)
    assert "421 4.3.2 go away" in env.recipients[0].reason


def test_dead_destination_costs_one_connection(cfg: Config, port: int, servers: list) -> None:
    f = fault(servers, "127.0.0.6", port, [("send", b"421 4.3.2 go away\r\n")])
    for i in range(6):
        queue(cfg, f"u{i}@fault.test")
    assert run(cfg).deferred == 6
    assert f.connections == 1  # the other five were deferred without connecting


def test_connection_refused_everywhere_defers(cfg: Config, port: int) -> None:
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).deferred == 1
    ((_, env),) = entries(cfg)
    assert env.recipients[0].reason == \
        f"connect to mx.fault.test[127.0.0.6]:{port}: Connection refused"
    assert states(cfg, qid) == {"bob@fault.test": "deferred"} and bounces(cfg) == []


def test_drop_mid_data_defers(cfg: Config, port: int, servers: list) -> None:
    f = fault(servers, "127.0.0.6", port,
              GREETING + accept_until_data() + [("read_bytes", 100), ("close", None)])
    qid = queue(cfg, "bob@fault.test", msg=b"Subject: big\n\n" + b"x" * 5000 + b"\n")
    assert run(cfg).deferred == 1
    assert states(cfg, qid) == {"bob@fault.test": "deferred"} and bounces(cfg) == []
    assert f.connections == 1


def test_drop_after_final_dot_defers_and_redelivers(cfg: Config, port: int,
                                                    servers: list) -> None:
    f = fault(servers, "127.0.0.6", port,
              GREETING + accept_until_data() + [("read_until", b"\r\n.\r\n"), ("close", None)],
              delivered())
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).deferred == 1
    ((_, env),) = entries(cfg)
    r = env.recipients[0]
    assert r.state == "deferred" and "end of data" in r.reason and bounces(cfg) == []
    assert run(cfg, force=True).delivered == 1  # at least once: the copy goes out again
    assert states(cfg, qid) == {} and f.connections == 2
    assert all(data.count(b"\r\n.\r\n") == 1 for data in f.received)


def test_stall_past_the_timeout_defers(config_values: dict, cfg: Config, port: int,
                                       servers: list) -> None:
    fault(servers, "127.0.0.6", port, [("sleep", 8), ("send", b"220 late\r\n")])
    short = Config({**config_values, "dns_nameservers": cfg.dns_nameservers,
                    "smtp_port": port, "smtp_helo_timeout": 1})
    queue(short, "bob@fault.test")
    t = time.monotonic()
    assert run(short).deferred == 1
    assert time.monotonic() - t < 6
    ((_, env),) = entries(short)
    assert "timed out" in env.recipients[0].reason and bounces(short) == []


def test_malformed_reply_is_never_success(cfg: Config, port: int, servers: list) -> None:
    fault(servers, "127.0.0.6", port,
          GREETING + accept_until_data() + [("read_until", b"\r\n.\r\n"),
                                            ("send", b"2500 ok\r\n")])
    qid = queue(cfg, "bob@fault.test")
    assert run(cfg).deferred == 1
    assert states(cfg, qid) == {"bob@fault.test": "deferred"}


def test_injected_address_never_reaches_the_wire(cfg: Config, port: int,
                                                 servers: list) -> None:
    """aiosmtplib would have sent <q>: we refuse the address and send nothing for it."""
    from pymailtools.queue.envelope import Recipient

    mx1 = sink(servers, "127.0.0.2", port)
    qid = queue(cfg, "ok@good.test")
    q = Queue(cfg.queue_directory)
    state, env = q.load(qid)
    env.recipients.append(Recipient('"q\r\nRSET"@good.test'))
    q.write_envelope(env, state)
    stats = run(cfg)
    assert stats.bounced == 1 and states(cfg, qid) == {}
    assert [m.rcpts for m in mx1.messages] == [["ok@good.test"]]
    assert "bad recipient address syntax" in bounce_text(cfg, bounces(cfg)[0])
    assert not any("RSET" in c for c in mx1.handler.commands)


def test_smuggled_end_of_data_stays_inside_the_message(cfg: Config, port: int,
                                                       servers: list) -> None:
    f = fault(servers, "127.0.0.6", port, delivered())
    body = b"Subject: s\n\nline\r\n.\r\nMAIL FROM:<evil@x>\n.\nend\n"
    queue(cfg, "bob@fault.test", msg=body)
    assert run(cfg).delivered == 1
    (sent,) = f.received  # the exact bytes the client wrote
    assert sent.count(b"\r\n.\r\n") == 1  # one end of data: nothing smuggled
    assert b"line\r\n..\r\nMAIL FROM:<evil@x>\r\n..\r\nend\r\n.\r\n" in sent
    assert b"\r\r" not in sent and b"\n\n" not in sent.replace(b"\r\n", b"")


def test_long_lines_are_broken_not_refused(cfg: Config, port: int, servers: list) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    queue(cfg, "bob@good.test", msg=b"Subject: long\n\n" + b"y" * 2500 + b"\n")
    assert run(cfg).delivered == 1
    lines = mx1.messages[0].content.split(b"\r\n")
    assert max(map(len, lines)) <= 998
    assert b"".join(ln.lstrip(b" ") for ln in lines if ln.strip(b"y ") == b"") == b"y" * 2500


# -- the long-running queue runner (sendmail -bD -qINTERVAL) -----------------------------------

def _config_file(cfg_values: dict, path: Path) -> Path:
    return write_toml(path, cfg_values)


def test_bD_runs_the_queue_periodically_and_stops_on_sigterm(
        config_values: dict, cfg: Config, port: int, servers: list, tmp_path: Path) -> None:
    import signal
    import subprocess

    from tests.conftest import script

    mx1 = sink(servers, "127.0.0.2", port)
    conf = _config_file({**config_values, "dns_nameservers": cfg.dns_nameservers,
                         "smtp_port": port, "delivery_mode": "queue",
                         # -bD also runs the SMTP listener: keep it off port 25
                         "smtpd_listen": [f"127.0.0.1:{free_port()}"]}, tmp_path / "d.toml")
    daemon = subprocess.Popen([script("sendmail"), "-C", str(conf), "-bD", "-q1s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        queue(cfg, "first@good.test")
        deadline = time.monotonic() + 30
        while len(mx1.messages) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        queue(cfg, "second@good.test")  # picked up by a later periodic run
        while len(mx1.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [m.rcpts for m in mx1.messages] == [["first@good.test"], ["second@good.test"]]
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.returncode == 0, err
    assert entries(cfg) == []


def test_bd_with_a_bad_interval_is_a_usage_error(sendmail) -> None:  # type: ignore
    # -bd without an interval runs the SMTP listener (tests/smtpd/); a bad one is refused
    assert sendmail("-bd", "-qsoon").returncode == 64


# -- the foreground run delivers the bounce it queues (no daemon, no later queue run) ---------

def _foreground(config_values: dict, cfg: Config, port: int, tmp_path: Path,
                user: pwd.struct_passwd, *rcpts: str) -> Sendmail:
    """``sendmail -f user rcpts...`` with delivery_mode = "foreground"; returns the tool."""
    conf = _config_file({**config_values, "dns_nameservers": cfg.dns_nameservers,
                         "dns_timeout": cfg.dns_timeout, "smtp_port": port,
                         "delivery_mode": "foreground"}, tmp_path / "fg.toml")
    sendmail = Sendmail(conf, Path(cfg.queue_directory))
    p = sendmail("-i", "-f", user.pw_name, *rcpts, input=MSG, mode="foreground")
    assert p.returncode == 0, p.stderr
    return sendmail


def test_null_mx_bounce_reaches_the_local_sender_in_the_same_run(
        config_values: dict, cfg: Config, port: int, tmp_path: Path, spool: Path,
        system_user: pwd.struct_passwd) -> None:
    sendmail = _foreground(config_values, cfg, port, tmp_path, system_user, "bob@nullmx.test")
    (dsn,) = mbox_messages(spool / system_user.pw_name)
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; bob@nullmx.test" in text and "Status: 5.1.10" in text
    assert sendmail.entries() == []


def test_550_for_one_of_three_bounce_reaches_the_local_sender_in_the_same_run(
        config_values: dict, cfg: Config, port: int, servers: list, tmp_path: Path,
        spool: Path, system_user: pwd.struct_passwd) -> None:
    mx1 = sink(servers, "127.0.0.2", port)
    mx1.handler.rcpt_reply = lambda a, e: "550 5.1.1 no such user" if a.startswith("b@") \
        else None
    sendmail = _foreground(config_values, cfg, port, tmp_path, system_user,
                           "a@good.test", "b@good.test", "c@good.test")
    assert mx1.handler.by_rcpt() == {"a@good.test": 1, "c@good.test": 1}
    (dsn,) = mbox_messages(spool / system_user.pw_name)
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; b@good.test" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert sendmail.entries() == []



def test_bounce_to_an_unreachable_sender_is_tried_once_and_left_deferred(cfg: Config) -> None:
    """The foreground run (one id, as sendmail -odi) tries its bounce once and does not wait."""
    qid = queue(cfg, "bob@nullmx.test", sender="alice@servfail.test")
    t = time.monotonic()
    stats = Runner(cfg).run(ids=[qid], force=True)
    assert time.monotonic() - t < cfg.dns_timeout + 10
    assert stats.bounced == 1 and stats.deferred == 1
    ((state, env),) = entries(cfg)
    (r,) = env.recipients
    assert (state, env.sender, r.address) == ("deferred", "", "alice@servfail.test")
    assert r.state == "deferred" and r.attempts == 1 and r.status == "4.4.3"


# -- interop: a real Postfix as the receiving MTA ----------------------------------------------

def test_delivery_into_a_real_postfix_mailbox(config_values: dict, world_dir: Path,
                                              system_user, servers: list) -> None:  # type: ignore
    import os
    import shutil
    import subprocess

    from tests.conftest import need_root, need_tool

    postfix = need_tool("postfix", "postfix")
    need_root()
    top = world_dir / "pf"  # pytest's tmp_path is root-only; Postfix's user needs in
    conf, spool = top / "conf", top / "spool"
    for d in (conf / "queue", conf / "data", spool):
        d.mkdir(parents=True)
    os.chmod(spool, 0o1777)
    p = free_port(("127.0.0.1",))
    settings = {
        "queue_directory": conf / "queue", "data_directory": conf / "data",
        "meta_directory": "/etc/postfix", "compatibility_level": "3.6",
        "mail_owner": "postfix", "setgid_group": "postdrop", "myhostname": "pf.test",
        "mydestination": "pf.test", "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8", "alias_maps": "", "alias_database": "",
        "mail_spool_directory": spool, "home_mailbox": "", "mailbox_command": "",
        "maillog_file_prefixes": "/var, /dev/stdout, /tmp",
        "maillog_file": conf / "data" / "maillog", "local_recipient_maps": "",
    }
    (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    master = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and not line.startswith((" ", "\t", "#")):
            if f[1] == "inet":
                continue  # only our smtpd listens, on a free port
            line = " ".join(f[:4] + ["n"] + f[5:])  # no chroot tree here
        master.append(line)
    master.append(f"127.0.0.1:{p} inet n - n - - smtpd")
    (conf / "master.cf").write_text("\n".join(master) + "\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    r = subprocess.run([postfix, "-c", str(conf), "post-install", "create-missing"],
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    shutil.chown(conf / "data", "postfix")
    r = subprocess.run([postfix, "-c", str(conf), "start"], capture_output=True, env=env,
                       timeout=60)
    assert r.returncode == 0, (conf / "data" / "maillog").read_text(errors="replace")
    try:
        cfg = Config({**config_values, "relayhost": f"[127.0.0.1]:{p}",
                      "dns_nameservers": ["127.0.0.1:9"], "dns_timeout": 1})
        user = system_user.pw_name
        body = b"Subject: interop\nX-Check: 4711\n\n.leading dot\nbody\n"
        qid = queue(cfg, f"{user}@pf.test", msg=body)
        stats = run(cfg)
        assert stats.delivered == 1 and states(cfg, qid) == {}
        box = spool / user
        deadline = time.monotonic() + 60
        while not (box.exists() and b"X-Check: 4711" in box.read_bytes()) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        data = box.read_bytes()
        assert b"Subject: interop\n" in data and b"\n.leading dot\nbody\n" in data
        assert f"Return-Path: <{SENDER}>".encode() in data
    finally:
        subprocess.run([postfix, "-c", str(conf), "stop"], capture_output=True, env=env,
                       timeout=60)
