# IP-in-IP (protocol 4) packets sent from A straight to B's outer address, bypassing A's espip: 20
# rounds of 10 UDP datagrams of one flow and size (the kind B's espip writes to its TUN as one
# coalesced packet), the fifth of each round with a payload byte flipped after its checksum was
# made. Prints the count and SHA-256 of the good payloads, in order.
# Usage: ipip_corrupt.py A_INNER B_INNER B_OUTER
import socket, struct, hashlib, sys, time
A_IN, B_IN, B_OUT = sys.argv[1], sys.argv[2], sys.argv[3]
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
def datagram(ident, payload):
    src, dst = socket.inet_aton(A_IN), socket.inet_aton(B_IN)
    ulen = 8 + len(payload)
    pseudo = src + dst + struct.pack('!BBH', 0, 17, ulen)
    c = csum(pseudo + struct.pack('!HHHH', 40000, 5555, ulen, 0) + payload) or 0xffff
    udp = struct.pack('!HHHH', 40000, 5555, ulen, c) + payload
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + ulen, ident, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
    return ip + udp
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
good = hashlib.sha256()
n = 0
for r in range(20):
    pkts = []
    for k in range(10):
        payload = bytes([(r * 10 + k) % 256]) * 1200
        p = datagram(r * 10 + k, payload)
        if k == 4:
            # One payload byte flipped after the checksum was made: the datagram is corrupt.
            p = p[:100] + bytes([p[100] ^ 0x01]) + p[101:]
        else:
            good.update(payload)
            n += 1
        pkts.append(p)
    for p in pkts:
        s.sendto(p, (B_OUT, 0))
    time.sleep(0.02)
print('sent', n, good.hexdigest())
