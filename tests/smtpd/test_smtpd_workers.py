"""Several listener processes on one port (smtpd_workers): real processes, real sockets on
loopback. Which worker takes a connection is made certain by stopping (SIGSTOP) the others,
and checked in /proc."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from pymailtools.smtpd.clients import SharedClients
from tests.conftest import Sendmail, write_toml
from tests.support.net import TIMEOUT, wait_for
from tests.support.smtpd import Client, alive, listener, only, owner, swaks


@pytest.fixture
def values(config_values: dict[str, object]) -> dict[str, object]:
    return dict(config_values, delivery_mode="queue", smtpd_workers=2)


def entries(values: dict[str, object]) -> list[tuple[str, object, bytes]]:
    return Sendmail(Path("/nonexistent"), Path(str(values["queue_directory"]))).entries()


def send(c: Client, body: str, rcpt: str = "root@localhost") -> str:
    """One message on an open session; the queue id from the 250 reply."""
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    reply = c.cmd(f"Subject: {body}\r\n\r\n{body}\r\n.".encode() + b"\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def test_default_is_two_workers_per_cpu(tmp_path: Path, values: dict[str, object]) -> None:
    """smtpd_workers = 0 (the default) runs two listener processes per CPU it may use; each
    takes connections."""
    values["smtpd_workers"] = 0
    expected = 2 * len(os.sched_getaffinity(0))
    with listener(tmp_path, values) as lst:
        pids = lst.workers(expected)
        assert len(pids) == expected, pids
        c = Client(lst.port)
        assert owner(c, pids) in pids
        send(c, "default workers")
        c.close()


def test_every_worker_accepts_and_each_message_is_queued_once(tmp_path: Path,
                                                              values: dict[str, object]) -> None:
    values["smtpd_workers"] = 3
    sent: dict[str, str] = {}  # queue id -> body
    with listener(tmp_path, values) as lst:
        pids = lst.workers(3)
        assert len(pids) == 3, pids
        for pid in pids:
            with only(pids, pid):
                c = Client(lst.port)
                assert owner(c, pids) == pid
                assert c.cmd("HELP MAIL").startswith("250 Syntax: MAIL FROM:")
                body = f"from worker {pid}"
                sent[send(c, body)] = body
                assert c.cmd("QUIT").startswith("221")
                c.close()
        # then all of them at once, from many clients
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", lst.port, timeout=TIMEOUT) as s:
                    s.ehlo("client.example")
                    for j in range(3):
                        body = f"burst {i}.{j}"
                        s.mail("a@x.test")
                        s.rcpt("root@localhost")
                        code, reply = s.data(f"Subject: {body}\r\n\r\n{body}\r\n".encode())
                        assert code == 250, reply
                        sent[reply.decode().rsplit(" ", 1)[1]] = body
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        assert lst.stop() == 0
        log = lst.log()
    queued = entries(values)
    assert len(queued) == len(sent) == 3 + 8 * 3
    for _, env, message in queued:
        assert message.endswith(f"\n\n{sent[env.id]}\n".encode())  # type: ignore[attr-defined]
    assert len({m for _, _, m in queued}) == len(queued)  # no message twice
    assert "(3 processes)" in log
    assert log.count("daemon stopped") == 1


def test_sigterm_to_the_parent_drains_every_worker(tmp_path: Path,
                                                   values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        a, b = pids = lst.workers(2)
        with only(pids, a):
            busy = Client(lst.port)
            assert busy.cmd("EHLO client.example").startswith("250")
            assert busy.cmd("MAIL FROM:<a@x.test>").startswith("250")
            assert busy.cmd("RCPT TO:<root@localhost>").startswith("250")
            assert busy.cmd("DATA").startswith("354")
            busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        with only(pids, b):
            idle = Client(lst.port)
            assert idle.cmd("EHLO idle.example").startswith("250")
        assert (owner(busy, pids), owner(idle, pids)) == (a, b)
        lst.drain(busy, idle)
        assert not alive(a) and not alive(b)
    (_, _, message), = entries(values)
    assert message.endswith(b"first half\nsecond half\n")


def test_sighup_reloads_every_worker(tmp_path: Path, values: dict[str, object]) -> None:
    values["smtpd_recipient_limit"] = 3
    with listener(tmp_path, values) as lst:
        pids = lst.workers(2)
        write_toml(lst.config, dict(lst.values, smtpd_recipient_limit=1))
        lst.proc.send_signal(signal.SIGHUP)
        wait_for("both workers to reload", lambda: lst.log().count("configuration reloaded") == 2)
        for pid in pids:
            with only(pids, pid):
                c = Client(lst.port)
                assert owner(c, pids) == pid
                c.cmd("EHLO client.example")
                c.cmd("MAIL FROM:<a@x.test>")
                assert c.cmd("RCPT TO:<root@localhost>").startswith("250")
                assert c.cmd("RCPT TO:<root@localhost>").startswith("452 4.5.3"), pid
                c.close()
        # a broken file is refused by every worker, which keep the configuration they had
        (lst.config).write_text("smtpd_recipient_limit = -5\n")
        lst.proc.send_signal(signal.SIGHUP)
        wait_for("the refusals", lambda: lst.log().count("reload failed") == 3)
        assert lst.workers() == pids
        assert lst.stop() == 0


def test_a_killed_worker_is_replaced_and_its_connections_forgotten(
        tmp_path: Path, values: dict[str, object]) -> None:
    values.update(smtpd_client_connection_count_limit=1, mynetworks=["10.9.9.0/24"])
    with listener(tmp_path, values) as lst:
        a, b = pids = lst.workers(2)
        time.sleep(0.5)  # the readiness probe's session has ended
        with only(pids, a):
            held = Client(lst.port)  # the client's one connection, on worker a
        other = Client.__new__(Client)
        other.sock = socket.create_connection(("127.0.0.1", lst.port), timeout=TIMEOUT)
        other.buf = b""
        assert other.reply().startswith("421 4.7.0 host.example.test Error: too many "
                                        "connections")  # the limit holds across workers
        other.close()
        os.kill(a, signal.SIGKILL)
        # One snapshot per look, the same twice in a row: a child forked for a helper program
        # carries the listener's command line until it execs, and would pass for a worker.
        seen: list[list[int]] = [[]]

        def replaced() -> bool:
            pids = sorted(lst.workers())
            stable = pids == seen[0]
            seen[0] = pids
            return stable and len(pids) == 2 and b in pids and a not in pids

        wait_for("a new worker", replaced)
        (new,) = (p for p in seen[0] if p != b)
        assert f"worker process {a} exited with signal 9; starting a new one" in lst.log()
        with pytest.raises((EOFError, ConnectionResetError)):
            held.cmd("NOOP")  # its connection died with it ...
        held.close()
        with only([new, b], new):  # ... and no longer counts against the client
            c = Client(lst.port)
            assert owner(c, [new, b]) == new
            send(c, "after the restart")
            c.close()
        assert lst.stop() == 0
    assert len(entries(values)) == 1


def test_workers_stop_when_the_parent_is_gone(tmp_path: Path,
                                              values: dict[str, object]) -> None:
    with listener(tmp_path, values) as lst:
        pids = lst.workers(2)
        lst.proc.kill()
        lst.proc.wait(TIMEOUT)
        wait_for("the orphaned workers to stop", lambda: not any(alive(p) for p in pids))
        assert "master process gone, stopping" in lst.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_accepted_mail_is_delivered_without_a_queue_run(tmp_path: Path,
                                                        config_values: dict[str, object],
                                                        system_user: pwd.struct_passwd,
                                                        workers: int) -> None:
    """delivery_mode = background: the listener starts the runner itself (coalesced), so
    mail ends in the mailbox with no `sendmail -q`."""
    name = system_user.pw_name
    values = dict(config_values, delivery_mode="background", smtpd_workers=workers)
    mbox = Path(str(values["mail_spool_directory"])) / name
    with listener(tmp_path, values) as lst:
        for i in range(3):
            p = swaks(lst.port, "--from", "alice@remote.example", "--to", f"{name}@localhost",
                      "--header", f"Subject: background {i}", "--body", f"kicked {i}")
            assert p.returncode == 0, p.stdout + p.stderr
        wait_for("delivery", lambda: mbox.exists()
                 and all(f"kicked {i}".encode() in mbox.read_bytes() for i in range(3)))
        assert lst.stop() == 0
    assert mbox.read_bytes().count(b"\nFrom ") + mbox.read_bytes().startswith(b"From ") == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_changes_delivery_mode(tmp_path: Path, config_values: dict[str, object],
                                      system_user: pwd.struct_passwd, workers: int) -> None:
    """delivery_mode is read for each message: after SIGHUP to "background" accepted mail is
    delivered at once (with what waited in the queue), after SIGHUP back to "queue" it waits."""
    name = system_user.pw_name
    values = dict(config_values, delivery_mode="queue", smtpd_workers=workers)
    mbox = Path(str(values["mail_spool_directory"])) / name

    def message(i: int) -> None:
        c = Client(lst.port)
        send(c, f"mode {i}", rcpt=f"{name}@localhost")
        c.close()

    def reload(mode: str, times: int) -> None:
        write_toml(lst.config, dict(lst.values, delivery_mode=mode))
        lst.proc.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: lst.log().count("configuration reloaded") == times)

    with listener(tmp_path, values) as lst:
        lst.workers(workers if workers > 1 else None)
        message(0)
        time.sleep(1.5)
        assert not mbox.exists()
        reload("background", workers)
        message(1)
        wait_for("delivery", lambda: mbox.exists() and b"mode 0" in mbox.read_bytes()
                 and b"mode 1" in mbox.read_bytes())
        reload("queue", 2 * workers)
        message(2)
        time.sleep(1.5)
        assert b"mode 2" not in mbox.read_bytes()
        assert len(entries(values)) == 1
        assert lst.stop() == 0


# --- the shared table of connections per client ------------------------------------------------

def test_shared_client_table_counts_across_workers_and_forgets_a_dead_one() -> None:
    table = SharedClients(workers=2, slots=8)  # tiny: every address collides with others
    try:
        ips = [f"192.0.2.{i}" for i in range(1, 8)]
        for ip in ips:
            assert table.acquire(ip, 2) is True
        assert table.acquire("192.0.2.200", 2) is True  # the 8th row: full now
        assert table.acquire("198.51.100.1", 2) is None  # full: let in, not counted
        table.worker = 1
        assert table.acquire(ips[0], 2) is True
        assert table.acquire(ips[0], 2) is False  # 2 in all workers together
        assert table.acquire("::ffff:192.0.2.1", 2) is False  # the same client over IPv6
        assert table.acquire(ips[0], 0) is True  # 0: no limit
        # releasing and deleting keeps every other row reachable (backward-shift deletion)
        table.worker = 0
        for ip in ips[::2]:
            table.release(ip)
        for ip in ips[1::2]:
            assert table.acquire(ip, 1) is False, ip
        for ip in ips[::2][1:]:
            assert table.acquire(ip, 1) is True, ip
        table.forget(1)  # worker 1 died: ips[0] had only its connections
        assert table.acquire(ips[0], 1) is True
        assert table.acquire(ips[0], 1) is False
        assert table.acquire(ips[1], 1) is False  # worker 0's counts survive
    finally:
        table.close()


def test_shared_client_table_agrees_with_a_plain_count() -> None:
    import random

    rng = random.Random(7)
    table = SharedClients(workers=3, slots=16)
    model: dict[tuple[str, int], int] = {}  # (address, worker) -> connections
    try:
        for _ in range(5000):
            ip = f"10.0.0.{rng.randrange(24)}"
            table.worker = rng.randrange(3)
            total = sum(n for (a, _), n in model.items() if a == ip)
            if rng.random() < 0.55:
                got = table.acquire(ip, 4)
                live = {a for (a, _), n in model.items() if n}
                if ip not in live and len(live) == 16:
                    assert got is None
                else:
                    assert got is (total < 4), (ip, total)
                    if got:
                        model[ip, table.worker] = model.get((ip, table.worker), 0) + 1
            elif model.get((ip, table.worker)):
                table.release(ip)
                model[ip, table.worker] -= 1
            if rng.random() < 0.01:
                dead = rng.randrange(3)
                table.forget(dead)
                model = {k: (0 if k[1] == dead else n) for k, n in model.items()}
    finally:
        table.close()
