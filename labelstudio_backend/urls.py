"""One strict reading of an image URL, shared by the host check and the download.

An allowlist is only as good as its agreement with the fetcher: ``urllib.parse`` and urllib3 (under
requests) split some URLs differently (``http://a\\@b/`` is host ``b`` for the first and ``a`` for
the second; tabs, IPv6 zones, ``@`` in the user part, percent-encoded or full-width separators, and
decimal, octal or short IPv4 forms each have their own readings). No library offers "the one host
every parser agrees on", so this module parses the RFC 3986 subset an image URL needs by hand,
refuses everything else, and rebuilds the URL from its parts: the string that is checked is the
string that is fetched. :func:`parse_url` cross-checks its own result with both libraries' parsers,
so a disagreement is a refusal rather than a leak.

Refused: any scheme but http(s); user information (``@`` before the host); control characters
and backslashes anywhere, whitespace around the URL or in its host; a host that is not ASCII letters, digits, ``-``, ``_`` and
dots (internationalised names must be given in their ``xn--`` form); IPv4 in any form but dotted
decimal; IPv6 zones; empty or out-of-range ports. Characters outside RFC 3986 in the path and query
(a space, non-ASCII letters) are percent-encoded, which cannot move the host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse

import urllib3.util

DEFAULT_PORTS = {"http": 80, "https": 443}
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[0-9]*))?")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\\]|^\s|\s$")
# RFC 3986 path, query and fragment characters (unreserved, sub-delims, ':', '@', '/', '?'), '%' apart
_SAFE_REST = "-._~!$&'()*+,;=:@/?"


class UnsafeURL(ValueError):
    """An address refused by :func:`parse_url`; its message says which part and why."""


@dataclasses.dataclass(frozen=True)
class URL:
    """A URL in canonical form: lower-case scheme and host, explicit port, RFC 3986 characters only.

    Attributes
    ----------
    scheme : str
        ``"http"`` or ``"https"``.
    host : str
        Lower-case registered name or dotted-decimal IPv4, or a compressed IPv6 address (no brackets).
    port : int
        The port connected to (the scheme's default when the URL names none).
    target : str
        Path and query, starting with ``/``; the fragment is dropped (never sent).
    """

    scheme: str
    host: str
    port: int
    target: str

    @property
    def origin(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``: what credentials are bound to."""
        return self.scheme, self.host, self.port

    @property
    def authority(self) -> str:
        """``host[:port]`` as the ``Host`` header names it (IPv6 in brackets, default port left out)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def parse_url(address: str) -> URL:
    """Parse ``address`` strictly; raises :class:`UnsafeURL` for anything two parsers could read apart.

    Parameters
    ----------
    address : str
        An absolute http(s) URL.

    Returns
    -------
    URL
        Its canonical parts; ``str(url)`` is the only form to hand to an HTTP client.
    """
    if not isinstance(address, str):
        raise UnsafeURL(f"an image address must be a string, not {type(address).__name__}")
    bad = _FORBIDDEN.search(address)
    if bad:
        raise UnsafeURL(f"contains {bad.group()!r}: control characters, backslashes and surrounding "
                        "whitespace are refused")
    match = _URL.fullmatch(address)
    if not match:
        raise UnsafeURL("is not an absolute URL of the form scheme://host/path")
    scheme = match["scheme"].lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL(f"scheme {scheme!r} is not http or https")
    host, port = _authority(match["authority"], scheme)
    url = URL(scheme, host, port, _target(match["rest"]))
    _agree(url)
    return url


def canonical_host(host: str) -> str:
    """A host name as :attr:`URL.host` spells it (for allowlists); raises :class:`UnsafeURL`."""
    literal = host.strip()
    if literal.startswith("[") and literal.endswith("]"):
        literal = literal[1:-1]
    if ":" in literal:
        return _ipv6(literal)
    return _authority(literal, "http")[0]


def _authority(authority: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        raise UnsafeURL("holds user information ('@' before the host); credentials in URLs are refused")
    if "%" in authority:
        raise UnsafeURL("holds a percent-encoded host or an IPv6 zone; write the host as plain ASCII")
    match = _AUTHORITY.fullmatch(authority)
    if not match:
        raise UnsafeURL(f"has a malformed host and port {authority!r}")
    host = _ipv6(match["ipv6"]) if match["ipv6"] is not None else _name(match["name"])
    port = match["port"]
    if port is None:
        return host, DEFAULT_PORTS[scheme]
    if not port or not 0 < int(port) < 65536:
        raise UnsafeURL(f"has port {port!r}, not a number between 1 and 65535")
    return host, int(port)


def _name(name: str) -> str:
    if not name.isascii():
        raise UnsafeURL(f"has the non-ASCII host {name!r}; write an internationalised name in its xn-- form")
    name = name.lower()
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeURL(f"has the malformed host {name!r}")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            parsed = ipaddress.IPv4Address(".".join(labels))
        except ipaddress.AddressValueError:
            raise UnsafeURL(f"has the host {name!r}: write an IPv4 address in dotted-decimal form (a.b.c.d)") from None
        return str(parsed)
    return ".".join(labels)


def _ipv6(literal: str) -> str:
    try:
        return ipaddress.IPv6Address(literal).compressed
    except ipaddress.AddressValueError as err:
        raise UnsafeURL(f"has the malformed IPv6 address {literal!r}: {err}") from None


def _target(rest: str) -> str:
    path, _, _fragment = rest.partition("#")
    path = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", path)
    quoted = urllib.parse.quote(path, safe=_SAFE_REST + "%")
    return quoted if quoted.startswith("/") else "/" + quoted


def _agree(url: URL) -> None:
    """Refuse ``url`` unless ``urllib.parse`` and urllib3 both read its canonical form as the same origin."""
    text = str(url)
    split = urllib.parse.urlsplit(text)
    pool = urllib3.util.parse_url(text)
    readings = {
        (split.scheme, split.hostname, split.port or DEFAULT_PORTS[url.scheme]),
        (pool.scheme, (pool.host or "").strip("[]").lower(), pool.port or DEFAULT_PORTS[url.scheme]),
    }
    if readings != {(url.scheme, url.host, url.port)}:
        raise UnsafeURL(f"is read as different hosts by different parsers: {sorted(map(str, readings))}")
