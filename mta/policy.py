"""Which TLS policy governs a recipient: a pure function of the
configuration and the address (SPEC.md section 3).

A recipient's direction is decided by its domain: inbound when the domain is
in ``domains``, outbound otherwise.  Rules of that direction are read in
order and the first that matches decides; ``defaults`` decides otherwise.
Outbound rules match ``recipient_domain``; inbound rules match
``recipient`` (the whole address, case-insensitively) or
``recipient_domain``.  A domain written with a leading dot matches every
domain under it but not itself, as Postfix's ``.example.com`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from mta.config import Config, Policy
from mta.nexthop import domain_of
from mta.relaycontrol import canonical_address

INBOUND = "inbound"
OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    level: str
    direction: str
    rule: str | None  # the rule's name; None when `defaults` decided
    match: tuple[str, ...] | None = None  # the rule's own reference names


def direction_of(config: Config, recipient: str) -> str:
    return INBOUND if config.is_local_domain(domain_of(recipient)) else OUTBOUND


def choose_policy(config: Config, recipient: str) -> PolicyChoice:
    direction = direction_of(config, recipient)
    for rule in config.policies:
        if rule.direction == direction and rule_matches(rule, recipient):
            return PolicyChoice(rule.level, direction, rule.name, rule.match)
    return PolicyChoice(config.defaults[direction], direction, None)


def rule_matches(rule: Policy, recipient: str) -> bool:
    if rule.recipient is not None:
        # Both sides in canonical form, so "ceo", "c\eo" and ceo are one
        # mailbox (RFC 5321 4.1.2) whichever side wrote the quotes; then
        # compared case-insensitively, as SPEC.md section 3 says.
        wanted = canonical_address(rule.recipient).lower()
        return canonical_address(recipient).lower() == wanted
    assert rule.recipient_domain is not None
    return domain_matches(rule.recipient_domain, domain_of(recipient))


def domain_matches(pattern: str, domain: str) -> bool:
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern
