"""How the customer's bytes reach the vendor: in the same process, or over HTTP on the loopback interface (the vendor
as a small standard-library server on 127.0.0.1). Both carry the same serialised messages (crossing.py), so one
end-to-end test runs over either. Not here: what the bytes mean.
"""
from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Protocol

log = logging.getLogger(__name__)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Handler(Protocol):
    def handle(self, route: str, payload: bytes) -> bytes: ...


class Transport(Protocol):
    def send(self, route: str, payload: bytes) -> bytes: ...


class InProcess:
    """Calls the vendor's `handle` directly, with the same bytes a network would carry."""

    def __init__(self, vendor: Handler):
        self.vendor = vendor

    def send(self, route: str, payload: bytes) -> bytes:
        return self.vendor.handle(route, bytes(payload))


class VendorServer:
    """`vendor` served at http://127.0.0.1:PORT/<route> (POST, body: one message; answer: one message), one request
    at a time (the vendor's optimiser is not thread-safe). A context manager: the server stops on exit."""

    def __init__(self, vendor: Handler, *, port: int = 0):
        class _Request(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's name
                route = self.path.strip("/")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    status, answer = 200, vendor.handle(route, body)
                except KeyError as err:
                    status, answer = 404, str(err).encode()
                except (ValueError, RuntimeError) as err:
                    status, answer = 400, str(err).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format, *args):  # http.server prints every request to stderr otherwise
                log.debug("vendor server: " + format, *args)

        self._server = HTTPServer(("127.0.0.1", port), _Request)
        self._thread = threading.Thread(target=self._server.serve_forever, name="split-vendor", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> VendorServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HttpTransport:
    """POSTs each message to a vendor server on the loopback interface (any other host is refused; no proxies)."""

    def __init__(self, url: str, *, timeout_s: float = 600.0):
        host = urllib.parse.urlsplit(url).hostname
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"the vendor must be on the loopback interface {LOOPBACK_HOSTS}, got {host!r}")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def send(self, route: str, payload: bytes) -> bytes:
        request = urllib.request.Request(f"{self.url}/{route}", data=bytes(payload), method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"vendor answered {err.code} on {route!r}: {err.read().decode(errors='replace')}") \
                from None
