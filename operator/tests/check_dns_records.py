#!/usr/bin/env python3
"""Independent check of the DNS records kubemail-operator generates.

Usage: check_dns_records.py ZONE_FILE DOMAIN RECORDS_JSON KEYS_DIR

* ZONE_FILE is the RFC 1035 fragment of the `<name>-dns` ConfigMap; dnspython must parse it.
* RECORDS_JSON is `status.dnsRecords`; every in-zone record must be in the zone, TXT data
  split into strings of at most 255 octets that join back to the status value.
* SPF, DMARC, DKIM, MTA-STS and TLS-RPT records are checked tag by tag (RFC 7208, 7489, 6376,
  8463, 8461, 8460), and dkimpy signs a message with each private key in KEYS_DIR
  (`<selector>.pem`, PKCS#8) and verifies it against the published TXT record.
"""
import base64
import json
import re
import sys

import dkim
import dns.name
import dns.rdatatype
import dns.zone

errors = []


def fail(msg):
    errors.append(msg)


def tags(value, sep=";"):
    out = {}
    for part in value.split(sep):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            fail(f"tag without '=': {part!r} in {value!r}")
            continue
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def der_from_pem(pem):
    body = re.search(r"-----BEGIN PRIVATE KEY-----(.*?)-----END PRIVATE KEY-----", pem, re.S)
    if not body:
        raise ValueError("not a PKCS#8 PEM")
    return base64.b64decode("".join(body.group(1).split()))


def read_len(der, i):
    n = der[i]
    if n < 0x80:
        return n, i + 1
    k = n & 0x7F
    return int.from_bytes(der[i + 1:i + 1 + k], "big"), i + 1 + k


def pkcs8_inner(der):
    """PrivateKeyInfo -> the privateKey OCTET STRING contents (RFC 5208)."""
    assert der[0] == 0x30
    _, i = read_len(der, 1)
    assert der[i] == 0x02  # version
    n, i = read_len(der, i + 1)
    i += n
    assert der[i] == 0x30  # algorithm
    n, i = read_len(der, i + 1)
    i += n
    assert der[i] == 0x04  # privateKey
    n, i = read_len(der, i + 1)
    return der[i:i + n]


def rsa_pkcs1_pem(pem):
    inner = pkcs8_inner(der_from_pem(pem))
    b64 = base64.encodebytes(inner).decode()
    return f"-----BEGIN RSA PRIVATE KEY-----\n{b64}-----END RSA PRIVATE KEY-----\n".encode()


def ed25519_seed_b64(pem):
    inner = pkcs8_inner(der_from_pem(pem))  # CurvePrivateKey ::= OCTET STRING (RFC 8410)
    assert inner[0] == 0x04 and inner[1] == 32, "Ed25519 seed"
    return base64.b64encode(inner[2:34])


