"""Address rewriting (pymailtools.rewrite) against the examples of Postfix's canonical(5),
virtual(5) and ADDRESS_REWRITING_README, and header rewriting that keeps what it does not own."""

from pathlib import Path

import pytest

from pymailtools import address
from pymailtools.config import Config
from pymailtools.errors import ConfigError, DataError, DeliveryError
from pymailtools.rewrite import GenericMaps, Rewriter


def rewriter(config_values: dict[str, object], **keys: object) -> Rewriter:
    return Rewriter(Config({**config_values, **keys}))


def table(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return f"texthash:{path}"


# -- the address-list scanner's rewriting --------------------------------------------------------

def test_rewrite_list_keeps_names_comments_groups_and_encoded_words() -> None:
    value = (' "Doe, J" <j@y.test> (work), =?utf-8?q?Caf=C3=A9?= <k@x.test>,\n'
             '\tplain@x.test (Plain Name), team: a@x.test, b@z.test;')
    got = address.rewrite_list(value, lambda a: a.replace("x.test", "new.test"))
    assert got == (' "Doe, J" <j@y.test> (work), =?utf-8?q?Caf=C3=A9?= <k@new.test>,\n'
                   '\tplain@new.test (Plain Name), team: a@new.test, b@z.test;')


def test_rewrite_list_unchanged_is_byte_identical() -> None:
    value = ' weird  <a@b> ,(c) d@e  ,  undisclosed-recipients:;'
    assert address.rewrite_list(value, lambda a: a) == value


# -- canonical maps ------------------------------------------------------------------------------

def test_sender_canonical_then_canonical(config_values: dict[str, object]) -> None:
    rw = rewriter(config_values,
                  sender_canonical_maps="inline:{ root@host.example.test=me@example.com }",
                  canonical_maps="inline:{ me@example.com=Me.Myself@example.com }")
    assert rw.sender("root@host.example.test") == "Me.Myself@example.com"
    assert rw.sender("") == ""  # never touched: the null sender
    # recipients are not senders: only canonical_maps applies
    assert rw.recipient("root@host.example.test") == "root@host.example.test"


def test_canonical_lookup_order_and_domain_results(config_values: dict[str, object]) -> None:
    # canonical(5): user@domain, then user (for our domains only), then @domain; a result
    # @domain keeps the local part.
    rw = rewriter(config_values, recipient_delimiter="+", canonical_maps=(
        "inline:{ wietse=Wietse.Venema, @old.example=@new.example, "
        "joe@example.com=joe.smith@example.com, joe+list@example.com=lists@example.com }"))
    assert rw.recipient("wietse@host.example.test") == "Wietse.Venema@host.example.test"
    assert rw.recipient("wietse@elsewhere.example") == "wietse@elsewhere.example"
    assert rw.recipient("anyone@old.example") == "anyone@new.example"
    # propagate_unmatched_extensions (canonical): the extension rides along
    assert rw.recipient("joe+foo@example.com") == "joe.smith+foo@example.com"
    assert rw.recipient("joe+list@example.com") == "lists@example.com"
    assert rw.recipient("JOE@Example.COM") == "joe.smith@example.com"


def test_domain_match_never_carries_the_extension(config_values: dict[str, object]) -> None:
    # a bare-user key that does not apply (other.com is not ours) must not make the @domain
    # match look like an extension-stripped one
    rw = rewriter(config_values, recipient_delimiter="+",
                  canonical_maps="inline:{ joe=x@y, @other.com=z@w }")
    assert rw.recipient("joe+foo@other.com") == "z@w"
    assert rw.recipient("joe+foo@host.example.test") == "x+foo@y"


def test_over_long_addresses_are_not_looked_up(config_values: dict[str, object],
                                               tmp_path: Path) -> None:
    src = tmp_path / "canonical"
    src.write_text("/^(.*)@old\\.test$/ $1@new.test\n")
    rw = rewriter(config_values, canonical_maps=f"regexp:{src}")
    long = "a" * 290 + "@old.test"
    assert rw.header(f"From: <{long}>\n".encode()) == f"From: <{long}>\n".encode()
    assert rw.header(b"From: <a@old.test>\n") == b"From: <a@new.test>\n"
    with pytest.raises(DataError, match="longer than 256"):
        rw.check_envelope(long)


def test_rewriter_never_opens_generic_maps_nor_generic_the_rewriting_ones(
        config_values: dict[str, object], tmp_path: Path) -> None:
    missing = f"hash:{tmp_path / 'missing'}"
    rw = rewriter(config_values, canonical_maps="inline:{ a@x.test=b@x.test }",
                  smtp_generic_maps=missing)
    assert rw.recipient("a@x.test") == "b@x.test"
    gen = GenericMaps(Config({**config_values, "canonical_maps": missing,
                              "virtual_alias_maps": missing,
                              "smtp_generic_maps": "inline:{ a@x.test=c@y.test }"}))
    assert gen.smtp_generic("a@x.test") == "c@y.test"


def test_canonical_classes_limit_where_it_applies(config_values: dict[str, object]) -> None:
    rw = rewriter(config_values, canonical_maps="inline:{ a@x.test=b@x.test }",
                  canonical_classes=["envelope_sender", "header_sender"])
    assert rw.sender("a@x.test") == "b@x.test"
    assert rw.recipient("a@x.test") == "a@x.test"
    assert rw.header(b"From: A <a@x.test>\n") == b"From: A <b@x.test>\n"
    assert rw.header(b"To: A <a@x.test>\n") == b"To: A <a@x.test>\n"


def test_result_that_is_not_an_address_is_a_config_error(
        config_values: dict[str, object], tmp_path: Path) -> None:
    rw = rewriter(config_values,
                  canonical_maps=table(tmp_path, "canonical", "a@x.test <bad>@x.test\n"))
    with pytest.raises(ConfigError, match="canonical_maps: the result for a@x.test"):
        rw.sender("a@x.test")


# -- masquerading -------------------------------------------------------------------------------

def test_masquerade_domains(config_values: dict[str, object]) -> None:
    rw = rewriter(config_values, masquerade_domains="!sub.example.com, example.com",
                  masquerade_exceptions="root")
    assert rw.sender("user@host.example.com") == "user@example.com"
    assert rw.sender("user@example.com") == "user@example.com"
    assert rw.sender("user@a.sub.example.com") == "user@a.sub.example.com"  # ! excludes
    assert rw.sender("root@host.example.com") == "root@host.example.com"  # an exception
    assert rw.sender("user@example.com.evil.test") == "user@example.com.evil.test"
    # masquerade_classes' default leaves envelope recipients alone, headers not
    assert rw.recipient("user@host.example.com") == "user@host.example.com"
    assert rw.header(b"Cc: u@host.example.com\n") == b"Cc: u@example.com\n"


def test_exact_domain_match_stops_masquerading(config_values: dict[str, object]) -> None:
    # As Postfix: the first entry equal to the domain ends the search unchanged.
    rw = rewriter(config_values, masquerade_domains="host.example.com example.com")
    assert rw.sender("u@host.example.com") == "u@host.example.com"
    assert rw.sender("u@a.host.example.com") == "u@host.example.com"


# -- virtual aliases ----------------------------------------------------------------------------

VIRTUAL = """\
virt.example          anything
team@virt.example     alice@x.test, bob@y.test
info@virt.example     team@virt.example, carol@z.test
self@virt.example     self@virt.example, other@x.test
l1@virt.example       l2@virt.example
l2@virt.example       l3@virt.example
l3@virt.example       l1@virt.example
@catch.example        catchall@x.test
"""


def test_virtual_one_to_many_nested(config_values: dict[str, object], tmp_path: Path) -> None:
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "virtual", VIRTUAL))
    assert rw.virtual_alias("team@virt.example") == ["alice@x.test", "bob@y.test"]
    assert rw.virtual_alias("info@virt.example") == ["alice@x.test", "bob@y.test",
                                                     "carol@z.test"]
    assert rw.virtual_alias("self@virt.example") == ["self@virt.example", "other@x.test"]
    assert rw.virtual_alias("anyone@catch.example") == ["catchall@x.test"]
    assert rw.virtual_alias("bob@y.test") == ["bob@y.test"]  # not in the table


