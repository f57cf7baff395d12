"""A remote MX with scripted replies, for the bounce, suppression and event tests.

    scripted_mx.py PORT SCRIPT.json LOG.jsonl

SCRIPT: {"greeting": "421 4.7.0 ...",            (optional: answer every connection with
                                                  this line and close, instead of aiosmtpd)
         "rcpt": {"addr": ["452 4.2.2 ...", "250 OK"], ...},
         "tls": {"cert": "cert.pem", "key": "key.pem"}}   (optional: offer STARTTLS)
Each recipient's replies are used in order, one per RCPT TO for that address; the last one
repeats. Recipients not listed get "250 OK". aiosmtpd (an independent SMTP server) speaks
the protocol; LOG gets one JSON line per event: {"event": "connect"}, {"event": "rcpt",
"address": ..., "reply": ...}, {"event": "message", "rcpt_tos": [...], "data": ...}.
Listens on 127.0.0.1 only.
"""

import asyncio
import json
import ssl
import sys

from aiosmtpd.controller import Controller


def main():
    port = int(sys.argv[1])
    script = json.load(open(sys.argv[2]))
    log = open(sys.argv[3], "a", buffering=1)

    def record(**fields):
        log.write(json.dumps(fields) + "\n")

    greeting = script.get("greeting")
    if greeting:
        async def refuse(reader, writer):
            record(event="connect")
            writer.write((greeting + "\r\n").encode())
            await writer.drain()
            writer.close()

        async def serve():
            server = await asyncio.start_server(refuse, "127.0.0.1", port)
            async with server:
                await server.serve_forever()

        asyncio.run(serve())
        return

    replies = {k.lower(): list(v) for k, v in script.get("rcpt", {}).items()}
    used = {}

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            key = address.lower()
            plan = replies.get(key, ["250 OK"])
            n = used.get(key, 0)
            used[key] = n + 1
            reply = plan[min(n, len(plan) - 1)]
            record(event="rcpt", address=key, reply=reply)
            if reply.startswith("250"):
                envelope.rcpt_tos.append(address)
            return reply

        async def handle_DATA(self, server, session, envelope):
            record(
                event="message",
                rcpt_tos=[r.lower() for r in envelope.rcpt_tos],
                data=envelope.content.decode("utf-8", "replace"),
            )
            return "250 2.0.0 OK queued"

    tls_context = None
    if script.get("tls"):
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(script["tls"]["cert"], script["tls"]["key"])
    controller = Controller(Handler(), hostname="127.0.0.1", port=port,
                            server_hostname="mx.remote.test", tls_context=tls_context)
    controller.start()
    try:
        asyncio.run(asyncio.Event().wait())
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
