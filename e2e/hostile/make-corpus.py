#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into e2e/hostile/corpus/<target>/.

Seeds come from known hostile inputs (SYN-09, LIM-*, SIZE-04, EXT-09/15,
OR-01..16, SMUG-01..13, DOT-01, AUTH-07, TLS-CLI-01/04) and from known crash inputs of mail
crates (mail-parser #21/#145/#155, mailparse #41/#130, smtp-proto PR #12, lettre
RUSTSEC-2021-0069 / RUSTSEC-2026-0561). Re-run after editing; files with other names in the
corpus directories (minimised crash reproducers, libFuzzer finds worth keeping) are left alone.
"""
import base64
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")
D = "relay.invalid"          # external test domain (never resolved)
IP = "[127.0.0.1]"           # "our" IP literal
SRV = "mx.example.test"      # our host name


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- addresses (text between the angle brackets) ------------------------------------------
OPEN_RELAY = [  # nmap smtp-open-relay.nse (recipient forms)
    f"relaytest@{D}", f"relaytest%{D}@{IP}", f"relaytest%{D}@{SRV}", f'"relaytest@{D}"',
    f'"relaytest%{D}"', f"relaytest@{D}@{IP}", f'"relaytest@{D}"@{IP}', f"relaytest@{D}@{SRV}",
    f"@{IP}:relaytest@{D}", f"@{SRV}:relaytest@{D}", f"{D}!relaytest", f"{D}!relaytest@{IP}",
    f"{D}!relaytest@{SRV}",
]
ADDRESSES = OPEN_RELAY + [
    "", ">>>>", "a@b.com>>", "postmaster", "Postmaster", "bob@example.test.",
    "USER@OurDomain.COM", "user@[127.0.0.1]", "user@[10.0.0.5]", "user@[IPv6:::1]",
    "user@[IPv6:::ffff:127.0.0.1]", "user@[999.1.1.1]", "用户@例子.广告", "josé@xn--exmple-cua.test",
    '"a\\"b"@x.test', '"a b"@x.test', '""@x.test', "a..b@x.test", ".a@x.test", "a.@x.test",
    "a" * 64 + "@x.test", "a" * 65 + "@x.test", "a@" + ".".join(["b" * 63] * 4),
    "a@" + "b" * 64 + ".test", "@a,@b:c@d.test", "@:c@d.test", "a@-b.test", "a@b-.test",
    "a@b_c.test", "a@b..test", "a\x00@b.test", "a\r\n@b.test", "a@b.test\x7f",
]
for i, a in enumerate(ADDRESSES):
    write("address", f"seed-{i:03}", a)

# ---- commands -----------------------------------------------------------------------------
def cmd(line):
    return line + "\r\n"


COMMANDS = [
    "EHLO client.example", "EHLO", "HELO", "HELO x", "ehlo [127.0.0.1]", "EHLO [IPv6:::1]",
    "MAIL FROM:<>", "MAIL FROM:<>>>>>", "MAIL FROM:<a@b.com>>>", "MAIL FROM: <a@b>",
    "mail from:<a@b>", "MAIL FROM:<a@b> SIZE=99999999999999999999999", "MAIL FROM:<a@b> SIZE=abc",
    "MAIL FROM:<a@b> SIZE=", "MAIL FROM:<a@b> SIZE=1000 BODY=8BITMIME", "MAIL FROM:<a@b> BODY=FOO",
    "MAIL FROM:<a@b> BODY=BINARYMIME", "MAIL FROM:<用户@例子.广告> SMTPUTF8", "MAIL FROM:<用户@例子.广告>",
    "MAIL FROM:<a@b> RET=HDRS ENVID=QQ314159", "MAIL FROM:<a@b> RET=FOO ENVID=+ZZ",
    "MAIL FROM:<a@b> AUTH=<>", "MAIL FROM:<a@b> AUTH=a+2Bb@c", "MAIL FROM:<a@b> =x", "MAIL FROM:<a@b> X",
    "RCPT TO:<b@x> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;B@x", "RCPT TO:<b@x> NOTIFY=NEVER,SUCCESS",
    "RCPT TO:<Postmaster>", "RCPT TO:<>", "RCPT TO:b@x", "RCPT TO:<b@x", "DATA", "DATA x",
    "BDAT 86 LAST", "BDAT 18446744073709551615 LAST", "BDAT 18446744073709551616", "BDAT -1",
    "BDAT abc", "BDAT 10", "BDAT", "RSET", "NOOP", "NOOP some text", "QUIT", "VRFY user",
    "EXPN list", "HELP", "HELP MAIL", "STARTTLS", "STARTTLS foo", "AUTH PLAIN", "AUTH PLAIN =",
    "AUTH PLAIN *", "AUTH PLAIN !!!!", "AUTH LOGIN", "AUTH FOO", "AUTH", "TURN", "ETRN x",
    "GET / HTTP/1.1", "POST /x HTTP/1.0", "CONNECT a:25 HTTP/1.1", "Host: x", "User-Agent: y",
    "FOO", "",
]
for i, c in enumerate(COMMANDS):
    write("command", f"seed-{i:03}", cmd(c))
for i, line in enumerate(f"RCPT TO:<{a}>" for a in OPEN_RELAY):
    write("command", f"relay-{i:02}", cmd(line))
write("command", "long-2049", "A" * 2049 + "\r\nNOOP\r\n")
write("command", "long-512", "MAIL FROM:<a@b> " + "X" * (512 - 18) + "\r\n")
write("command", "bare-lf", "EHLO a\nMAIL FROM:<a@b>\r\n")
write("command", "bare-cr", "EHLO a\rMAIL FROM:<a@b>\r\n")
write("command", "nul", "EHLO a\x00b\r\n")
write("command", "starttls-injection", "STARTTLS\r\nRSET\r\nMAIL FROM:<x@y>\r\n")
write("command", "pipelined", "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
write("command", "utf8-invalid", b"EHLO \xff\xfe\r\nMAIL FROM:<\xc3(@b>\r\n")

# ---- DATA ---------------------------------------------------------------------------------
SECOND = "MAIL FROM:<smuggled@relay.invalid>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
SMUGGLING = {  # (hannob/smtpsmug, SEC Consult scanner)
    "smug-01-lf-dot-lf": "\n.\n", "smug-02-cr-dot-cr": "\r.\r", "smug-03-cr-dot-lf": "\r.\n",
    "smug-04-lf-dot-cr": "\n.\r", "smug-05-lf-dot-crlf": "\n.\r\n", "smug-06-crlf-dot-lf": "\r\n.\n",
    "smug-07-cr-dot-crlf": "\r.\r\n", "smug-08-crlf-dot-cr": "\r\n.\r",
    "smug-09-nul-dot": "\r\n\x00.\r\n", "smug-10-dot-crcrlf": "\r\n.\r\r\n",
    "smug-11-crcrlf-dot-crcrlf": "\r\r\n.\r\r\n", "smug-lfcrlf": "\n\r\n.\r\n",
    "smug-crlflf": "\r\n\n.\r\n",
}
for name, seq in SMUGGLING.items():
    write("data", name, "Subject: t\r\n\r\nbody" + seq + SECOND + "\r\n.\r\n")
write("data", "smug-13-pipelined", "body\r\n.\r\n" + SECOND)
write("data", "empty", ".\r\n")
write("data", "dot-01", "..x\r\n. \r\n.\t\r\nx.\r\n .\r\n..\r\n...\r\n.\r\n")
write("data", "stuffed-terminator", "a\r\n..\r\n.\r\nNOOP\r\n")
write("data", "no-terminator", "a\r\nb\r\n")
write("data", "lim-03-1000", "A" * 998 + "\r\n.\r\n")
write("data", "lim-03-1001", "A" * 999 + "\r\n.\r\n")
for n in (38, 39, 40, 998, 1000, 1022, 1024, 4094, 4096):  # LIM-05: chopped-line dot trap
    write("data", f"lim-05-chop-{n}", "A" * n + ".\r\nMAIL FROM:<x@y>\r\n\r\n.\r\n")
write("data", "lim-04-long-line", "B" * 3000 + "\r\n.\r\n")
write("data", "size-300", "C\r\n" * 120 + ".\r\n")
write("data", "lettre-2021-0069", "a\r\n\r\n.\r\nQUIT\r\n")
write("data", "bare-only", "\n\n\r\r.\n.\r")
write("data", "eight-bit", b"Subject: \xe2\x82\xac\r\n\r\n\xff\xfe\x00\r\n.\r\n")

# ---- AUTH ---------------------------------------------------------------------------------
def b64(raw):
    return base64.b64encode(raw).decode()


AUTH = [
    b64(b"\x00alice@example.test\x00wonderland"), b64(b"alice\x00alice\x00pw"),
    b64(b"\x00alice\x00wonderland").rstrip("="), "*", "=", "", "!!!!", "AGFsaWNl", "====",
    b64(b"\x00\x00"), b64(b"\x00a\x00b\x00c"), b64(b"\x00\xff\xfe\x00pw"), b64(b"a"),
    b64(b"\x00user\x00" + b"p" * 300), "A" * 4096, "YWxp Y2U=", "YWxpY2U=\r\n",
    b64(b"\x00alice\x00correct horse battery staple"),
]
for i, a in enumerate(AUTH):
    write("auth", f"seed-{i:03}", a)

# ---- replies (delivery client) ------------------------------------------------------------
REPLIES = [
    "220 mx.remote.test ESMTP\r\n", "250 ok\r\n", "250 ok\n", "250\r\n", "250-\r\n250 \r\n",
    "250-mx.remote.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    "250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n",
    "250-2.0.0 a\r\n250 2.0.0 b\r\n", "250-2.0.0 a\r\n250 b\r\n", "550 5.1.1 <b@x>: unknown\r\n",
    "421 4.3.0 Server shutting down.\r\n", "452 4.5.3 Too many recipients\r\n",
    "220 Ready to start TLS\r\n250-example.org\r\n250 AUTH LOGIN\r\n",  # TLS-CLI-01 (B_1)
    "221 bye\r\n", "354 go\r\n", "500 x\r\n", "530 x\r\n", "554 x\r\n",  # TLS-CLI-04 greetings
    "2500 x\r\n", "250x\r\n", "25\r\n", "600 x\r\n", "099 x\r\n", "250-a\r\n251 b\r\n",
    "250 \x00\x1b[31m\r\n", "250 2.0\r\n", "250 5.0.0 mismatch\r\n", "250 2.999.999 x\r\n",
    "250 2.1234.1 x\r\n", "250-" + "x" * 600 + "\r\n250 y\r\n", "250-a\r\n" * 300 + "250 z\r\n",
    "250 \xff\xfe\r\n",
]
for i, r in enumerate(REPLIES):
    write("reply", f"seed-{i:03}", r)

# ---- config -------------------------------------------------------------------------------
with open(os.path.join(HERE, "..", "..", "smtp-node", "examples", "dev.yaml"), "rb") as f:
    write("config", "dev.yaml", f.read())
write("config", "minimal.yaml",
      "hostname: mx.example.test\nlisteners:\n- name: mx\n  kind: mx\n  address: 127.0.0.1:2525\n")
write("config", "full.yaml", """hostname: mx.example.test
listeners:
- {name: mx, kind: mx, address: "127.0.0.1:2525", bareLineEndings: normalize, proxyProtocol: true,
  trustedProxies: ["10.0.0.0/8", "2001:db8::1"], nulBytes: strip}
