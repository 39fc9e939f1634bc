#!/usr/bin/env python3
"""Content-header frames as Python pika 1.3.2 writes them, for the two
properties that pika 1.3.0-1.3.2 encode in ways other clients may not read.

pika 1.3.0-1.3.2 write an int below -2**31 in a headers table with the field
type tag `L` (signed 64-bit); pika 1.1 and 1.4 write `l`. They also write an
int in [2**63, 2**64) as `l` with unsigned packing, and pass a `bytes`
content_type through as raw octets (here 0xFF, which is not UTF-8). The Rust
client must deliver such messages, not close the connection over them.

Pinned to pika 1.3.2 on purpose: 1.1 and 1.4 never write `L`, so vectors made
with them would prove nothing. The script refuses to run with another version.

Rerun (from the repository root), in a throwaway virtualenv:

    python3 -m venv /tmp/pika132 && /tmp/pika132/bin/pip install pika==1.3.2
    /tmp/pika132/bin/python tests/golden/make_golden_pika132.py

It writes, next to itself (one line of lowercase hex each):

  pika132_header_long_l.hex     The content header frame (channel 1, body size
                                4) of a message whose headers are
                                {"big-neg": -2**40, "small-neg": -2**31 - 1,
                                 "x": 5, "huge": 2**63 + 5} and whose
                                content_type is "text/plain".
  pika132_header_ctype_ff.hex   The content header frame (channel 1, body
                                size 4) of a message whose content_type is
                                b"\\xff".

Only pika's encoder is used; the script checks the tags it expects by
reading the bytes itself.
"""

import os
import struct
import sys

import pika
import pika.frame
import pika.spec

PINNED = "1.3.2"
HERE = os.path.dirname(os.path.abspath(__file__))


def write_hex(name, data):
    with open(os.path.join(HERE, name), "w", encoding="ascii", newline="\n") as f:
        f.write(data.hex() + "\n")
    print("wrote %s (%d bytes)" % (name, len(data)))


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def header_frame(props):
    data = pika.frame.Header(1, 4, props).marshal()
    ftype, channel, size = struct.unpack_from(">BHI", data, 0)
    check(ftype == 2 and channel == 1, "not a content header frame on channel 1")
    check(len(data) == 7 + size + 1 and data[-1] == 0xCE, "bad frame size or end")
    return data


def main():
    if pika.__version__ != PINNED:
        sys.exit("pika %s is installed; these vectors must come from pika %s"
                 % (pika.__version__, PINNED))
    headers = {"big-neg": -(2 ** 40), "small-neg": -(2 ** 31) - 1, "x": 5,
               "huge": 2 ** 63 + 5}
    data = header_frame(pika.spec.BasicProperties(content_type="text/plain",
                                                  headers=headers))
    check(b"\x07big-negL" in data and b"\x09small-negL" in data,
          "pika did not write the tag L for ints below -2**31")
    check(b"\x04hugel\x80\x00\x00\x00\x00\x00\x00\x05" in data,
          "pika did not write 2**63+5 as l with unsigned packing")
    write_hex("pika132_header_long_l.hex", data)

    data = header_frame(pika.spec.BasicProperties(content_type=b"\xff"))
    check(data.endswith(b"\x80\x00\x01\xff\xce"),
          "pika did not write content_type as the raw octet 0xFF")
    write_hex("pika132_header_ctype_ff.hex", data)


if __name__ == "__main__":
    main()
