"""Validates CloudEvents against tests/data/cloudevents-1.0.schema.json with jsonschema (format
checks on: date-time through rfc3339-validator, uri-reference through rfc3986 when present).

    validate_cloudevents.py < events.json      (a JSON array of events)

Prints a JSON array with one entry per event: {"id": ..., "errors": [...]}.
"""

import json
import os
import sys

import jsonschema

here = os.path.dirname(os.path.abspath(__file__))
schema = json.load(open(os.path.join(here, "..", "data", "cloudevents-1.0.schema.json")))
validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
events = json.load(sys.stdin)
out = []
for event in events:
    errors = [e.message for e in validator.iter_errors(event)]
    out.append({"id": event.get("id"), "errors": errors})
print(json.dumps(out))
