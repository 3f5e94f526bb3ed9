"""Submission through the installed sendmail: input rules, added headers, exact bytes, limits."""

import os
import pwd
from pathlib import Path

import pytest

from .conftest import Sendmail, tmpfs


def only_entry(sendmail: Sendmail):
    entries = sendmail.entries()
    assert len(entries) == 1, entries
    return entries[0]


def body_of(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[1]


def test_lone_dot_ends_input_without_i(sendmail: Sendmail) -> None:
    p = sendmail("u@x.test", input=b"Subject: t\n\nline1\n.\nline3\n")
    assert p.returncode == 0, p.stderr
    _, _, msg = only_entry(sendmail)
    assert body_of(msg) == b"line1\n"


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_dot_is_body_with_i(sendmail: Sendmail, flag: str) -> None:
    p = sendmail(flag, "u@x.test", input=b"Subject: t\n\nline1\n.\nline3\n..x\n")
    assert p.returncode == 0, p.stderr
    assert body_of(only_entry(sendmail)[2]) == b"line1\n.\nline3\n..x\n"


def test_crlf_becomes_lf_and_from_line_dropped(sendmail: Sendmail) -> None:
    data = b"From root Mon Jan  1 00:00:00 2024\r\nSubject: t\r\n\r\na\rb\r\nc\r\n"
    assert sendmail("-i", "u@x.test", input=data).returncode == 0
    msg = only_entry(sendmail)[2]
    assert b"\r\n" not in msg
    assert b"From root" not in msg
    assert b"\nSubject: t\n" in msg
    assert body_of(msg) == b"a\rb\nc\n"  # a bare CR is content, kept


def test_missing_headers_added_with_full_name(sendmail: Sendmail) -> None:
    assert sendmail("-F", "Cron Daemon", "-f", "cron@x.test", "u@x.test",
                    input=b"Subject: t\n\nb\n").returncode == 0
    state, env, msg = only_entry(sendmail)
    head = msg.split(b"\n\n", 1)[0].decode()
    assert state == "incoming"
    assert env.sender == "cron@x.test"
    assert "\nFrom: Cron Daemon <cron@x.test>" in head
    assert f"\nMessage-ID: <{env.id}@host.example.test>" in head
    assert "\nDate: " in head
    assert head.startswith("Received: by host.example.test (pymailtools, from userid ")


def test_existing_from_kept_and_f_name_unused(sendmail: Sendmail) -> None:
    data = b"From: Me <me@x.test>\nDate: x\nMessage-ID: <a@b>\n\nb\n"
    assert sendmail("-F", "Other", "u@x.test", input=data).returncode == 0
    head = only_entry(sendmail)[2].split(b"\n\n", 1)[0]
    assert head.count(b"\nFrom:") == 1 and b"Other" not in head
    assert head.count(b"Message-ID") == 1 and head.count(b"\nDate:") == 1


def test_full_name_cannot_inject_headers(sendmail: Sendmail) -> None:
    p = sendmail("-F", "Eve\nBcc: v@y.test", "u@x.test", input=b"Subject: t\n\nb\n")
    assert p.returncode == 0
    head = only_entry(sendmail)[2].split(b"\n\n", 1)[0]
    assert b"\nBcc:" not in head
    assert b'\nFrom: "Eve Bcc: v@y.test" <' in head


def test_t_reads_recipients_removes_bcc_and_adds_argv(sendmail: Sendmail) -> None:
    data = b"To: a@x.test, Bee <b@x.test>\nCc: c@y.test\nBcc: d@z.test\nSubject: t\n\nbody\n"
    assert sendmail("-t", "-i", "e@w.test", input=data).returncode == 0
    _, env, msg = only_entry(sendmail)
    assert sorted(r.address for r in env.recipients) == [
        "a@x.test", "b@x.test", "c@y.test", "d@z.test", "e@w.test"]
    assert b"Bcc" not in msg and b"d@z.test" not in msg


def test_t_uses_only_resent_headers_when_present(sendmail: Sendmail) -> None:
    data = b"To: a@x.test\nResent-To: r@x.test\nResent-Bcc: rb@x.test\n\nb\n"
    assert sendmail("-t", input=data).returncode == 0
    _, env, msg = only_entry(sendmail)
    assert sorted(r.address for r in env.recipients) == ["r@x.test", "rb@x.test"]
    assert b"Resent-Bcc" not in msg


def test_t_without_recipients_is_usage_error_nothing_queued(sendmail: Sendmail) -> None:
    p = sendmail("-t", input=b"Subject: t\n\nb\n")
    assert p.returncode == 64
    assert p.stderr.decode().strip() == "sendmail: no recipient addresses found in message header"
    assert sendmail.entries() == []
    assert not any(sendmail.queue_dir.joinpath("tmp").iterdir())


def test_no_recipients_is_usage_error(sendmail: Sendmail) -> None:
    p = sendmail(input=b"x")
    assert p.returncode == 64
    assert b"Recipient addresses must be specified" in p.stderr


def test_odd_bytes_stored_exactly(sendmail: Sendmail) -> None:
    long_line = b"x" * 5000 + b"\n"
    body = b"a\x00b\n" + long_line + b"\xff\xfe\xc3\x28\n" + b"y" * (1 << 20)
    assert sendmail("-i", "u@x.test", input=b"Subject: t\n\n" + body).returncode == 0
    assert body_of(only_entry(sendmail)[2]) == body


def test_empty_stdin_is_a_message(sendmail: Sendmail) -> None:
    assert sendmail("u@x.test", input=b"").returncode == 0
    msg = only_entry(sendmail)[2]
    assert b"\nFrom: " in msg and b"\nDate: " in msg and b"\nMessage-ID: " in msg


def test_body_without_headers_gets_separator(sendmail: Sendmail) -> None:
    assert sendmail("u@x.test", input=b"hello world\nsecond\n").returncode == 0
    assert body_of(only_entry(sendmail)[2]) == b"hello world\nsecond\n"


def test_message_over_size_limit_refused_nothing_queued(sendmail: Sendmail) -> None:
    before = sendmail.snapshot()
    p = sendmail("-i", "u@x.test", input=b"Subject: t\n\n" + b"z" * 3000,
                 env={"PYMAILTOOLS_MESSAGE_SIZE_LIMIT": "2000"})
    assert p.returncode == 69
    assert p.stderr.decode().strip() == "sendmail: message file too big"
    assert sendmail.snapshot() == before


def test_huge_header_is_bounded(sendmail: Sendmail) -> None:
    data = b"X-H: " + b"a" * 1_000_000 + b"\n" + b"".join(b"X-N: %d\n" % i for i in range(10000))
    p = sendmail("-i", "u@x.test", input=data + b"\nbody\n")
    assert p.returncode == 0, p.stderr
    assert only_entry(sendmail)[2].endswith(b"\nbody\n")


def test_ten_thousand_recipients(sendmail: Sendmail) -> None:
    rcpts = [f"u{i}@example.test" for i in range(10000)]
    p = sendmail(*rcpts, input=b"Subject: t\n\nb\n")
    assert p.returncode == 0, p.stderr
    _, env, _ = only_entry(sendmail)
    assert [r.address for r in env.recipients] == rcpts


def test_queue_files_are_private_under_umask_000(sendmail: Sendmail) -> None:
    old = os.umask(0)
    try:
        assert sendmail("u@x.test", input=b"x\n").returncode == 0
    finally:
        os.umask(old)
    q = sendmail.queue_dir
    for d in ("corrupt", "messages", "tmp", "history"):
        assert (q / d).stat().st_mode & 0o777 == 0o700
    for d in ("incoming", "deferred", "hold"):  # listable by every user (mailq), not readable
        assert (q / d).stat().st_mode & 0o777 == 0o755
    assert (q / "maildrop").stat().st_mode & 0o7777 == 0o1733
    for f in list((q / "messages").iterdir()) + list((q / "incoming").iterdir()):
        assert f.stat().st_mode & 0o777 == 0o600


def test_closed_stdio_puts_no_text_in_queue(sendmail: Sendmail, tmp_path: Path) -> None:
    import subprocess

    from .conftest import script

    def close_stdout_stderr() -> None:
        os.close(1)
        os.close(2)

    msg = tmp_path / "m"
    msg.write_bytes(b"Subject: t\n\nbody\n")
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(sendmail.config_file),
               PYMAILTOOLS_DELIVERY_MODE="queue")
    codes = []
    for argv in (["-f", "bad\x01x", "u@x.test"], ["u@x.test"]):
        with open(msg, "rb") as stdin:
            codes.append(subprocess.run([script("sendmail"), *argv], stdin=stdin, env=env,
                                        preexec_fn=close_stdout_stderr).returncode)
    assert codes == [64, 0]  # the error had nowhere to go, and did not go into the queue
    (_, _, data), = sendmail.entries()
    assert data.endswith(b"\n\nbody\n")
    assert b"sendmail" not in data.split(b"\n\n", 1)[1]


