#!/usr/bin/python3
"""espip benchmark: espip and the reference tunnels, measured in one run on the same namespaces.

Usage (as root, on Debian; installs what is missing):
    python3 tests/bench/run.py [--seconds 5] [--repeat 3] [--out docs/bench-latest.md]
                               [--only veth,espip-ipip,...] [--soak 60]

Two network namespaces joined by a veth pair (192.0.2.1/24 - 192.0.2.2/24). For each tunnel in
turn (set up, measured, torn down): plain veth, espip ipip, espip esp with each cipher, espip
esp-udp (ESP in UDP, RFC 3948) with aes-128-gcm and chacha20-poly1305, socat
TUN/UDP, the current upstream wireguard-go (with its TUN TSO/GRO and UDP GSO/GRO offloads: the
static build in ../shared/anchors/, or --wireguard-go-upstream PATH), Debian's wireguard-go,
gotatun (Mullvad's Rust WireGuard; `cargo install gotatun-cli` into target/bench-tools when
missing), OpenVPN UDP (TLS, AES-256-GCM, userspace, no DCO). For each:
  - single-stream TCP Gbit/s (iperf3, --seconds each),
  - 4-stream TCP Gbit/s (iperf3 -P 4),
  - UDP 64-byte datagrams per second delivered (iperf3 -u -l 64 -b 0),
  - round trip: median and p99 of 200 pings (0.01 s apart), and the median added over veth,
  - CPU seconds per GB: all CPU time of the machine (user+system+softirq, /proc/stat) during the
    single-stream runs, divided by the bytes delivered,
  - espip's peak RSS (VmHWM of both daemons, the larger).
Each throughput figure is the median of --repeat runs. Then a --soak run (esp aes-128-gcm,
single stream, RSS sampled every 5 s) checks that memory stays flat.

Prints a table with each result and its ratio to plain veth and to the best reference tunnel
(the best of every reference tunnel that ran, for that column), and writes it (Markdown) to --out.
A reference that cannot be set up is a row saying why, never silently left out.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

A_OUT, B_OUT = "192.0.2.1", "192.0.2.2"
PKGS = {"iperf3": "iperf3", "socat": "socat", "wireguard-go": "wireguard-go", "wg": "wireguard-tools",
        "openvpn": "openvpn", "openssl": "openssl", "ip": "iproute2", "ping": "iputils-ping"}
GOTATUN_VERSION = "0.10.2"
WG_UPSTREAM_VERSION = "0.0.20250522"
ESPIP_EXE = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "target/release/espip")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# --tx-path: interface.tx_path of the espip daemons ("auto": AF_PACKET for esp and ipip).
ESPIP_TX_PATH = ["auto"]
# --rx-path: interface.rx_path of the espip daemons ("raw": raw sockets; "xdp": AF_XDP).
ESPIP_RX_PATH = ["raw"]
# --tx-threads: interface.tx_threads of the espip daemons (1: one TX thread, one TUN queue).
ESPIP_TX_THREADS = [1]
# Filled in main(): binaries of the references that do not come from Debian.
TOOLS = {"wireguard-go-upstream": None, "gotatun": None}


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def ensure_packages():
    missing = sorted({pkg for prog, pkg in PKGS.items() if shutil.which(prog) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        sys.exit("bench: missing programs and no apt-get; install: " + " ".join(missing))
    print("bench: installing " + " ".join(missing), flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env)
    if r.returncode != 0 or any(shutil.which(p) is None for p in PKGS):
        sys.exit("bench: could not install " + " ".join(missing))


class Lab:
    """Namespaces espip-bench-<pid>-a / -b on a veth; removed on exit, whatever happens."""

    def __init__(self):
        self.a = f"espip-bench-{os.getpid()}-a"
        self.b = f"espip-bench-{os.getpid()}-b"
        self.procs = []

    def __enter__(self):
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            self.ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "veth0", "netns", self.a, "type", "veth", "peer", "name", "veth0",
           "netns", self.b)
        for ns, addr in ((self.a, A_OUT), (self.b, B_OUT)):
            self.ns(ns, "ip", "addr", "add", addr + "/24", "dev", "veth0")
            self.ns(ns, "ip", "link", "set", "veth0", "up")
        return self

    def __exit__(self, *exc):
        self.stop_all()
        for ns in (self.a, self.b):
            sh("ip", "netns", "del", ns, check=False)

    def ns(self, ns, *cmd, check=True):
        return sh("ip", "netns", "exec", ns, *cmd, check=check)

    def spawn(self, ns, *cmd, log=None):
        out = open(log, "w") if log else subprocess.DEVNULL
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def wait_ping(lab, dst, seconds=10):
    end = time.time() + seconds
    while time.time() < end:
        if lab.ns(lab.a, "ping", "-c", "1", "-W", "1", dst, check=False).returncode == 0:
            return True
        time.sleep(0.2)
    return False


# --- tunnels: each sets itself up in the lab and returns the inner address of B -------------

def setup_veth(lab, work):
    return B_OUT, []


def espip_config(me_a, mode, cipher, keys, work):
    addr, local, endpoint, allowed, name = (("10.4.2.99", A_OUT, B_OUT, "10.4.2.5", "b") if me_a
                                            else ("10.4.2.5", B_OUT, A_OUT, "10.4.2.99", "a"))
    host = "a" if me_a else "b"
    s = (f'[interface]\nname = "espip0"\naddress = ["{addr}/24"]\nlocal = "{local}"\n'
         f'state_dir = "{work}/state-{host}"\ncontrol = "{work}/state-{host}/control.sock"\n\n'
         f'[[peer]]\nname = "{name}"\nendpoint = "{endpoint}"\nallowed_ips = ["{allowed}/32"]\n')
    if mode == "ipip":
        return s + 'mode = "ipip"\n'
    out, inn = (keys[0], keys[1]) if me_a else (keys[1], keys[0])
    spi_out, spi_in = ("0x1001", "0x1002") if me_a else ("0x1002", "0x1001")
    return s + (f'mode = "{mode}"\ncipher = "{cipher}"\nspi_out = "{spi_out}"\nspi_in = "{spi_in}"\n'
                f'key_out = "{out}"\nkey_in = "{inn}"\n')


def setup_espip(mode, cipher=None):
    def setup(lab, work):
        exe = ESPIP_EXE[0]
        keys = None
        if mode != "ipip":
            keys = [sh(exe, "genkey", "--cipher", cipher).stdout.strip() for _ in range(2)]
        pids = []
        for me_a, ns in ((True, lab.a), (False, lab.b)):
            path = os.path.join(work, f"espip-{'a' if me_a else 'b'}.toml")
            with open(path, "w") as f:
                text = espip_config(me_a, mode, cipher, keys, work)
                if ESPIP_TX_PATH[0] != "auto":
                    text = text.replace("[interface]\n", f'[interface]\ntx_path = "{ESPIP_TX_PATH[0]}"\n', 1)
                if ESPIP_RX_PATH[0] != "raw":
                    text = text.replace("[interface]\n", f'[interface]\nrx_path = "{ESPIP_RX_PATH[0]}"\n', 1)
                if ESPIP_TX_THREADS[0] > 1:
                    text = text.replace("[interface]\n", f"[interface]\ntx_threads = {ESPIP_TX_THREADS[0]}\n", 1)
                f.write(text)
            os.chmod(path, 0o600)
            p = lab.spawn(ns, exe, "--log-level", "warn", "run", "--config", path,
                          log=os.path.join(work, f"espip-{'a' if me_a else 'b'}.log"))
            pids.append(p)
        return "10.4.2.5", pids
    return setup


def setup_socat(lab, work):
    for ns, me, peer, inner in ((lab.a, A_OUT, B_OUT, "10.9.0.1"), (lab.b, B_OUT, A_OUT, "10.9.0.2")):
        # UDP-DATAGRAM (unconnected): an ICMP "port unreachable" while the other end starts
        # does not end socat, as it would a connected UDP socket.
        lab.spawn(ns, "socat", f"UDP-DATAGRAM:{peer}:4789,bind={me}:4789",
                  f"TUN:{inner}/24,tun-name=tun0,tun-type=tun,iff-no-pi,iff-up")
    for ns in (lab.a, lab.b):
        for _ in range(50):
            if lab.ns(ns, "ip", "link", "show", "tun0", check=False).returncode == 0:
                break
            time.sleep(0.1)
        # UDP over a 1500-byte path: 1500 - 20 - 8.
        lab.ns(ns, "ip", "link", "set", "tun0", "mtu", "1472")
    return "10.9.0.2", []


def setup_wg_userspace(start):
    """A userspace WireGuard configured with `wg`: `start(lab, ns, ifname)` runs it."""
    def setup(lab, work):
        return _setup_wg(lab, work, start)
    return setup


def start_wireguard_go(exe):
    def start(lab, ns, ifname):
        if exe is None:
            raise OSError("binary not found")
        lab.spawn(ns, "env", "LOG_LEVEL=error", exe, "-f", ifname)
    return start


def start_gotatun(lab, ns, ifname):
    if TOOLS["gotatun"] is None:
        raise OSError(f"gotatun not available (cargo install gotatun-cli --version {GOTATUN_VERSION} failed)")
    lab.spawn(ns, "env", "WG_SUDO=1", TOOLS["gotatun"], ifname, "--foreground",
              "--disable-drop-privileges")


def _setup_wg(lab, work, start):
    keys = {}
    for h in ("a", "b"):
        priv = sh("wg", "genkey").stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv, text=True, capture_output=True,
                             check=True).stdout.strip()
        path = os.path.join(work, f"wg-{h}.key")
        with open(path, "w") as f:
            f.write(priv + "\n")
        os.chmod(path, 0o600)
        keys[h] = (path, pub)
    for h, ns, inner, peer_h, peer_out in (("a", lab.a, "10.9.0.1", "b", B_OUT),
                                           ("b", lab.b, "10.9.0.2", "a", A_OUT)):
        start(lab, ns, f"wg-{h}")
        for _ in range(50):
            if lab.ns(ns, "ip", "link", "show", f"wg-{h}", check=False).returncode == 0:
                break
            time.sleep(0.1)
        lab.ns(ns, "wg", "set", f"wg-{h}", "private-key", keys[h][0], "listen-port", "51820",
               "peer", keys[peer_h][1], "allowed-ips", "10.9.0.0/24", "endpoint", f"{peer_out}:51820")
        lab.ns(ns, "ip", "addr", "add", inner + "/24", "dev", f"wg-{h}")
        lab.ns(ns, "ip", "link", "set", f"wg-{h}", "mtu", "1420", "up")
    return "10.9.0.2", []


def setup_openvpn(lab, work):
    """OpenVPN 2.6 point-to-point over UDP, TLS with self-signed certificates pinned by
    fingerprint (--peer-fingerprint), data channel AES-256-GCM (2.6's default), userspace
    (--disable-dco): the configuration OpenVPN's own docs give for two peers."""
    fps = {}
    for h in ("a", "b"):
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-keyout", os.path.join(work, f"ovpn-{h}.key"), "-out", os.path.join(work, f"ovpn-{h}.crt"),
           "-days", "2", "-nodes", "-subj", f"/CN={h}")
        fp = sh("openssl", "x509", "-fingerprint", "-sha256", "-noout", "-in",
                os.path.join(work, f"ovpn-{h}.crt")).stdout
        fps[h] = fp.strip().split("=", 1)[1]
    for h, ns, me, peer, local_in, remote_in, role, other in (
            ("a", lab.a, A_OUT, B_OUT, "10.9.0.1", "10.9.0.2", "--tls-server", "b"),
            ("b", lab.b, B_OUT, A_OUT, "10.9.0.2", "10.9.0.1", "--tls-client", "a")):
        extra = ["--dh", "none"] if role == "--tls-server" else []
        lab.spawn(ns, "openvpn", "--dev", "tun0", "--dev-type", "tun", "--proto", "udp",
                  "--local", me, "--remote", peer, "--port", "1194",
                  "--ifconfig", local_in, remote_in, role, *extra,
                  "--cert", os.path.join(work, f"ovpn-{h}.crt"), "--key", os.path.join(work, f"ovpn-{h}.key"),
                  "--peer-fingerprint", fps[other], "--data-ciphers", "AES-256-GCM",
                  "--disable-dco", "--verb", "1",
                  log=os.path.join(work, f"openvpn-{h}.log"))
    return "10.9.0.2", []


