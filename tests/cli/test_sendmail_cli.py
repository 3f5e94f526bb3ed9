"""sendmail's command line: Postfix's getopt semantics, real callers' argv, exit codes."""

import pytest

from pymailtools.cli.common import getopt
from pymailtools.cli.sendmail import OPTSTRING, parse
from pymailtools.errors import UsageError
from tests.conftest import Sendmail

CRON_MSG = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> ls\n"
            b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
            b"Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n\nfile1\nfile2\n")
FULL_MSG = b"From: a@x.test\nTo: to@example.com\nSubject: s\n\nbody\n.\nafter dot\n"

# (caller, argv, stdin, envelope recipients expected); argv exactly as each caller runs sendmail.
CALLERS = [
    ("debian cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], CRON_MSG,
     ["root@host.example.test"]),
    ("old debian cron", ["-i", "-FCronDaemon", "-B8BITMIME", "-oem", "a@x.test,b@y.test"],
     CRON_MSG, ["a@x.test", "b@y.test"]),
    ("cronie", ["-FCronDaemon", "-i", "-odq", "-oem", "-oi", "-t", "-f", "root"], CRON_MSG,
     ["root@host.example.test"]),
    ("php mail()", ["-t", "-i", "-f", "bounce@example.com"],
     b"To: to@example.com\r\nSubject: s\r\n\r\nbody\r\n", ["to@example.com"]),
    ("git send-email", ["-f", "me@x.test", "-i", "a@x.test", "b@y.test"], FULL_MSG,
     ["a@x.test", "b@y.test"]),
    ("logwatch", ["-t"], b"To: root\nFrom: logwatch\nSubject: Logwatch\n\nreport\n",
     ["root@host.example.test"]),
    ("mdadm", ["-t"], b"From: mdadm monitoring <root>\nTo: root\nSubject: Fail\n\nmd0\n",
     ["root@host.example.test"]),
    ("mutt", ["-oem", "-oi", "-f", "alice@example.org", "-N", "failure,delay", "-R", "hdrs",
              "--", "to@example.com", "cc@example.net", "bcc@example.net"], FULL_MSG,
     ["to@example.com", "cc@example.net", "bcc@example.net"]),
    ("mutt default", ["-oem", "-oi", "--", "to@example.com"], FULL_MSG, ["to@example.com"]),
    ("atd", ["-i", "root"], b"Subject: Output from your job 1\nTo: root\n\nout\n",
     ["root@host.example.test"]),
    ("bsd atrun", ["-F", "Atrun Service", "-odq", "-oem", "-t"], b"To: root\n\nout\n",
     ["root@host.example.test"]),
    ("sudo", ["-t"], b"To: root\nFrom: root\nSubject: *** SECURITY ***\n\nx\n",
     ["root@host.example.test"]),
    ("fail2ban", ["-f", "fail2ban@host", "root@localhost"], b"Subject: ban\n\nip\n",
     ["root@localhost"]),
    ("ruby mail gem", ["-i", "-f", "from@x.test", "--", "to@y.test"], FULL_MSG, ["to@y.test"]),
    ("old ruby mail gem", ["-i", "-t", "-f", "from@x.test", "extra@y.test"], FULL_MSG,
     ["to@example.com", "extra@y.test"]),
    ("bsd-mailx", ["-i", "-t", "-f", "me@x.test"], b"To: a@x.test\nBcc: b@x.test\n\nhi\n",
     ["a@x.test", "b@x.test"]),
    ("s-nail", ["-i", "-F", "Me", "-f", "me@x.test", "--", "a@x.test"], FULL_MSG, ["a@x.test"]),
    ("mailutils", ["-oi", "-f", "root@host", "-t"], b"To: a@x.test\n\nhi\n", ["a@x.test"]),
    ("unattended-upgrades", ["-oi", "-t"], b"To: root\nSubject: upgrades\n\nok\n",
     ["root@host.example.test"]),
]


@pytest.mark.parametrize(("caller", "argv", "stdin", "rcpts"), CALLERS, ids=[c[0] for c in CALLERS])
def test_real_callers(sendmail: Sendmail, caller: str, argv: list[str], stdin: bytes,
                      rcpts: list[str]) -> None:
    p = sendmail(*argv, input=stdin)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""
    (state, env, msg), = sendmail.entries()
    assert sorted(r.address for r in env.recipients) == sorted(rcpts)
    assert b"\nBcc:" not in msg
    assert b"\r" not in msg
    if "-i" in argv or "-oi" in argv:
        assert msg.endswith(stdin.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1])


def test_no_permutation_option_after_recipient_is_a_recipient() -> None:
    req = parse(["sendmail", "foo@example.net", "-f", "bar@example.org"])
    assert req.recipients == ["foo@example.net", "-f", "bar@example.org"]
    assert req.sender is None


def test_getopt_bundles_and_attached_arguments() -> None:
    args = ["-it", "-fuser@host", "-FCron Daemon", "-odi", "-B8BITMIME", "-q1h", "r"]
    opts, first = getopt(args, OPTSTRING)
    assert opts == [("i", ""), ("t", ""), ("f", "user@host"), ("F", "Cron Daemon"),
                    ("o", "di"), ("B", "8BITMIME"), ("q", "1h")]
    assert args[first:] == ["r"]
    assert getopt(["-q", "-v"], OPTSTRING) == ([("q", ""), ("v", "")], 2)
    assert getopt(["-f", "a@b", "-", "x"], OPTSTRING) == ([("f", "a@b")], 2)


