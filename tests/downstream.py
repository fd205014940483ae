"""A local HTTP server standing in for a downstream: it notes every call (when, which
ID, which idempotency key, which Authorization and Host headers) and every connection,
answers after `latency` seconds with the status `answers` gives for the ID (200
otherwise), and keeps connections alive. Given a rate, it refuses what goes beyond it,
with 429, as a limiter would."""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Record:
    latency: float = 0.0
    answers: dict[int, int] = field(default_factory=dict)
    slow_ids: dict[int, float] = field(default_factory=dict)
    calls: list[tuple[float, int, str | None, str | None]] = field(default_factory=list)
    hosts: list[str | None] = field(default_factory=list)  # each call's Host header
    connections: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Sent as Retry-After with every 429 and 503 answer, when set.
    retry_after: str | None = None
    # With a rate (calls a second), calls beyond it and a burst of `burst` are refused
    # with 429, as a token-bucket limiter refuses them; `refused` notes each (time, ID).
    rate: float | None = None
    burst: int = 1
    refused: list[tuple[float, int]] = field(default_factory=list)
    tokens: float | None = None
    filled_at: float = 0.0

    def admits(self, now: float) -> bool:
        """Whether the limiter takes a call now (call with the lock held)."""
        if self.rate is None:
            return True
        if self.tokens is None:
            self.tokens, self.filled_at = float(self.burst), now
        self.tokens = min(self.burst, self.tokens + (now - self.filled_at) * self.rate)
        self.filled_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def keys(self) -> dict[int, list[str | None]]:
        keys: dict[int, list[str | None]] = {}
        for _, user_id, key, _ in self.calls:
            keys.setdefault(user_id, []).append(key)
        return keys


def _handler(record: Record):
    class Downstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real downstreams offer

        def setup(self):
            super().setup()
            with record.lock:
                record.connections += 1

        def do_POST(self):
            user_id = int(self.path.rsplit("/", 1)[-1])
            with record.lock:
                now = time.time()
                if not record.admits(now):
                    record.refused.append((now, user_id))
                    self._answer(429)
                    return
                record.calls.append(
                    (
                        time.time(),
                        user_id,
                        self.headers["Idempotency-Key"],
                        self.headers["Authorization"],
                    )
                )
                record.hosts.append(self.headers["Host"])
                record.in_flight += 1
                record.most_in_flight = max(record.most_in_flight, record.in_flight)
            time.sleep(record.slow_ids.get(user_id, record.latency))
            with record.lock:
                record.in_flight -= 1
            self._answer(record.answers.get(user_id, 200))

        def _answer(self, status: int) -> None:
            self.send_response(status)
            if status in (429, 503) and record.retry_after is not None:
                self.send_header("Retry-After", record.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args):
            pass

    return Downstream


class Server:
    """`with Server(record) as url:` serves on a free port of a loopback address
    (127.0.0.1 unless told), over TLS when given a certificate and its key (files);
    `url` has `{id}`."""

    def __init__(
        self,
        record: Record,
        address: str = "127.0.0.1",
        certificate: tuple[str, str] | None = None,
    ):
        self.record, self.address = record, address
        ThreadingHTTPServer.request_queue_size = 1024  # a burst of new connections waits
        self.server = ThreadingHTTPServer((address, 0), _handler(record))
        self.server.daemon_threads = True
        self.scheme = "https" if certificate else "http"
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)

    @property
    def port(self) -> int:
        return self.server.server_port

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"{self.scheme}://{self.address}:{self.port}/users/{{id}}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
