#!/usr/bin/env python3
"""Resolves a domain's MTA-STS policy with postfix-mta-sts-resolver, an independent MTA-STS
implementation: its STSResolver looks up the `_mta-sts` TXT record, fetches the policy over
HTTPS (status, content type, size) and validates it (version, mode, max_age, mx) as it does
for Postfix. Only where it connects is bent to the test's loopback peers: DNS queries go to
the given server (Knot), and the HTTPS connection for `mta-sts.<domain>` goes to
127.0.0.1:<https-port> (policy hosts are always on port 443) with the test CA trusted; the
TLS server name stays `mta-sts.<domain>`.

  mta_sts_resolve.py --dns 127.0.0.1:15353 --https-port 18443 --ca ca.pem example.test

Prints {"status": "VALID" | "NONE" | "FETCH_ERROR" | ..., "id": ..., "policy": {...}}.
"""
import argparse
import asyncio
import json
import socket
import ssl

import aiodns
import aiohttp
import aiohttp.abc
from postfix_mta_sts_resolver import resolver as sts


class Loopback(aiohttp.abc.AbstractResolver):
    """Every host name resolves to 127.0.0.1 on one port."""

    def __init__(self, port):
        self.port = port

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{
            "hostname": host,
            "host": "127.0.0.1",
            "port": self.port,
            "family": socket.AF_INET,
            "proto": 0,
            "flags": socket.AI_NUMERICHOST,
        }]

    async def close(self):
        pass


async def resolve(args):
    loop = asyncio.get_running_loop()
    host, port = args.dns.rsplit(":", 1)
    resolver = sts.STSResolver(loop=loop, timeout=10)
    resolver._resolver = aiodns.DNSResolver(
        nameservers=[host], udp_port=int(port), tcp_port=int(port), timeout=5, loop=loop)
    tls = ssl.create_default_context(cafile=args.ca)
    session = aiohttp.ClientSession

    def loopback_session(*a, **kw):
        kw["connector"] = aiohttp.TCPConnector(resolver=Loopback(args.https_port), ssl=tls)
        return session(*a, **kw)

    sts.aiohttp.ClientSession = loopback_session
    status, result = await resolver.resolve(args.domain)
    policy_id, policy = result if result else (None, None)
    return {"status": status.name, "id": policy_id, "policy": policy}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dns", required=True, help="nameserver ip:port")
    p.add_argument("--https-port", type=int, required=True)
    p.add_argument("--ca", required=True, help="CA file that signed the policy host's certificate")
    p.add_argument("domain")
    print(json.dumps(asyncio.run(resolve(p.parse_args()))))


if __name__ == "__main__":
    main()