def test_o_x_value_consumes_only_x_like_postfix() -> None:
    req = parse(["sendmail", "-o", "x", "value", "r@x.test"])
    assert req.recipients == ["value", "r@x.test"]


def test_double_dash_ends_options() -> None:
    assert parse(["sendmail", "--", "-oi@x.test"]).recipients == ["-oi@x.test"]


@pytest.mark.parametrize("argv", [["-Z", "x"], ["-f"], ["-B", "bogus", "x"], ["-bt"],
                                  ["-bp", "extra@example.net"], ["-qSexample.net"],
                                  ["-q", "extra@x.test"], ["-qI"], ["-t", "-bv", "a@x.test"]])
def test_usage_errors_exit_64(sendmail: Sendmail, argv: list[str]) -> None:
    p = sendmail(*argv, input=b"x")
    assert p.returncode == 64, p.stderr
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail: ")
    assert sendmail.entries() == []


@pytest.mark.parametrize(
    "argv",
    [["-f", "a@x.test\r\nRCPT TO:<v@y.test>", "u@x.test"], ["-f", "-oQ/tmp", "u@x.test"],
     ["u@x.test\nBcc: v@y.test"], ["--", "-oQ/tmp"]],
)
def test_unsafe_addresses_exit_64_nothing_queued(sendmail: Sendmail, argv: list[str]) -> None:
    before = sendmail.snapshot()
    p = sendmail(*argv, input=b"Subject: t\n\nb\n")
    assert p.returncode == 64, p.stderr
    assert sendmail.snapshot() == before


def test_ignored_options_are_accepted(sendmail: Sendmail) -> None:
    argv = ["-n", "-X", "/var/www/x.php", "-oQ/tmp", "-G", "-U", "-m", "-c", "-x", "-h", "5",
            "-L", "lbl", "-O", "a=b", "-Am", "-e", "x", "-p", "UUCP:h", "-V", "envid1",
            "-o7", "u@x.test"]
    p = sendmail(*argv, input=b"Subject: t\n\nb\n")
    assert p.returncode == 0, p.stderr
    (_, env, _), = sendmail.entries()
    assert env.envid == "envid1"
    assert not (sendmail.queue_dir.parent / "x.php").exists()


def test_bad_n_value_warns_and_queues(sendmail: Sendmail) -> None:
    p = sendmail("-N", "bogus", "x@example.net", input=b"m\n")
    assert p.returncode == 0
    assert p.stderr.decode().splitlines() == [
        'sendmail: warning: unknown DSN NOTIFY command value "bogus" in "bogus"',
        "sendmail: warning: bad -N option value -- ignored"]
    (_, env, _), = sendmail.entries()
    assert env.recipients[0].notify == ""


def test_n_and_r_stored(sendmail: Sendmail) -> None:
    assert sendmail("-N", "success,failure", "-R", "full", "x@example.net",
                    input=b"m\n").returncode == 0
    (_, env, _), = sendmail.entries()
    assert env.recipients[0].notify == "success,failure" and env.ret == "full"


@pytest.mark.parametrize("argv", [["-bh"], ["-bH"], ["-q30m"], ["-q1h30m"]])
def test_modes_that_exit_zero_without_reading_stdin(sendmail: Sendmail, argv: list[str]) -> None:
    p = sendmail(*argv, input=b"")
    assert p.returncode == 0 and p.stderr == b""
    assert sendmail.entries() == []


def test_bp_lists_queue(sendmail: Sendmail) -> None:
    assert sendmail("-bp").stdout == b"Mail queue is empty\n"
    assert sendmail("-f", "s@x.test", "r@y.test", input=b"m\n").returncode == 0
    out = sendmail("-bp").stdout.decode().splitlines()
    assert out[0].startswith("----Queue ID-----")
    assert out[1].endswith(" s@x.test") and out[2] == " " * 47 + "r@y.test"
    assert out[-1] == "-- 0 Kbytes in 1 Request."


def test_bv_reports_and_delivers_nothing(sendmail: Sendmail) -> None:
    p = sendmail("-bv", "root", "nosuchuser12345")
    assert p.returncode == 67, p.stderr
    out = p.stdout.decode()
    assert "root@host.example.test" in out and "nosuchuser12345@host.example.test" in out
    assert "unknown user" in out
    assert sendmail.entries() == []


def test_unknown_option_message() -> None:
    with pytest.raises(UsageError) as e:
        parse(["sendmail", "-Z"])
    assert str(e.value) == "invalid option -- 'Z'"


def test_bi_reports_bad_alias_lines(sendmail: Sendmail, config_values: dict[str, object]) -> None:
    from pathlib import Path

    aliases = Path(str(config_values["alias_maps"][0]))  # type: ignore[index]
    aliases.write_text("postmaster: root\nbroken line\n")
    p = sendmail("-bi")
    assert p.returncode == 0
    assert p.stderr.decode().splitlines() == [
        f"sendmail: warning: {aliases}:2: missing colon after the name: 'broken line'"]
