"""The network address an allowed host *name* is connected to: resolved once, checked, pinned.

An allowlist of names is only as safe as those names' DNS: a name whose records an attacker
controls, or rebinds between the check and the connection, can point at 127.0.0.1, a cloud's
metadata service (169.254.169.254) or the private network behind the backend. So a name is
resolved here once, its addresses are checked in the resolver's order, and the download connects
to the first one allowed, sending the name in ``Host`` and TLS's SNI and certificate check.
urllib3 resolves again inside its connection, which would reopen the gap between check and use,
and no library offers a pinned connection with such a check, so it is written here.

Allowed: public (globally routable, not multicast) addresses, and addresses inside the
networks the operator lists in ``INSID3_ALLOWED_NETWORKS``. IPv4 addresses embedded in IPv6
(``::ffff:a.b.c.d``, NAT64's ``64:ff9b::a.b.c.d``) are judged as the IPv4 address they reach.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AddressRefused(ValueError):
    """A host name that resolves only to addresses outside the public internet and the allowed networks."""


def parse_networks(texts: Iterable[str]) -> frozenset[Network]:
    """Networks in CIDR form (``10.0.0.0/8``, ``fd00::/8``; a bare address is its own /32 or /128).

    Raises ``ValueError`` naming ``INSID3_ALLOWED_NETWORKS`` and the entry for anything else,
    host bits set after the prefix included (``10.0.0.1/8`` is a typo, not a network).
    """
    networks = set()
    for text in texts:
        try:
            networks.add(ipaddress.ip_network(text.strip()))
        except ValueError as err:
            raise ValueError(f"INSID3_ALLOWED_NETWORKS: {text.strip()!r} is not a network "
                             f"(a.b.c.d/n or an IPv6 prefix): {err}") from None
    return frozenset(networks)


def reached_address(address: Address) -> Address:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address reaches; any other ``address`` as is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_allowed(address: Address, networks: Iterable[Network] = ()) -> bool:
    """``True`` for a public unicast address, or one inside ``networks``."""
    reached = reached_address(address)
    if any(candidate in network for candidate in {address, reached} for network in networks
           if candidate.version == network.version):
        return True
    return reached.is_global and not reached.is_multicast


def connect_address(host: str, port: int, networks: Iterable[Network] = ()) -> str:
    """The address to connect to for the host name ``host``: its first allowed resolved address.

    Parameters
    ----------
    host : str
        A registered name (not an IP literal).
    port : int
        The port connected to (passed to the resolver).
    networks : iterable of network
        Networks allowed beside the public internet (:func:`parse_networks`).

    Returns
    -------
    str
        An IPv4 or IPv6 address (no zone), to hand to the connection in place of ``host``.

    Raises
    ------
    AddressRefused
        When every address of ``host`` is loopback, private, link-local, reserved or multicast and
        none is in ``networks``; its message lists them (for the log, not for the client).
    OSError
        When ``host`` does not resolve.
    """
    networks = tuple(networks)
    resolved = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
        if is_allowed(address, networks):
            return str(address)
        resolved.append(str(address))
    raise AddressRefused(f"resolves to {', '.join(dict.fromkeys(resolved))}")
