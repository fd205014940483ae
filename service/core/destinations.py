"""Where a processor may send calls: the deployment's allow-list of URL prefixes
(DOWNSTREAM_URLS, and PROCESSOR_HTTP_URL's own prefix), the addresses that are never
allowed, and the resolver whose answer each call is checked against.

A prefix is `scheme://host[:port][/path]`. A URL is under it when:

- its scheme and host are the prefix's exactly (host names in lower case, as httpx
  writes them; `api.example.com.`, `127.1` or `2130706433` are other hosts, not
  spellings of the same one);
- its port is the prefix's: a prefix without a port means its scheme's default (80 or
  443), and `:*` means any port (`http://127.0.0.1:*/`, for downstreams listening on
  ports chosen when they start);
- its path, as sent (percent-encoded), starts with the prefix's on a segment boundary:
  `/v1` allows `/v1` and `/v1/...` but not `/v10`, `/v1/` allows `/v1/...` only, and a
  prefix without a path (or `/`) allows any path.

Whatever the prefixes say, a URL is refused when it holds a user or password
(`user@host`), or `.` or `..` segments or an encoded slash or backslash in its path
(percent-encoded too): each could reach a host or a path that its text does not show.

Addresses, judged on what the host resolves to when a call is made:

- **never allowed**: link-local addresses (169.254.0.0/16, fe80::/10), the cloud
  metadata services' addresses and names (METADATA_ADDRESSES, METADATA_NAMES),
  multicast and the reserved 240.0.0.0/4;
- **allowed only under a prefix that names them**: loopback (127.0.0.0/8, ::1),
  unspecified (0.0.0.0/8, ::), private (10/8, 172.16/12, 192.168/16, fc00::/7,
  100.64/10) and any other address that is not globally reachable. A prefix names an
  address when its host is that address written as an IP literal
  (`http://10.1.2.3:8080/`), or is `localhost` and the address is loopback. A host name
  that resolves to such an address is refused: `https://partner.example/` never reaches
  10.0.0.5, whatever its DNS answers;
- IPv6 addresses that carry an IPv4 one (`::ffff:a.b.c.d`, `::a.b.c.d`, NAT64's
  `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4's `2002::/16`) are judged by the IPv4
  address.

Hosts are judged as they go on the wire (`wire_host`): an international name in its
IDNA form, the one spelling the resolver, TLS and the prefixes all see.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud, older instances
    )
)
RESERVED = ipaddress.ip_network("240.0.0.0/4")
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
PRIVATE = tuple(
    ipaddress.ip_network(network)
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "100.64.0.0/10")
)
# NAT64's well-known prefix, and its local-use range (RFC 8215), the IPv4 address in the
# last 32 bits as gateways most often write it.
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# The deprecated IPv4-compatible form, ::a.b.c.d (:: and ::1 are not of it).
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# `:*` after a prefix's host: any port.
ANY_PORT = re.compile(r"^(?P<origin>[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*):\*(?=[/?#]|$)")
# In a path, what a server may decode into another path than the one allowed.
ENCODED_SEPARATORS = re.compile(r"%2f|%5c|\\", re.IGNORECASE)
# A call's host is resolved again after this many seconds (per process).
RESOLVE_CACHE_SECONDS = 10.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to, as text.
Resolver = Callable[[str, int], list[str]]


class NotAllowed(ValueError):
    """A destination refused; the message says why, never what a secret holds."""


def parse_url(text: str) -> httpx.URL:
    """A URL as httpx will call it: the very parser that decides where a call goes."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeError):
        raise NotAllowed("is not a URL that can be called") from None
    if url.scheme not in SCHEMES or not url.host:
        raise NotAllowed("must be an http:// or https:// URL with a host")
    if url.userinfo:
        raise NotAllowed("must not hold a user or password (user@host)")
    _check_path(raw_path(url))
    return url


def raw_path(url: httpx.URL) -> str:
    """The path as it goes on the wire, percent-encoded, without the query."""
    return url.raw_path.decode("ascii").partition("?")[0] or "/"


