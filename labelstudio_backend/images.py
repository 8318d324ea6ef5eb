"""Fetching task images from Label Studio uploads, local-files storage and allowed http(s) hosts."""

from __future__ import annotations

import io
import time
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image

from insid3_core.io import InputError, load_image

from .credentials import Credentials
from .errors import BackendError

MAX_REDIRECTS = 5
CHUNK = 1 << 16
DOWNLOAD_SECONDS = 120
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, the default port made explicit; ``ValueError`` when malformed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


class ImageFetcher:
    """Download and decode task images within size limits, from allowed hosts only.

    Parameters
    ----------
    credentials : Credentials
        Sent to Label Studio's own origin (scheme, host and port) only.
    allowed_hosts : iterable of str
        Host names accepted (any port, no credentials) beside Label Studio's origin.
    max_bytes : int
        Largest file downloaded.
    max_pixels : int
        Largest image decoded (width x height).
    """

    def __init__(self, credentials: Credentials, allowed_hosts=(), max_bytes: int = 50 * 2**20,
                 max_pixels: int = 100_000_000) -> None:
        self.credentials = credentials
        self.own_origin = origin(credentials.base_url) if credentials.base_url else None
        self.allowed_hosts = {host.lower() for host in allowed_hosts}
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def url(self, address: str) -> str:
        """Absolute URL of a task's image address; raises :class:`BackendError` when refused."""
        if address.startswith("/"):
            if not self.credentials.base_url:
                raise BackendError(f"image {address!r} is served by Label Studio, but LABEL_STUDIO_URL is not set")
            address = urljoin(self.credentials.base_url + "/", address.lstrip("/"))
        try:
            scheme, host, _ = origin(address)
        except ValueError as err:
            raise BackendError(f"image {address[:200]!r} is not a valid URL: {err}", 422) from err
        if scheme not in ("http", "https"):
            raise BackendError(f"image {address[:200]!r}: only Label Studio uploads, local files and http(s) URLs are supported", 422)
        if not self.is_own(address) and host not in self.allowed_hosts:
            raise BackendError(
                f"image host {host!r} is neither Label Studio's ({self.credentials.base_url or 'unset'}) "
                "nor listed in INSID3_ALLOWED_HOSTS", 403
            )
        return address

    def is_own(self, url: str) -> bool:
        """``True`` when ``url`` is on Label Studio's origin (the only one given its credentials)."""
        return origin(url) == self.own_origin

    def fetch(self, address: str) -> Image.Image:
        """The image at ``address`` as RGB, EXIF orientation applied."""
        data = self.download(address)
        try:
            with Image.open(io.BytesIO(data)) as handle:
                if handle.width * handle.height > self.max_pixels:
                    raise BackendError(
                        f"image {address!r} is {handle.width}x{handle.height}, above INSID3_MAX_PIXELS={self.max_pixels}", 413
                    )
                handle.load()
                return load_image(handle)
        except BackendError:
            raise
        except (InputError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise BackendError(f"image {address!r} is unreadable: {err}", 422) from err

    def download(self, address: str) -> bytes:
        """The bytes at ``address``, following redirects to allowed hosts only, within ``DOWNLOAD_SECONDS``."""
        url = self.url(address)
        deadline = time.monotonic() + DOWNLOAD_SECONDS
        for _ in range(MAX_REDIRECTS + 1):
            try:
                if self.is_own(url):
                    response = self.credentials.get(url, stream=True, timeout=(10, 120), allow_redirects=False)
                else:
                    response = requests.get(url, stream=True, timeout=(10, 120), allow_redirects=False)
            except requests.RequestException as err:
                raise BackendError(f"image {address!r} cannot be downloaded: {err}", 502) from err
            with response:
                if response.is_redirect:
                    url = self.url(urljoin(url, response.headers["Location"]))
                    continue
                if response.status_code != 200:
                    raise BackendError(f"image {address!r}: HTTP {response.status_code} from {urlsplit(url).hostname}", 422)
                return self._read_limited(response, address, deadline)
        raise BackendError(f"image {address!r}: more than {MAX_REDIRECTS} redirects", 422)

    def _read_limited(self, response: requests.Response, address: str, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise BackendError(f"image {address!r} is {declared} bytes, above INSID3_MAX_DOWNLOAD_BYTES={self.max_bytes}", 413)
        body = bytearray()
        try:
            for chunk in response.iter_content(CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise BackendError(f"image {address!r} is above INSID3_MAX_DOWNLOAD_BYTES={self.max_bytes} bytes", 413)
                if time.monotonic() > deadline:
                    raise BackendError(f"image {address!r} took more than {DOWNLOAD_SECONDS} s to download", 504)
        except requests.RequestException as err:
            raise BackendError(f"image {address!r} cannot be downloaded: {err}", 502) from err
        return bytes(body)
