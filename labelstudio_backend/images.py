"""Fetching task images from Label Studio uploads, local-files storage and allowed http(s) hosts.

Each download connects with urllib3's connection class to the host and port that
:func:`~labelstudio_backend.urls.parse_url` read and checked, and sends that URL's path: the fetcher
parses no URL of its own, so the host checked is the host connected to. An allowed host name is
resolved once and connected to at an address :func:`~labelstudio_backend.addresses.connect_address`
allows (public, or in ``INSID3_ALLOWED_NETWORKS``), so its DNS cannot point the backend at
loopback, metadata services or the private network, not even by rebinding. Redirects are followed
here, each hop checked like the first; Label Studio's credentials go only to its exact origin and
never after a hop elsewhere. A watchdog shuts the socket at the download's deadline, so a server
sending a byte now and then cannot hold a worker past it.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urljoin

import urllib3
from PIL import Image, UnidentifiedImageError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.ssl_match_hostname import CertificateError

from insid3_core.io import InputError, load_image

from .addresses import AddressRefused, connect_address, parse_networks
from .budget import Lease, PixelBudget
from .credentials import Credentials, is_personal_access_token
from .errors import BackendError
from .urls import URL, UnsafeURL, canonical_host, parse_url

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
SHOWN_CHARACTERS = 200
FILE_ROUTES = re.compile(r"/(data/upload/|data/local-files/?\?|storage-data/uploaded/?\?|tasks/[0-9]+/presign/?\?)")
"""Label Studio's routes that serve task files (uploads, local files, storage data, presigned
cloud URIs), after the ``LABEL_STUDIO_URL`` path."""
CHUNK = 1 << 16
FETCH_THREADS = 8
"""Downloads of one request that run at once (:meth:`ImageFetcher.fetch_all`), so that their
latencies overlap: a batch of tasks on an object store is not one round trip after another."""
READ_SECONDS = 30
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSFER_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, CertificateError)
"""A connection that failed: refused, reset, cut, a bad answer or a certificate not for the host."""


def ca_bundle() -> str:
    """Certificates that verify https hosts: ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE`` or certifi's."""
    import certifi

    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or certifi.where()