def test_virtual_domain_without_mapping_is_unknown(config_values: dict[str, object],
                                                   tmp_path: Path) -> None:
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "virtual", VIRTUAL))
    with pytest.raises(DeliveryError) as e:
        rw.virtual_alias("nobody@virt.example")
    assert e.value.status == "5.1.1"
    assert "User unknown in virtual alias table" in e.value.reason
    # listed domain names make a domain virtual too
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "v2", "a@b.test c@d\n"),
                  virtual_alias_domains="b.test")
    with pytest.raises(DeliveryError, match="User unknown"):
        rw.virtual_alias("x@b.test")


def test_virtual_loop_is_detected(config_values: dict[str, object], tmp_path: Path) -> None:
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "virtual", VIRTUAL))
    with pytest.raises(DeliveryError) as e:
        rw.virtual_alias("l1@virt.example")
    assert e.value.status == "5.4.6"
    assert "l1@virt.example -> l2@virt.example -> l3@virt.example -> l1@virt.example" \
        in e.value.reason


def test_virtual_limits(config_values: dict[str, object], tmp_path: Path) -> None:
    chain = "".join(f"n{i}@deep.test n{i + 1}@deep.test\n" for i in range(10))
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "deep", chain),
                  virtual_alias_recursion_limit=5)
    with pytest.raises(DeliveryError, match="nesting") as e:
        rw.virtual_alias("n0@deep.test")
    assert e.value.status.startswith("4")
    wide = "big@wide.test " + ", ".join(f"m{i}@x.test" for i in range(20)) + "\n"
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "wide", wide),
                  virtual_alias_expansion_limit=10)
    with pytest.raises(DeliveryError, match="expansion size"):
        rw.virtual_alias("big@wide.test")


def test_recipients_keep_refused_ones_for_a_bounce(config_values: dict[str, object],
                                                   tmp_path: Path) -> None:
    rw = rewriter(config_values, virtual_alias_maps=table(tmp_path, "virtual", VIRTUAL))
    got = rw.recipients(["team@virt.example", "alice@x.test", "l1@virt.example"])
    assert [(a, o) for a, o, _ in got] == [("alice@x.test", "team@virt.example"),
                                           ("bob@y.test", "team@virt.example"),
                                           ("l1@virt.example", "l1@virt.example")]
    refused = got[2][2]
    assert refused is not None and refused.status == "5.4.6"


# -- smtp_generic_maps --------------------------------------------------------------------------

def test_generic_header_rewriting(config_values: dict[str, object]) -> None:
    config_values.update(myorigin="host.localdomain", smtp_generic_maps=(
        "inline:{ root@host.localdomain=me@example.com, @host.localdomain=@example.com }"))
    rw = GenericMaps(Config(config_values))
    assert rw.smtp_generic("root@host.localdomain") == "me@example.com"
    assert rw.smtp_generic("daemon@host.localdomain") == "daemon@example.com"
    assert rw.generic_header(b"From: root (Cron Daemon)\n") == \
        b"From: me@example.com (Cron Daemon)\n"
    assert rw.generic_header(b"Subject: root@host.localdomain\n") == \
        b"Subject: root@host.localdomain\n"