def main():
    zone_file, domain, records_file, keys_dir = sys.argv[1:5]
    origin = dns.name.from_text(domain)
    with open(zone_file) as f:
        text = f.read()
    zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
    with open(records_file) as f:
        records = json.load(f)

    def txt_strings(name):
        rds = zone.get_rdataset(dns.name.from_text(name), dns.rdatatype.TXT)
        if rds is None:
            return []
        return [list(rd.strings) for rd in rds]

    # Every in-zone record of the status is in the zone, with the same data.
    for r in records:
        name = dns.name.from_text(r["name"])
        if not name.is_subdomain(origin):
            if f"; {r['name']}\t" not in text:
                fail(f"{r['name']} lies outside {domain}: expected it as a comment line")
            continue
        rdtype = dns.rdatatype.from_text(r["type"])
        rds = zone.get_rdataset(name, rdtype)
        if rds is None:
            fail(f"{r['name']} {r['type']} missing from the zone")
            continue
        if rds.ttl != r["ttl"]:
            fail(f"{r['name']} {r['type']} TTL {rds.ttl} != {r['ttl']}")
        if r["type"] == "TXT":
            joined = [b"".join(rd.strings).decode() for rd in rds]
            if r["value"] not in joined:
                fail(f"TXT {r['name']}: {r['value']!r} not in {joined!r}")
            for rd in rds:
                for s in rd.strings:
                    if len(s) > 255:
                        fail(f"TXT {r['name']} has a string of {len(s)} octets")
        else:
            got = [rd.to_text() for rd in rds]
            if r["value"] not in got:
                fail(f"{r['name']} {r['type']}: {r['value']!r} not in {got!r}")

    # SPF (RFC 7208): exactly one v=spf1 at the apex, ends in -all/~all, <= 10 lookups, no ptr.
    spf = [b"".join(s).decode() for s in txt_strings(domain) if b"".join(s).startswith(b"v=spf1")]
    if len(spf) != 1:
        fail(f"expected exactly one SPF record, found {spf!r}")
    else:
        terms = spf[0].split()
        if terms[-1] not in ("-all", "~all"):
            fail(f"SPF does not end in -all/~all: {spf[0]!r}")
        lookups = [t for t in terms if re.match(r"^[+\-~?]?(include|a|mx|ptr|exists|redirect)\b", t)]
        if len(lookups) > 10:
            fail(f"SPF needs {len(lookups)} lookups")
        if any(re.match(r"^[+\-~?]?ptr", t) for t in terms):
            fail("SPF uses ptr")
        for t in terms[1:-1]:
            if not re.match(r"^(ip4:[0-9./]+|ip6:[0-9a-fA-F:./]+|include:[a-z0-9.\-_]+|mx|a)$", t):
                fail(f"SPF term {t!r} is malformed")

    # DMARC (RFC 7489 6.3): v=DMARC1 first, then p=.
    dmarc = [b"".join(s).decode() for s in txt_strings("_dmarc." + domain)]
    if len(dmarc) != 1:
        fail(f"expected one DMARC record, found {dmarc!r}")
    else:
        d = dmarc[0]
        parts = [p.strip() for p in d.split(";") if p.strip()]
        if parts[0] != "v=DMARC1" or not parts[1].startswith("p="):
            fail(f"DMARC must start with v=DMARC1; p=: {d!r}")
        t = tags(d)
        if t.get("p") not in ("none", "quarantine", "reject"):
            fail(f"DMARC p= invalid: {d!r}")
        for k in ("adkim", "aspf"):
            if t.get(k) not in ("r", "s"):
                fail(f"DMARC {k} not set deliberately: {d!r}")
        for k in ("rua", "ruf"):
            for uri in filter(None, t.get(k, "").split(",")):
                if not (uri.startswith("mailto:") or uri.startswith("https://")):
                    fail(f"DMARC {k} URI {uri!r}")

    # DKIM (RFC 6376 3.6.1, RFC 8463): parse with dkimpy, then sign and verify.
    dkim_records = {r["name"]: r["value"] for r in records if "._domainkey." in r["name"]}
    if not dkim_records:
        fail("no DKIM records")

    def dnsfunc(name, timeout=5):
        n = name.decode() if isinstance(name, bytes) else name
        found = txt_strings(n)
        return b"".join(found[0]) if found else None

    for name, value in dkim_records.items():
        selector = name.split("._domainkey.")[0]
        t = dkim.util.parse_tag_value(value.encode())
        if t.get(b"v") != b"DKIM1" or t.get(b"k") not in (b"rsa", b"ed25519"):
            fail(f"DKIM {name}: bad v/k: {value!r}")
            continue
        p = base64.b64decode(t[b"p"])
        if t[b"k"] == b"ed25519" and len(p) != 32:
            fail(f"DKIM {name}: Ed25519 p= must be the raw 32-byte key (RFC 8463 4.2), got {len(p)} bytes")
        try:
            with open(f"{keys_dir}/{selector}.pem") as f:
                pem = f.read()
        except OSError as e:
            fail(f"DKIM {name}: no private key: {e}")
            continue
        msg = (b"From: Joe <joe@" + domain.encode() + b">\r\nTo: x@example.net\r\n"
               b"Subject: kubemail DNS check\r\nDate: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
               b"Message-ID: <check@" + domain.encode() + b">\r\n\r\nHi.\r\n")
        if t[b"k"] == b"rsa":
            sig = dkim.sign(msg, selector.encode(), domain.encode(), rsa_pkcs1_pem(pem),
                            signature_algorithm=b"rsa-sha256")
        else:
            sig = dkim.sign(msg, selector.encode(), domain.encode(), ed25519_seed_b64(pem),
                            signature_algorithm=b"ed25519-sha256")
        if not dkim.verify(sig + msg, dnsfunc=dnsfunc, minkey=2048 if t[b"k"] == b"rsa" else 0):
            fail(f"DKIM {name}: a signature made with {selector}.pem does not verify against the TXT record")

    # MTA-STS (RFC 8461 3.1) and TLS-RPT (RFC 8460 3).
    for v in (b"".join(s).decode() for s in txt_strings("_mta-sts." + domain)):
        if not re.fullmatch(r"v=STSv1; id=[A-Za-z0-9]{1,32}", v):
            fail(f"MTA-STS record {v!r}")
    for v in (b"".join(s).decode() for s in txt_strings("_smtp._tls." + domain)):
        if not re.fullmatch(r"v=TLSRPTv1; rua=(mailto:|https://)\S+", v):
            fail(f"TLS-RPT record {v!r}")

    mx = zone.get_rdataset(origin, dns.rdatatype.MX)
    if mx is None or len(mx) != 1:
        fail("expected one MX record at the apex")

    if errors:
        print("\n".join(errors))
        sys.exit(1)
    print(f"ok: {len(records)} records, {len(dkim_records)} DKIM keys verified by dkimpy")


if __name__ == "__main__":
    main()
