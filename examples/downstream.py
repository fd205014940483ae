"""A downstream to point an HTTP limit at while trying the service: it listens on
127.0.0.1 only, answers every call 200 (or the status `--status` gives), and prints
one line per call: when, the method and path, and the idempotency key.

    python -m examples.downstream            # http://127.0.0.1:9000
    python -m examples.downstream --port 9100 --status 429
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9000


def handler(status: int, out=sys.stdout):
    class Downstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real downstreams offer

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            key = self.headers.get("Idempotency-Key", "-")
            when = datetime.now(UTC).isoformat(timespec="milliseconds")
            print(f"{when} {self.command} {self.path} key={key}", file=out, flush=True)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, format, *args):  # one line per call is printed above
            pass

    return Downstream


def serve(port: int, status: int) -> None:
    server = ThreadingHTTPServer((ADDRESS, port), handler(status))
    print(f"downstream on http://{ADDRESS}:{port}, answering {status}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--status", type=int, default=200, help="the answer to every call")
    arguments = parser.parse_args(argv)
    serve(arguments.port, arguments.status)


if __name__ == "__main__":
    main()