def _check_path(path: str) -> None:
    if ENCODED_SEPARATORS.search(path):
        raise NotAllowed("must not hold an encoded slash or backslash in its path")
    if "%25" in path:
        # A percent encoded again: a server that decodes twice sees what the check did
        # not (`%252e%252e` is `..` to it).
        raise NotAllowed("must not hold an encoded percent sign (%25) in its path")
    # Some servers drop a segment's `;parameters` before they resolve dots: `..;` is `..`.
    if any(unquote(segment.partition(";")[0]) in (".", "..") for segment in path.split("/")):
        raise NotAllowed("must not hold . or .. segments in its path")


def wire_host(url: httpx.URL) -> str:
    """The host as it goes on the wire: ASCII, an international name in its IDNA form.
    The resolver, TLS and the prefixes all judge this one spelling; httpx's `host` shows
    such a name in Unicode, which the system's resolver would encode by older rules into
    another name (`straße.de` into `strasse.de`)."""
    return url.raw_host.decode("ascii").lower()


def port_of(url: httpx.URL) -> int:
    return url.port or DEFAULT_PORTS[url.scheme]


def host_key(host: str) -> str:
    """A host as prefixes and URLs compare it: an IP literal in its one written form."""
    address = literal(host)
    return host.lower() if address is None else str(address)


def literal(host: str) -> Address | None:
    """The address a host is written as, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _carried(address: Address) -> Address:
    """The IPv4 address an IPv6 one carries, if any: it is where the packets go."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return address.ipv4_mapped
        if any(address in network for network in NAT64):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address in IPV4_COMPATIBLE and int(address) > 1:
            return ipaddress.IPv4Address(int(address))
        if address.sixtofour:
            return address.sixtofour
    return address


def never_allowed(address: Address) -> str | None:
    """Why no prefix can allow an address, or None."""
    address = _carried(address)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in RESERVED:
        return "a reserved address"
    return None


def needs_naming(address: Address) -> str | None:
    """What kind of address only a prefix that names it allows, or None (a public one)."""
    address = _carried(address)
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified or address in THIS_NETWORK:
        return "an unspecified address"
    if any(address in network for network in PRIVATE):
        return "a private address"
    if not address.is_global:
        return "an address that is not globally reachable"
    return None


def never_allowed_host(host: str) -> str | None:
    """Why no prefix can allow a host, by its text alone, or None."""
    if host.lower().rstrip(".") in METADATA_NAMES:
        return "a cloud metadata name"
    address = literal(host)
    return never_allowed(address) if address is not None else None


def names(host: str, address: Address) -> bool:
    """Whether a host (a prefix's, which a URL under it shares) names an address."""
    written = literal(host)
    if written is not None:
        return _carried(written) == _carried(address)
    return host.lower() == "localhost" and _carried(address).is_loopback


@dataclass(frozen=True)
class Prefix:
    """A URL prefix of the allow-list, or of a secret."""

    scheme: str
    host: str  # as host_key writes it
    port: int | None  # None: any
    path: str  # raw, percent-encoded, from "/"
    text: str  # as the operator wrote it
    source: str = "DOWNSTREAM_URLS"

    @classmethod
    def parse(cls, text: str, source: str = "DOWNSTREAM_URLS") -> Prefix:
        """A prefix as written (`http://127.0.0.1:*/` for any port); NotAllowed when it
        is none, or names what no prefix may allow."""
        written = text.strip()
        any_port = ANY_PORT.match(written)
        url = parse_url(any_port["origin"] + written[any_port.end() :] if any_port else written)
        if url.query or url.fragment or "{id}" in written:
            raise NotAllowed("must not hold a query, a fragment or {id}")
        refused = never_allowed_host(wire_host(url))
        if refused:
            raise NotAllowed(f"names {refused}, which is never allowed")
        port = None if any_port else port_of(url)
        return cls(url.scheme, host_key(wire_host(url)), port, raw_path(url), written, source)

    def covers(self, url: httpx.URL) -> bool:
        return (
            url.scheme == self.scheme
            and host_key(wire_host(url)) == self.host
            and (self.port is None or port_of(url) == self.port)
            and _under(raw_path(url), self.path)
        )

    @property
    def shown(self) -> str:
        return self.text if self.source == "DOWNSTREAM_URLS" else f"{self.text} ({self.source})"


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def prefix_of_template(template: str, source: str) -> Prefix:
    """The prefix a URL with `{id}` names for itself: its origin, and its path up to the
    segment that holds `{id}` (all of its path when `{id}` is in the query)."""
    parts = urlsplit(template)
    path = (
        parts.path.split("{id}", 1)[0].rpartition("/")[0] + "/"
        if "{id}" in parts.path
        else parts.path
    )
    return Prefix.parse(f"{parts.scheme}://{parts.netloc}{path}", source)