- {name: sub, kind: submission, address: "[::1]:5870", requireTls: true}
- {name: smtps, kind: implicitTls, address: "127.0.0.1:4650"}
tls: {certFile: c.pem, keyFile: k.pem, reloadInterval: 1h 30m}
nats: {url: "nats://a:4222,nats://b:4222", stream: KUBEMAIL, subjectPrefix: kubemail.queue,
  replicas: 3, maxBytes: 25Mi, duplicateWindow: 2m, bodyBucket: B, inlineBodyLimit: 512Ki,
  publishTimeout: 5s}
domains:
- name: example.test
  recipients: [bob, postmaster@example.test]
  catchAll: false
  usersFile: users
  allowedSenders: {alice: [alice@example.test, "*@lists.example.test"]}
  limits: {maxMessageSize: 1Gi, maxRecipients: 100, messagesPerMinutePerUser: 60}
  inbound: {host: dovecot, port: 24, protocol: lmtp, tls: none}
  relay: {name: sg, host: smtp.relay.invalid, port: 587, tls: startTlsRequired,
    verifyCertificate: true, auth: {usernameFile: u, passwordFile: p}, messagesPerSecond: 50}
  dkim: {keys: [{selector: k1, keyFile: rsa.pem}, {selector: k2.sub, keyFile: ed.pem}]}
