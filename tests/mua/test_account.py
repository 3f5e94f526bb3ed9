"""mua.account: s-nail's URL, variable chains, .netrc and the Policy they make (no network)."""

import os
import signal
from pathlib import Path

import pytest

from pymailtools import config as configmod
from pymailtools.errors import ConfigError, UsageError
from pymailtools.mua import account
from tests.conftest import need_root

HOST, PORT = "smtp.provider.test", 587


@pytest.fixture
def cfg(config_file: Path) -> configmod.Config:
    return configmod.load()


@pytest.fixture
def netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(path))
    return path


def test_url_user_is_percent_decoded_and_the_password_never_shown() -> None:
    url = account.parse_url("smtps://me%40provider.test:s%20cret@SMTP.Provider.test:465")
    assert (url.scheme, url.user, url.password, url.host, url.port) == (
        "smtps", "me@provider.test", "s cret", "smtp.provider.test", 465)
    assert "s cret" not in url.shown and "s%20cret" not in url.shown and ":***@" in url.shown
    assert account.parse_url("submission://h.test").port == 587
    assert account.parse_url("submissions://h.test").port == 465
    with pytest.raises(UsageError, match="unsupported URL scheme pop3://"):
        account.parse_url("pop3://h.test", schemes=("smtp", "smtps"))


@pytest.mark.parametrize("name", [
    f"password-me@provider.test@{HOST}:{PORT}", f"password-me@provider.test@{HOST}",
    f"password-{HOST}:{PORT}", f"password-{HOST}", "password"])
def test_each_step_of_the_password_chain(name: str) -> None:
    variables = {name: "right", "password-other.test": "wrong",
                 f"password-you@{HOST}": "wrong"}
    assert account.password(variables, "me@provider.test", HOST, PORT) == "right"


def test_the_most_specific_name_wins() -> None:
    variables = {"password": "d", f"password-{HOST}": "c", f"password-me@{HOST}": "b",
                 f"password-me@{HOST}:{PORT}": "a"}
    assert account.password(variables, "me", HOST, PORT) == "a"
    assert account.password(variables, "me", HOST, 25) == "b"
    assert account.password(variables, "you", HOST, 25) == "c"
    assert account.password({}, "me", HOST, PORT) is None


def test_tls_names_fall_back_to_ssl_names() -> None:
    assert account.chain({"ssl-ca-file": "/x"}, "tls-ca-file", "", HOST, PORT) == "/x"


def test_netrc_login_password_wildcard_and_quotes(netrc: Path) -> None:
    netrc.write_text(
        "# a comment line\n"
        "machine *.provider.test login wild password wildpw\n"
        f"machine {HOST.upper()} login me@provider.test password \"p w#1\"\n"
        "machine two.test login a password 1\nmachine two.test login b password 2\n"
        "default login anon password anon\n")
    netrc.chmod(0o600)
    assert account.netrc_login(HOST) == ("me@provider.test", "p w#1")
    assert account.netrc_login("imap.provider.test") == ("wild", "wildpw")
    assert account.netrc_login("two.test") is None  # ambiguous
    assert account.netrc_login("elsewhere.test") is None  # default is never used
    assert account.netrc_password("b", "two.test") == "2"
    on = {"netrc-lookup": ""}
    assert account.password(on, "me@provider.test", HOST, PORT) == "p w#1"
    assert account.password({}, "me@provider.test", HOST, PORT) is None
    assert account.account_user(on, "smtp", "", HOST, PORT) == "me@provider.test"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
def test_a_netrc_others_may_read_is_refused(netrc: Path, mode: int) -> None:
    netrc.write_text(f"machine {HOST} login me password secret-pw\n")
    netrc.chmod(mode)
    with pytest.raises(ConfigError) as e:
        account.password({"netrc-lookup": ""}, "me", HOST, PORT)
    assert "chmod 600" in str(e.value) and "secret-pw" not in str(e.value)
    assert e.value.exit_code == 78


def test_a_netrc_someone_else_owns_is_refused(netrc: Path) -> None:
    need_root()  # only root can give a file away, and only root could read it at mode 0600
    netrc.write_text(f"machine {HOST} login me password secret-pw\n")
    netrc.chmod(0o600)
    os.chown(netrc, 65534, 65534)
    with pytest.raises(ConfigError) as e:
        account.password({"netrc-lookup": ""}, "me", HOST, PORT)
    assert "owned by uid 65534" in str(e.value) and "secret-pw" not in str(e.value)
    assert e.value.exit_code == 78


def test_a_fifo_in_place_of_the_netrc_is_refused_without_waiting(netrc: Path) -> None:
    os.mkfifo(netrc, 0o600)

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("still waiting to open the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            account.password({"netrc-lookup": ""}, "me", HOST, PORT)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_no_netrc_is_no_password(netrc: Path) -> None:
    assert account.password({"netrc-lookup": ""}, "me", HOST, PORT) is None


def test_server_policy_maps_the_variables(cfg: configmod.Config) -> None:
    variables = {"smtp-use-starttls": "", f"password-me@{HOST}": "pw",
                 "tls-ca-file": "~/ca.pem", "tls-ca-dir": "/etc/ssl/mine",
                 "tls-ca-no-defaults": "", "smtp-auth": "LOGIN",
                 "smtp-auth-oauth2-token-command": "get-token",
                 f"smtp-auth-password-command-{HOST}": "pass show mail"}
    p = account.server_policy(cfg, variables, scheme="submission", user="me", host=HOST,
                              port=PORT)
    assert (p.level, p.username, p.password, p.mechanisms) == ("verify", "me", "pw",
                                                                ("login",))
    assert p.ca_file == os.path.expanduser("~/ca.pem") and p.ca_path == "/etc/ssl/mine"
    assert not p.ca_defaults and not p.implicit_tls
    assert (p.password_command, p.token_command) == ("pass show mail", "get-token")
    p = account.server_policy(cfg, {}, scheme="smtps", user="", host=HOST, port=465)
    assert p.implicit_tls and p.username == "" and p.level == cfg.smtp_tls_security_level


def test_server_policy_tls_verify_and_auth_none(cfg: configmod.Config) -> None:
    p = account.server_policy(cfg, {"password": "pw", "tls-verify": "ignore"},
                              scheme="smtp", user="me", host=HOST, port=25)
    assert p.level != "verify" and p.username == "me"
    assert account.unverified({"tls-verify": "Warn"}, "me", HOST, 25)
    p = account.server_policy(cfg, {"smtp-auth": "none"}, scheme="smtp", user="me",
                              host=HOST, port=25)
    assert p.username == ""
    with pytest.raises(UsageError, match="smtp-auth"):
        account.server_policy(cfg, {"smtp-auth": "cram-md5"}, scheme="smtp", user="",
                              host=HOST, port=25)
    with pytest.raises(UsageError, match="smtp-auth-oauth2-token-command"):
        account.server_policy(cfg, {"smtp-auth": "xoauth2", "password": "pw"}, scheme="smtp",
                              user="me", host=HOST, port=25)


def test_a_user_without_any_password_source_is_a_usage_error(cfg: configmod.Config) -> None:
    with pytest.raises(UsageError, match=f"no password for me on {HOST}"):
        account.server_policy(cfg, {}, scheme="smtp", user="me", host=HOST, port=25)
    # a command is a source: the client runs it when it needs the password
    p = account.server_policy(cfg, {"smtp-auth-password-command": "pass x"}, scheme="smtp",
                              user="me", host=HOST, port=25)
    assert p.password == "" and p.password_command == "pass x" and p.level == "verify"