TUNNELS = [
    ("veth", setup_veth),
    ("espip-ipip", setup_espip("ipip")),
    ("espip-esp-aes128gcm", setup_espip("esp", "aes-128-gcm")),
    ("espip-esp-aes256gcm", setup_espip("esp", "aes-256-gcm")),
    ("espip-esp-chacha20", setup_espip("esp", "chacha20-poly1305")),
    ("espip-espudp-aes128gcm", setup_espip("esp-udp", "aes-128-gcm")),
    ("espip-espudp-chacha20", setup_espip("esp-udp", "chacha20-poly1305")),
    ("socat", setup_socat),
    ("wireguard-go-upstream", setup_wg_userspace(
        lambda lab, ns, ifname: start_wireguard_go(TOOLS["wireguard-go-upstream"])(lab, ns, ifname))),
    ("wireguard-go-debian", setup_wg_userspace(start_wireguard_go("wireguard-go"))),
    ("gotatun", setup_wg_userspace(start_gotatun)),
    ("openvpn", setup_openvpn),
]
# Every tunnel that is not espip's and not the plain veth.
REFERENCES = ["socat", "wireguard-go-upstream", "wireguard-go-debian", "gotatun", "openvpn"]


def find_tools(args):
    """The upstream wireguard-go and gotatun binaries (installing gotatun with cargo if
    missing), with the versions the table names."""
    up = args.wireguard_go_upstream or os.path.join(
        os.path.dirname(ROOT), "shared", "anchors", f"wireguard-go-{WG_UPSTREAM_VERSION}")
    if os.access(up, os.X_OK):
        TOOLS["wireguard-go-upstream"] = up
    else:
        print(f"bench: no upstream wireguard-go at {up} (--wireguard-go-upstream PATH); its row will say so",
              flush=True)
    gt = shutil.which("gotatun") or os.path.join(ROOT, "target", "bench-tools", "bin", "gotatun")
    if not os.access(gt, os.X_OK) and shutil.which("cargo"):
        print(f"bench: installing gotatun-cli {GOTATUN_VERSION} with cargo (a few minutes)", flush=True)
        subprocess.run(["cargo", "install", "--quiet", "gotatun-cli", "--version", GOTATUN_VERSION,
                        "--root", os.path.join(ROOT, "target", "bench-tools")], check=False)
    if os.access(gt, os.X_OK):
        TOOLS["gotatun"] = gt


