"""Forge IP-in-IP frames into a NAPI tap (a stand-in for a NIC with GRO) so that the kernel's
GRO merges them, as it would on a physical NIC: 10 IPv4-in-IPv4 packets of one inner TCP flow,
outer source SRC and destination DST, inner INNER_SRC -> INNER_DST.

usage: gro_forge.py TAP_ADDR/PREFIX SRC DST INNER_SRC INNER_DST
Creates tap `gro0` (IFF_NAPI) with TAP_ADDR, a 2 ms GRO flush timeout and rp_filter off,
writes the frames, and prints `sent N`.
"""
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time

IFF_TAP, IFF_NO_PI, IFF_NAPI = 0x2, 0x1000, 0x10
TUNSETIFF = 0x400454CA


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ip(src, dst, proto, ident, df, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000 if df else 0,
                    64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload


def tcp(src, dst, seq, data):
    th = struct.pack("!HHIIBBHHH", 40000, 5557, seq, 1, 5 << 4, 0x10, 500, 0, 0)
    ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(th) + len(data))
    return th[:16] + struct.pack("!H", csum(ph + th + data)) + th[18:] + data


def main():
    addr, src, dst, isrc, idst = sys.argv[1:6]
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"gro0", IFF_TAP | IFF_NO_PI | IFF_NAPI))
    sh = lambda c: subprocess.run(c, shell=True, check=True)
    sh(f"ip link set gro0 address 02:00:00:00:00:02 up && ip addr add {addr} dev gro0")
    sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.gro0.rp_filter=0")
    sh("echo 2000000 > /sys/class/net/gro0/gro_flush_timeout")
    sh("ethtool -K gro0 gro on >/dev/null 2>&1 || true")
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    seq = 1000
    for i in range(10):
        data = bytes([65 + i]) * 1000
        inner = ip(isrc, idst, 6, 100 + i, True, tcp(isrc, idst, seq, data))
        seq += len(data)
        os.write(fd, eth + ip(src, dst, 4, 500 + i, False, inner))
    time.sleep(0.5)
    print("sent 10")


main()
