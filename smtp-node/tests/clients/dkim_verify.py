#!/usr/bin/env python3
"""Verifies every DKIM-Signature of a message with dkimpy (an independent implementation),
looking the keys up in a test DNS server with dnspython. Reads the message from stdin and
prints one JSON list: [{"index", "d", "s", "a", "ok", "error"}] in header order.

  dkim_verify.py --dns 127.0.0.1:15353 < message.eml
"""
import argparse
import email.parser
import email.policy
import json
import sys

import dkim
import dns.resolver


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dns", required=True, help="nameserver ip:port")
    args = p.parse_args()
    host, port = args.dns.rsplit(":", 1)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 5

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        try:
            answer = resolver.resolve(name, "TXT")
        except Exception:  # dkimpy treats an empty answer as "no key"
            return b""
        return b"".join(b"".join(r.strings) for r in answer)

    message = sys.stdin.buffer.read()
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    signatures = headers.get_all("DKIM-Signature") or []
    results = []
    d = dkim.DKIM(message)
    for index, value in enumerate(signatures):
        tags = {}
        for part in "".join(str(value).split()).split(";"):
            if "=" in part:
                k, v = part.split("=", 1)
                tags[k] = v
        entry = {"index": index, "d": tags.get("d"), "s": tags.get("s"), "a": tags.get("a"),
                 "h": tags.get("h"), "ok": False, "error": None}
        try:
            entry["ok"] = bool(d.verify(idx=index, dnsfunc=dnsfunc))
        except Exception as e:  # report, do not crash: the test prints it
            entry["error"] = repr(e)
        results.append(entry)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
