"""A tiny OpenAI-shaped HTTP server for the process provider's tests.

    python tiny_server.py PORT [GATE]

Answers 200 on /health and /v1/models.  With GATE, it does not bind its port until the
file GATE exists: a server that is alive but still starting.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path not in ("/health", "/v1/models"):
            self.send_error(404)
            return
        body = json.dumps({"status": "ok", "pid": os.getpid(), "data": [{"id": "tiny"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    gate = sys.argv[2] if len(sys.argv) > 2 else None
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.02)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
