#!/usr/bin/python3
"""Hostile packets against an espip daemon (host A of the p2p lab), sent by scapy from host B.

Every class of bad packet is sent with a fresh, known effect on espip's counters; valid ICMP
echo requests are mixed in to show the tunnel keeps working. Prints one JSON object:
  expected: the drop counters and delivered packets espip must report,
  replies:  the sequence numbers of the echo replies espip sent (decrypted by scapy),
  other:    packets from A that were not an expected reply (must be none: espip never answers
            a bad packet).
"""
import argparse
import json
import sys
import time

from scapy.all import AsyncSniffer, ICMP, IP, IPOption_NOP, Raw, conf, fragment, send
from scapy.layers.ipsec import ESP, SecurityAssociation

A_OUT, B_OUT = "192.0.2.1", "192.0.2.2"
A_IN, B_IN = "10.4.2.99", "10.4.2.5"
ALGO = {"aes-128-gcm": "AES-GCM", "aes-256-gcm": "AES-GCM", "chacha20-poly1305": "CHACHA20-POLY1305"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cipher", required=True)
    ap.add_argument("--key-a-to-b", required=True)
    ap.add_argument("--key-b-to-a", required=True)
    ap.add_argument("--spi-a-to-b", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--spi-b-to-a", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--window", type=int, default=1024)
    a = ap.parse_args()
    conf.verb = 0
    algo = ALGO[a.cipher]
    tx = SecurityAssociation(ESP, spi=a.spi_b_to_a, crypt_algo=algo,
                             crypt_key=bytes.fromhex(a.key_b_to_a.removeprefix("0x")),
                             tunnel_header=IP(src=B_OUT, dst=A_OUT))
    rx = SecurityAssociation(ESP, spi=a.spi_a_to_b, crypt_algo=algo,
                             crypt_key=bytes.fromhex(a.key_a_to_b.removeprefix("0x")),
                             tunnel_header=IP(src=A_OUT, dst=B_OUT))
    expected = {"delivered": 0, "drops": {}}
    valid_echoes = []

    def drop(reason, n=1):
        expected["drops"][reason] = expected["drops"].get(reason, 0) + n

    def echo(seq, src=B_IN, size=0):
        return IP(src=src, dst=A_IN) / ICMP(type=8, id=0x99, seq=seq) / Raw(b"h" * size or b"hostile %d" % seq)

    def good(seq, esp_seq, size=0):
        """A valid echo request, encrypted at sequence number esp_seq."""
        valid_echoes.append(seq)
        expected["delivered"] += 1
        return tx.encrypt(echo(seq, size=size), seq_num=esp_seq)

    def wire(pkt):
        return bytes(pkt)

    sniffer = AsyncSniffer(iface="veth0", filter=f"ip and src host {A_OUT}")
    sniffer.start()
    time.sleep(0.5)
    pause = lambda: time.sleep(0.05)

    # 1. Reordered within the window: 3, 2, 1 are all delivered.
    for s in (3, 2, 1):
        send(good(s, s)); pause()
    # 2. Replayed: 2 again.
    send(tx.encrypt(echo(2), seq_num=2)); drop("replay"); pause()
    # 3. Beyond the window: 5000 moves the window; 5000 - window - 10 is left of it.
    send(good(4, 5000)); pause()
    send(tx.encrypt(echo(90), seq_num=5000 - a.window - 10)); drop("replay"); pause()
    # 4. Tampered ciphertext (a byte in the middle), 5. tampered ICV (the last byte).
    p = bytearray(wire(tx.encrypt(echo(91), seq_num=5001)))
    p[40] ^= 0x20
    send(IP(bytes(p))); drop("bad_icv"); pause()
    p = bytearray(wire(tx.encrypt(echo(92), seq_num=5002)))
    p[-1] ^= 0x01
    send(IP(bytes(p))); drop("bad_icv"); pause()
    # 6. Tampered SPI.
    p = bytearray(wire(tx.encrypt(echo(93), seq_num=5003)))
    p[20:24] = (a.spi_b_to_a ^ 0x00ff0000).to_bytes(4, "big")
    send(IP(bytes(p))); drop("unknown_spi"); pause()
    # 7. Tampered sequence number (it is in the AAD): 5004 relabelled 5005.
    p = bytearray(wire(tx.encrypt(echo(94), seq_num=5004)))
    p[24:28] = (5005).to_bytes(4, "big")
    send(IP(bytes(p))); drop("bad_icv"); pause()
    # 8. Truncated at every length: each is too short to be ESP (malformed) or fails the ICV.
    full = wire(tx.encrypt(echo(95), seq_num=5010))
    esp = full[20:]
    for n in range(len(esp)):
        send(IP(src=B_OUT, dst=A_OUT, proto=50) / Raw(esp[:n]))
        # RFC 4303 2.4: SPI, sequence, IV (8), at least 4 bytes of ciphertext, ICV (16); the
        # ciphertext is a multiple of 4 bytes. Anything else cannot be ESP; the rest fail the ICV.
        drop("malformed" if n < 36 or (n - 32) % 4 != 0 else "bad_icv")
    time.sleep(0.2)
    # ...and then the whole packet is accepted.
    valid_echoes.append(95)
    expected["delivered"] += 1
    send(IP(full)); pause()
    # 9. Wrong outer source: a valid packet from an address that is not the peer.
    p = bytearray(wire(tx.encrypt(echo(96), seq_num=5011)))
    spoof = IP(bytes(p))
    spoof.src = "192.0.2.77"
    del spoof.chksum
    send(spoof); drop("wrong_source"); pause()
    # 10. Inner source outside allowed_ips.
    send(tx.encrypt(echo(97, src="10.9.9.9"), seq_num=5012)); drop("not_allowed"); pause()
    # 11. An inner packet claiming more bytes than it has.
    bad_len = bytearray(bytes(echo(98)))
    bad_len[2:4] = (len(bad_len) + 100).to_bytes(2, "big")
    send(tx.encrypt(IP(bytes(bad_len)), seq_num=5013)); drop("malformed"); pause()
    # 12. Outer IPv4 options: still a valid packet.
    p = tx.encrypt(echo(5), seq_num=5014)
    valid_echoes.append(5)
    expected["delivered"] += 1
    opt = IP(src=B_OUT, dst=A_OUT, proto=50, options=[IPOption_NOP()] * 4) / p[ESP]
    send(opt); pause()
    # 13. Outer fragments: a 4000-byte echo in one ESP packet, sent as IP fragments (the kernel
    # reassembles before espip sees it; the reply is fragmented on the way back).
    big = good(6, 5015, size=3900)
    for frag in fragment(big, fragsize=1400):
        send(frag)
    time.sleep(0.3)
    # 14. A valid echo at the end: the tunnel still works.
    send(good(7, 5016))
    time.sleep(1.5)
    captured = sniffer.stop()

    replies, other, inner = [], [], []
    from scapy.layers.inet import defragment
    for p in defragment(captured):
        if not p.haslayer(IP) or p[IP].proto != 50:
            other.append(p.summary())
            continue
        try:
            inner.append(rx.decrypt(p[IP]))
        except Exception as e:  # noqa: BLE001
            other.append("undecryptable " + repr(e))
    # A's kernel fragments the big reply before espip carries it: reassemble the inner packets.
    for d in defragment(inner):
        d = IP(bytes(d))
        if ICMP in d and d[ICMP].type == 0 and d[ICMP].id == 0x99:
            replies.append(d[ICMP].seq)
        else:
            other.append(d.summary())
    out = {"expected": expected, "valid": sorted(valid_echoes), "replies": sorted(replies),
           "other": other}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
