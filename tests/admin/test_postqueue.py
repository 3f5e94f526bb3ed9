"""postqueue and mailq as commands: modes, usage, hostile arguments, selectors, --explain."""

import json
import os
import pwd
import time
from pathlib import Path

import pytest

from pymailtools.queue.envelope import Recipient
from pymailtools.queue.store import Attempt, Queue
from tests.conftest import Sendmail, run_as, script
from tests.support.cli import run
from tests.support.queue import deferred, put

USAGE = ("postqueue: fatal: usage: postqueue -f | postqueue -i queueid | postqueue -j | "
         "postqueue -p | postqueue -s site\n")


@pytest.fixture
def queue(sendmail: Sendmail) -> Queue:
    q = Queue(str(sendmail.queue_dir))
    q.ensure()
    return q


def test_p_equals_mailq_equals_bp_and_j_is_json(queue: Queue, sendmail: Sendmail) -> None:
    put(queue, "Aa1", "s@x.test", [deferred("r@gmail.com")])
    put(queue, "Bb2", "", [deferred("t@y.test")], state="hold")
    p = run("postqueue", "-p")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout == run("mailq").stdout == sendmail("-bp").stdout.decode()
    assert p.stdout == run("mailq", "--plain").stdout
    assert p.stdout.startswith("----Queue ID-----") and "Bb2!" in p.stdout
    j = run("postqueue", "-j").stdout.splitlines()
    assert [json.loads(x)["queue_id"] for x in j] == ["Aa1", "Bb2"]
    assert run("mailq", "--json").stdout.splitlines() == j


def test_usage_errors_are_64_with_postfix_text(queue: Queue) -> None:
    for argv in ([], ["-p", "-j"], ["-p", "extra"], ["-f", "-p"]):
        p = run("postqueue", *argv)
        assert (p.returncode, p.stderr) == (64, USAGE), argv
    assert run("postqueue", "-x").stderr == "postqueue: fatal: invalid option -- 'x'\n"
    assert run("postqueue", "-f", "--to", "x").returncode == 64


@pytest.mark.parametrize(("argv", "text"), [
    (["-i", "ID;rm -rf /"], 'Cannot flush queue ID - invalid name: "ID;rm -rf /"'),
    (["-i", "../x"], 'Cannot flush queue ID - invalid name: "../x"'),
    (["-i", "A\n"], 'Cannot flush queue ID - invalid name: "A?"'),
    (["-s", "$(id)"], 'Cannot flush mail queue - invalid destination: "$(id)"'),
    (["-s", "bad site!"], 'Cannot flush mail queue - invalid destination: "bad site!"'),
])
def test_hostile_arguments_exit_64_and_run_nothing(queue: Queue, tmp_path: Path,
                                                   argv: list[str], text: str) -> None:
    """Hostile arguments exit 64: nothing is executed, nothing delivered."""
    put(queue, "Keep1", "s@x.test", [Recipient("nobody@host.example.test")], state="incoming")
    p = run("postqueue", *argv)
    assert (p.returncode, p.stderr) == (64, f"postqueue: fatal: {text}\n")
    assert queue.ids("incoming") == ["Keep1"] and queue.history("Keep1") == []


def test_flush_and_i_run_the_queue(queue: Queue, sendmail: Sendmail) -> None:
    """-i ID, -s SITE and -f deliver now what is not due yet (here: a local user that does
    not exist, from the null sender, so the entry ends bounced with no notice and no network);
    -i of a missing id is silent, as in Postfix."""
    def entry(qid: str) -> str:
        return put(queue, qid, "", [Recipient("nosuchuser9@host.example.test",
                                              state="deferred", next_try=time.time() + 9999)],
                   arrival=time.time())  # a fixed old arrival would expire and bounce

    a, b, c = entry("Fl1"), entry("Fl2"), entry("Fl3")
    assert run("postqueue", "-i", "NoSuch1").returncode == 0
    p = run("postqueue", "-i", a)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert queue.ids("deferred") == [b, c]
    assert run("postqueue", "-s", "other.example").returncode == 0
    assert queue.ids("deferred") == [b, c]
    assert run("sendmail", "-q").returncode == 0  # not due: sendmail -q leaves them
    assert queue.ids("deferred") == [b, c]
    assert run("postqueue", "-s", "host.example.test").returncode == 0
    assert queue.ids("deferred") == []
    entry("Fl4")
    assert run("postqueue", "-f").returncode == 0
    assert queue.ids("deferred") == []


