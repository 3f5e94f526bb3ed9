"""mua.mailrc: s-nail's resource files (system file, ~/.mailrc, accounts, quoting, -S on top)."""

from pathlib import Path

import pytest

from pymailtools.errors import ConfigError
from pymailtools.mua import mailrc


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("MAILX_NO_SYSTEM_RC", raising=False)
    return tmp_path / "mail.rc", tmp_path / "mailrc"


def load(files: tuple[Path, Path], command_line: dict[str, str] | None = None,
         **kwargs: object) -> dict[str, str]:
    system, user = files
    return mailrc.load(command_line or {}, system_file=str(system), user_file=str(user),
                       **kwargs)  # type: ignore[arg-type]


def test_system_then_user_then_command_line(files: tuple[Path, Path]) -> None:
    system, user = files
    system.write_text("set a=system b=system hold\n")
    user.write_text("set b=user c=user\nunset hold\n")
    assert load(files, {"c": "cmd"}) == {"a": "system", "b": "user", "c": "cmd"}
    # -n: the system file is skipped
    assert load(files, system=False) == {"b": "user", "c": "user"}


def test_mailx_no_system_rc_in_the_environment(files: tuple[Path, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files[0].write_text("set a=system\n")
    monkeypatch.setenv("MAILX_NO_SYSTEM_RC", "1")
    assert load(files) == {}


def test_missing_files_are_nothing(files: tuple[Path, Path]) -> None:
    assert load(files) == {}


def test_old_style_quoting(files: tuple[Path, Path]) -> None:
    files[1].write_text(
        "  # a comment\n"
        "set from=\"Me <me@x.test>\" 'password=a b$c' x=a\\ b\n"
        "set multi=one \\\n    two=2\n"
        "se nohold\n"
        'set q="say \\"hi\\""\n')
    assert load(files, {"hold": ""}) == {
        "from": "Me <me@x.test>", "password": "a b$c", "x": "a b", "multi": "one",
        "two": "2", "hold": "", "q": 'say "hi"'}
    assert "hold" not in load(files)


def test_shell_style_quoting_with_v15_compat_or_wysh(files: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYHOST", "mx.example.test")
    files[1].write_text(
        "set v15-compat=yes\n"
        "set mta=smtp://$MYHOST pw=$'a\\tb' lit='$MYHOST' # a comment\n"
        "set a=1; set b=\"${MYHOST}:587\"\n")
    got = load(files)
    assert (got["mta"], got["pw"], got["lit"], got["a"], got["b"]) == (
        "smtp://mx.example.test", "a\tb", "$MYHOST", "1", "mx.example.test:587")
    files[1].write_text("wysh set x=$'\\x'\nset y=$MYHOST\n")
    assert load(files)["y"] == "$MYHOST"  # old style: $ is a plain character


def test_accounts_run_only_when_chosen(files: tuple[Path, Path]) -> None:
    files[1].write_text("set from=me@home.test\n"
                        "account Work {\n  set from=me@work.test mta=smtps://mx.work.test\n}\n"
                        "define hook {\n  set from=never\n}\n")
    assert load(files) == {"from": "me@home.test"}
    assert load(files, account="work") == {"from": "me@work.test",
                                           "mta": "smtps://mx.work.test"}
    assert load(files, {"from": "cmd@x.test"}, account="Work")["from"] == "cmd@x.test"
    with pytest.raises(ConfigError, match="account nosuch is not defined"):
        load(files, account="nosuch")


def test_other_commands_are_skipped_and_if_blocks_warned_once(
        files: tuple[Path, Path]) -> None:
    files[1].write_text("alias team a@x b@x\nignore received\nretain date\nheaderpick x\n"
                        "if t\n  set a=1\n  if r\n    set b=2\n  endif\nendif\nset c=3\n"
                        "if r\n set d=4\nendif\n")
    warnings: list[str] = []
    assert load(files, warn=warnings.append) == {"c": "3"}
    assert len(warnings) == 1 and "if/endif" in warnings[0] and ":5:" in warnings[0]


def test_source_and_unset_from_the_command_line(files: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    (tmp_path / "more.rc").write_text("set more=yes save\n")
    files[1].write_text(f"source {tmp_path / 'more.rc'}\n")
    assert load(files, unset=frozenset({"save"})) == {"more": "yes"}
    files[1].write_text(f"source {tmp_path / 'missing.rc'}\n")
    with pytest.raises(ConfigError, match="missing.rc"):
        load(files)


def test_an_unterminated_quote_skips_the_line_with_a_warning(files: tuple[Path, Path]) -> None:
    files[1].write_text("set a='open\nset b=2\n")
    warnings: list[str] = []
    assert load(files, warn=warnings.append) == {"b": "2"}
    assert "unterminated" in warnings[0]
