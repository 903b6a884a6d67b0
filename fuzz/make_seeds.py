#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/seeds/<target>/) from transcripts of real clients and of
Dovecot 2.3. Run from anywhere; the seeds are committed, so this only needs rerunning when a
transcript is added. Byte 0/1 of the preauth and upstream_login seeds are the mode and chunk
seed those targets read first. Files named regress-* are inputs the fuzzer once failed on,
kept as seeds (this script does not write or delete them)."""
import base64
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent / "seeds"


def b64(b):
    return base64.b64encode(b)


TOKEN = b"eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
XOAUTH2 = b"user=alice@example.org\x01auth=Bearer " + TOKEN + b"\x01\x01"
OAUTHBEARER = (b"n,a=alice@example.org,\x01host=imap.example.org\x01port=993\x01auth=Bearer "
               + TOKEN + b"\x01\x01")

CLIENTS = {
    # Thunderbird 115 on the implicit-TLS port.
    "thunderbird": b"1 capability\r\n2 authenticate PLAIN\r\n"
    + b64(b"\0alice@example.org\0app-pw 123456") + b"\r\n3 select INBOX\r\n",
    # Apple Mail: ID first, LOGIN with quoted strings.
    "apple_mail": b'1.1 ID ("name" "Mac OS X Mail" "version" "16.0")\r\n'
    b'1.2 LOGIN "alice@example.org" "app pw 123456"\r\n',
    # Python imaplib.
    "imaplib": b"ABCD1 CAPABILITY\r\nABCD2 LOGIN alice {13}\r\napppw1 123456\r\nABCD3 LOGOUT\r\n",
    # curl.
    "curl": b"A001 CAPABILITY\r\nA002 AUTHENTICATE PLAIN "
    + b64(b"\0alice\0pw 654321") + b"\r\nA003 LIST \"\" *\r\n",
    # Outlook with XOAUTH2 and SASL-IR.
    "outlook_xoauth2": b"C1 CAPABILITY\r\nC2 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2) + b"\r\n",
    # OAUTHBEARER without initial response, then the RFC 7628 error dance.
    "oauthbearer": b"t1 AUTHENTICATE OAUTHBEARER\r\n" + b64(OAUTHBEARER) + b"\r\n\x01\r\n",
    # K-9 on the STARTTLS port: STARTTLS, pipelined junk that must be dropped, then login.
    "starttls": b"1 CAPABILITY\r\n2 STARTTLS\r\n3 LOGIN smuggled x\r\n4 CAPABILITY\r\n"
    b"5 LOGIN alice pw\r\n",
    # Literals: synchronising and not, a cancelled AUTHENTICATE, NOOP, ENABLE before auth.
    "literals": b"a LOGIN {5}\r\nalice {9+}\r\npw 123456\r\nb AUTHENTICATE PLAIN\r\n*\r\n"
    b"c NOOP\r\nd ENABLE UTF8=ACCEPT\r\ne COMPRESS DEFLATE\r\n",
    # Hostile: literal overflow, NUL, long tag, nesting, bare LF.
    "hostile": b"x LOGIN {4294967296}\r\n* LOGIN a b\r\n+ NOOP\r\n\0\0\0\r\n"
    + b"t" * 300 + b" NOOP\r\nq ID " + b"(" * 200 + b"\r\nz LOGIN a b\nz LOGOUT\r\n",
}

# SMTP submission clients (the smtp_front target): byte 0 = listener mode (bit 0 STARTTLS
# listener, bit 1 OAuth, bit 2 sign-in alert), byte 1 = chunk seed.
SMTP_CLIENTS = {
    # Thunderbird on 465: EHLO, AUTH PLAIN with initial response, then a pipelined message.
    "thunderbird": b"EHLO [192.168.1.20]\r\nAUTH PLAIN " + b64(b"\0alice@example.org\0app-pw 123456")
    + b"\r\nMAIL FROM:<alice@example.org> SIZE=120\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
    # Outlook on 587: STARTTLS with smuggled AUTH behind it, then AUTH LOGIN in two steps.
    "outlook_starttls": b"EHLO DESKTOP-1\r\nSTARTTLS\r\nAUTH PLAIN " + b64(b"\0smuggled\0x")
    + b"\r\nEHLO DESKTOP-1\r\nAUTH LOGIN\r\n" + b64(b"alice@example.org") + b"\r\n"
    + b64(b"app pw") + b"\r\n",
    # XOAUTH2 with the RFC 7628 dance, OAUTHBEARER without initial response.
    "oauth": b"EHLO c\r\nAUTH XOAUTH2 " + b64(XOAUTH2) + b"\r\n\r\nAUTH OAUTHBEARER\r\n"
    + b64(OAUTHBEARER) + b"\r\nAQ==\r\n",
    # Hostile: MAIL before AUTH, bad base64, cancel, NUL, bare LF, a long line.
    "hostile": b"MAIL FROM:<a@b>\r\nHELO x\nAUTH PLAIN %%%\r\nAUTH LOGIN\r\n*\r\n\0\0\r\nXCLIENT LOGIN=x\r\n"
    + b"A" * 9000 + b"\r\nQUIT\r\n",
}

# POP3 clients (the pop3_front target): byte 0 = listener mode (bit 0 STLS listener, bit 1
# OAuth, bit 2 sign-in alert), byte 1 = chunk seed.
POP3_CLIENTS = {
    "poplib": b"CAPA\r\nUSER alice@example.org\r\nPASS app pw 123456\r\nSTAT\r\n",
    "stls": b"CAPA\r\nSTLS\r\nUSER smuggled\r\nPASS x\r\nCAPA\r\nAUTH PLAIN "
    + b64(b"\0alice\0pw") + b"\r\n",
    "sasl": b"AUTH\r\nAUTH PLAIN\r\n" + b64(b"\0alice\0pw") + b"\r\nAUTH XOAUTH2 " + b64(XOAUTH2)
    + b"\r\n\r\nAUTH PLAIN\r\n*\r\n",
    "hostile": b"APOP alice 0123456789abcdef0123456789abcdef\r\nRETR 1\r\nPASS x\r\nAUTH PLAIN %%\r\n"
    + b"\0\0\nUSER " + b"u" * 400 + b"\r\n" + b"B" * 9000 + b"\r\nQUIT\r\n",
}

# Backends answering the SMTP handover (upstream_smtp_login): byte 0 = mode (bits 0-1 implicit /
# STARTTLS / plain, bits 2-3 master user / SASL authzid / XCLIENT, bits 4-5 the client's EHLO
# name, bit 6 IPv6), from Postfix 3.7's and Dovecot 2.3's submission transcripts.
POSTFIX_EHLO = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n"
                b"250-ETRN\r\n250-STARTTLS\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
                b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")
DOVECOT_EHLO = (b"250-mail.example.org\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250-BURL imap\r\n"
                b"250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
SMTP_BACKENDS = {
    "postfix_xclient_starttls": (1 | 8 | 16, b"220 mx.example.org ESMTP Postfix (Debian/GNU)\r\n" + POSTFIX_EHLO
                                 + b"220 2.0.0 Ready to start TLS\r\n" + POSTFIX_EHLO
                                 + b"220 mx.example.org ESMTP Postfix (Debian/GNU)\r\n" + POSTFIX_EHLO),
    "postfix_xclient_v6": (2 | 8 | 16 | 64, b"220 mx.example.org ESMTP\r\n" + POSTFIX_EHLO
                           + b"220 mx.example.org ESMTP\r\n" + POSTFIX_EHLO),
    "dovecot_authzid": (0 | 4 | 16, b"220 mail.example.org Dovecot ready.\r\n" + DOVECOT_EHLO
                        + b"235 2.7.0 Logged in.\r\n"),
    "dovecot_master": (0 | 0 | 32, b"220-mail.example.org\r\n220 Dovecot ready.\r\n" + DOVECOT_EHLO
                       + b"535 5.7.8 Authentication failed\r\n"),
    "refused": (1 | 8, b"421 4.3.2 Service shutting down\r\n"),
    "no_xclient": (2 | 8, b"220 mx ESMTP\r\n250-mx\r\n250 PIPELINING\r\n"),
}

# Backends answering the POP3 login (upstream_pop3_login): byte 0 = mode (bits 0-1 implicit /
# STLS / plain, bit 2 SASL authzid, bit 3 a long master password), from Dovecot 2.3's POP3.
POP3_BACKENDS = {
    "dovecot_user_pass": (0, b"+OK Dovecot ready.\r\n+OK\r\n+OK Logged in.\r\n"),
    "dovecot_stls_authzid": (1 | 4, b"+OK Dovecot ready.\r\n+OK Begin TLS negotiation now.\r\n"
                             b"+OK Logged in.\r\n"),
    "long_password": (2 | 4 | 8, b"+OK ready\r\n+ \r\n+OK Logged in.\r\n"),
    "refused": (0, b"+OK ready\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n"),
    "bye": (0, b"-ERR [SYS/TEMP] too busy\r\n"),
}

BACKENDS = {
    # Dovecot 2.3.19 (Debian 12), master-user LOGIN on plain TCP.
    "dovecot_login": (2, b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE "
     b"LITERAL+ AUTH=PLAIN] Dovecot (Debian) ready.\r\n"
     b"g1 OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY "
     b"THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE "
     b"UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH "
     b"ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY "
     b"PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE] Logged in\r\n"),
    # Dovecot over STARTTLS: capabilities asked, STARTTLS, ID sent, login.
    "dovecot_starttls": (1 | 8, b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE "
     b"IDLE LITERAL+ STARTTLS LOGINDISABLED] Dovecot (Debian) ready.\r\n"
     b"g1 OK Begin TLS negotiation now.\r\n"
     b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\n"
     b"g2 OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
     b"* ID (\"name\" \"Dovecot\")\r\ng3 OK ID completed.\r\n"
     b"g4 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"),
    # SASL with authzid (Cyrus style), continuation then OK without capabilities.
    "cyrus_authzid": (4 | 2, b"* OK imap.example.org Cyrus IMAP 3.6 server ready\r\n"
     b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\ng1 OK Completed\r\n"
     b"+ \r\ng2 OK Success (tls protection)\r\n"
     b"* CAPABILITY IMAP4rev1 IDLE\r\ng3 OK Completed\r\n* 3 EXISTS\r\n"),
    # Faults: PREAUTH, BYE, rejected login, garbage, a literal in a response.
    "preauth": (2, b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as root\r\n"),
    "bye": (0, b"* BYE [UNAVAILABLE] Server shutting down\r\n"),
    "rejected": (2, b"* OK ready\r\ng1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
    "literal": (2, b"* OK ready\r\n* 1 FETCH (BODY[] {5}\r\nhello)\r\ng1 OK {3}\r\nabc\r\n"),
}

# Written by `imapgate users add`, `app-password create` and `users disable`.
USERS = b"""# imapgate users file: written by `imapgate users`, `app-password` and `totp`.
# App passwords are argon2id hashes; TOTP secrets are encrypted under the key ring
# (auth.secret_keys), useless without it. Keep it mode 0600.
version: 1
users:
  alice@example.org:
    disabled: false
    app_passwords:
      - id: ap_i5nqvc
        label: phone
        hash: "$argon2id$v=19$m=19456,t=2,p=1$1ONL4k9rz10LlEoUe1zCTA$NVvRcJluHOB5YR46/1NLDktwxrFsIqdP5SPO0yKwsa8"
        created: 2026-11-26T03:44:37Z
        expires: null
        revoked: false
  bob@example.org:
    disabled: true
    mfa: required
    upstream_user: bob
    app_passwords: []