def test_c_names_the_configuration(queue: Queue, config_file: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    put(queue, "Cc1", "s@x.test", [deferred("r@y.test")])
    monkeypatch.delenv("PYMAILTOOLS_CONFIG")
    for where in (str(config_file), str(config_file.parent)):
        assert "Cc1" in run("postqueue", "-c", where, "-p").stdout


def test_selectors_on_mailq_and_postqueue(queue: Queue) -> None:
    now = time.time()
    put(queue, "Old1", "spammer@example.com", [deferred("a@gmail.com")], arrival=now - 7200)
    put(queue, "New1", "x@y.test", [deferred("b@gmail.com")], arrival=now)
    put(queue, "Oth1", "x@y.test", [deferred("c@example.org")], arrival=now)
    out = run("mailq", "--to", "@gmail.com", "--json").stdout.splitlines()
    assert sorted(json.loads(x)["queue_id"] for x in out) == ["New1", "Old1"]
    p = run("mailq", "--from", "spammer@example.com", "--older-than", "1h")
    assert "Old1" in p.stdout and p.stdout.endswith("in 1 Request.\n")
    p = run("postqueue", "-j", "--newer-than=1h", "--to", "@example.org")
    assert [json.loads(x)["queue_id"] for x in p.stdout.splitlines()] == ["Oth1"]
    assert run("mailq", "--queue", "hold").stdout == "Mail queue is empty\n"
    assert run("mailq", "--older-than", "whenever").returncode == 64
    assert run("mailq", "--bogus").returncode == 64


def test_explain_shows_the_attempt_history(queue: Queue) -> None:
    qid = put(queue, "Ex1", "s@x.test", [Recipient("r@y.test", state="deferred", attempts=2,
                                                   reason="host mx[192.0.2.1] said: 450 busy"),
                                         Recipient("done@y.test", state="sent", attempts=1)])
    queue.add_history(qid, Attempt(1795391343.0, "r@y.test", "mx[192.0.2.1]:25", "deferred",
                                   "4.0.0", "host mx[192.0.2.1] said: 450 busy"))
    queue.add_history(qid, Attempt(1795391400.0, "done@y.test", "local", "sent", "2.0.0",
                                   "delivered to mailbox\x1b[2J"))
    p = run("mailq", "--explain", qid)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Ex1: deferred, 262 bytes, arrived ")
    assert lines[1].startswith("  r@y.test: deferred, 2 attempts")
    assert "relay=mx[192.0.2.1]:25 deferred 4.0.0 host mx[192.0.2.1] said: 450 busy" in lines[3]
    assert "\x1b" not in p.stdout and "mailbox?[2J" in p.stdout
    j = json.loads(run("mailq", "--explain", qid, "--json").stdout)
    assert [len(r["history"]) for r in j["recipients"]] == [1, 1]
    assert j["recipients"][0]["history"][0]["relay"] == "mx[192.0.2.1]:25"
    assert run("mailq", "--explain", "NoSuch1").returncode == 66
    assert run("mailq", "--explain", "../x").returncode == 64


def test_table_on_a_terminal(queue: Queue, sendmail: Sendmail) -> None:
    """On a terminal: a table (id, state, age, size, sender, recipients, reason); markup in
    a sender is text, not style; --plain keeps Postfix's format."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    put(queue, "Tt1", "[bold]x@y.test", [deferred("r@gmail.com")], arrival=time.time() - 7200)

    def on_tty(*args: str) -> str:
        pid, fd = pty.fork()
        if pid == 0:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
            # pytest exports COLUMNS=80, which rich would prefer to the terminal's size
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            os.execve(script("mailq"), ["mailq", *args], env)  # noqa: S606
        out = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        return re.sub(r"\x1b\[[0-9;]*m", "", out.decode())

    table = on_tty()
    assert "Queue ID" in table and "Tt1" in table and "deferred" in table and "2h" in table
    assert "[bold]x@y.test" in table and "connect to 127.0.0.1" in table
    assert "-- 0 Kbytes in 1 Request." in table
    assert on_tty("--plain").replace("\r\n", "\n") == run("mailq").stdout


def test_ordinary_user_lists_but_cannot_flush_root_queue(world_dir: Path,
                                                         system_user: pwd.struct_passwd) -> None:
    import pymailtools.admin.listing  # noqa: F401
    import pymailtools.cli.postqueue  # noqa: F401  (the child cannot read /root's interpreter)

    q = Queue(str(world_dir / "q"))
    q.ensure()
    put(q, "Rq1", "s@x.test", [deferred("r@y.test")])
    cfg = world_dir / "config.toml"
    cfg.write_text(f'queue_directory = "{q.root}"\nsyslog = false\n')
    cfg.chmod(0o644)
    from pymailtools.cli.postqueue import main

    assert run_as(system_user, lambda: main(["-j"]), config=cfg, quiet=True) == 0
    status = run_as(system_user, lambda: 1 if main(["-f"]) == 77 else 2, config=cfg, quiet=True)
    assert status == 1, "postqueue -f should exit 77"
    assert q.ids("deferred") == ["Rq1"]
