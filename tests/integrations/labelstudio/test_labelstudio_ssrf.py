"""Image downloads against real listeners on three loopback addresses: Label Studio (127.0.0.1), an
allowed image host (127.0.0.3) and an attacker (127.0.0.2) that must never be reached.

The table holds URLs that ``urllib.parse`` and urllib3 read as different hosts, or that some client
normalises into another host: each must be refused before any byte leaves, and Label Studio's API
key must never reach anything but Label Studio's exact origin.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import urllib.parse

import pytest

pytest.importorskip("flask")

from labelstudio_fixtures import (BRUSH_CONFIG, Listener, UPLOADS, brush_region, reference_folder,  # noqa: E402
                                  self_signed_certificate, small_segmenter)

from labelstudio_backend.addresses import is_allowed, parse_networks  # noqa: E402
from labelstudio_backend.credentials import Credentials  # noqa: E402
from labelstudio_backend.errors import BackendError  # noqa: E402
from labelstudio_backend.images import ImageFetcher, redacted  # noqa: E402
from labelstudio_backend.urls import UnsafeURL, canonical_host, parse_url  # noqa: E402

API_KEY = "secret-api-key"


@pytest.fixture(scope="module")
def hosts():
    listeners = {name: Listener(address) for name, address in
                 (("label_studio", "127.0.0.1"), ("attacker", "127.0.0.2"), ("allowed", "127.0.0.3"))}
    yield listeners
    for listener in listeners.values():
        listener.close()


@pytest.fixture
def fetcher(hosts):
    for listener in hosts.values():
        listener.requests.clear()
        listener.host_headers.clear()
    return ImageFetcher(Credentials(hosts["label_studio"].url, API_KEY), allowed_hosts={"127.0.0.3"},
                        download_seconds=1.0)


# {L}: Label Studio's host:port, {A}: the attacker's, {Ap}: the attacker's port alone
DIFFERENTIAL_URLS = [
    r"http://{A}\@{L}/x.png",
    r"http://{A}\\@{L}/x.png",
    r"http:\\{A}\x.png",
    r"http:/\{A}/x.png",
    r"http://{L}\.{A}/x.png",
    "http://{A}@{L}/x.png",
    "http://{L}@{A}/x.png",
    "http://x@{A}@{L}/x.png",
    "http://{A}:@{L}/x.png",
    "http://{A}%40{L}/x.png",
    "http://{A}%2f@{L}/x.png",
    "http://{A}%5c@{L}/x.png",
    "http://{L}%2f%2f{A}/x.png",
    "http://{A}%23@{L}/x.png",
    "http://{A}\t@{L}/x.png",
    "http://{A}\n@{L}/x.png",
    "http://{A}\r\n@{L}/x.png",
    "http://127.0.0.\t2:{Ap}/x.png",
    "\thttp://{A}/x.png",
    " http://{A}/x.png",
    "http://{A}\x00@{L}/x.png",
    "http://{A}＠{L}/x.png",
    "http://[::ffff:127.0.0.2]:{Ap}/x.png",
    "http://[::ffff:7f00:2]:{Ap}/x.png",
    "http://[::1%25lo]:{Ap}/x.png",
    "http://[fe80::1%lo]:{Ap}/x.png",
    "http://[::1%2540{L}]/x.png",
    "http://127。0。0。2:{Ap}/x.png",
    "http://127．0．0．2:{Ap}/x.png",
    "http://１２７.0.0.2:{Ap}/x.png",
    "http://127.0.0.2%E3%80%82:{Ap}/x.png",
    "http://2130706434:{Ap}/x.png",
    "http://0x7f000002:{Ap}/x.png",
    "http://017700000002:{Ap}/x.png",
    "http://0177.0.0.2:{Ap}/x.png",
    "http://0x7f.0.0.2:{Ap}/x.png",
    "http://127.2:{Ap}/x.png",
    "http://127.0.2:{Ap}/x.png",
    "http://127.000.000.002:{Ap}/x.png",
    "http://{L}:{Ap}/x.png",
    "http://{A};@{L}/x.png",
    "http:///{A}/x.png",
    "HTTP://{A}/x.png",
    "http://{A}/x.png",
]


def expand(template: str, hosts) -> str:
    attacker = hosts["attacker"].authority
    return template.format(L=hosts["label_studio"].authority, A=attacker, Ap=attacker.rsplit(":", 1)[1])


@pytest.mark.parametrize("template", DIFFERENTIAL_URLS)
def test_parser_differential_urls_are_refused_before_any_request(template, hosts, fetcher):
    address = expand(template, hosts)
    with pytest.raises(BackendError) as refused:
        fetcher.fetch(address)
    assert refused.value.status in (403, 422), refused.value.message
    assert hosts["attacker"].requests == []
    assert all(auth is None for listener in ("allowed", "attacker") for _, auth in hosts[listener].requests)


def test_every_refused_url_that_both_parsers_read_is_refused_by_the_strict_parser_too(hosts):
    """The table's URLs are not refused by accident: each one that parse_url accepts (only
    canonical-looking foreign hosts) names a host other than Label Studio's."""
    for template in DIFFERENTIAL_URLS:
        try:
            url = parse_url(expand(template, hosts))
        except UnsafeURL:
            continue
        assert url.host != "127.0.0.1", template