def versions():
    """What each reference row measured, for the table."""
    def line_with(word, *cmd):
        r = sh(*cmd, check=False)
        found = [l.strip() for l in (r.stdout + r.stderr).splitlines() if word in l]
        return found[0] if found else f"{cmd[0]} (version unknown)"
    deb = sh("dpkg-query", "-W", "-f", "${Version}", "wireguard-go", check=False).stdout.strip() or "?"
    up = TOOLS["wireguard-go-upstream"]
    return {
        "wireguard-go-debian": f"wireguard-go {deb} (Debian package)",
        "wireguard-go-upstream": (f"wireguard-go {WG_UPSTREAM_VERSION} (upstream, TUN TSO/GRO and UDP "
                                  f"GSO/GRO on) from {up}" if up else "upstream wireguard-go: not found"),
        "gotatun": f"gotatun-cli {GOTATUN_VERSION} from {TOOLS['gotatun'] or '(not installed)'}",
        "socat": line_with("socat version", "socat", "-V").split(" on ")[0],
        "openvpn": line_with("OpenVPN", "openvpn", "--version").split(" [")[0],
    }


# --- measurements ----------------------------------------------------------------------------

def cpu_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    return sum(v[:3]) + sum(v[5:8])


def iperf(lab, dst, seconds, *extra):
    r = lab.ns(lab.a, "iperf3", "-c", dst, "-t", str(seconds), "-J", *extra, check=False)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"error": r.stdout[-300:] + r.stderr[-300:]}