"""


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    for name, t in CLIENTS.items():
        write("preauth", name + "_tls", bytes([2, 7]) + t)
        write("preauth", name + "_starttls_oauth", bytes([3, 11]) + t)
    for name, t in SMTP_CLIENTS.items():
        write("smtp_front", name + "_tls", bytes([0, 7]) + t)
        write("smtp_front", name + "_starttls_oauth_alert", bytes([7, 11]) + t)
    for name, t in POP3_CLIENTS.items():
        write("pop3_front", name + "_tls", bytes([0, 7]) + t)
        write("pop3_front", name + "_stls_oauth_alert", bytes([7, 11]) + t)
    for name, (mode, t) in SMTP_BACKENDS.items():
        write("upstream_smtp_login", name, bytes([mode, 5]) + t)
    for name, (mode, t) in POP3_BACKENDS.items():
        write("upstream_pop3_login", name, bytes([mode, 5]) + t)
    for name, (mode, t) in BACKENDS.items():
        write("upstream_login", name, bytes([mode, 5]) + t)
    write("sasl_plain", "authcid", b"\0alice\0secret")
    write("sasl_plain", "authzid", b"alice\0alice\0secret pw")
    write("sasl_plain", "mismatch", b"admin\0alice\0secret")
    write("sasl_xoauth2", "gmail", XOAUTH2)
    write("sasl_oauthbearer", "rfc7628", OAUTHBEARER)
    write("sasl_oauthbearer", "escaped", b"y,a=a=2Cb=3Dc,\x01auth=bearer abc.def\x01\x01")
    write("proxy_header", "v1_tcp4", b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 993\r\n\x16\x03\x01")
    write("proxy_header", "v1_tcp6", b"PROXY TCP6 2001:db8::5 2001:db8::1 1234 993\r\n")
    write("proxy_header", "v1_unknown", b"PROXY UNKNOWN\r\n")
    sig = b"\r\n\r\n\0\r\nQUIT\n"
    v4 = bytes([0x21, 0x11, 0, 12, 198, 51, 100, 22, 203, 0, 113, 7, 0x8b, 0x3e, 0x03, 0xe1])
    write("proxy_header", "v2_tcp4", sig + v4 + b"\x16\x03\x01")
    write("proxy_header", "v2_local", sig + bytes([0x20, 0x00, 0, 0]))
    # AWS NLB style TLV (type 0xEA, VPC endpoint id).
    tlv = bytes([0xEA, 0, 9, 1]) + b"vpce-0a1b"
    write("proxy_header", "v2_tlv", sig + bytes([0x21, 0x11, 0, 12 + len(tlv)]) + v4[4:] + tlv)
    write("users_file", "cli_written.yaml", USERS)
    here = pathlib.Path(__file__).resolve().parent.parent
    for f in sorted((here / "config").glob("*.yaml")):
        write("config", f.name, f.read_bytes())

if __name__ == "__main__":
    main()
