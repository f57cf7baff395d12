#!/usr/bin/env python3
"""Reads a delivery status notification from stdin with Python's `email` package (an
independent MIME parser) and prints what a mail client would see as JSON:
content type, report type, the part types, the per-message and per-recipient fields of the
message/delivery-status part, and the envelope-relevant headers.
"""
import email
import email.policy
import json
import sys


def main():
    msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
    out = {
        "defects": [type(d).__name__ for d in msg.defects],
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "is_multipart": msg.is_multipart(),
        "from": str(msg.get("From", "")),
        "to": str(msg.get("To", "")),
        "subject": str(msg.get("Subject", "")),
        "auto_submitted": str(msg.get("Auto-Submitted", "")),
        "dkim_signatures": len(msg.get_all("DKIM-Signature") or []),
        "parts": [],
        "per_message": {},
        "recipients": [],
        "returned_subject": None,
    }
    for part in msg.iter_parts() if msg.is_multipart() else []:
        ctype = part.get_content_type()
        out["parts"].append(ctype)
        if ctype == "message/delivery-status":
            blocks = part.get_payload()
            if blocks:
                out["per_message"] = {k: str(v) for k, v in blocks[0].items()}
                out["recipients"] = [{k: str(v) for k, v in b.items()} for b in blocks[1:]]
        elif ctype == "message/rfc822":
            inner = part.get_payload()[0]
            out["returned_subject"] = str(inner.get("Subject", ""))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