def tcp(lab, dst, seconds, streams):
    j = iperf(lab, dst, seconds, "-P", str(streams))
    if "error" in j:
        return None, 0
    e = j["end"]["sum_received"]
    return e["bits_per_second"] / 1e9, e["bytes"]


def udp_pps(lab, dst, seconds):
    j = iperf(lab, dst, seconds, "-u", "-l", "64", "-b", "0")
    if "error" in j:
        return None
    s = j["end"]["sum"]
    delivered = s["packets"] - s["lost_packets"]
    return delivered / s["seconds"]


def rtts(lab, dst, count=200):
    r = lab.ns(lab.a, "ping", "-c", str(count), "-i", "0.01", "-W", "1", dst, check=False)
    return sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", r.stdout))


def rss_kb(pids, field):
    best = 0
    for p in pids:
        # The daemon is a child of `ip netns exec`, which execs: same pid.
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        best = max(best, int(line.split()[1]))
        except FileNotFoundError:
            pass
    return best


def measure(lab, name, setup, args, work):
    print(f"== {name}", flush=True)
    lab.ns(lab.b, "true")
    res = {"name": name}
    try:
        dst, pids = setup(lab, work)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or ""
        res["error"] = f"setup failed: {e} {detail.strip()}"
        print("   " + res["error"], flush=True)
        lab.stop_all()
        return res
    srv = lab.spawn(lab.b, "iperf3", "-s")
    try:
        if not wait_ping(lab, dst):
            res["error"] = "no ping through the tunnel"
            print("   no ping through the tunnel; skipped", flush=True)
            return res
        time.sleep(0.3)
        singles, cpus = [], []
        for _ in range(args.repeat):
            t0, c0 = time.time(), cpu_ticks()
            g, nbytes = tcp(lab, dst, args.seconds, 1)
            c1 = cpu_ticks()
            if g is not None:
                singles.append(g)
                cpus.append((c1 - c0) / os.sysconf("SC_CLK_TCK") / (nbytes / 1e9))
        multis = [g for g in (tcp(lab, dst, args.seconds, 4)[0] for _ in range(args.repeat)) if g]
        pps = [p for p in (udp_pps(lab, dst, args.seconds) for _ in range(args.repeat)) if p]
        r = rtts(lab, dst)
        res.update({
            "tcp1": statistics.median(singles) if singles else None,
            "tcp1_runs": singles,
            "tcp4": statistics.median(multis) if multis else None,
            "udp64_pps": statistics.median(pps) if pps else None,
            "rtt_median_ms": statistics.median(r) if r else None,
            "rtt_p99_ms": r[min(len(r) - 1, int(len(r) * 0.99))] if r else None,
            "cpu_s_per_gb": statistics.median(cpus) if cpus else None,
        })
        if pids:
            res["rss_peak_mb"] = rss_kb(pids, "VmHWM") / 1024
        print("   " + ", ".join(f"{k} {fmt(v)}" for k, v in res.items() if k not in ("name", "tcp1_runs")),
              flush=True)
        return res
    finally:
        srv.terminate()
        lab.stop_all()
        time.sleep(0.5)


