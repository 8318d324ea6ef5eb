"""Backend settings, read from the label-studio-ml environment variables and ``INSID3_*``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from insid3_core.config import BATCH_SIZE, env_setting, number
from insid3_core.instances import INSTANCE_METHODS

INSTANCE_CHOICES = ("off", *INSTANCE_METHODS)
MAX_QUEUED_REQUESTS = 10_000


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from its environment.

    Parameters
    ----------
    label_studio_url : str
        ``LABEL_STUDIO_URL``, base address of Label Studio (no trailing slash).
    api_key : str
        ``LABEL_STUDIO_API_KEY``: a legacy token or a personal access token (JWT refresh token).
    basic_auth : tuple of (str, str) or None
        ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``; when set every route requires them.
    model_dir : Path
        ``MODEL_DIR``: the cache of references made from annotations.
    reference_dir : Path or None
        ``INSID3_REFERENCE_DIR``: one sub-folder per label of ``<stem>.<ext>`` images and
        ``<stem>_mask.png`` masks.
    allowed_hosts : frozenset of str
        ``INSID3_ALLOWED_HOSTS`` (comma separated) beside Label Studio's own host.
    allowed_networks : frozenset of str
        ``INSID3_ALLOWED_NETWORKS`` (comma separated CIDR networks): addresses an allowed host
        name may resolve to beside public ones (default: none, so a name resolving to loopback,
        private or link-local addresses is refused).
    max_download_bytes : int
        ``INSID3_MAX_DOWNLOAD_BYTES``: largest image file fetched.
    max_pixels : int
        ``INSID3_MAX_PIXELS``: largest decoded image (width x height).
    download_seconds : float
        ``INSID3_DOWNLOAD_SECONDS``: deadline of one image download, redirects included.
    max_pixels_in_flight : int
        ``INSID3_MAX_PIXELS_IN_FLIGHT``: pixels of decoded task images held at once by all requests
        (at least ``max_pixels``); a request beyond it waits, then is answered 503.
    decode_wait : float
        ``INSID3_DECODE_WAIT``: seconds a request waits for ``max_pixels_in_flight`` before its 503.
    max_request_bytes : int
        ``INSID3_MAX_REQUEST_BYTES``: largest request body accepted (413 beyond).
    max_queued_requests : int
        ``INSID3_MAX_QUEUED_REQUESTS``: work requests waiting for a turn beyond those served at
        once; one more is answered 503 at once.
    queue_wait : float
        ``INSID3_QUEUE_WAIT``: seconds a work request waits for its turn before its 503.
    max_tasks_per_request : int
        ``INSID3_MAX_TASKS_PER_REQUEST``: larger ``/predict`` requests are answered so that
        Label Studio retrieves the tasks one by one (each within its own timeout).
    batch_size : int
        ``INSID3_BATCH_SIZE``: targets per backbone call.
    warmup_wait : float
        ``INSID3_WARMUP_WAIT``: seconds a ``/predict`` request waits for the project's references
        to be read and encoded in the background before it is answered 503 (retry later);
        below Label Studio's ``ML_TIMEOUT_PREDICT`` (100 s).
    instances : {"off", "necks", "components", "clusters"}
        ``INSID3_INSTANCES``: ``off`` gives one region per label; a method (see
        :func:`insid3_core.instances.instance_labels`) gives one region per instance.
    min_instance_patches : int
        ``INSID3_MIN_INSTANCE_PATCHES``: instances of fewer feature patches are dropped.
    negative_label : str
        ``INSID3_NEGATIVE_LABEL``: a reserved BrushLabels label whose brushed regions mean "not
        this": they are negative references for every other label and are never predicted
        (empty: no reserved label).
    polygon_tolerance : float
        ``INSID3_POLYGON_TOLERANCE``: pixels a ``PolygonLabels`` outline may depart from the mask
        (Douglas-Peucker simplification; 0 keeps every boundary pixel).
    calibrate : bool
        ``INSID3_CALIBRATE`` (``on``/``off``): once a label has references on three images, each
        pool is calibrated (:func:`insid3_core.calibration.calibrate`) before it is encoded, and
        predicted with the chosen settings.
    """

    label_studio_url: str = ""
    api_key: str = ""
    basic_auth: tuple[str, str] | None = None
    model_dir: Path = Path("insid3-model")
    reference_dir: Path | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_networks: frozenset[str] = field(default_factory=frozenset)
    max_download_bytes: int = 50 * 2**20
    max_pixels: int = 100_000_000
    download_seconds: float = 120.0
    max_pixels_in_flight: int = 200_000_000
    decode_wait: float = 30.0
    max_request_bytes: int = 64 * 2**20
    max_queued_requests: int = 256
    queue_wait: float = 90.0
    max_tasks_per_request: int = 8
    batch_size: int = BATCH_SIZE
    warmup_wait: float = 30.0
    instances: str = "off"
    min_instance_patches: int = 1
    negative_label: str = ""
    polygon_tolerance: float = 1.0
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.instances not in INSTANCE_CHOICES:
            raise ValueError(f"INSID3_INSTANCES must be one of {', '.join(INSTANCE_CHOICES)}, got {self.instances!r}")
        for name in ("max_download_bytes", "max_pixels", "max_request_bytes", "max_tasks_per_request", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"INSID3_{name.upper()} must be >= 1, got {getattr(self, name)}")
        if self.max_pixels_in_flight < self.max_pixels:
            raise ValueError(f"INSID3_MAX_PIXELS_IN_FLIGHT={self.max_pixels_in_flight} is below "
                             f"INSID3_MAX_PIXELS={self.max_pixels}: no image that size could be decoded")
        if not 0 <= self.max_queued_requests <= MAX_QUEUED_REQUESTS:
            raise ValueError(f"INSID3_MAX_QUEUED_REQUESTS must be from 0 to {MAX_QUEUED_REQUESTS} (a thread each), "
                             f"got {self.max_queued_requests}")
        for name in ("download_seconds", "warmup_wait", "decode_wait", "queue_wait"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"INSID3_{name.upper()} must be a positive number of seconds, got {getattr(self, name)}")
        if not 0 <= self.polygon_tolerance < float("inf"):
            raise ValueError(f"INSID3_POLYGON_TOLERANCE must be a number of pixels >= 0, got {self.polygon_tolerance}")
        if self.min_instance_patches < 1:
            raise ValueError(f"INSID3_MIN_INSTANCE_PATCHES must be >= 1, got {self.min_instance_patches}")
        check_credentials(self.api_key, self.basic_auth)

    @classmethod
    def from_environment(cls) -> "Settings":
        """Read the settings from ``os.environ``; raises ``ValueError`` naming a bad variable."""
        user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
        if bool(user) != bool(password):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        reference_dir = env_setting("reference_dir")
        hosts = env_setting("allowed_hosts", "")
        return cls(
            label_studio_url=os.environ.get("LABEL_STUDIO_URL", "").rstrip("/"),
            api_key=os.environ.get("LABEL_STUDIO_API_KEY", ""),
            basic_auth=(user, password) if user else None,
            model_dir=Path(os.environ.get("MODEL_DIR", "insid3-model")).expanduser(),
            reference_dir=Path(reference_dir).expanduser() if reference_dir else None,
            allowed_hosts=frozenset(h.strip().lower() for h in hosts.split(",") if h.strip()),
            allowed_networks=frozenset(n.strip() for n in env_setting("allowed_networks", "").split(",") if n.strip()),
            max_download_bytes=env_setting("max_download_bytes", cls.max_download_bytes, int),
            max_pixels=env_setting("max_pixels", cls.max_pixels, int),
            download_seconds=env_setting("download_seconds", cls.download_seconds, number),
            max_pixels_in_flight=env_setting("max_pixels_in_flight", cls.max_pixels_in_flight, int),
            decode_wait=env_setting("decode_wait", cls.decode_wait, number),
            max_request_bytes=env_setting("max_request_bytes", cls.max_request_bytes, int),
            max_queued_requests=env_setting("max_queued_requests", cls.max_queued_requests, int),
            queue_wait=env_setting("queue_wait", cls.queue_wait, number),
            max_tasks_per_request=env_setting("max_tasks_per_request", cls.max_tasks_per_request, int),
            batch_size=env_setting("batch_size", cls.batch_size, int),
            warmup_wait=env_setting("warmup_wait", cls.warmup_wait, number),
            instances=env_setting("instances", cls.instances).strip().lower(),
            min_instance_patches=env_setting("min_instance_patches", cls.min_instance_patches, int),
            negative_label=env_setting("negative_label", cls.negative_label).strip(),
            polygon_tolerance=env_setting("polygon_tolerance", cls.polygon_tolerance, number),
            calibrate=switch("calibrate"),
        )


