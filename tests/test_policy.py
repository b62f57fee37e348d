"""Which TLS policy governs a recipient (SPEC.md section 3): a table of
recipient -> level, direction, deciding rule and match names, evaluated
on a real configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import Config, load_config
from mta.policy import INBOUND, OUTBOUND, PolicyChoice, choose_policy

CONFIG = """\
hostname: relay.example.net
spool: spool
tls: {certificate: relay.crt, private_key: relay.key}
listeners: [{address: 127.0.0.1, port: 2525, role: inbound}]
domains:
  example.com: {relay_to: "mail.example.com"}
  example.org: {relay_to: "mail.example.org"}
  partner.local: {relay_to: "mail.partner.local"}
defaults: {outbound: opportunistic, inbound: enforce-tls}
policies:
  - {name: partner, direction: outbound, recipient_domain: Partner.Example,
     tls: enforce-secure, match: [mx.provider.example, mx2.provider.example]}
  - {name: partner-subs, direction: outbound,
     recipient_domain: .partner.example, tls: enforce-tls}
  - {name: only-subs, direction: outbound, recipient_domain: .subs.example,
     tls: none}
  - {name: first, direction: outbound, recipient_domain: twice.example,
     tls: none}
  - {name: second, direction: outbound, recipient_domain: twice.example,
     tls: enforce-secure}
  - {name: ceo, direction: inbound, recipient: CEO@Example.com,
     tls: enforce-secure}
  - {name: cfo, direction: inbound, recipient: '"cfo"@example.com',
     tls: enforce-secure}
  - {name: org, direction: inbound, recipient_domain: example.org,
     tls: none}
  - {name: org-again, direction: inbound, recipient: boss@example.org,
     tls: enforce-secure}
  # Rules of the other direction never apply: direction is the domain's.
  - {name: wrong-way-in, direction: inbound, recipient_domain: other.example,
     tls: none}
  - {name: wrong-way-out, direction: outbound, recipient_domain: example.com,
     tls: none}
  - {name: local-subs, direction: inbound, recipient_domain: .partner.local,
     tls: none}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("policy") / "mta.yaml"
    path.write_text(CONFIG)
    return load_config(path, check_tls=False)


PROVIDER = ("mx.provider.example", "mx2.provider.example")

CASES = [
    # (recipient, level, direction, rule, match)
    # outbound: exact domain, case-insensitive, trailing dot ignored
    ("a@partner.example", "enforce-secure", OUTBOUND, "partner", PROVIDER),
    ("a@PARTNER.Example.", "enforce-secure", OUTBOUND, "partner", PROVIDER),
    # a leading dot matches subdomains at any depth, not the domain itself
    ("a@mx.partner.example", "enforce-tls", OUTBOUND, "partner-subs", None),
    ("a@a.b.partner.example", "enforce-tls", OUTBOUND, "partner-subs", None),
    ("a@notpartner.example", "opportunistic", OUTBOUND, None, None),
    ("a@subs.example", "opportunistic", OUTBOUND, None, None),
    ("a@x.subs.example", "none", OUTBOUND, "only-subs", None),
    # the first rule that matches decides
    ("a@twice.example", "none", OUTBOUND, "first", None),
    # no rule: the direction's default
    ("a@elsewhere.example", "opportunistic", OUTBOUND, None, None),
    # an outbound rule never governs an inbound domain, and the reverse
    ("a@example.com", "enforce-tls", INBOUND, None, None),
    ("a@other.example", "opportunistic", OUTBOUND, None, None),
    # inbound: the whole address, case-insensitively
    ("ceo@example.com", "enforce-secure", INBOUND, "ceo", None),
    ("CEO@EXAMPLE.COM", "enforce-secure", INBOUND, "ceo", None),
    ("Ceo@Example.Com.", "enforce-secure", INBOUND, "ceo", None),
    ("ceo.assistant@example.com", "enforce-tls", INBOUND, None, None),
    # RFC 5321 4.1.2: a quoted local part that needs no quotes is the same
    # mailbox, however it is written, on either side
    ('"ceo"@example.com', "enforce-secure", INBOUND, "ceo", None),
    ('"c\\eo"@example.com', "enforce-secure", INBOUND, "ceo", None),
    ('"\\C\\E\\O"@Example.COM.', "enforce-secure", INBOUND, "ceo", None),
    ("cfo@example.com", "enforce-secure", INBOUND, "cfo", None),
    ('"CFO"@example.com', "enforce-secure", INBOUND, "cfo", None),
    ('"ceo.assistant"@example.com', "enforce-tls", INBOUND, None, None),
    # ...but a quoted string that is not a dot-atom is another mailbox
    ('"ceo "@example.com', "enforce-tls", INBOUND, None, None),
    ('"ceo@example.com"@example.com', "enforce-tls", INBOUND, None, None),
    # inbound recipient_domain; an earlier domain rule beats a later address
    ("anyone@example.org", "none", INBOUND, "org", None),
    ("boss@example.org", "none", INBOUND, "org", None),
    # a subdomain of an inbound domain is not in `domains`: it is outbound
    ("a@sub.example.com", "opportunistic", OUTBOUND, None, None),
    ("a@mx.partner.local", "opportunistic", OUTBOUND, None, None),
]


@pytest.mark.parametrize(
    "recipient, level, direction, rule, match",
    CASES,
    ids=[row[0] for row in CASES],
)
def test_choose_policy(
    config: Config,
    recipient: str,
    level: str,
    direction: str,
    rule: str | None,
    match: tuple[str, ...] | None,
) -> None:
    assert choose_policy(config, recipient) == PolicyChoice(
        level, direction, rule, match
    )


def test_defaults_decide_when_there_are_no_rules(tmp_path: Path) -> None:
    """Without a `defaults` section both directions are opportunistic."""
    path = tmp_path / "mta.yaml"
    path.write_text(CONFIG.split("defaults:")[0])
    config = load_config(path, check_tls=False)

    assert choose_policy(config, "a@example.com") == PolicyChoice(
        "opportunistic", INBOUND, None
    )
    assert choose_policy(config, "a@partner.example") == PolicyChoice(
        "opportunistic", OUTBOUND, None
    )