timeouts: {greeting: 300, command: 5m, dataInit: 2m, dataBlock: 3m, dataTermination: 10m, tlsHandshake: 10s}
minDataRate: 500
maxConnections: 1000
maxConnectionsPerIp: 20
maxErrorsPerSession: 20
maxJunkCommands: 100
clientIpv6Prefix: 64
recipientVerification: {enabled: true, positiveTtl: 1h, negativeTtl: 10m, timeout: 10s, maxConcurrent: 16, cacheSize: 10000}
auth: {maxFailuresPerSession: 3, failuresPerIpPerMinute: 10, maxConcurrentVerifications: 4, verificationWait: 5s}
admin: {address: "127.0.0.1:8080"}
shutdown: {drainTimeout: 30s}
dns: {nameservers: ["127.0.0.1:5353"], timeout: 2s, attempts: 2}
delivery:
  enabled: true
  concurrency: 8
  mxPort: 25
  allowedNetworks: [127.0.0.0/8]
  blockedNetworks: ["203.0.113.0/24"]
  retry: {minBackoff: 5m, maxBackoff: 4000s, lifetime: 5d, bounceLifetime: 5d, delayWarning: 4h}
  timeouts: {connect: 30s, greeting: 5m, command: 5m, mail: 5m, rcpt: 5m, dataInit: 2m, dataBlock: 3m, dataTermination: 10m}
  connections: {perDestination: 20, idleTimeout: 2s, maxMessagesPerConnection: 100}
  tls: {mx: required, extraCaFile: ca.pem}
  consumer: {ackWait: 5m, maxDeliver: 10, maxAckPending: 20000}
  bounceSizeLimit: 50K
