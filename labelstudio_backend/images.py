"""Fetching task images from Label Studio uploads, local-files storage and allowed http(s) hosts."""

from __future__ import annotations

import io
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image

from insid3_core.io import InputError, load_image

from .credentials import Credentials
from .errors import BackendError

MAX_REDIRECTS = 5
CHUNK = 1 << 16


class ImageFetcher:
    """Download and decode task images within size limits, from allowed hosts only.

    Parameters
    ----------
    credentials : Credentials
        Sent to Label Studio's own host only.
    allowed_hosts : iterable of str
        Host names accepted beside Label Studio's.
    max_bytes : int
        Largest file downloaded.
    max_pixels : int
        Largest image decoded (width x height).
    """

    def __init__(self, credentials: Credentials, allowed_hosts=(), max_bytes: int = 50 * 2**20,
                 max_pixels: int = 100_000_000) -> None:
        self.credentials = credentials
        self.own_host = (urlsplit(credentials.base_url).hostname or "").lower()
        self.allowed_hosts = {host.lower() for host in allowed_hosts}
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def url(self, address: str) -> str:
        """Absolute URL of a task's image address; raises :class:`BackendError` when refused."""
        if address.startswith("/"):
            if not self.credentials.base_url:
                raise BackendError(f"image {address!r} is served by Label Studio, but LABEL_STUDIO_URL is not set")
            address = urljoin(self.credentials.base_url + "/", address.lstrip("/"))
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https"):
            raise BackendError(f"image {address[:200]!r}: only Label Studio uploads, local files and http(s) URLs are supported", 422)
        host = (parts.hostname or "").lower()
        if host != self.own_host and host not in self.allowed_hosts:
            raise BackendError(
                f"image host {host!r} is neither Label Studio's nor listed in INSID3_ALLOWED_HOSTS", 403
            )
        return address

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
        """The bytes at ``address``, following redirects to allowed hosts only."""
        url = self.url(address)
        for _ in range(MAX_REDIRECTS + 1):
            own = (urlsplit(url).hostname or "").lower() == self.own_host
            try:
                if own:
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
                return self._read_limited(response, address)
        raise BackendError(f"image {address!r}: more than {MAX_REDIRECTS} redirects", 422)

    def _read_limited(self, response: requests.Response, address: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise BackendError(f"image {address!r} is {declared} bytes, above INSID3_MAX_DOWNLOAD_BYTES={self.max_bytes}", 413)
        body = bytearray()
        for chunk in response.iter_content(CHUNK):
            body += chunk
            if len(body) > self.max_bytes:
                raise BackendError(f"image {address!r} is above INSID3_MAX_DOWNLOAD_BYTES={self.max_bytes} bytes", 413)
        return bytes(body)
