#!/usr/bin/env python3
"""Reads a TLS-RPT report mail (RFC 8460 5.3) from stdin with Python's `email` package,
gunzips its application/tlsrpt+gzip part and validates the JSON against a JSON schema with
`jsonschema` (formats such as date-time checked too). Prints
{"content_type", "report_type", "headers": {...}, "filename", "report", "errors": [...]}.

  tlsrpt_report.py smtp-node/tests/data/rfc8460-report.schema.json < report.eml
"""
import email
import email.policy
import gzip
import json
import sys

import jsonschema


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    checker = validator_class.FORMAT_CHECKER
    # Without rfc3339-validator jsonschema skips date-time silently; fail loudly instead.
    assert "date-time" in checker.checkers, "jsonschema cannot check date-time (rfc3339-validator missing)"
    validator = validator_class(schema, format_checker=checker)

    msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
    out = {
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "headers": {h: str(msg.get(h, "")) for h in
                    ["From", "To", "Subject", "TLS-Report-Domain", "TLS-Report-Submitter"]},
        "dkim_signatures": len(msg.get_all("DKIM-Signature") or []),
        "filename": None,
        "report": None,
        "errors": [],
    }
    parts = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    if len(parts) != 1:
        out["errors"].append(f"{len(parts)} application/tlsrpt+gzip parts")
    else:
        out["filename"] = parts[0].get_filename()
        report = json.loads(gzip.decompress(parts[0].get_payload(decode=True)))
        out["report"] = report
        out["errors"] = [
            f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(report)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
