"""A webhook receiver for the event sink tests, with its own signature check.

    webhook_receiver.py PORT SECRET_FILE MODE_FILE LOG.jsonl

Listens on 127.0.0.1:PORT and answers POSTs as MODE_FILE says, read at every request:
"ok" (200), "500xN" (500 to the next N requests, then 200), "410" (410 Gone).
Each request is logged as one JSON line: the CloudEvent id, type and subject, the status
answered and whether the Kubemail-Signature header verified. The check is Python's hmac over
"<t>.<raw body>" with SHA-256, compared with hmac.compare_digest, the timestamp at most 300 s
from this clock: an implementation independent of the operator's.
"""

import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

PORT = int(sys.argv[1])
SECRET = open(sys.argv[2], "rb").read()
MODE_FILE = sys.argv[3]
LOG = open(sys.argv[4], "a", buffering=1)
failures_served = {"n": 0}


def verify(header, body):
    fields = {}
    signatures = []
    for part in (header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "v1":
            signatures.append(value)
        elif key:
            fields[key] = value
    try:
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > 300:
        return False
    expected = hmac.new(SECRET, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures)


def status_for_mode():
    mode = open(MODE_FILE).read().strip()
    if mode == "410":
        return 410
    if mode.startswith("500x"):
        wanted = int(mode[4:])
        if failures_served["n"] < wanted:
            failures_served["n"] += 1
            return 500
        return 200
    failures_served["n"] = 0
    return 200


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        valid = verify(self.headers.get("Kubemail-Signature"), body)
        try:
            event = json.loads(body)
        except ValueError:
            event = {}
        status = status_for_mode() if valid else 401
        LOG.write(json.dumps({
            "id": event.get("id"),
            "header_id": self.headers.get("Kubemail-Event-Id"),
            "type": event.get("type"),
            "subject": event.get("subject"),
            "content_type": self.headers.get("Content-Type"),
            "valid_signature": valid,
            "status": status,
        }) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