def test_full_disk_fails_cleanly_and_keeps_older_entries(tmp_path: Path) -> None:
    """ENOSPC while writing: exit 74 with one line, no partial entry, temp file gone."""
    import subprocess

    from .conftest import script

    with tmpfs(tmp_path, "256k") as mnt:
        env = dict(os.environ, PYMAILTOOLS_QUEUE_DIRECTORY=str(mnt / "q"),
                   PYMAILTOOLS_DELIVERY_MODE="queue", PYMAILTOOLS_SYSLOG="no",
                   PYMAILTOOLS_CONFIG=str(tmp_path / "none.toml"))
        (tmp_path / "none.toml").write_text("")
        first = subprocess.run([script("sendmail"), "u@x.test"], input=b"small\n", env=env,
                               capture_output=True)
        assert first.returncode == 0, first.stderr
        before = {p.name: p.read_bytes() for p in (mnt / "q" / "messages").iterdir()}
        p = subprocess.run([script("sendmail"), "-i", "u@x.test"], input=b"y" * (1 << 20),
                           env=env, capture_output=True)
        assert p.returncode == 74
        assert p.stderr.decode() == ("sendmail: cannot write queue file: "
                                     "No space left on device\n")
        assert {p.name: p.read_bytes() for p in (mnt / "q" / "messages").iterdir()} == before
        assert len(list((mnt / "q" / "incoming").iterdir())) == 1
        assert list((mnt / "q" / "tmp").iterdir()) == []


