#!/usr/bin/python3
"""Hostile outer packets for the XDP receive path (tests/offload.rs): sent from A's namespace
as raw Ethernet frames (AF_PACKET on IFACE) to B's MAC address, protocol 50 to B's outer
address, so B's XDP program steers each of them to espip:
  1. an IPv4 header with a wrong checksum;
  2. an IPv4 total length beyond the frame;
  3. a sound header from a source that is no peer's.
Usage: xdp_hostile.py IFACE DST_MAC SRC_IP DST_IP. Prints "sent 3"."""
import socket
import struct
import sys

iface, dst_mac, src, dst = sys.argv[1:5]


def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, payload, total=None, bad_checksum=False):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(payload), 7, 0, 64, 50, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    c = checksum(h) ^ (0x5A5A if bad_checksum else 0)
    return h[:10] + struct.pack("!H", c) + h[12:] + payload


s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
eth = bytes.fromhex(dst_mac.replace(":", "")) + s.getsockname()[4] + b"\x08\x00"
esp = struct.pack("!II", 0x1001, 1) + b"\xAB" * 48
for frame in (
    ipv4(src, dst, esp, bad_checksum=True),
    ipv4(src, dst, esp, total=20 + len(esp) + 400),
    ipv4("192.0.2.77", dst, esp),
):
    s.send(eth + frame)
print("sent 3")
