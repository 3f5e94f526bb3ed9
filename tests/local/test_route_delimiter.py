"""recipient_delimiter in local routing: user+tag is delivered to user, ~/.forward+tag is read
before ~/.forward, aliases are looked up with the extension, then without."""

import os
import pwd
from pathlib import Path

from pymailtools.config import Config
from pymailtools.local import route
from pymailtools.local.targets import Mailbox, Remote
from tests.conftest import Sendmail, write_toml

User = pwd.struct_passwd


def cfg(config_values: dict[str, object], **keys: object) -> Config:
    return Config({**config_values, "recipient_delimiter": "+", **keys})


def forward_file(user: User, name: str, text: str) -> None:
    path = Path(user.pw_dir) / name
    path.write_text(text)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, 0o644)


def test_extension_delivers_to_the_user(config_values: dict[str, object],
                                        system_user: User) -> None:
    name = system_user.pw_name
    config = cfg(config_values)
    assert route.resolve(config, f"{name}+news@host.example.test") == [Mailbox(name)]
    # without a delimiter configured, user+news is nobody
    assert route.resolve(config, f"{name}@localhost") == [Mailbox(name)]


def test_forward_with_extension_first(config_values: dict[str, object],
                                      system_user: User) -> None:
    name = system_user.pw_name
    config = cfg(config_values)
    forward_file(system_user, ".forward+lists", "lists@archive.test\n")
    forward_file(system_user, ".forward", "everything@else.test\n")
    assert route.resolve(config, f"{name}+lists@localhost") == [Remote("lists@archive.test")]
    assert route.resolve(config, f"{name}+other@localhost") == [Remote("everything@else.test")]
    assert route.resolve(config, f"{name}@localhost") == [Remote("everything@else.test")]
    note = route.explain(config, f"{name}+lists@localhost")
    assert "forwarded to lists@archive.test" in note
    assert f"recipient_delimiter: {name}+lists -> {name} (extension lists)" in note


def test_aliases_with_then_without_extension(config_values: dict[str, object],
                                             system_user: User) -> None:
    name = system_user.pw_name
    config = cfg(config_values)
    Path(config.alias_maps[0]).write_text(f"team+sales: sales@x.test\nteam: {name}\n")
    assert route.resolve(config, "team+sales@localhost") == [Remote("sales@x.test")]
    assert route.resolve(config, "team+support@localhost") == [Mailbox(name)]


def test_delimiter_set_and_exceptions(config_values: dict[str, object],
                                      system_user: User) -> None:
    name = system_user.pw_name
    config = cfg(config_values, recipient_delimiter="+-")
    assert route.resolve(config, f"{name}-x+y@localhost") == [Mailbox(name)]
    Path(config.alias_maps[0]).write_text(f"owner-list: {name}\n")
    assert route.resolve(config, "owner-list@localhost") == [Mailbox(name)]  # never split


def test_sendmail_to_user_plus_tag_reaches_the_mailbox(tmp_path: Path, spool: Path,
                                                       config_values: dict[str, object],
                                                       system_user: User) -> None:
    name = system_user.pw_name
    path = write_toml(tmp_path / "delim.toml", {**config_values, "recipient_delimiter": "+"})
    sendmail = Sendmail(path, Path(str(config_values["queue_directory"])))
    assert sendmail(f"{name}+tag", input=b"Subject: tagged\n\nbody\n").returncode == 0
    p = sendmail("-q")
    assert p.returncode == 0, p.stderr
    box = (spool / name).read_bytes()
    assert b"Subject: tagged" in box
    assert f"Delivered-To: {name}+tag@host.example.test".encode() in box