def test_unprivileged_user_cannot_run_but_can_list_root_queue(
        world_dir: Path, system_user: pwd.struct_passwd) -> None:
    """sendmail -q as an ordinary user on root's queue: exit 77; mailq (-bp) lists it."""
    import subprocess

    import pymailtools.admin.listing  # noqa: F401
    import pymailtools.cli.mailq  # noqa: F401  (the child cannot read /root's interpreter)
    import pymailtools.qmgr.runner  # noqa: F401
    from tests.support.cli import submit_as

    from .conftest import script

    cfg = world_dir / "config.toml"
    cfg.write_text(f'queue_directory = "{world_dir}/q"\nsyslog = false\n'
                   'delivery_mode = "queue"\n')
    cfg.chmod(0o644)
    env = dict(os.environ, PYMAILTOOLS_CONFIG=str(cfg))
    assert subprocess.run([script("sendmail"), "u@x.test"], input=b"x\n",
                          env=env).returncode == 0
    stdin = world_dir / "empty"
    stdin.write_bytes(b"")
    stdin.chmod(0o644)
    assert submit_as(system_user, cfg, ["-q"], stdin) == 77
    assert submit_as(system_user, cfg, ["-bp"], stdin) == 0


def test_symlinked_queue_directory_refused(tmp_path: Path) -> None:
    """A queue directory that is a symlink (to /etc, say) is refused, nothing written."""
    import subprocess

    from .conftest import script

    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "q").symlink_to(target)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'queue_directory = "{tmp_path / "q"}"\nsyslog = false\n')
    p = subprocess.run([script("sendmail"), "u@x.test"], input=b"x\n", capture_output=True,
                       env=dict(os.environ, PYMAILTOOLS_CONFIG=str(cfg)))
    assert p.returncode == 78
    assert p.stderr.decode().count("\n") == 1 and "symlink" in p.stderr.decode()
    assert list(target.iterdir()) == []


def test_dash_C_names_the_configuration_file(sendmail: Sendmail, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(f'queue_directory = "{tmp_path / "otherq"}"\nsyslog = false\n'
                     'delivery_mode = "queue"\n')
    p = sendmail("-C", str(other), "u@x.test", input=b"x\n")
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "otherq" / "incoming").iterdir())) == 1
    assert sendmail.entries() == []
