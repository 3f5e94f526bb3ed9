"""Address lists (argv, To/Cc/Bcc) and envelope address validation."""

import pytest

from pymailtools import address
from pymailtools.errors import AddressError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@x.test", [("", "a@x.test")]),
        ("a@x.test, b@y.test", [("", "a@x.test"), ("", "b@y.test")]),
        ('"Doe, John" <jd@x.test>, c@z.test', [("Doe, John", "jd@x.test"), ("", "c@z.test")]),
        ("Group: a@x.test, b@y.test;", [("", "a@x.test"), ("", "b@y.test")]),
        ("undisclosed-recipients:;", []),
        ("a@x.test (Alice)", [("Alice", "a@x.test")]),
        ("<@relay.test:u@x.test>", [("", "u@x.test")]),
        ("root", [("", "root")]),
        ('"john doe"@x.test', [("", '"john doe"@x.test')]),
        ("Ünïcode Näme <u@x.test>", [("Ünïcode Näme", "u@x.test")]),
    ],
)
def test_parse_list(text: str, expected: list[tuple[str, str]]) -> None:
    assert address.parse_list(text) == expected


def test_many_semicolons_parse_quickly() -> None:
    # Mutt CVE-2021-3181 input: must be linear, and still find the address.
    assert address.parse_list(";" * 100000 + "a@x.test") == [("", "a@x.test")]


@pytest.mark.parametrize(
    "bad",
    ["a@x.test\r\nRCPT TO:<v@y.test>", "a\nb@x.test", "a\x00@x.test", "-oQ/tmp", "-f",
     "a" * 400 + "@x.test", "a@", "@x.test", "<a@x.test>"],
)
def test_check_envelope_refuses(bad: str) -> None:
    with pytest.raises(AddressError):
        address.check_envelope(bad)


def test_recipients_are_qualified_with_myorigin() -> None:
    assert address.parse_recipients("root, bob@x.test", "host.test") == [
        "root@host.test", "bob@x.test"]


def test_recipient_with_newline_refused() -> None:
    with pytest.raises(AddressError):
        address.parse_recipients("a@x.test\nBcc: v@y.test", "host.test")


@pytest.mark.parametrize("null", ["", "<>", " <> "])
def test_null_sender(null: str) -> None:
    assert address.parse_sender(null, "host.test") == ""


def test_sender_first_of_list_and_qualified() -> None:
    assert address.parse_sender("Bounce <b@x.test>, c@y.test", "h.test") == "b@x.test"
    assert address.parse_sender("cron", "h.test") == "cron@h.test"


@pytest.mark.parametrize("bad", ["-oQ/tmp", "a@x.test\r\nRCPT TO:<v@y.test>", "x\x00y"])
def test_sender_refused(bad: str) -> None:
    with pytest.raises(AddressError):
        address.parse_sender(bad, "h.test")
