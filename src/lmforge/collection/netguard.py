"""Which IP addresses a crawler may connect to: the SSRF guard of the fetcher.

A host name is resolved first and *every* address it resolves to is judged; the fetcher then
connects to a judged address (never resolving again), so DNS rebinding cannot slip a private
address in between. Refused unless ``allow_private`` is set or the address lies in one of the
``allow_networks``: anything not globally routable (private, loopback, link-local including the
cloud metadata address 169.254.169.254, shared 100.64/10, unique-local, reserved, unspecified),
multicast, and IPv6 forms that embed such an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
6to4, NAT64 ``64:ff9b::/96``, Teredo).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """A host resolved to an address the policy forbids (or did not resolve)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, NAT64, Teredo)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def refusal(address: IPAddress, allow_private: bool, allowed: Iterable[IPNetwork]) -> str | None:
    """Why ``address`` is refused, or None when a connection to it is allowed."""
    if allow_private:
        return None
    allowed = list(allowed)
    mapped = getattr(address, "ipv4_mapped", None)
    # An IPv4-mapped address *is* its IPv4 address; other forms are judged with what they embed.
    for candidate in [mapped] if mapped is not None else [address, *embedded_ipv4(address)]:
        if any(candidate.version == net.version and candidate in net for net in allowed):
            continue
        if candidate.is_multicast or not candidate.is_global:
            shown = str(address) if candidate == address else f"{address}, which embeds {candidate},"
            return f"{shown} is a {_kind(candidate)} address"
    return None


def _kind(address: IPAddress) -> str:
    for kind in ("loopback", "link_local", "multicast", "private", "unspecified", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


def resolve(host: str, port: int, allow_private: bool, allowed: Iterable[IPNetwork]) -> list[str]:
    """The addresses of ``host`` (all judged allowed), or :class:`AddressRefused`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressRefused("unreachable", f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    allowed = list(allowed)
    for text in addresses:
        reason = refusal(ipaddress.ip_address(text), allow_private, allowed)
        if reason is not None:
            raise AddressRefused("private_address", f"refused {host}: {reason}; set allow_private or "
                                 "allow_networks on the source to crawl it")
    return addresses


def networks(values: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(value, strict=False) for value in values]
