"""Server abuse (issue #7 item 5, part): path tricks on `/v1/images/{id}` and URL tricks in
`image_url` are refused with a 4xx; nothing outside the index is ever served or fetched."""

from __future__ import annotations

import http.server
import threading

import pytest
from fastapi.testclient import TestClient

from fromage.apps.serve import ServeConfig, create_app

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def redirecting_host():
    """A loopback server that redirects every request to an internal address."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/../../../../etc/passwd",
        "/v1/images/..%2f..%2f..%2fetc%2fpasswd",
        "/v1/images/%2e%2e/%2e%2e/etc/passwd",
        "/v1/images/-1",
        "/v1/images/99999999999999999999999",
        "/v1/images/1e3",
        "/v1/images/0x1",
        "/v1/images/%00",
        "/v1/images//etc/passwd",
    ],
)
def test_image_route_takes_only_index_rows(bot, path):  # noqa: F811
    fromage, _ = bot
    reply = TestClient(create_app(fromage)).get(path)
    assert 400 <= reply.status_code < 500, (path, reply.status_code)
    assert b"root:" not in reply.content


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("file:///etc/passwd", "data:"),
        ("FILE:///etc/passwd", "data:"),
        ("HTTP://127.0.0.1/red.png", "data:"),  # only lower-case http(s) is fetched at all
        ("ftp://127.0.0.1/red.png", "data:"),
        ("gopher://127.0.0.1:70/", "data:"),
        ("http://169.254.169.254/latest/meta-data/", "'169.254.169.254' is not allowed"),
        ("http://[::1]/red.png", "'::1' is not allowed"),
        ("http://localhost/red.png", "'localhost' is not allowed"),
        ("http://127.0.0.1@evil.example/red.png", "'evil.example' is not allowed"),
        ("http://evil.example#@127.0.0.1/red.png", "'evil.example' is not allowed"),
        ("http://2130706433/red.png", "'2130706433' is not allowed"),  # 127.0.0.1 as a number
        ("data:text/plain;base64,aGVsbG8=", "not a readable image"),
    ],
)
def test_url_tricks_are_refused(bot, url, says):  # noqa: F811
    fromage, _ = bot
    client = TestClient(create_app(fromage, ServeConfig(allowed_image_hosts=("127.0.0.1",))))
    reply = client.post("/v1/caption", json={"image": url, "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]["message"]


def test_a_redirect_from_an_allowed_host_is_not_followed(bot, redirecting_host):  # noqa: F811
    fromage, _ = bot
    client = TestClient(create_app(fromage, ServeConfig(allowed_image_hosts=("127.0.0.1",))))
    reply = client.post("/v1/caption", json={"image": f"{redirecting_host}/red.png"})
    assert reply.status_code == 400 and "answered 302" in reply.json()["error"]["message"]
