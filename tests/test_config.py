"""Configuration: defaults, files, variables, and one-line errors naming the key (exit 78)."""

import os
import subprocess
from pathlib import Path

import pytest

from pymailtools import config
from pymailtools.errors import ConfigError

from .conftest import script


def test_defaults_follow_postfix() -> None:
    c = config.Config({"myhostname": "mx.example.test"})
    assert c.minimal_backoff_time == 300
    assert c.maximal_backoff_time == 4000
    assert c.maximal_queue_lifetime == 5 * 86400
    assert c.bounce_queue_lifetime == 5 * 86400
    assert c.message_size_limit == 10240000
    assert c.delivery_mode == "background"
    assert c.myorigin == "mx.example.test"
    assert c.mydomain == "example.test"
    assert set(c.mydestination) == {"mx.example.test", "mx", "localhost", "localhost.localdomain"}
    assert c.is_local_domain("LOCALHOST.")
    assert not c.is_local_domain("example.test")


@pytest.mark.parametrize(("text", "seconds"), [("300s", 300), ("5d", 432000), ("1h30m", 5400),
                                                ("90", 90), (60, 60), ("1w", 604800)])
def test_durations(text: object, seconds: int) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("key", "value"),
    [("maximal_queue_lifetime", "forever"), ("message_size_limit", -5),
     ("delivery_mode", "sometimes"), ("queue_directory", "relative/path"),
     ("mydestination", 5), ("syslog", "maybe"), ("smtpd_workers", 100000)],
)
def test_bad_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        config.Config({key: value})
    assert key in str(e.value)
    assert e.value.exit_code == 78


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('myhostname = "a.test"\nmessage_size_limit = 100\nrelay_host = "x"\n')
    c = config.load(str(f), environ={"PYMAILTOOLS_MESSAGE_SIZE_LIMIT": "200"})
    assert c.myhostname == "a.test"
    assert c.message_size_limit == 200
    assert any("relay_host" in w for w in c.warnings)


def test_pymailtools_config_replaces_other_files(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('myhostname = "only.test"\n')
    c = config.load(environ={"PYMAILTOOLS_CONFIG": str(f)})
    assert c.myhostname == "only.test"


def test_syntax_error_reports_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('\n\nmyhostname = "x"\nbroken = = 3\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f), environ={})
    assert str(e.value).startswith(f"{f}:4: ")


def test_sendmail_exits_78_with_one_line(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('maximal_queue_lifetime = "forever"\n')
    p = subprocess.run([script("sendmail"), "root"], input=b"x", capture_output=True,
                       env=dict(os.environ, PYMAILTOOLS_CONFIG=str(f)))
    assert p.returncode == 78
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and "maximal_queue_lifetime" in lines[0]
    assert lines[0].startswith("sendmail: ")


def test_root_refuses_unsafe_config(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the ownership rule applies to root")
    f = tmp_path / "c.toml"
    f.write_text('myhostname = "x.test"\n')
    os.chmod(f, 0o666)
    with pytest.raises(ConfigError) as e:
        config.load(str(f), environ={})
    assert "unsafe permissions" in str(e.value)
    os.chmod(f, 0o644)
    os.chown(f, 1000, 1000)
    with pytest.raises(ConfigError):
        config.load(str(f), environ={})


def test_fast_reader_never_disagrees_with_tomllib() -> None:
    """The hot path's flat-file reader returns what tomllib returns, or defers (None)."""
    import random
    import tomllib

    pieces = ['"a"', "'b'", '"x\\\\y"', "12", "-3", "007", "1_000", "true", "false", "1.5",
              '["a", "b"]', "['a',]", "[]", '[ "a" , \'b\' ]', '["a" "b"]', '"""m"""', "''",
              '""', '"é ü"', '"a#b"', "# c", "#", "=", "[t]", "x.y", '"k"', "\t", " ", "\r",
              "1979-05-27", "inf", "0x1F", '"\x01"', "[1, 2]", '"unterminated', "tru",
              '"a\x7fb"', "# c\x7f", "#\tc\t", "# \x01", '"\u00a0\u2028"']
    rng = random.Random(7)
    agreed = deferred = 0
    for _ in range(20000):
        lines = []
        for _ in range(rng.randint(0, 4)):
            key = rng.choice(["queue_directory", "a", "b-c", "x_1", "a", "k k", ""])
            line = f"{key} = {rng.choice(pieces)}"
            if rng.random() < 0.3:
                line += " " + rng.choice(pieces)
            lines.append(rng.choice([line, line, "# comment", "", rng.choice(pieces)]))
        text = "\n".join(lines)
        fast = config.fast_toml(text)
        if fast is None:
            deferred += 1
            continue
        assert fast == tomllib.loads(text), text
        agreed += 1
    assert agreed > 1000 and deferred > 1000


def test_fast_reader_takes_a_typical_file() -> None:
    text = ('# pymailtools\nmyhostname = "mx.example.org"   # FQDN\nmydestination = '
            '["mx.example.org", "localhost"]\nmessage_size_limit = 20480000\n'
            "syslog = true\nmaximal_queue_lifetime = '3d'\n")
    assert config.fast_toml(text) == {
        "myhostname": "mx.example.org", "mydestination": ["mx.example.org", "localhost"],
        "message_size_limit": 20480000, "syslog": True, "maximal_queue_lifetime": "3d"}
