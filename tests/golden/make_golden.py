#!/usr/bin/env python3
"""Generate byte-exact AMQP 0-9-1 golden test vectors using Python's `pika`.

These vectors come from an independent implementation (pika's *encoder*),
so the Rust client's encoder and decoder can be checked against them.

Made with: pika 1.4.4 from PyPI (`pip install pika==1.4.4`), on CPython 3.11.
Only pika's encoding side is used. Its decoder is not used at all: the
bytes are parsed back by the small parser in this script.

Rerun (from the repository root):

    pip install pika==1.4.4
    python3 tests/golden/make_golden.py

The script writes these files next to itself (in tests/golden/):

  connection_start_ok.hex  Method frame (channel 0) for Connection.StartOk.
  basic_publish.hex        Method frame for Basic.Publish, then the content header
                           frame (all 14 BasicProperties set), then the body frame,
                           all on channel 1.
  field_table.hex          A field table as pika.data.encode_table makes it
                           (4-byte length prefix, then the entries).
  field_table.txt          For each key in field_table.hex, the field type tag
                           pika chose (parsed from the bytes), plus the tags of
                           nested values, the entries pika refused, and the
                           AMQP/RabbitMQ tags this pika version never produces.

Each .hex file holds lowercase hex and nothing else: one line, no spaces,
then a newline. The script also checks the frames it writes (frame type,
channel, size, the 0xCE frame-end octet, class/method ids) and stops with
an error if a check fails.

The output should not depend on the local time zone. pika encodes a
datetime as calendar.timegm(dt.utctimetuple()), so a naive datetime is
read as UTC; the script checks this.
"""

import calendar
import datetime
import decimal
import inspect
import os
import re
import struct
import sys

import pika
import pika.compat
import pika.data
import pika.exceptions
import pika.frame
import pika.spec

PIKA_VERSION_USED = "1.4.4"
HERE = os.path.dirname(os.path.abspath(__file__))
FRAME_END = 0xCE

# All field type tags of AMQP 0-9-1 plus RabbitMQ's errata, in a fixed order.
ALL_TAGS = ["t", "b", "B", "s", "u", "I", "i", "l", "f", "d", "D", "S",
            "x", "A", "T", "F", "V"]


# --------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------

def write_hex(name, data):
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(data.hex() + "\n")
    print("wrote %s (%d bytes)" % (name, len(data)))


def write_text(name, text):
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print("wrote %s" % name)


# --------------------------------------------------------------------------
# A small independent parser (pika's decoder is deliberately not used)
# --------------------------------------------------------------------------

def parse_short_string(buf, off):
    n = buf[off]
    off += 1
    return buf[off:off + n], off + n


def parse_value(buf, off, path, out):
    """Parse one tagged field value at buf[off].

    Appends (path, tag, detail) to `out` for this value and any nested
    values. Returns the offset just past the value.
    """
    tag = chr(buf[off])
    off += 1
    fixed = {"t": ">B", "b": ">b", "B": ">B", "s": ">h", "u": ">H",
             "I": ">i", "i": ">I", "l": ">q", "f": ">f", "d": ">d",
             "T": ">Q"}
    if tag in fixed:
        fmt = fixed[tag]
        (v,) = struct.unpack_from(fmt, buf, off)
        detail = repr(v)
        if tag == "T":
            utc = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=v)
            detail = "%d (= %sZ)" % (v, utc.isoformat())
        out.append((path, tag, detail))
        return off + struct.calcsize(fmt)
    if tag == "D":
        scale, raw = struct.unpack_from(">Bi", buf, off)
        out.append((path, tag, "scale=%d value=%d (octets %s)"
                    % (scale, raw, buf[off:off + 5].hex())))
        return off + 5
    if tag in ("S", "x"):
        (n,) = struct.unpack_from(">I", buf, off)
        off += 4
        raw = buf[off:off + n]
        out.append((path, tag, "len=%d bytes=%s" % (n, raw.hex())))
        return off + n
    if tag == "A":
        (n,) = struct.unpack_from(">I", buf, off)
        off += 4
        end = off + n
        out.append((path, tag, "len=%d" % n))
        i = 0
        while off < end:
            off = parse_value(buf, off, "%s[%d]" % (path, i), out)
            i += 1
        if off != end:
            raise ValueError("array %s overran its length" % path)
        return off
    if tag == "F":
        (n,) = struct.unpack_from(">I", buf, off)
        out.append((path, tag, "len=%d" % n))
        return parse_table(buf, off, path, out)
    if tag == "V":
        out.append((path, tag, "void"))
        return off
    raise ValueError("unknown field type tag %r at %s" % (tag, path))


