"""Where destinations may reach: the network policy the router applies to every address it is
about to connect to, and the admin service to endpoints written as literal addresses.

A tenant chooses its destinations' endpoints, and the router connects to them from inside the
operator's network and stores the start of each answer where the tenant reads it (GetJob). Left
alone, that is a server-side request forgery with the answer handed back: `http://127.0.0.1:
50052` reaches relayq's own admin port, `http://169.254.169.254/` a cloud's instance metadata.
So, as Svix's egress proxy and the webhook senders that fixed SSRF (openreplay, plane,
glitchtip) do, an address is refused unless it is a public one or the operator allowed its
network (RELAYQ_DESTINATION_ALLOW_NETWORKS, a list of CIDRs):

- always refused (unless allowed): loopback, link-local, unspecified ("this network"),
  multicast, broadcast and reserved addresses (documentation, benchmarking, IETF protocol
  assignments, 240/4, IPv6 outside 2000::/3, ...);
- private ranges (10/8, 172.16/12, 192.168/16, 100.64/10 shared, fc00::/7 unique local,
  fec0::/10 site-local) likewise, allowed only by the list.

IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::a.b.c.d,
6to4 2002:AABB:CCDD::) are judged by that IPv4 address too, so `[::ffff:127.0.0.1]` is
loopback. The tables are our own, not `ipaddress.is_private`/`is_global`: those changed
meaning between Python patch releases, and here each refusal must name its rule.

Hosts written as numbers that are no dotted quad (`2130706433`, `0177.0.0.1`, `0x7f.1`,
`127.1`) are what the C library's inet_aton, and so getaddrinfo, makes of them: addresses.
`literal()` reads them the same way, so the admin service refuses them as literals, and the
router never sends them to a DNS server as names.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The variable an operator sets, named in every refusal so the fix is one search away.
ALLOW_VARIABLE = "RELAYQ_DESTINATION_ALLOW_NETWORKS"


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# First match names the rule. IPv4 (RFC 6890 and the IANA special-purpose registry).
_IPV4_RULES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8")),
    ("link-local", _nets("169.254.0.0/16")),
    ("multicast", _nets("224.0.0.0/4")),
    ("broadcast", _nets("255.255.255.255/32")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")),
    ("reserved", _nets("192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
                       "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4")),
)
_IPV6_RULES: tuple[tuple[str, tuple[Network, ...]], ...] = (
    ("unspecified", _nets("::/128")),
    ("loopback", _nets("::1/128")),
    ("link-local", _nets("fe80::/10")),
    ("multicast", _nets("ff00::/8")),
    ("private", _nets("fc00::/7", "fec0::/10", "64:ff9b:1::/48")),
    # IPv4-compatible and -translated forms, discard, IETF assignments (Teredo among them),
    # documentation, and everything outside global unicast (2000::/3).
    ("reserved", _nets("::/8", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20",
                       "5f00::/16")),
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """An address the policy refuses; `rule` names why (loopback, private, ...)."""

    def __init__(self, address: IPAddress, rule: str) -> None:
        super().__init__(f"{address} is {rule}")
        self.address = address
        self.rule = rule


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4), which is where it leads."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def rule_of(address: IPAddress) -> str | None:
    """The rule that refuses `address` (before any allow list), or None for a public one."""
    inner = embedded_ipv4(address)
    if inner is not None:
        rule = rule_of(inner)
        if rule is not None:
            return rule
        if _mapped(address) is not None or address in _NAT64:
            return None
    rules = _IPV4_RULES if isinstance(address, ipaddress.IPv4Address) else _IPV6_RULES
    for rule, networks in rules:
        if any(address in network for network in networks):
            return rule
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def _mapped(address: IPAddress) -> ipaddress.IPv4Address | None:
    return address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None


def _form(address: IPAddress) -> str:
    """How an IPv6 address carries its IPv4 one, for messages ("" when it does not)."""
    inner = embedded_ipv4(address)
    if inner is None:
        return ""
    kind = ("IPv4-mapped" if isinstance(address, ipaddress.IPv6Address)
            and address.ipv4_mapped is not None else "NAT64" if address in _NAT64 else "6to4")
    return f" ({kind}: {inner})"


def literal(host: str) -> IPAddress | None:
    """The address `host` is written as (brackets, a zone id, and the numeric forms inet_aton
    takes, such as 2130706433 or 0x7f.1, included), or None when it is a name."""
    bare = host.removeprefix("[").removesuffix("]").replace("%25", "%", 1)
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return ipaddress.IPv6Address(bare.partition("%")[0])
        return address
    if bare and bare[0].isdigit() and all(c in _NUMERIC for c in bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


_NUMERIC = frozenset("0123456789abcdefABCDEFxX.")
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def known_address(host: str) -> IPAddress | None:
    """The address `host` means without asking DNS: a literal's, or loopback for `localhost`
    and its subdomains (RFC 6761 keeps them loopback); None for any other name."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return _LOOPBACK
    return literal(host)


@dataclass(frozen=True)
class NetworkPolicy:
    """What the operator allows beyond public addresses (RELAYQ_DESTINATION_ALLOW_NETWORKS)."""

    allowed: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, value: str) -> NetworkPolicy:
        """A comma-separated list of CIDRs (or single addresses); ValueError naming the bad
        one."""
        networks: list[Network] = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or"
                                 " fd00::/8") from None
        return cls(tuple(networks))

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be connected to (its rule), or None when it may."""
        if self._allowed(address):
            return None
        inner = embedded_ipv4(address)
        if inner is not None and _mapped(address) is not None and self._allowed(inner):
            return None
        return rule_of(address)

    def check(self, address: IPAddress) -> None:
        """Raise Refused unless `address` may be connected to."""
        rule = self.refusal(address)
        if rule is not None:
            raise Refused(address, rule)

    def check_all(self, addresses: Iterable[IPAddress]) -> None:
        """Every address a name resolves to must pass: a name that leads anywhere refused is
        refused, whichever address a connection would have picked."""
        for address in addresses:
            self.check(address)

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network
                   for network in self.allowed)

    def describe(self) -> str:
        return ",".join(map(str, self.allowed)) or "(none)"


def explain(refused: Refused, host: str | None = None) -> str:
    """A refusal as operators and tenants read it: the address (or the name), the rule, and
    the setting that would allow it."""
    # For a name, not the address: a tenant must not learn what internal names resolve to.
    what = f"{host!r} resolves to an address that is {refused.rule}" if host else (
        f"{refused.address}{_form(refused.address)} is {refused.rule}")
    return (f"{what}: destinations may not reach {refused.rule} addresses unless the"
            f" operator allows their network ({ALLOW_VARIABLE})")