def check_credentials(api_key: str, basic_auth: tuple[str, str] | None) -> None:
    """A ``ValueError`` naming the variable of a credential no HTTP header can carry; the
    message never holds the value (it would reach logs and Label Studio's users).

    The token goes into an ``Authorization`` header as it is, so it must be printable ASCII
    without spaces: a trailing newline from a secrets file would otherwise fail every call, and
    the HTTP client's error quotes the header. A Basic-auth user name cannot hold ``:`` (the
    scheme splits user and password at the first one) and neither part a control character.
    """
    if api_key and not all("!" <= char <= "~" for char in api_key):
        raise ValueError("LABEL_STUDIO_API_KEY holds spaces, control or non-ASCII characters (a trailing newline "
                         "from a secrets file?): set the token alone; its value is not shown here")
    if basic_auth is None:
        return
    user, password = basic_auth
    if ":" in user:
        raise ValueError("BASIC_AUTH_USER must not hold ':' (HTTP Basic auth splits user and password there, "
                         "so no client could log in)")
    for name, value in (("BASIC_AUTH_USER", user), ("BASIC_AUTH_PASS", password)):
        if not value.isprintable():
            raise ValueError(f"{name} holds control characters (a trailing newline from a secrets file?); "
                             "its value is not shown here")


def switch(name: str) -> bool:
    """``INSID3_<NAME>`` as on (``on``, ``true``, ``1``, ``yes``) or off (unset, ``off``, ``false``, ``0``, ``no``)."""
    value = env_setting(name, "off").strip().lower()
    if value not in ON + OFF:
        raise ValueError(f"INSID3_{name.upper()} must be on or off, got {value!r}")
    return value in ON


ON, OFF = ("on", "true", "1", "yes"), ("off", "false", "0", "no", "")