def soak(lab, seconds, work):
    """Single-stream load through esp aes-128-gcm for `seconds`; RSS of the daemons every 5 s."""
    print(f"== soak: esp aes-128-gcm, {seconds} s of single-stream TCP, RSS every 5 s", flush=True)
    dst, pids = setup_espip("esp", "aes-128-gcm")(lab, work)
    lab.spawn(lab.b, "iperf3", "-s")
    try:
        if not wait_ping(lab, dst):
            return None
        client = subprocess.Popen(["ip", "netns", "exec", lab.a, "iperf3", "-c", dst, "-t", str(seconds)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples = []
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(5)
            samples.append(rss_kb(pids, "VmRSS") / 1024)
        client.wait()
        peak = rss_kb(pids, "VmHWM") / 1024
        return {"samples_mb": samples, "peak_mb": peak}
    finally:
        lab.stop_all()


# --- report ----------------------------------------------------------------------------------

COLUMNS = [("tcp1", "TCP 1 stream Gbit/s", True), ("tcp4", "TCP 4 streams Gbit/s", True),
           ("udp64_pps", "UDP 64 B kpps", True), ("rtt_median_ms", "RTT median ms", False),
           ("rtt_p99_ms", "RTT p99 ms", False), ("cpu_s_per_gb", "CPU s/GB", False)]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:,.0f}"
    return str(v)


def table(results, meta):
    by = {r["name"]: r for r in results}
    veth = by.get("veth", {})
    lines = [f"espip benchmark, {meta}", ""]
    hdr = ["tunnel"] + [c[1] for c in COLUMNS] + ["added RTT us", "espip peak RSS MB"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    best_ref = {}
    for key, _, higher in COLUMNS:
        vals = [by[n][key] for n in REFERENCES if n in by and by[n].get(key)]
        if vals:
            best_ref[key] = max(vals) if higher else min(vals)
    for r in results:
        cells = [r["name"]]
        if "error" in r:
            cells += [r["error"]] + [""] * (len(hdr) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for key, _, higher in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("-")
                continue
            shown = v / 1000 if key == "udp64_pps" else v
            parts = [fmt(shown)]
            if r["name"] != "veth" and veth.get(key):
                parts.append(f"{v / veth[key]:.2f}x veth")
            if r["name"] not in REFERENCES and best_ref.get(key):
                parts.append(f"{v / best_ref[key]:.2f}x ref")
            cells.append(" / ".join(parts))
        added = (r["rtt_median_ms"] - veth["rtt_median_ms"]) * 1000 if r.get("rtt_median_ms") and veth.get("rtt_median_ms") else None
        cells.append(fmt(added) if r["name"] != "veth" else "0")
        cells.append(fmt(r.get("rss_peak_mb")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    best_name = {}
    for key, _, higher in COLUMNS:
        cands = [(by[n][key], n) for n in REFERENCES if n in by and by[n].get(key)]
        if cands:
            best_name[key] = (max(cands) if higher else min(cands))[1]
    lines.append("Ratios: `x veth` = this / plain veth; `x ref` = this / the best reference tunnel in that "
                 "column (for RTT and CPU lower is better, so a ratio below 1 is better). Best reference per "
                 "column: " + "; ".join(f"{title}: {best_name[k]}" for k, title, _ in COLUMNS if k in best_name) + ".")
    lines.append("Single-stream runs (Gbit/s): " + "; ".join(
        f"{r['name']} {', '.join(f'{g:.2f}' for g in r.get('tcp1_runs', []))}" for r in results if "error" not in r))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--soak", type=int, default=60, help="seconds of the RSS soak run (0: skip)")
    ap.add_argument("--only", default="", help="comma-separated tunnel names")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench-latest.md"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--exe", help="the espip binary to measure (default: target/release/espip, built first)")
    ap.add_argument("--tx-threads", type=int, default=1,
                    help="interface.tx_threads of espip (TX threads and TUN queues; default 1)")
    ap.add_argument("--tx-path", default="auto", choices=["auto", "raw"],
                    help="interface.tx_path of espip: auto (AF_PACKET for esp and ipip, the default) or raw")
    ap.add_argument("--rx-path", default="raw", choices=["raw", "xdp"],
                    help="interface.rx_path of espip: raw (raw sockets, the default) or xdp (AF_XDP)")
    ap.add_argument("--wireguard-go-upstream", help="upstream wireguard-go binary (default: "
                    f"../shared/anchors/wireguard-go-{WG_UPSTREAM_VERSION} next to the repository)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (namespaces, TUN devices, raw sockets)")
    if args.repeat < 1 or args.seconds < 1:
        sys.exit("bench: --repeat and --seconds must be at least 1")
    ensure_packages()
    ESPIP_TX_THREADS[0] = args.tx_threads
    ESPIP_TX_PATH[0] = args.tx_path
    ESPIP_RX_PATH[0] = args.rx_path
    if args.exe:
        ESPIP_EXE[0] = os.path.abspath(args.exe)
    elif not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    chosen = [t for t in TUNNELS if not args.only or t[0] in args.only.split(",")]
    if any(n in ("wireguard-go-upstream", "gotatun") for n, _ in chosen):
        find_tools(args)
    cpu = re.search(r"model name\s*: (.*)", open("/proc/cpuinfo").read())
    commit = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = sh("git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip()
    meta = (f"commit {commit}{' (modified)' if dirty else ''}, {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} x {cpu.group(1) if cpu else 'unknown CPU'}, kernel {os.uname().release}; "
            f"{args.seconds} s per run, median of {args.repeat}"
            f"{f'; espip tx_threads = {args.tx_threads}' if args.tx_threads > 1 else ''}"
            f"{f'; espip tx_path = {args.tx_path}' if args.tx_path != 'auto' else ''}"
            f"{f'; espip rx_path = {args.rx_path}' if args.rx_path != 'raw' else ''}")
    results = []
    work = tempfile.mkdtemp(prefix="espip-bench-")
    # Root's own directory: espip keeps its state (root's) in here and refuses parents others
    # can write.
    os.chmod(work, 0o700)
    try:
        with Lab() as lab:
            for name, setup in chosen:
                results.append(measure(lab, name, setup, args, work))
            soaked = soak(lab, args.soak, work) if args.soak > 0 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(results, meta)
    vs = versions()
    text += "\n\nReferences measured: " + "; ".join(
        vs[n] for n in REFERENCES if n in vs and any(r["name"] == n for r in results)) + "."
    if soaked:
        s = soaked["samples_mb"]
        text += (f"\n\nRSS soak ({args.soak} s, esp aes-128-gcm, single TCP stream): VmRSS every 5 s "
                 f"{', '.join(f'{x:.1f}' for x in s)} MB; min {min(s):.1f}, max {max(s):.1f}, "
                 f"peak (VmHWM) {soaked['peak_mb']:.1f} MB")
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