class ImageFetcher:
    """Download and decode task images within size and time limits, from allowed hosts only.

    Parameters
    ----------
    credentials : Credentials
        Sent to Label Studio's own origin (scheme, host and port) only.
    allowed_hosts : iterable of str
        Host names accepted (any port, no credentials) beside Label Studio's origin.
    allowed_networks : iterable of str
        Networks (CIDR) an allowed host *name* may resolve to beside public addresses; an IP
        literal in ``allowed_hosts`` is connected to as given.
    max_bytes : int
        Largest file downloaded.
    max_pixels : int
        Largest image decoded (width x height).
    download_seconds : float
        Deadline of one download, redirects and slow bodies included.
    budget : PixelBudget or None
        Shared by every request's :meth:`lease` (default: ``2 * max_pixels``, 30 s wait).
    """

    def __init__(self, credentials: Credentials, allowed_hosts=(), allowed_networks=(),
                 max_bytes: int = 50 * 2**20, max_pixels: int = 100_000_000, download_seconds: float = 120.0,
                 budget: PixelBudget | None = None) -> None:
        self.credentials = credentials
        own = label_studio_url(credentials.base_url) if credentials.base_url else None
        self.own_origin = own.origin if own else None
        self.own_prefix = own.target.split("?")[0].rstrip("/") if own else ""  # Label Studio under a sub-path
        self.allowed_hosts = frozenset(map(_allowed_host, allowed_hosts))
        self.allowed_networks = parse_networks(allowed_networks)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.download_seconds = download_seconds
        self.budget = budget or PixelBudget(2 * max_pixels, 30.0)

    def lease(self, wait: float | None = None) -> Lease:
        """A request's share of the pixel budget, given back when its ``with`` block ends, and
        the deadline of all its downloads (``download_seconds`` from now); see :class:`Lease`."""
        return Lease(self.budget, self.download_seconds, wait)

    def url(self, address: str) -> URL:
        """The checked URL of a task's image address; raises :class:`BackendError` when refused.

        An address on Label Studio's origin (relative, or absolute) must be one of its file
        routes (:data:`FILE_ROUTES`) without ``.`` or ``..`` segments: the backend sends its
        credentials there, and a task's author must not make it ``GET`` Label Studio's API.
        """
        if not isinstance(address, str):
            raise BackendError(f"an image address must be a string, not {type(address).__name__}", 422)
        given = address
        if address.startswith("/"):
            if not self.credentials.base_url:
                raise BackendError(f"{named(address)} is served by Label Studio, but LABEL_STUDIO_URL is not set")
            address = self.credentials.base_url + "/" + address.lstrip("/")
        url = self._checked(address)
        if self.is_own(url):
            self._check_file_route(url, given)
        return url

    def _check_file_route(self, url: URL, given: str) -> None:
        route = url.target[len(self.own_prefix):] if url.target.startswith(self.own_prefix + "/") else ""
        decoded = unquote(unquote(route))
        if not FILE_ROUTES.match(route) or any(part in (".", "..") for part in re.split(r"[/?&=]", decoded)):
            raise BackendError(
                f"{named(given)} is on Label Studio but not one of its file routes without '..' "
                "(/data/upload/, /data/local-files/?d=, /storage-data/uploaded/?filepath=, "
                "/tasks/<id>/presign/?fileuri=): only those get Label Studio's credentials", 422)

    def _checked(self, address: str) -> URL:
        try:
            url = parse_url(address)
        except UnsafeURL as err:
            raise BackendError(f"{named(address)} is refused: it {err}", 422) from None
        if url.origin != self.own_origin and url.host not in self.allowed_hosts:
            raise BackendError(
                f"image host {url.host!r} is neither Label Studio's ({self.credentials.base_url or 'unset'}) "
                "nor listed in INSID3_ALLOWED_HOSTS", 403
            )
        return url

    def is_own(self, url: URL) -> bool:
        """``True`` when ``url`` is on Label Studio's origin (the only one given its credentials)."""
        return url.origin == self.own_origin

    def fetch(self, address: str, lease: Lease | None = None) -> Image.Image:
        """The image at ``address`` as RGB, EXIF orientation applied; its pixels are taken from
        ``lease`` before it is decoded, and its download ends by the lease's deadline (``None``:
        neither counted nor shared)."""
        data = self.download(address, None if lease is None else lease.deadline)
        try:
            with Image.open(io.BytesIO(data)) as handle:
                if handle.width * handle.height > self.max_pixels:
                    raise BackendError(
                        f"{named(address)} is {handle.width}x{handle.height}, above INSID3_MAX_PIXELS={self.max_pixels}", 413
                    )
                if lease is not None:
                    lease.take(handle.width * handle.height, named(address))
                handle.load()
                return load_image(handle)
        except BackendError:
            raise
        except UnidentifiedImageError:
            raise BackendError(f"{named(address)} is unreadable: not an image in a format PIL reads", 422) from None
        except (InputError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise BackendError(f"{named(address)} is unreadable: {err}", 422) from err

    def fetch_all(self, addresses: Sequence[str], lease: Lease) -> list[Image.Image | BackendError]:
        """:meth:`fetch` of every address, up to :data:`FETCH_THREADS` at once, in their order;
        an image that fails has its :class:`BackendError` in its place. All share ``lease``
        (its pixels and its deadline)."""
        def fetched(address: str) -> Image.Image | BackendError:
            try:
                return self.fetch(address, lease)
            except BackendError as err:
                return err

        if len(addresses) < 2:
            return [fetched(address) for address in addresses]
        with ThreadPoolExecutor(min(FETCH_THREADS, len(addresses)), thread_name_prefix="insid3-fetch") as pool:
            return list(pool.map(fetched, addresses))

    def download(self, address: str, deadline: float | None = None) -> bytes:
        """The bytes at ``address``, following redirects to allowed hosts only, within
        ``download_seconds`` and by ``deadline`` (a :func:`time.monotonic` time) when given."""
        url = self.url(address)
        deadline = min(time.monotonic() + self.download_seconds, deadline or float("inf"))
        trusted = True  # every hop so far stayed on Label Studio's origin
        for _ in range(MAX_REDIRECTS + 1):
            trusted = trusted and self.is_own(url)
            with self._open(url, trusted, deadline, address) as exchange:
                response = exchange.response
                if response.status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise BackendError(f"{named(address)}: HTTP {response.status} without a Location", 422)
                    url = self._checked(urljoin(str(url), location))
                    continue
                if response.status != 200:
                    raise BackendError(f"{named(address)}: HTTP {response.status} from {url.host}", 422)
                return exchange.read(self.max_bytes)
        raise BackendError(f"{named(address)}: more than {MAX_REDIRECTS} redirects", 422)

    def _open(self, url: URL, trusted: bool, deadline: float, address: str) -> "_Exchange":
        """The answer to ``GET url``: with credentials when ``trusted``, retried once with a fresh
        access token after a 401."""
        peer = self._peer(url, address)
        exchange = _Exchange(url, peer, self.credentials.headers() if trusted else {}, deadline, address).open()
        if exchange.response.status == 401 and trusted and is_personal_access_token(self.credentials.api_key):
            exchange.close()
            exchange = _Exchange(url, peer, self.credentials.headers(refresh=True), deadline, address).open()
        return exchange

    def _peer(self, url: URL, address: str) -> str:
        """The address connected to for ``url``: its host as given on Label Studio's origin or as
        an IP literal, else the address its allowed name resolves to (checked, then pinned)."""
        if self.is_own(url) or _is_ip_literal(url.host):
            return url.host
        try:
            return connect_address(url.host, url.port, self.allowed_networks)
        except AddressRefused as err:
            log.warning("%s: image host %s %s, outside INSID3_ALLOWED_NETWORKS", named(address), url.host, err)
            raise BackendError(
                f"{named(address)} is refused: image host {url.host!r} resolves only to non-public addresses "
                "(loopback, private, link-local or reserved); list their network in INSID3_ALLOWED_NETWORKS "
                "to allow them", 403) from None
        except OSError as err:
            log.warning("%s: image host %s does not resolve: %s", named(address), url.host, err)
            raise BackendError(f"{named(address)} cannot be downloaded from {url.host}: the connection failed",
                               502) from None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Exchange:
    """One ``GET`` on a connection of its own to ``peer`` (``url``'s host or the address it was
    pinned to) at ``url``'s port, cut off at ``deadline``; ``Host``, SNI and the certificate check
    name ``url``'s host."""

    def __init__(self, url: URL, peer: str, headers: dict[str, str], deadline: float, address: str) -> None:
        self.address = address
        self.seconds_left = deadline - time.monotonic()
        timeout = max(0.001, min(READ_SECONDS, self.seconds_left))
        if url.scheme == "https":
            self.connection = HTTPSConnection(peer, url.port, timeout=timeout, cert_reqs="CERT_REQUIRED",
                                              ca_certs=ca_bundle(), server_hostname=url.host,
                                              assert_hostname=url.host)
        else:
            self.connection = HTTPConnection(peer, url.port, timeout=timeout)
        if peer != url.host:
            headers = {**headers, "Host": url.authority}
        self.cut = threading.Event()
        self.watchdog = threading.Timer(max(0.0, self.seconds_left), self._cut)
        self.watchdog.daemon = True
        self.url, self.headers = url, headers
        self.socket = None  # kept: http.client drops the connection's socket once a response will close
        self.response = None

    def open(self) -> "_Exchange":
        """Send the request and read the answer's status and headers."""
        if self.seconds_left <= 0:
            raise self._late()
        self.watchdog.start()
        try:
            self.connection.request("GET", self.url.target, headers=self.headers, preload_content=False)
            self.socket = self.connection.sock
            self.response = self.connection.getresponse()
        except TRANSFER_ERRORS as err:
            self.close()
            raise self._late() if self.cut.is_set() else self._failed(err) from None
        return self

    def __enter__(self) -> "_Exchange":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def read(self, max_bytes: int) -> bytes:
        """The body (decoded), refused beyond ``max_bytes`` or after the deadline."""
        declared = self.response.headers.get("Content-Length", "")
        if declared.isdigit() and len(declared) < 20 and int(declared) > max_bytes:
            raise BackendError(f"{named(self.address)} is {declared} bytes, above INSID3_MAX_DOWNLOAD_BYTES={max_bytes}", 413)
        body = bytearray()
        try:
            for chunk in self.response.stream(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise BackendError(f"{named(self.address)} is above INSID3_MAX_DOWNLOAD_BYTES={max_bytes} bytes", 413)
        except TRANSFER_ERRORS as err:
            raise self._late() if self.cut.is_set() else self._failed(err) from None
        if self.cut.is_set():
            raise self._late()
        return bytes(body)

    def close(self) -> None:
        self.watchdog.cancel()
        if self.response is not None:
            self.response.close()
        self.connection.close()

    def _cut(self) -> None:
        self.cut.set()
        sock = self.socket or self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _late(self) -> BackendError:
        return BackendError(f"{named(self.address)} was not downloaded within INSID3_DOWNLOAD_SECONDS "
                            "(one request's downloads together)", 504)

    def _failed(self, err: Exception) -> BackendError:
        """A 502 that does not say why the connection failed (refused, reset, unreachable: a port
        scanner's answers); the log does."""
        log.warning("%s: download from %s:%s failed: %s", named(self.address), self.url.host, self.url.port, err)
        return BackendError(f"{named(self.address)} cannot be downloaded from {self.url.host}: the connection failed", 502)


def named(address: str) -> str:
    """``image '<address>'`` for messages and the log, its credentials (:func:`redacted`) hidden,
    cut to its first :data:`SHOWN_CHARACTERS`."""
    shown = redacted(address)
    shown = shown[:SHOWN_CHARACTERS] + ("..." if len(shown) > SHOWN_CHARACTERS else "")
    return f"image {shown!r}"


USER_INFORMATION = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*@")
SECRET_PARAMETER = re.compile(r"([?&;#]([^=&;#]*(?:sig|token|key|secret|pass|credential|auth|session)[^=&;#]*)=)[^&;#]*",
                              re.IGNORECASE)


def label_studio_url(address: str) -> URL:
    """``LABEL_STUDIO_URL`` parsed; a ``ValueError`` naming the variable (the address
    :func:`redacted`) when :func:`~labelstudio_backend.urls.parse_url` refuses it."""
    try:
        return parse_url(address)
    except UnsafeURL as err:
        raise ValueError(f"LABEL_STUDIO_URL={redacted(address)!r} {err}") from None


def redacted(address: str) -> str:
    """``address`` with its user information and the values of its credential-like query parameters
    (the signature and credential of a presigned S3 or GCS URL, an Azure SAS ``sig``, a ``token``
    or ``api_key``) shown as ``***``, so that neither Label Studio's users nor the log see them.
    Other parameters (``?d=`` of a local file) stay readable."""
    address = USER_INFORMATION.sub(lambda found: f"{found.group(1) or ''}//***@", address)
    return SECRET_PARAMETER.sub(lambda found: f"{found.group(1)}***", address)


def _allowed_host(host: str) -> str:
    """An ``INSID3_ALLOWED_HOSTS`` entry as :attr:`URL.host` spells it; a ``ValueError`` naming it."""
    try:
        return canonical_host(host)
    except UnsafeURL as err:
        raise ValueError(f"INSID3_ALLOWED_HOSTS: the entry {host!r} {err}") from None