def test_label_studio_and_allowed_hosts_are_fetched_with_credentials_only_on_label_studio(hosts, fetcher):
    assert fetcher.fetch(f"HTTP://{hosts['label_studio'].authority}{UPLOADS}/x.png#fragment").size == (8, 6)
    assert fetcher.fetch(f"{UPLOADS}/x.png").size == (8, 6)
    assert hosts["label_studio"].requests == [(f"{UPLOADS}/x.png", f"Token {API_KEY}")] * 2
    assert fetcher.fetch(hosts["allowed"].url + "/x.png").size == (8, 6)
    assert hosts["allowed"].requests == [("/x.png", None)]


def redirect(listener, location: str) -> str:
    return f"{listener.url}{UPLOADS}/to?{urllib.parse.quote(location, safe='')}"


def test_redirects_are_checked_on_every_hop(hosts, fetcher):
    label_studio, attacker, allowed = hosts["label_studio"], hosts["attacker"], hosts["allowed"]
    for hop in (rf"http://{attacker.authority}\@{label_studio.authority}/x.png", attacker.url + "/x.png",
                f"//{attacker.authority}/x.png", rf"\\{attacker.authority}/x.png"):
        for start in (label_studio, allowed):
            with pytest.raises(BackendError):
                fetcher.fetch(redirect(start, hop))
    assert attacker.requests == []
    with pytest.raises(BackendError, match="more than 5 redirects"):
        fetcher.fetch(redirect(label_studio, redirect(label_studio, redirect(label_studio, redirect(
            label_studio, redirect(label_studio, redirect(label_studio, "/x.png")))))))


def test_credentials_never_follow_a_redirect_off_label_studio(hosts, fetcher):
    label_studio, allowed = hosts["label_studio"], hosts["allowed"]
    assert fetcher.fetch(redirect(label_studio, "/x.png")).size == (8, 6)
    assert [auth for _, auth in label_studio.requests] == [f"Token {API_KEY}"] * 2
    label_studio.requests.clear()
    # Label Studio -> allowed host: no key; allowed host -> back to Label Studio: still no key
    assert fetcher.fetch(redirect(label_studio, redirect(allowed, label_studio.url + "/x.png"))).size == (8, 6)
    assert [auth for _, auth in label_studio.requests] == [f"Token {API_KEY}", None]
    assert [auth for _, auth in allowed.requests] == [None]


@pytest.mark.parametrize("path, status, message", [
    ("/status?404", 422, "HTTP 404 from 127.0.0.3"),
    ("/status?500", 422, "HTTP 500 from 127.0.0.3"),
    ("/status?302", 422, "HTTP 302 without a Location"),
    ("/unsized?4096", 413, "above INSID3_MAX_DOWNLOAD_BYTES=1024 bytes"),
    ("/text", 422, "is unreadable: not an image in a format PIL reads"),
])
def test_an_image_server_that_fails_is_a_client_error_naming_the_image(hosts, fetcher, path, status, message):
    """An error status, a redirect to nowhere, a body with no declared length longer than the
    limit (counted as it streams), a page that is not an image: each is the request's error with
    the address and why, never the server's own page."""
    fetcher.max_bytes = 1024
    address = hosts["allowed"].url + path
    with pytest.raises(BackendError) as failed:
        fetcher.fetch(address)
    assert failed.value.status == status and message in failed.value.message and address in failed.value.message
    assert "internal details" not in failed.value.message
    assert hosts["allowed"].requests == [(path, None)], "asked once, never retried"


