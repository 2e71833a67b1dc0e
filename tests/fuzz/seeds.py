#!/usr/bin/python3
"""Write the fuzz targets' seed corpus (tests/fuzz/corpus/<target>/) from the ESP test vectors
(tests/vectors/esp_aead.txt) and the example configurations. Rerun after changing either."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def vectors():
    blocks, cur = [], {}
    for line in open(os.path.join(ROOT, "tests/vectors/esp_aead.txt")):
        line = line.strip()
        if line.startswith("#"):
            continue
        if not line:
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        k, v = (x.strip() for x in line.split("=", 1))
        cur[k] = v
    if cur:
        blocks.append(cur)
    return blocks


def rec(tag, data):
    return bytes([tag]) + struct.pack("<H", len(data)) + data


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    inner = []
    for v in vectors():
        if "packet" in v:
            ct = bytes.fromhex(v["packet"])
        else:
            ct = bytes.fromhex(v["spi"] + v["seq"][-8:] + v["iv"] + v["ciphertext"] + v["tag"])
        write("inbound_esp", v["name"] + "-raw", b"\x00" + rec(0, ct))
        write("inbound_ipip", v["name"] + "-esp", rec(2, ct))
        if "inner" in v:
            inner.append((v["name"], bytes.fromhex(v["inner"]), 4))
        if "plaintext" in v:
            pt = bytes.fromhex(v["plaintext"])
            pad = pt[-2]
            packet, nh = pt[: -(2 + pad)], pt[-1]
            inner.append((v["name"], packet, nh))
    # (offload seeds: TCP packets for segmentation, written by hand in corpus/offload.)
    for name, packet, nh in inner:
        # A packet sealed with the peer's key at sequence 1, then the same again (a replay),
        # then at sequence 100 (a window move).
        sealed = lambda seq: rec(1, struct.pack("<I", seq) + bytes([nh]) + packet)
        write("inbound_esp", name + "-sealed", b"\x00" + sealed(1) + sealed(1) + sealed(100))
        write("inbound_ipip", name + "-ipip", rec(0, packet))
        write("outbound", name, rec(0, packet))
        write("nat", name + "-egress", b"\x00" + packet)
        write("nat", name + "-ingress", b"\x01" + packet)
    # Packets in the fixtures' prefixes, so routing and policy accept them.
    icmp = bytes.fromhex("45000054000040004001" "0000" "0a040263" "0a040205") + bytes(64)
    write("outbound", "icmp-to-peer", rec(0, icmp))
    write("inbound_esp", "icmp-from-peer", b"\x00" + rec(1, struct.pack("<I", 7) + b"\x04" +
                                                         icmp[:12] + icmp[16:20] + icmp[12:16] + icmp[20:]))
    lan = bytes.fromhex("45000054000040004001" "0000" "0a0000a1" "0a0001a0") + bytes(64)
    write("nat", "alias-egress", b"\x00" + lan)
    for name in ("README.md", "docs/configuration.md"):
        text = open(os.path.join(ROOT, name)).read()
        blocks = text.split("```toml")[1:]
        for i, b in enumerate(blocks):
            write("config", f"{os.path.basename(name)}-{i}", b.split("```")[0].encode())


if __name__ == "__main__":
    main()
