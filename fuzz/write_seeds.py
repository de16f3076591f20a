#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets backend_messages, scram_exchange, row_mapper and
synapse_yaml into fuzz/seeds/<target>/ (pgoutput_decode's seeds come from
`cargo test --lib write_fuzz_seeds -- --ignored`). Run from anywhere: python3 fuzz/write_seeds.py
The messages follow PostgreSQL's protocol documentation (backend messages, pgoutput v1)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def cstr(s):
    return s.encode() + b"\0"


def msg(tag, body=b""):
    return tag + struct.pack(">I", len(body) + 4) + body


# ---- backend messages -------------------------------------------------------------------------
def fields(pairs):
    return b"".join(k + cstr(v) for k, v in pairs) + b"\0"


def row_description(names):
    body = struct.pack(">H", len(names))
    for n in names:
        body += cstr(n) + struct.pack(">IhIhih", 0, 0, 25, -1, -1, 0)
    return msg(b"T", body)


def data_row(values):
    body = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            body += struct.pack(">i", -1)
        else:
            v = v.encode()
            body += struct.pack(">i", len(v)) + v
    return msg(b"D", body)


startup = (
    msg(b"R", struct.pack(">I", 0))
    + b"".join(
        msg(b"S", cstr(k) + cstr(v))
        for k, v in [
            ("application_name", "synapse-account-data-relay"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("server_encoding", "UTF8"),
            ("server_version", "17.2"),
            ("standard_conforming_strings", "on"),
            ("TimeZone", "Etc/UTC"),
        ]
    )
    + msg(b"K", struct.pack(">II", 4711, 123456))
    + msg(b"Z", b"I")
)
write("backend_messages", "startup", startup)
identify = (
    row_description(["systemid", "timeline", "xlogpos", "dbname"])
    + data_row(["7312345678901234567", "1", "0/1A2B3C40", "synapse"])
    + msg(b"C", cstr("IDENTIFY_SYSTEM"))
    + msg(b"Z", b"I")
)
write("backend_messages", "identify-system", identify)
write(
    "backend_messages",
    "identify-system-null-dbname",
    row_description(["systemid", "timeline", "xlogpos", "dbname"])
    + data_row(["7312345678901234567", "3", "16/B374D848", None])
    + msg(b"C", cstr("IDENTIFY_SYSTEM")),
)
write(
    "backend_messages",
    "error-slot-missing",
    msg(
        b"E",
        fields(
            [
                (b"S", "ERROR"),
                (b"V", "ERROR"),
                (b"C", "42704"),
                (b"M", 'replication slot "synapse_account_data_relay" does not exist'),
                (b"F", "slot.c"),
                (b"L", "507"),
                (b"R", "ReplicationSlotAcquire"),
            ]
        ),
    )
    + msg(b"Z", b"I"),
)
write(
    "backend_messages",
    "notice-and-error-with-detail",
    msg(b"N", fields([(b"S", "WARNING"), (b"V", "WARNING"), (b"C", "01000"), (b"M", "something"), (b"H", "a hint")]))
    + msg(
        b"E",
        fields([(b"S", "FATAL"), (b"V", "FATAL"), (b"C", "57P01"), (b"M", "terminating connection"), (b"D", "detail")]),
    ),
)
xlog = b"w" + struct.pack(">QQq", 0x015333A0, 0x015333D0, 817000000000000) + b"B" + struct.pack(">QqI", 0x015333D0, 817000000000000, 7)
keepalive = b"k" + struct.pack(">Qq", 0x015333D0, 817000000000000) + b"\x01"
write(
    "backend_messages",
    "copy-both-stream",
    msg(b"W", b"\0" + struct.pack(">H", 0)) + msg(b"d", xlog) + msg(b"d", keepalive) + msg(b"c") + msg(b"C", cstr("COPY 0")) + msg(b"Z", b"I"),
)
sasl = msg(b"R", struct.pack(">I", 10) + cstr("SCRAM-SHA-256-PLUS") + cstr("SCRAM-SHA-256") + b"\0")
write(
    "backend_messages",
    "auth-sasl",
    sasl
    + msg(b"R", struct.pack(">I", 11) + b"r=abc,s=c2FsdA==,i=4096")
    + msg(b"R", struct.pack(">I", 12) + b"v=c2lnbmF0dXJl")
    + msg(b"R", struct.pack(">I", 0)),
)
write("backend_messages", "auth-md5-cleartext", msg(b"R", struct.pack(">I", 5) + b"salt") + msg(b"R", struct.pack(">I", 3)))

# ---- SCRAM exchange ---------------------------------------------------------------------------
def scram_input(flags, mechanisms, server_first, server_final):
    sasl = msg(b"R", struct.pack(">I", 10) + b"".join(cstr(m) for m in mechanisms) + b"\0")
    return bytes([flags]) + struct.pack(">H", len(sasl)) + sasl + struct.pack(">H", len(server_first)) + server_first + server_final


# "r=" is followed by the client nonce in the target; then the server's part of the nonce.
first = b"r=3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
write("scram_exchange", "scram-sha-256", scram_input(0, ["SCRAM-SHA-256"], first, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
write("scram_exchange", "scram-sha-256-plus", scram_input(1, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], first, b"v=AAAA"))
write("scram_exchange", "plus-offered-no-tls", scram_input(0, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], first, b"e=invalid-proof"))
write("scram_exchange", "tls-plus-not-offered", scram_input(1, ["SCRAM-SHA-256"], first, b"v="))
write("scram_exchange", "unknown-mechanism", scram_input(0, ["SCRAM-SHA-1"], first, b""))

# ---- row mapper (pgoutput v1 messages, each behind a u16 length) -----------------------------
TEXT, BIGINT, SMALLINT, INT = 25, 20, 21, 23


def relation(oid, name, columns, key=("user_id",)):
    body = struct.pack(">I", oid) + cstr("public") + cstr(name) + b"d" + struct.pack(">H", len(columns))
    for col, typ in columns:
        body += bytes([1 if col in key else 0]) + cstr(col) + struct.pack(">Ii", typ, -1)
    return b"R" + body


def tuple_data(values):
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "<toast>":
            out += b"u"
        else:
            v = v.encode()
            out += b"t" + struct.pack(">I", len(v)) + v
    return out


def insert(oid, values):
    return b"I" + struct.pack(">I", oid) + b"N" + tuple_data(values)


def update(oid, values, key=None):
    old = b"K" + tuple_data(key) if key else b""
    return b"U" + struct.pack(">I", oid) + old + b"N" + tuple_data(values)


def delete(oid, key):
    return b"D" + struct.pack(">I", oid) + b"K" + tuple_data(key)


def frames(messages):
    return b"".join(struct.pack(">H", len(m)) + m for m in messages)


begin = b"B" + struct.pack(">QqI", 0x015333D0, 817000000000000, 7)
commit = b"C" + b"\0" + struct.pack(">QQq", 0x015333A0, 0x015333D0, 817000000000000)
ad = [("user_id", TEXT), ("account_data_type", TEXT), ("stream_id", BIGINT), ("content", TEXT), ("instance_name", TEXT)]
rad = [("user_id", TEXT), ("room_id", TEXT), ("account_data_type", TEXT), ("stream_id", BIGINT), ("content", TEXT), ("instance_name", TEXT)]
trv = [("user_id", TEXT), ("room_id", TEXT), ("stream_id", BIGINT), ("instance_name", TEXT)]
prs = [("stream_id", BIGINT), ("event_stream_ordering", BIGINT), ("user_id", TEXT), ("rule_id", TEXT), ("op", TEXT),
       ("priority_class", SMALLINT), ("priority", INT), ("conditions", TEXT), ("actions", TEXT), ("instance_name", TEXT)]
write(
    "row_mapper",
    "account-data",
    frames([
        begin,
        relation(16385, "account_data", ad, key=("user_id", "account_data_type")),
        insert(16385, ["@a_1:example.org", "m.direct", "12", '{"@b:example.org":["!r:example.org"]}', "master"]),
        update(16385, ["@a_1:example.org", "m.direct", "13", "<toast>", None]),
        update(16385, ["@a_1:example.org", "m.direct", "14", "{not json", None]),
        delete(16385, ["@a_1:example.org", "m.direct", None, None, None]),
        commit,
    ]),
)
write(
    "row_mapper",
    "room-account-data-and-tags",
    frames([
        relation(16390, "room_account_data", rad, key=("user_id", "room_id", "account_data_type")),
        insert(16390, ["@a_1:example.org", "!r:example.org", "m.fully_read", "3", '{"event_id":"$e"}', None]),
        relation(16395, "room_tags_revisions", trv, key=("user_id", "room_id")),
        insert(16395, ["@a_1:example.org", "!r:example.org", "4", None]),
        relation(16400, "push_rules_stream", prs, key=()),
        insert(16400, ["5", "1", "@a_1:example.org", "global/override/.m.rule.x", "ENABLE", None, None, None, None, None]),
        relation(16405, "users", [("name", TEXT)], key=("name",)),
        insert(16405, ["@a_1:example.org"]),
        b"T" + struct.pack(">I", 2) + b"\0" + struct.pack(">II", 16385, 16390),
    ]),
)
write(
    "row_mapper",
    "schema-without-content",
    frames([
        relation(16385, "account_data", [("user_id", TEXT), ("account_data_type", TEXT)]),
        insert(16385, ["@a_1:example.org", "m.direct"]),
    ]),
)

# ---- Synapse YAML -----------------------------------------------------------------------------
write(
    "synapse_yaml",
    "registration",
    "id: irc\nurl: http://localhost:9000\nas_token: SeedTokenNeverQuoted\nhs_token: SeedTokenNeverQuoted\n"
    "sender_localpart: ircbot\nbase: &b\n  exclusive: yes\nnamespaces:\n  users:\n    - <<: *b\n      regex: '@irc_.*'\n"
    "    - regex: '@x'\n      exclusive: no\nrate_limited: false\norg.matrix.msc3682.account_data: yes\n",
)
write("synapse_yaml", "registration-url-null", "id: x\nurl: ~\nas_token: SeedTokenNeverQuoted\nhs_token: h\nsender_localpart: x\n")
write(
    "synapse_yaml",
    "homeserver-two-files",
    "server_name: wrong.example\ndatabase:\n  name: psycopg2\n  args:\n    user: synapse\n    password: SeedTokenNeverQuoted\n"
    "    database: synapse\n    host: /var/run/postgresql\n    port: '5433'\n    cp_min: 5\napp_service_config_files:\n"
    "  - appservices/irc.yaml\n  - /abs/other.yaml\nlisteners:\n  - port: 8008\n    type: http\n    tls: false\n"
    "    bind_addresses: ['::1', '127.0.0.1']\n    resources:\n      - names: [client, federation]\n"
    "unknown_key: {a: [1, 2]}\n\0server_name: example.org\nuse_appservice_legacy_authorization: true\n",
)
write("synapse_yaml", "homeserver-sqlite", "server_name: example.org\ndatabase:\n  name: sqlite3\n  args:\n    database: /data/homeserver.db\n")
print("seeds written under", os.path.join(HERE, "seeds"))