@pytest.mark.parametrize("path", ["/drip", "/slow-headers"])
def test_a_download_has_one_deadline_however_slowly_the_server_sends(hosts, fetcher, path):
    """1 byte every 50 ms would take 50 s; the 1 s deadline cuts the connection long before."""
    allowed = hosts["allowed"]
    allowed.dripped = 0
    with pytest.raises(BackendError) as late:
        fetcher.fetch(allowed.url + path)
    assert late.value.status == 504 and "INSID3_DOWNLOAD_SECONDS" in late.value.message
    assert allowed.dripped < 500


def test_one_request_shares_one_download_deadline(hosts, fetcher):
    """Images of one request end within one INSID3_DOWNLOAD_SECONDS together: once the first has
    used it up, the next is refused without a connection."""
    allowed = hosts["allowed"]
    allowed.requests.clear()
    with fetcher.lease() as lease:
        for _ in range(2):
            with pytest.raises(BackendError) as late:
                fetcher.fetch(allowed.url + "/drip", lease)
            assert late.value.status == 504 and "one request's downloads together" in late.value.message
    assert [path for path, _ in allowed.requests] == ["/drip"]
    assert fetcher.fetch(allowed.url + "/x.png", fetcher.lease()).size == (8, 6)  # a new request, a new deadline


def test_a_requests_downloads_run_at_once(hosts):
    """Each of the four images is sent once all four requests are in: one download after another,
    the first would wait alone until its deadline. A failing one keeps its place."""
    label_studio = hosts["label_studio"]
    fetcher = ImageFetcher(Credentials(label_studio.url, API_KEY), download_seconds=10.0)
    addresses = [f"{label_studio.url}{UPLOADS}/together?4&{index}" for index in range(4)]
    addresses.insert(2, f"{label_studio.url}{UPLOADS}/status?404")

    with fetcher.lease() as lease:
        images = fetcher.fetch_all(addresses, lease)
        assert lease.pixels == 4 * 8 * 6, "every image's pixels are on the request's lease"
    assert [getattr(image, "size", None) for image in images] == [(8, 6), (8, 6), None, (8, 6), (8, 6)]
    assert isinstance(images[2], BackendError) and images[2].status == 422 and "HTTP 404" in images[2].message


def test_messages_and_the_log_hide_the_credentials_in_an_image_url(hosts, fetcher, caplog):
    """A refused URL with a password in it, and a presigned URL that failed, were quoted whole in the
    answer to Label Studio (whose users see it) and in the log: the password, and the signature and
    access key of the presigned URL. Their values are now ``***``; other parameters stay readable."""
    allowed = hosts["allowed"]
    secrets = ("s3cr3t", "AKIAEXAMPLE", "0a1b2c3d4e", "FQoGZXIvYXdzE", "tok-123")
    presigned = (f"{allowed.url}/status?404&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261203"
                 "&X-Amz-Signature=0a1b2c3d4e&X-Amz-Security-Token=FQoGZXIvYXdzE&access_token=tok-123")
    messages = []
    with caplog.at_level("INFO"):
        for address in (f"http://alice:s3cr3t@{allowed.authority}/x.png", presigned,
                        f"http://bob:s3cr3t@{canonical_host('127.0.0.3')}:1/x.png?d=scans/a.png"):
            with pytest.raises(BackendError) as failed:
                fetcher.fetch(address)
            messages.append(failed.value.message)
    assert [path for path, _ in allowed.requests] == [presigned.removeprefix(allowed.url)]  # it was asked for
    assert not [secret for secret in secrets if secret in " ".join(messages) + caplog.text]
    assert messages[0].startswith("image 'http://***@127.0.0.3:") and "user information" in messages[0]
    assert "X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&access_token=***" in messages[1]
    assert "HTTP 404" in messages[1] and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in messages[1]
    assert messages[2].startswith("image 'http://***@127.0.0.3:1/x.png?d=scans/a.png'")
    assert redacted("https://h/a.png?GoogleAccessId=bot&Signature=c2ln#access_token=tok") == \
        "https://h/a.png?GoogleAccessId=bot&Signature=***#access_token=***"


def test_a_failed_connection_does_not_say_why(hosts, fetcher):
    """Refused, reset or unreachable read the same to the client (no port scanner); the log has the cause."""
    closed_port = f"http://{canonical_host('127.0.0.3')}:1/x.png"
    with pytest.raises(BackendError) as failed:
        fetcher.fetch(closed_port)
    assert failed.value.status == 502 and failed.value.message.endswith("the connection failed")
    assert "Errno" not in failed.value.message and "refused" not in failed.value.message.lower()