inboundAuth: {enabled: true, dmarc: enforce, timeout: 10s}
""")
write("config", "durations.yaml", "hostname: a.b\nlisteners: []\ntimeouts: {greeting: 1ns, command: 18446744073709551615, dataInit: \"1y 2months 3w\"}\n")
write("config", "sizes", "25Mi")
write("config", "size-overflow", "18446744073709551615Gi")
write("config", "alias-bomb.yaml", "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nhostname: *c\n")
write("config", "unknown-field.yaml", "hostname: a.b\nlisteners: []\nlistenres: []\n")

# ---- messages (header handling at ingest; known crash inputs of mail crates) --------------
MESSAGES = {
    "mail-parser-155": b"Received:\n\t",
    "mail-parser-155-crlf": b"Received:\r\n\t",
    "mail-parser-21-mime": b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n",
    "mail-parser-145": b"Content-Type: message/rfc822\r\n\r\nA: \r\n",
    "mailparse-41-date": b"Date: Thu, 1 Jan 99999999999 00:00:00 +9999\r\n\r\n",
    "mailparse-130-from": b"From \r\nFrom: \r\n\r\n",
    "forged-authres": b"Authentication-Results: mx.example.test; spf=pass\r\n"
                      b"Authentication-Results: MX.EXAMPLE.TEST ; dkim=pass\r\n"
                      b"\tfolded\r\nAuthentication-Results: other.test; dmarc=pass\r\n"
                      b"From: a@b\r\n\r\nAuthentication-Results: mx.example.test; body\r\n",
    "header-only": b"From: a@b\r\nSubject: x",
    "nested-mime": b"Content-Type: multipart/mixed; boundary=a\r\n\r\n"
                   + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 50,
    "dkim-signature": b"DKIM-Signature: v=1; a=rsa-sha256; d=x; s=y; h=from; bh=; b=\r\nFrom: a@b\r\n\r\nx\r\n",
    "rfc2047": b"Subject: =?utf-8?B?" + b"QUFB" * 100 + b"?=\r\n\r\n",
    "received-many": b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 60 + b"\r\nx\r\n",
}
for name, m in MESSAGES.items():
    write("message", name, m)
print("corpus written to", OUT)
