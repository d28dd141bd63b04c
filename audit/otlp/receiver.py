#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver for moat's export tests.

Usage: receiver.py OUT.jsonl [--delay SECONDS] [--fail N]

Listens on 127.0.0.1 (a free port, printed as the first line of standard output), takes
`POST /v1/logs` with an `application/x-protobuf` body, decodes it with the official
OpenTelemetry protobuf definitions (the `opentelemetry-proto` package from PyPI) as an
ExportLogsServiceRequest, and appends one JSON line per log record to OUT.jsonl: the
resource's and scope's fields, every field of the log record, the attributes by key with
their typed values. Anything that does not decode is answered 400 and recorded as an error
line. `--delay` holds every answer that long (a slow endpoint); `--fail N` answers the first
N requests 503 (an endpoint that recovers).
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    return {kind: getattr(v, kind)}


def main(argv):
    out = argv[1]
    delay = float(argv[argv.index("--delay") + 1]) if "--delay" in argv else 0.0
    fail = int(argv[argv.index("--fail") + 1]) if "--fail" in argv else 0
    lock = threading.Lock()
    state = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                state["requests"] += 1
                n = state["requests"]
            if delay:
                time.sleep(delay)
            if n <= fail:
                self.send_response(503)
                self.end_headers()
                return
            lines = []
            try:
                if self.path != "/v1/logs":
                    raise ValueError(f"path {self.path}")
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    raise ValueError(f"content type {self.headers.get('Content-Type')}")
                req = logs_service_pb2.ExportLogsServiceRequest()
                req.ParseFromString(body)
                for rl in req.resource_logs:
                    resource = {a.key: any_value(a.value) for a in rl.resource.attributes}
                    for sl in rl.scope_logs:
                        for r in sl.log_records:
                            lines.append({
                                "request": n,
                                "resource": resource,
                                "scope": {"name": sl.scope.name, "version": sl.scope.version},
                                "time_unix_nano": r.time_unix_nano,
                                "observed_time_unix_nano": r.observed_time_unix_nano,
                                "severity_number": r.severity_number,
                                "severity_text": r.severity_text,
                                "body": any_value(r.body),
                                "attributes": {a.key: any_value(a.value) for a in r.attributes},
                            })
            except (DecodeError, ValueError) as e:
                lines = [{"request": n, "error": str(e)}]
                self.send_response(400)
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()
            with lock, open(out, "a", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