def test_allowlist_entries_are_read_like_urls():
    assert canonical_host("Images.Example.ORG.") == "images.example.org"
    assert canonical_host("[::1]") == canonical_host("0:0::1") == "::1"
    for bad in ("a b", "0177.0.0.1", "exämple.org", "a@b"):
        with pytest.raises(UnsafeURL):
            canonical_host(bad)
    with pytest.raises(ValueError, match="INSID3_ALLOWED_HOSTS"):
        ImageFetcher(Credentials("", ""), allowed_hosts={"2130706433"})


def test_task_and_webhook_images_go_through_the_same_check(tiny_backbone, hosts, tmp_path):
    import numpy as np

    from labelstudio_backend.app import create_app
    from labelstudio_backend.predictor import Predictor
    from labelstudio_backend.service import Backend
    from labelstudio_backend.settings import Settings

    label_studio, attacker = hosts["label_studio"], hosts["attacker"]
    attacker.requests.clear()
    settings = Settings(label_studio_url=label_studio.url, api_key=API_KEY, model_dir=tmp_path / "model",
                        reference_dir=reference_folder(tmp_path / "references"))
    fetcher = ImageFetcher(Credentials(label_studio.url, API_KEY))
    client = create_app(Backend(settings, Predictor(small_segmenter(tiny_backbone), 4), None, fetcher)).test_client()
    image = rf"http://{attacker.authority}\@{label_studio.authority}/x.png"
    task = {"id": 1, "data": {"image": image}}
    answer = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": BRUSH_CONFIG})
    assert answer.status_code == 422 and "refused" in answer.get_json()["error"]
    annotation = {"id": 5, "result": [brush_region(np.ones((6, 8), bool))]}
    answer = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "task": task, "annotation": annotation,
                                           "project": {"id": 7, "label_config": BRUSH_CONFIG}})
    assert answer.status_code == 422 and "refused" in answer.get_json()["error"]
    assert attacker.requests == []


def test_an_allowed_name_that_resolves_to_a_non_public_address_is_refused_unless_its_network_is_listed(hosts):
    """``localhost`` (the system's resolver: 127.0.0.1, maybe ::1) stands for a name whose DNS
    points inside: refused before any connection, fetched once its network is listed."""
    label_studio = hosts["label_studio"]
    port = label_studio.authority.rsplit(":", 1)[1]
    named = f"http://localhost:{port}/x.png"
    fetcher = ImageFetcher(Credentials(label_studio.url, API_KEY), allowed_hosts={"localhost"}, download_seconds=1.0)
    with pytest.raises(BackendError) as refused:
        fetcher.fetch(named)
    assert refused.value.status == 403 and "INSID3_ALLOWED_NETWORKS" in refused.value.message
    assert "127.0.0.1" not in refused.value.message  # what a name resolves to is for the log only
    assert label_studio.requests == []
    listed = ImageFetcher(Credentials(label_studio.url, API_KEY), allowed_hosts={"localhost"},
                          allowed_networks={"127.0.0.1/32"}, download_seconds=1.0)
    assert listed.fetch(named).size == (8, 6)
    assert label_studio.requests == [("/x.png", None)]  # not Label Studio's origin: no credentials
    assert label_studio.host_headers == [f"localhost:{port}"]


