#!/usr/bin/python3
"""Play host B of the p2p lab with scapy's independent ESP implementation.

Runs inside B's namespace against an espip daemon in A's namespace:
1. encrypts ICMP echo requests 10.4.2.5 -> 10.4.2.99 with the B->A SA and sends them to A;
2. replays one of them (espip must drop it: no second reply);
   with --hostile also sends one packet each with a broken ICV, an unknown SPI, and too short
   to be ESP (each must be dropped and counted: bad_icv, unknown_spi, malformed);
3. sniffs what espip sends back and decrypts it with the A->B SA.
With --udp everything travels as ESP in UDP between ports 4500 (RFC 3948, scapy's NAT-T
encapsulation), and --hostile adds a NAT-keepalive and an IKE datagram (non-ESP marker).
With --outer6 the underlay is IPv6 (A 2001:db8:2::1, B 2001:db8:2::2; ESP as next header 50).
Prints one JSON line; exits 0 when every request got exactly one decryptable echo reply.
"""
import argparse
import json
import sys
import time

from scapy.all import UDP, AsyncSniffer, ICMP, IP, IPv6, Raw, conf, send
from scapy.layers.ipsec import ESP, SecurityAssociation

ALGO = {
    "aes-128-gcm": "AES-GCM",
    "aes-256-gcm": "AES-GCM",
    "chacha20-poly1305": "CHACHA20-POLY1305",
}


def fix_udp_length(pkt):
    """scapy 2.5's NAT-T encryption leaves the UDP length at 8 (the header alone), so the
    receiving kernel would cut the ESP payload off; let scapy compute it (and the IP and, over
    IPv6, where a UDP checksum is mandatory, the UDP checksum)."""
    if UDP in pkt:
        del pkt[UDP].len
        if IPv6 in pkt:
            del pkt[UDP].chksum
            del pkt[IPv6].plen
            return IPv6(bytes(pkt))
        del pkt[IP].chksum
        return IP(bytes(pkt))
    return pkt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cipher", required=True)
    ap.add_argument("--key-a-to-b", required=True)
    ap.add_argument("--key-b-to-a", required=True)
    ap.add_argument("--spi-a-to-b", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--spi-b-to-a", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--hostile", action="store_true")
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--outer6", action="store_true", help="an IPv6 underlay")
    ap.add_argument("--sport", type=int, default=4500,
                    help="our UDP source port with --udp (as a NAT would have mapped it)")
    a = ap.parse_args()
    conf.verb = 0
    algo = ALGO[a.cipher]
    A, B = ("2001:db8:2::1", "2001:db8:2::2") if a.outer6 else ("192.0.2.1", "192.0.2.2")
    L3 = IPv6 if a.outer6 else IP
    nat_t = UDP(sport=a.sport, dport=4500) if a.udp else None
    tx = SecurityAssociation(ESP, spi=a.spi_b_to_a, crypt_algo=algo,
                             crypt_key=bytes.fromhex(a.key_b_to_a.removeprefix("0x")),
                             tunnel_header=L3(src=B, dst=A),
                             nat_t_header=nat_t)
    rx = SecurityAssociation(ESP, spi=a.spi_a_to_b, crypt_algo=algo,
                             crypt_key=bytes.fromhex(a.key_a_to_b.removeprefix("0x")),
                             tunnel_header=L3(src=A, dst=B),
                             nat_t_header=UDP(sport=4500, dport=a.sport) if a.udp else None)

    def outer(payload):
        """A hand-made datagram to A: bare protocol 50, or in UDP with --udp."""
        if a.udp:
            return L3(src=B, dst=A) / UDP(sport=a.sport, dport=4500) / Raw(payload)
        if a.outer6:
            return IPv6(src=B, dst=A, nh=50) / Raw(payload)
        return IP(src=B, dst=A, proto=50) / Raw(payload)

    proto_filter = "udp" if a.udp else ("ip6 proto 50" if a.outer6 else "ip proto 50")
    sniffer = AsyncSniffer(iface="veth0", filter=f"{proto_filter} and src host {A}")
    sniffer.start()
    time.sleep(0.5)
    sent = []
    for seq in range(1, a.count + 1):
        inner = IP(src="10.4.2.5", dst="10.4.2.99") / ICMP(type=8, id=0x77, seq=seq) / Raw(
            b"scapy interop %d" % seq)
        pkt = fix_udp_length(tx.encrypt(inner, seq_num=seq))
        sent.append(pkt)
        send(pkt)
    # Replay request 2: espip must drop it.
    send(sent[1])
    if a.hostile:
        nxt = a.count + 1
        inner = IP(src="10.4.2.5", dst="10.4.2.99") / ICMP(type=8, id=0x77, seq=nxt)
        good = bytes(fix_udp_length(tx.encrypt(inner, seq_num=nxt)))
        # Last byte of the ICV flipped: a fresh sequence number, so only the ICV is wrong.
        tampered = good[:-1] + bytes([good[-1] ^ 0x01])
        t = L3(tampered)
        if a.outer6 and UDP in t:
            # Over IPv6 the UDP checksum is checked by the kernel: make it right for the
            # tampered bytes, so that only the ICV is wrong when the datagram reaches espip.
            del t[UDP].chksum
            t = IPv6(bytes(t))
        send(t)
        # An SPI nobody installed.
        send(outer((0xdead).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(40)))
        # The right SPI but only 8 bytes: no room for IV, payload or ICV.
        send(outer(a.spi_b_to_a.to_bytes(4, "big") + (nxt + 1).to_bytes(4, "big")))
        if a.udp:
            # RFC 3948: a NAT-keepalive, and an IKE message behind the non-ESP marker.
            send(outer(b"\xff"))
            send(outer(bytes(4) + bytes(range(28))))
    time.sleep(1.5)
    captured = sniffer.stop()
    replies = []
    errors = []
    # An echo reply is as long as its request, so its ESP packet is as long as ours: a train of
    # replies the kernel sent as one UDP GSO frame splits at that length.
    esp_len = len(sent[0][ESP])
    packets = []
    wrong_port = 0
    for p in captured:
        if not a.udp:
            packets.append(p[L3])
            continue
        # espip must answer the port our datagrams came from.
        wrong_port += p[UDP].sport != 4500 or p[UDP].dport != a.sport
        data = bytes(p[UDP].payload)
        n = len(data) // esp_len if len(data) % esp_len == 0 else 1
        size = len(data) // n
        for i in range(n):
            packets.append(L3(src=A, dst=B) / UDP(sport=4500, dport=a.sport)
                           / ESP(data[i * size:(i + 1) * size]))
    for p in packets:
        try:
            d = rx.decrypt(p)
        except Exception as e:  # noqa: BLE001 - report any decryption failure
            errors.append(repr(e))
            continue
        if ICMP in d and d[ICMP].type == 0 and d[ICMP].id == 0x77:
            replies.append(d[ICMP].seq)
    ok = sorted(replies) == list(range(1, a.count + 1)) and not errors and not wrong_port
    print(json.dumps({"ok": ok, "esp_from_espip": len(captured), "replies": sorted(replies),
                      "wrong_port": wrong_port, "errors": errors}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