def parse_table(buf, off, path, out):
    """Parse a field table (length prefix included) at buf[off]."""
    (n,) = struct.unpack_from(">I", buf, off)
    off += 4
    end = off + n
    while off < end:
        key, off = parse_short_string(buf, off)
        key = key.decode("utf-8")
        sub = key if not path else "%s.%s" % (path, key)
        off = parse_value(buf, off, sub, out)
    if off != end:
        raise ValueError("table %r overran its length" % path)
    return off


def split_frames(data):
    """Split concatenated frames into (type, channel, payload) tuples,
    checking the size and the frame-end octet of each frame."""
    frames = []
    off = 0
    while off < len(data):
        ftype, channel, size = struct.unpack_from(">BHI", data, off)
        off += 7
        payload = data[off:off + size]
        if len(payload) != size:
            raise AssertionError("frame payload truncated")
        off += size
        if data[off] != FRAME_END:
            raise AssertionError("frame end octet is 0x%02x, not 0xce"
                                 % data[off])
        off += 1
        if ftype not in (1, 2, 3, 8):
            raise AssertionError("bad frame type %d" % ftype)
        frames.append((ftype, channel, payload))
    return frames


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


# --------------------------------------------------------------------------
# 1. Connection.StartOk
# --------------------------------------------------------------------------

def make_start_ok():
    client_properties = {
        "product": "pika-rs-golden",
        "version": "1.0",
        "platform": "Rust",
        "capabilities": {
            "authentication_failure_close": True,
            "basic.nack": True,
            "connection.blocked": True,
            "consumer_cancel_notify": True,
            "publisher_confirms": True,
        },
        "information": "golden vector",
    }
    method = pika.spec.Connection.StartOk(
        client_properties=client_properties,
        mechanism="PLAIN",
        response="\x00guest\x00guest",
        locale="en_US",
    )
    data = pika.frame.Method(0, method).marshal()

    frames = split_frames(data)
    check(len(frames) == 1, "start-ok: expected one frame")
    ftype, channel, payload = frames[0]
    check(ftype == 1 and channel == 0, "start-ok: not a method frame on ch 0")
    check(struct.unpack_from(">HH", payload, 0) == (10, 11),
          "start-ok: class/method is not 10/11")
    # client-properties table, mechanism, response, locale
    off = 4
    entries = []
    off = parse_table(payload, off, "", entries)
    mech, off = parse_short_string(payload, off)
    (rlen,) = struct.unpack_from(">I", payload, off)
    off += 4
    resp = payload[off:off + rlen]
    off += rlen
    locale, off = parse_short_string(payload, off)
    check(off == len(payload), "start-ok: trailing bytes in payload")
    check(mech == b"PLAIN" and resp == b"\x00guest\x00guest"
          and locale == b"en_US", "start-ok: fields do not match")
    return data


# --------------------------------------------------------------------------
# 2. Basic.Publish + content header + body
# --------------------------------------------------------------------------

def make_publish():
    body = b'{"hello": "golden world"}'
    props = pika.spec.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"x-int": 42, "x-str": "v"},
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="reply.q",
        expiration="60000",
        message_id="msg-1",
        timestamp=1700000000,
        type="golden.type",
        user_id="guest",
        app_id="pika-golden",
        cluster_id="cluster-x",
    )
    method = pika.spec.Basic.Publish(exchange="amq.direct",
                                     routing_key="golden.key",
                                     mandatory=True, immediate=False)
    data = (pika.frame.Method(1, method).marshal()
            + pika.frame.Header(1, len(body), props).marshal()
            + pika.frame.Body(1, body).marshal())

    frames = split_frames(data)
    check([(t, c) for t, c, _ in frames] == [(1, 1), (2, 1), (3, 1)],
          "publish: expected method, header, body frames on channel 1")
    m = frames[0][2]
    check(struct.unpack_from(">HH", m, 0) == (60, 40),
          "publish: class/method is not 60/40")
    check(m[-1] == 0x01, "publish: bit octet should be mandatory=1 only")
    h = frames[1][2]
    cls, weight, size, flags = struct.unpack_from(">HHQH", h, 0)
    check(cls == 60 and weight == 0 and size == len(body),
          "publish: bad content header class/weight/size")
    check(flags == 0xFFFC, "publish: property flags 0x%04x, not 0xfffc"
          % flags)
    check(frames[2][2] == body, "publish: body frame does not match")
    return data


# --------------------------------------------------------------------------
# 3. Field table
# --------------------------------------------------------------------------

TABLE_INPUT = [
    ("bool_t", True),
    ("bool_f", False),
    ("int", 123),
    ("neg", -5),
    ("long", 2 ** 40),
    ("neg_long", -(2 ** 40)),
    ("float", 1.5),
    ("decimal", decimal.Decimal("3.14")),
    ("timestamp", datetime.datetime(2020, 1, 2, 3, 4, 5)),
    ("string", "hello"),
    ("unicode", "grüße"),
    ("bytes", b"\x00\x01\xff"),
    ("array", [1, "two", True, None, {"k": "v"}]),
    ("table", {"nested": "yes", "deeper": {"n": 1}}),
    ("void", None),
]


