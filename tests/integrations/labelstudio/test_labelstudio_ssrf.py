"""Image downloads against real listeners on three loopback addresses: Label Studio (127.0.0.1), an
allowed image host (127.0.0.3) and an attacker (127.0.0.2) that must never be reached.

The table holds URLs that ``urllib.parse`` and urllib3 read as different hosts, or that some client
normalises into another host: each must be refused before any byte leaves, and Label Studio's API
key must never reach anything but Label Studio's exact origin.
"""

from __future__ import annotations

import urllib.parse

import pytest

pytest.importorskip("flask")

from labelstudio_fixtures import BRUSH_CONFIG, Listener, UPLOADS, brush_region, reference_folder, small_segmenter  # noqa: E402

from labelstudio_backend.credentials import Credentials  # noqa: E402
from labelstudio_backend.errors import BackendError  # noqa: E402
from labelstudio_backend.images import ImageFetcher  # noqa: E402
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
