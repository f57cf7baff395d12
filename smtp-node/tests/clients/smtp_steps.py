#!/usr/bin/env python3
"""Drives one SMTP session with Python's smtplib (an independent client implementation) and
prints the server's answer to every step as a JSON line: {"op", "code", "msg"}.

Modes: plain (port 25/587), starttls (EHLO, STARTTLS, then the steps), ssl (implicit TLS).
Steps (JSON list of lists):
  ["ehlo", name] ["helo", name] ["starttls"] ["login", user, password]
  ["auth", "PLAIN"|"LOGIN", user, password]
  ["mail", sender, [options...]] ["rcpt", recipient, [options...]]
  ["data", message-text]          message with \n or \r\n line ends; smtplib makes CRLF
  ["cmd", raw-command-line] ["noop"] ["rset"] ["vrfy", arg] ["help"] ["quit"]
  ["send", sender, [recipients...], message-text]   smtplib.sendmail, reports the final code
A disconnect ends the session with code -1.
"""
import argparse
import json
import smtplib
import ssl
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["plain", "starttls", "ssl"], default="plain")
    p.add_argument("--cafile")
    p.add_argument("--steps", required=True, help="JSON list of steps, or - to read it from stdin")
    args = p.parse_args()

    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if args.mode == "ssl":
        conn = smtplib.SMTP_SSL(args.host, args.port, context=ctx, timeout=60)
    else:
        conn = smtplib.SMTP(args.host, args.port, timeout=60)
    if args.mode == "starttls":
        conn.ehlo("client.test")
        conn.starttls(context=ctx)

    steps = sys.stdin.read() if args.steps == "-" else args.steps
    for step in json.loads(steps):
        op = step[0]
        try:
            code, msg = run(conn, step)
        except smtplib.SMTPServerDisconnected as e:
            emit(op, -1, str(e))
            return
        except smtplib.SMTPRecipientsRefused as e:
            code, msg = list(e.recipients.values())[0]
        except smtplib.SMTPResponseException as e:
            code, msg = e.smtp_code, e.smtp_error
        emit(op, code, msg)


def run(conn, step):
    op = step[0]
    if op == "ehlo":
        return conn.ehlo(step[1])
    if op == "helo":
        return conn.helo(step[1])
    if op == "starttls":
        return conn.starttls()
    if op == "login":
        return conn.login(step[1], step[2])
    if op == "auth":
        conn.user, conn.password = step[2], step[3]
        mech = step[1].upper()
        obj = conn.auth_plain if mech == "PLAIN" else conn.auth_login
        return conn.auth(mech, obj, initial_response_ok=(mech == "PLAIN"))
    if op == "mail":
        return conn.mail(step[1], step[2] if len(step) > 2 else [])
    if op == "rcpt":
        return conn.rcpt(step[1], step[2] if len(step) > 2 else [])
    if op == "data":
        return conn.data(step[1].encode("utf-8"))
    if op == "cmd":
        return conn.docmd(step[1])
    if op == "noop":
        return conn.noop()
    if op == "rset":
        return conn.rset()
    if op == "vrfy":
        return conn.verify(step[1])
    if op == "help":
        conn.putcmd("help")
        return conn.getreply()
    if op == "quit":
        return conn.quit()
    if op == "send":
        refused = conn.sendmail(step[1], step[2], step[3].encode("utf-8"))
        if refused:
            return list(refused.values())[0]
        return 250, b"sent"
    raise SystemExit(f"unknown step {op}")


def emit(op, code, msg):
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    print(json.dumps({"op": op, "code": code, "msg": msg}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