def make_field_table():
    kept = {}
    dropped = []
    for key, value in TABLE_INPUT:
        try:
            pika.data.encode_value([], value)
        except Exception as exc:  # pika refuses this Python type
            dropped.append((key, value, "%s.%s" % (type(exc).__module__,
                                                   type(exc).__name__)))
            continue
        kept[key] = value

    pieces = []
    size = pika.data.encode_table(pieces, kept)
    data = b"".join(pieces)
    check(size == len(data), "field table: size returned does not match")

    entries = []
    end = parse_table(data, 0, "", entries)
    check(end == len(data), "field table: trailing bytes")
    top = [p for p, _, _ in entries if p in kept]
    check(top == list(kept),
          "field table: keys out of order")

    # A naive datetime must come out as seconds since the epoch, read as UTC.
    ts = datetime.datetime(2020, 1, 2, 3, 4, 5)
    want = int((ts - datetime.datetime(1970, 1, 1)).total_seconds())
    check(want == calendar.timegm(ts.utctimetuple()) == 1577934245,
          "timestamp: unexpected epoch seconds")
    check(struct.pack(">cQ", b"T", want) in data,
          "timestamp: naive datetime was not encoded as UTC seconds")
    return data, entries, list(kept), dropped


def tags_pika_can_produce():
    """The tags pika's encoder can write, read from its source code, and
    the tags it writes for a set of sample values (the two must agree)."""
    src = inspect.getsource(pika.data.encode_value)
    from_source = set(re.findall(r"b'(.)'", src))
    samples = [True, 0, -1, 2 ** 31 - 1, -(2 ** 31), 2 ** 31, -(2 ** 63),
               2 ** 63 - 1, pika.compat.long(1), "", "s", b"",
               decimal.Decimal("0"), decimal.Decimal("-1.5"),
               datetime.datetime(2000, 1, 1), [], {}, None]
    from_samples = set()
    for value in samples:
        pieces = []
        pika.data.encode_value(pieces, value)
        from_samples.add(chr(b"".join(pieces)[0]))
    check(from_samples <= from_source,
          "sampled tags %r are not all in the encoder source %r"
          % (sorted(from_samples), sorted(from_source)))
    return from_source, from_samples


def field_table_report(entries, kept_keys, dropped):
    lines = []
    lines.append("# Field type tags pika %s chose for field_table.hex"
                 % pika.__version__)
    lines.append("# (parsed from the bytes by make_golden.py; do not edit)")
    lines.append("")
    lines.append("# key tag")
    for path, tag, _ in entries:
        if path in kept_keys:
            lines.append("%s %s" % (path, tag))
    lines.append("")
    lines.append("# nested values: path tag")
    for path, tag, _ in entries:
        if path not in kept_keys:
            lines.append("%s %s" % (path, tag))
    lines.append("")
    lines.append("# details: path tag value")
    for path, tag, detail in entries:
        lines.append("%s %s %s" % (path, tag, detail))
    lines.append("")
    lines.append("# entries pika refused (left out of field_table.hex)")
    if dropped:
        for key, value, exc in dropped:
            lines.append("%s %r %s" % (key, value, exc))
    else:
        lines.append("(none)")
    lines.append("")
    from_source, _ = tags_pika_can_produce()
    seen = {tag for _, tag, _ in entries}
    never = [t for t in ALL_TAGS if t not in from_source]
    lines.append("# tags pika's encoder can produce (from its source)")
    lines.append(" ".join(t for t in ALL_TAGS if t in from_source)
                 + "".join(" " + t for t in sorted(from_source - set(ALL_TAGS))))
    lines.append("# tags present in field_table.hex")
    lines.append(" ".join(t for t in ALL_TAGS if t in seen))
    lines.append("# tags this pika version never produces (cover elsewhere)")
    lines.append(" ".join(never))
    return "\n".join(lines) + "\n"


def main():
    if pika.__version__ != PIKA_VERSION_USED:
        sys.stderr.write("warning: pika %s installed, the files were made "
                         "with pika %s\n"
                         % (pika.__version__, PIKA_VERSION_USED))
    write_hex("connection_start_ok.hex", make_start_ok())
    write_hex("basic_publish.hex", make_publish())
    table, entries, kept_keys, dropped = make_field_table()
    write_hex("field_table.hex", table)
    write_text("field_table.txt",
               field_table_report(entries, kept_keys, dropped))


if __name__ == "__main__":
    main()
