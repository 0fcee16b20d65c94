#!/usr/bin/env python3
"""Writes the seed corpus of the raw-bytes fuzz targets (fuzz/seeds/<target>/).

Well-formed inputs the fuzzer would take a while to find by itself: peer-port frames of every
kind (raft batch with entries and a conf change, snapshot chunk, handshake, control frames with
a meta transaction), and one harpoon log record of each kind. Run from anywhere:
    python3 fuzz/seeds/make_seeds.py
The structured targets (arbitrary-based) need no seeds.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field, v):
    return varint(field << 3) + varint(v)


def f_bytes(field, b):
    return varint((field << 3) | 2) + varint(len(b)) + b


def entry(index, term, data=b"", etype=0):
    return (f_varint(1, etype) if etype else b"") + f_varint(2, term) + f_varint(3, index) + (
        f_bytes(4, data) if data else b"")


def raft_msg(msg_type, to, frm, term, index=0, log_term=0, entries=(), commit=0, snapshot=None):
    m = f_varint(1, msg_type) + f_varint(2, to) + f_varint(3, frm) + f_varint(4, term)
    if log_term:
        m += f_varint(5, log_term)
    if index:
        m += f_varint(6, index)
    for e in entries:
        m += f_bytes(7, e)
    if commit:
        m += f_varint(8, commit)
    if snapshot is not None:
        m += f_bytes(9, snapshot)
    return m


def conf_change_v2(node):
    single = f_varint(1, 0) + f_varint(2, node)  # AddNode
    return f_bytes(2, single)


def cell_message(cell, msg):
    return f_varint(1, cell) + f_bytes(2, msg)


def peer_frame(kind_field, body):
    return f_bytes(kind_field, body)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    append = raft_msg(3, 2, 1, 7, index=4, log_term=7,
                      entries=[entry(5, 7, b"put a=1"), entry(6, 7, conf_change_v2(4), etype=2)],
                      commit=5)
    vote = raft_msg(5, 3, 1, 8, index=6, log_term=7)
    batch = f_bytes(1, cell_message(3, append)) + f_bytes(1, cell_message(0, vote))
    snap_meta = f_bytes(1, f_varint(1, 1) + f_varint(1, 2)) + f_varint(2, 10) + f_varint(3, 7)
    snap_header = raft_msg(7, 2, 1, 7, snapshot=f_bytes(2, snap_meta))
    chunk = f_varint(1, 3) + f_bytes(2, snap_header) + f_bytes(4, b"snapshot-data") + \
        f_varint(5, 1) + f_varint(6, 13)
    hello = f_varint(1, 1) + f_bytes(2, b"test") + f_varint(3, 1) + f_varint(4, 2) + \
        f_bytes(5, bytes(range(32)))
    txn = f_bytes(1, f_bytes(1, b"k") + f_varint(3, 0)) + \
        f_bytes(2, f_bytes(1, f_bytes(1, b"k") + f_bytes(2, b"v")))
    control_request = f_varint(1, 9) + f_bytes(5, f_bytes(1, txn))
    control_hello = f_varint(1, 1) + f_bytes(2, b"test") + f_bytes(4, bytes(32))
    image = f_varint(1, 3) + f_bytes(2, f_bytes(1, b"k") + f_bytes(2, b"v") + f_varint(3, 1) +
                                     f_varint(4, 3) + f_varint(5, 2))
    control_view = f_varint(1, 9) + f_bytes(4, f_bytes(1, image) + f_varint(2, 1))

    frames = {
        "raft_batch": peer_frame(6, batch),
        "snapshot_chunk": peer_frame(7, chunk),
        "hello": peer_frame(1, hello),
        "refused": peer_frame(5, f_varint(1, 1)),
        "control_hello": f_bytes(16, control_hello),
        "control_propose": f_bytes(20, control_request),
        "control_view": f_bytes(21, control_view),
        "raft_message": append,
    }
    for name, data in frames.items():
        write("peer_frame", name, data)
    stream = b"".join(struct.pack("<I", len(v)) + v for v in frames.values())
    # frame_decoder input: limit choice, number of reads, read sizes (u16 LE), stream.
    write("frame_decoder", "frames", b"\x05\x00" + stream)  # 64 MiB limit, one read
    write("frame_decoder", "frames_split", b"\x04\x03" + struct.pack("<HHH", 1, 5, 3) + stream)
    write("frame_decoder", "frames_small_limit", b"\x03\x01" + struct.pack("<H", 7) + stream)

    def rec(kind, cell, body):
        return bytes([kind]) + struct.pack("<Q", cell) + body

    ents = struct.pack("<QI", 5, 2)
    for term, etype, data in ((7, 0, b"put"), (7, 2, conf_change_v2(4))):
        ents += struct.pack("<QBBI", term, etype, 0, len(data)) + data + struct.pack("<I", 0)
    records = {
        "entries": rec(1, 3, ents),
        "hard_state": rec(2, 3, struct.pack("<QQQ", 7, 1, 5)),
        "snapshot": rec(3, 3, struct.pack("<QQ", 10, 7)),
        "compact": rec(4, 3, struct.pack("<QQ", 4, 7)),
        "destroy": rec(5, 3, b""),
    }
    for name, data in records.items():
        write("raft_log_record", name, data)


if __name__ == "__main__":
    main()
