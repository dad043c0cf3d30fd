"""The spec's `middlebox.rules`: an ordered firewall rule list, validated field by field.

vmbox.spec.sections' MiddleboxSpec holds a tuple of `RuleSpec`; the rule set
that runs them is vmbox.functions.rules. Each problem is reported on the
field it concerns (`middlebox.rules.2.match.dport: ...`, indexes from 0), so
checks that involve an earlier field (dport needs tcp or udp, limit needs
ratelimit) are field validators reading the fields validated before them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

RULE_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
PORT_RANGE = re.compile(r"^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$")
RESERVED_NAME = "limit"  # the rule `middlebox.limit` makes beside `rules` (and its metrics label)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"ports lie between 1 and 65535, got {value}")
    return value


class MatchSpec(_Strict):
    """What a rule matches; every field is optional, and all given must hold."""

    # icmp matches ICMP and ICMPv6.
    proto: Literal["tcp", "udp", "icmp", "any"] = "any"
    # CIDRs (or single addresses); an IPv4 one never matches an IPv6 packet.
    src: str | None = None
    dst: str | None = None
    # One port (80) or an inclusive range ("8000-8099"); only with tcp or udp.
    dport: int | str | None = None

    @field_validator("src", "dst")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_network(value.strip()))
        except ValueError as exc:
            raise ValueError(f"must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32: {exc}") from None

    @field_validator("dport")
    @classmethod
    def _dport(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        if value is None:
            return None
        if info.data.get("proto") not in ("tcp", "udp"):
            raise ValueError("only with proto tcp or udp")
        if isinstance(value, int):
            return _port(value)
        if value.strip().isdigit():
            return _port(int(value))
        found = PORT_RANGE.match(value)
        if found is None:
            raise ValueError(f'must be a port or a range "LO-HI", got {value!r}')
        low, high = _port(int(found[1])), _port(int(found[2]))
        if low > high:
            raise ValueError(f"range {low}-{high} is empty")
        return f"{low}-{high}"


class RuleSpec(_Strict):
    """One rule: a name, a match, an action (and a limit for ratelimit)."""

    name: str = Field(pattern=RULE_NAME)
    match: MatchSpec = MatchSpec()
    action: Literal["accept", "drop", "ratelimit"]
    # Per window, split among the replicas like middlebox.limit; shared item rules.<name>.limit.
    limit: Annotated[int, Field(gt=0, le=10**9)] | None = None
    unit: Literal["packets", "bytes"] = "packets"
    # Count what the rule would drop, and let the next rules decide.
    shadow: bool = False

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == RESERVED_NAME:
            raise ValueError(f"{value!r} is the rule middlebox.limit makes; pick another name")
        return value

    @field_validator("limit", "unit")
    @classmethod
    def _ratelimit_only(cls, value: object, info: ValidationInfo) -> object:
        # The defaults are fine anywhere: a stored spec (model_dump) spells them out.
        if value not in (None, "packets") and info.data.get("action", "ratelimit") != "ratelimit":
            raise ValueError("only with action ratelimit")
        return value

    @field_validator("shadow")
    @classmethod
    def _shadow_decides(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("action") == "accept":
            raise ValueError("only with action drop or ratelimit (an accept drops nothing)")
        return value

    @model_validator(mode="after")
    def _has_limit(self) -> RuleSpec:
        if self.action == "ratelimit" and self.limit is None:
            raise ValueError("action ratelimit needs a limit")
        return self


def unique_names(rules: tuple[RuleSpec, ...] | None) -> tuple[RuleSpec, ...] | None:
    """The rules, if no two share a name (their state items and metrics are by name)."""
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules or ()):
        if rule.name in seen:
            raise ValueError(f"rule {index} has the name of rule {seen[rule.name]}: {rule.name!r}")
        seen[rule.name] = index
    if rules is not None and not rules:
        raise ValueError("needs at least one rule (or leave rules out)")
    return rules