@pytest.fixture
def rebinding_dns(monkeypatch):
    """A resolver for ``rebinding.test`` that answers 127.0.0.3 (allowed) once, then 127.0.0.2
    (the attacker), as a DNS rebinding attack does; it counts the lookups."""
    lookups = []
    system = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rebinding.test":
            return system(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.3" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_an_allowed_name_is_connected_to_at_the_address_that_was_checked(hosts, rebinding_dns):
    """Resolved once and pinned: a second lookup (urllib3's own, without the pin) would reach
    127.0.0.2, where nothing listens on the allowed host's port, and the download would fail."""
    allowed = hosts["allowed"]
    port = allowed.authority.rsplit(":", 1)[1]
    fetcher = ImageFetcher(Credentials(hosts["label_studio"].url, API_KEY), allowed_hosts={"rebinding.test"},
                           allowed_networks={"127.0.0.3/32"}, download_seconds=1.0)
    assert fetcher.fetch(f"http://rebinding.test:{port}/x.png").size == (8, 6)
    assert rebinding_dns == ["rebinding.test"]
    assert allowed.requests == [("/x.png", None)] and allowed.host_headers == [f"rebinding.test:{port}"]
    with pytest.raises(BackendError) as rebound:  # the next lookup answers the attacker's address
        fetcher.fetch(f"http://rebinding.test:{port}/x.png")
    assert rebound.value.status == 403 and hosts["attacker"].requests == []


def test_a_redirect_to_an_allowed_name_is_resolved_and_checked_too(hosts, rebinding_dns):
    label_studio, attacker = hosts["label_studio"], hosts["attacker"]
    fetcher = ImageFetcher(Credentials(label_studio.url, API_KEY), allowed_hosts={"rebinding.test"},
                           download_seconds=1.0)
    port = attacker.authority.rsplit(":", 1)[1]
    with pytest.raises(BackendError) as refused:  # 127.0.0.3 is not in any listed network
        fetcher.fetch(redirect(label_studio, f"http://rebinding.test:{port}/x.png"))
    assert refused.value.status == 403 and attacker.requests == []


def test_a_name_that_does_not_resolve_is_a_failed_connection(hosts, monkeypatch):
    def unknown(host, *_, **__):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    fetcher = ImageFetcher(Credentials(hosts["label_studio"].url, API_KEY), allowed_hosts={"gone.test"})
    with pytest.raises(BackendError) as failed:
        fetcher.fetch("http://gone.test/x.png")
    assert failed.value.status == 502 and failed.value.message.endswith("the connection failed")


@pytest.mark.parametrize("address, networks, allowed", [
    ("93.184.216.34", (), True),
    ("2606:4700:4700::1111", (), True),
    ("::ffff:8.8.8.8", (), True),
    ("127.0.0.1", (), False),
    ("0.0.0.0", (), False),
    ("10.1.2.3", (), False),
    ("172.16.0.1", (), False),
    ("192.168.1.1", (), False),
    ("100.64.0.1", (), False),  # carrier-grade NAT
    ("169.254.169.254", (), False),  # cloud metadata
    ("224.0.0.1", (), False),
    ("255.255.255.255", (), False),
    ("::1", (), False),
    ("::", (), False),
    ("fe80::1", (), False),
    ("fd00::1", (), False),
    ("::ffff:127.0.0.1", (), False),
    ("::ffff:169.254.169.254", (), False),
    ("64:ff9b::a9fe:a9fe", (), False),  # NAT64 to 169.254.169.254
    ("10.1.2.3", ("10.0.0.0/8",), True),
    ("::ffff:10.1.2.3", ("10.0.0.0/8",), True),
    ("10.1.2.3", ("10.0.0.0/16",), False),
    ("fd00::1", ("fd00::/8", "10.0.0.0/8"), True),
])
def test_which_resolved_addresses_may_be_connected_to(address, networks, allowed):
    assert is_allowed(ipaddress.ip_address(address), parse_networks(networks)) is allowed


def test_allowed_networks_are_read_strictly():
    assert parse_networks([" 10.0.0.0/8 ", "fd00::1"]) == {ipaddress.ip_network("10.0.0.0/8"),
                                                          ipaddress.ip_network("fd00::1/128")}
    for bad in ("10.0.0.1/8", "10.0.0.0/33", "intranet", ""):
        with pytest.raises(ValueError, match="INSID3_ALLOWED_NETWORKS"):
            ImageFetcher(Credentials("", ""), allowed_networks={bad})


def test_a_pinned_https_connection_checks_the_certificate_against_the_name(tmp_path, monkeypatch):
    """Connected to 127.0.0.3, TLS still sends and verifies the URL's name: the certificate for
    ``secure.test`` is accepted there and refused for ``other.test``, which resolves to the same address."""
    pem = self_signed_certificate(tmp_path, "secure.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    server = Listener("127.0.0.3", context)
    system = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in ("secure.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.3", port))]
        return system(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pem))
    port = server.authority.rsplit(":", 1)[1]
    fetcher = ImageFetcher(Credentials("", ""), allowed_hosts={"secure.test", "other.test"},
                           allowed_networks={"127.0.0.3/32"}, download_seconds=5.0)
    try:
        assert fetcher.fetch(f"https://secure.test:{port}/x.png").size == (8, 6)
        assert server.host_headers == [f"secure.test:{port}"]
        with pytest.raises(BackendError) as mismatch:
            fetcher.fetch(f"https://other.test:{port}/x.png")
        assert mismatch.value.status == 502 and len(server.requests) == 1
    finally:
        server.close()