@dataclass(frozen=True)
class Secret:
    """A value sent as a call's Authorization header, only to URLs under its prefix."""

    name: str
    prefix: Prefix
    value: str = field(repr=False)

    def covers(self, url: httpx.URL) -> bool:
        return self.prefix.covers(url)


@dataclass(frozen=True)
class Destination:
    """Where one call goes: its URL, and the checked addresses it may connect to, in
    the resolver's order of preference."""

    url: httpx.URL
    addresses: tuple[str, ...]

    def at(self, address: str) -> httpx.URL:
        """The URL with a checked address as its host: httpx connects to that address,
        never to one that a second lookup of the name could answer."""
        return self.url.copy_with(host=address)

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")


@dataclass(frozen=True)
class AllowList:
    """The prefixes a destination must be under."""

    prefixes: tuple[Prefix, ...] = ()

    @property
    def shown(self) -> str:
        if not self.prefixes:
            return "none (DOWNSTREAM_URLS is unset)"
        return ", ".join(prefix.shown for prefix in self.prefixes)

    def check(self, text: str) -> httpx.URL:
        """The URL, when its text is allowed; NotAllowed saying why otherwise."""
        url = parse_url(text)
        refused = never_allowed_host(wire_host(url))
        if refused:
            raise NotAllowed(f"names {refused}, which is never allowed")
        if any(prefix.covers(url) for prefix in self.prefixes):
            return url
        address = literal(wire_host(url))
        kind = needs_naming(address) if address is not None else None
        named = any(prefix.host == host_key(wire_host(url)) for prefix in self.prefixes)
        if kind and not named:
            raise NotAllowed(
                f"names {wire_host(url)}, {kind}: allowed only by a prefix of DOWNSTREAM_URLS "
                f"with that host (allowed: {self.shown})"
            )
        raise NotAllowed(f"is outside DOWNSTREAM_URLS (allowed: {self.shown})")

    def refusal(self, text: str) -> str | None:
        try:
            self.check(text)
        except NotAllowed as refused:
            return str(refused)
        return None

    def destination(self, text: str, resolve: Resolver) -> Destination:
        """Where a call to the URL connects: the addresses its host resolves to, once
        every one of them is allowed. NotAllowed saying why otherwise; an OSError when
        the host does not resolve."""
        url = self.check(text)
        addresses = tuple(resolve(wire_host(url), port_of(url)))
        if not addresses:
            raise OSError(f"{wire_host(url)} resolves to no address")
        for written in addresses:
            refused = address_refusal(wire_host(url), ipaddress.ip_address(written))
            if refused:
                raise NotAllowed(f"resolves to {written}, {refused}")
        return Destination(url, addresses)


def address_refusal(host: str, address: Address) -> str | None:
    """Why a call to `host` may not connect to `address`, or None."""
    kind = never_allowed(address)
    if kind:
        return f"{kind}, which is never allowed"
    kind = needs_naming(address)
    if kind and not names(host, address):
        return f"{kind}, which no prefix of DOWNSTREAM_URLS names"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses as the system resolves them, in its order of preference."""
    found = []
    for *_, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        written = address[0].partition("%")[0]  # an IPv6 zone is no part of the address
        if written not in found:
            found.append(written)
    return found


class CachingResolver:
    """Answers for each host kept RESOLVE_CACHE_SECONDS: at a thousand calls a second a
    lookup per call would cost more than the calls. A failed lookup is not kept."""

    def __init__(
        self,
        resolve: Resolver = system_resolver,
        seconds: float = RESOLVE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.resolve, self.seconds, self.clock = resolve, seconds, clock
        self.answers: dict[str, tuple[float, list[str]]] = {}
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        now = self.clock()
        with self.lock:
            kept = self.answers.get(host)
        if kept and kept[0] > now:
            return kept[1]
        addresses = self.resolve(host, port)
        with self.lock:
            self.answers[host] = (now + self.seconds, addresses)
        return addresses
