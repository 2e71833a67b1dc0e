//! Scenario 1 `p2p` (SCENARIOS.md): hosts A 192.0.2.1 and B 192.0.2.2 on one veth, tunnel
//! addresses 10.4.2.99 (A) and 10.4.2.5 (B). Checks: ping both ways, a TCP transfer with equal
//! SHA-256 on both ends, a capture of the veth that shows only ESP (or IP-in-IP) between A and
//! B and, for ESP, no plaintext; clean daemon exits that leave no device behind.

use super::netns::{self, Daemon, Netns};
use super::{pcap, transfer, Report};
use espip_core::sa::{Cipher, KeyMaterial};
use std::io;
use std::path::Path;

/// Host A's underlay address.
pub const A_OUTER: &str = "192.0.2.1";
/// Host B's underlay address.
pub const B_OUTER: &str = "192.0.2.2";
/// Host A's underlay address with `--outer ipv6` (RFC 3849 documentation prefix).
pub const A_OUTER6: &str = "2001:db8:2::1";
/// Host B's underlay address with `--outer ipv6`.
pub const B_OUTER6: &str = "2001:db8:2::2";
/// Host A's tunnel address.
pub const A_INNER: &str = "10.4.2.99";
/// Host B's tunnel address.
pub const B_INNER: &str = "10.4.2.5";
/// SPI of the SA from A to B.
pub const SPI_A_TO_B: u32 = 0x1001;
/// SPI of the SA from B to A.
pub const SPI_B_TO_A: u32 = 0x1002;

/// Encapsulation of a lab tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabMode {
    /// ESP with a cipher.
    Esp(Cipher),
    /// ESP in UDP (RFC 3948, port 4500) with a cipher.
    EspUdp(Cipher),
    /// IP-in-IP.
    IpIp,
}

/// Options of `espip lab p2p`.
#[derive(Debug, Clone)]
pub struct P2pOptions {
    /// Encapsulation.
    pub mode: LabMode,
    /// Size of the TCP transfer in MB (10^6 bytes).
    pub megabytes: u64,
    /// Use 64-bit extended sequence numbers.
    pub esn: bool,
    /// Carry the tunnel over IPv6 (ESP as next header 50, ESP in UDP/IPv6, IPv4 in IPv6).
    pub outer_v6: bool,
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

/// The keys of one lab run.
pub struct LabKeys {
    /// A -> B.
    pub a_to_b: KeyMaterial,
    /// B -> A.
    pub b_to_a: KeyMaterial,
}

impl LabKeys {
    /// Fresh random keys for both directions.
    pub fn generate(c: Cipher) -> io::Result<LabKeys> {
        Ok(LabKeys {
            a_to_b: espip_sys::random_key(c)?,
            b_to_a: espip_sys::random_key(c)?,
        })
    }
}

/// Hosts A and B of scenario 1: two namespaces `espip-<tag>-<pid>-{a,b}` joined by `veth0`
/// with the underlay addresses.
/// The p2p topology with IPv6 on the link as well (`--outer ipv6`): A 2001:db8:2::1, B ::2,
/// without duplicate address detection (the addresses are usable at once).
pub fn topology_v6(tag: &str) -> io::Result<(Netns, Netns)> {
    let (a, b) = topology(tag)?;
    for (ns, addr) in [(&a, A_OUTER6), (&b, B_OUTER6)] {
        ns.sysctl("net.ipv6.conf.veth0.disable_ipv6", "0")?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "veth0",
            "nodad",
        ])?;
    }
    Ok((a, b))
}

pub fn topology(tag: &str) -> io::Result<(Netns, Netns)> {
    let a = Netns::new(tag, "a")?;
    let b = Netns::new(tag, "b")?;
    netns::veth(
        &a,
        &format!("{A_OUTER}/24"),
        &b,
        &format!("{B_OUTER}/24"),
        "veth0",
    )?;
    Ok((a, b))
}

/// The configuration text of one host of the p2p lab.
pub fn config_text(
    mode: LabMode,
    me_a: bool,
    keys: Option<&LabKeys>,
    esn: bool,
    state_dir: &Path,
) -> String {
    config_text_over(mode, me_a, keys, esn, state_dir, false)
}

/// The configuration text of one host of the p2p lab, with an IPv6 underlay if `outer_v6`.
pub fn config_text_over(
    mode: LabMode,
    me_a: bool,
    keys: Option<&LabKeys>,
    esn: bool,
    state_dir: &Path,
    outer_v6: bool,
) -> String {
    let (a_out, b_out) = if outer_v6 {
        (A_OUTER6, B_OUTER6)
    } else {
        (A_OUTER, B_OUTER)
    };
    let (addr, local, peer, endpoint, allowed) = if me_a {
        (A_INNER, a_out, "b", b_out, B_INNER)
    } else {
        (B_INNER, b_out, "a", a_out, A_INNER)
    };
    let mut s = format!(
        "# espip lab p2p, host {}\n[interface]\nname = \"espip0\"\naddress = [\"{addr}/24\"]\nlocal = \"{local}\"\n{}\n[[peer]]\nname = \"{peer}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [\"{allowed}/32\"]\n",
        if me_a { "A" } else { "B" },
        super::state_lines(state_dir)
    );
    match (mode, keys) {
        (LabMode::Esp(c) | LabMode::EspUdp(c), Some(k)) => {
            let (spi_out, spi_in, key_out, key_in) = if me_a {
                (SPI_A_TO_B, SPI_B_TO_A, &k.a_to_b, &k.b_to_a)
            } else {
                (SPI_B_TO_A, SPI_A_TO_B, &k.b_to_a, &k.a_to_b)
            };
            s.push_str(&format!(
                "mode = \"{}\"\ncipher = \"{}\"\nspi_out = \"{spi_out:#010x}\"\nspi_in = \"{spi_in:#010x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\nesn = {esn}\n",
                if matches!(mode, LabMode::EspUdp(_)) {
                    "esp-udp"
                } else {
                    "esp"
                },
                c.name(),
                key_out.to_hex().as_str(),
                key_in.to_hex().as_str()
            ));
        }
        _ => s.push_str("mode = \"ipip\"\n"),
    }
    s
}

pub(crate) fn write_private(path: &Path, text: &str) -> io::Result<()> {
    espip_sys::safefs::write_private(path, text.as_bytes()).map(|_| ())
}

/// Three pings from `ns` to `to`: (all answered, summary).
pub fn ping(ns: &Netns, to: &str) -> (bool, String) {
    match netns::run(
        ns.command("ping")
            .args(["-c", "3", "-i", "0.2", "-W", "2", to]),
    ) {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let summary = text
                .lines()
                .filter(|l| l.contains("packets transmitted") || l.starts_with("rtt"))
                .collect::<Vec<_>>()
                .join("; ");
            (o.status.success(), summary)
        }
        Err(e) => (false, e.to_string()),
    }
}

/// Extract `key=value` from the last log line containing `marker`.
pub(crate) fn log_field(log: &str, marker: &str, key: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(marker))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// Run the p2p lab.
pub fn run(opts: &P2pOptions) -> io::Result<Report> {
    let mode_name = match opts.mode {
        LabMode::Esp(c) => format!("esp {}", c.name()),
        LabMode::EspUdp(c) => format!("esp-udp {}", c.name()),
        LabMode::IpIp => "ipip".into(),
    };
    let (mut report, work, keep_work) = opts.run.begin(
        "p2p",
        format!(
            "espip lab p2p ({mode_name}{}{})",
            if opts.esn { ", esn" } else { "" },
            if opts.outer_v6 { ", over IPv6" } else { "" }
        ),
        &[],
    )?;

    let (a, b) = if opts.outer_v6 {
        topology_v6("lab")?
    } else {
        topology("lab")?
    };
    let keys = match opts.mode {
        LabMode::Esp(c) | LabMode::EspUdp(c) => Some(LabKeys::generate(c)?),
        LabMode::IpIp => None,
    };
    let cfg_a = work.join("a.toml");
    let cfg_b = work.join("b.toml");
    let taps = opts.run.pcap_dir.as_deref();
    write_private(
        &cfg_a,
        &(config_text_over(
            opts.mode,
            true,
            keys.as_ref(),
            opts.esn,
            &work.join("state-a"),
            opts.outer_v6,
        ) + &super::capture_lines(taps, "a")),
    )?;
    write_private(
        &cfg_b,
        &(config_text_over(
            opts.mode,
            false,
            keys.as_ref(),
            opts.esn,
            &work.join("state-b"),
            opts.outer_v6,
        ) + &super::capture_lines(taps, "b")),
    )?;

    let mut da = Daemon::start(&a, &opts.run.exe, &cfg_a, &work.join("a.log"))?;
    let mut db = Daemon::start(&b, &opts.run.exe, &cfg_b, &work.join("b.log"))?;
    if keys.is_some() {
        // The same export as `espip sa --wireshark --write`, from the running daemon.
        super::export_esp_sa(
            &work.join("state-a").join("control.sock"),
            &work.join("esp_sa"),
        )?;
    }
    report.check(
        "daemons up",
        a.has_link("espip0") && b.has_link("espip0"),
        format!(
            "espip0 in {} and {}, mtu {}",
            a.name(),
            b.name(),
            log_field(&da.log(), "interface up", "mtu").unwrap_or_else(|| "?".into())
        ),
    );

    let (ok, detail) = ping(&a, B_INNER);
    report.check(format!("ping A -> B {B_INNER}"), ok, detail);
    let (ok, detail) = ping(&b, A_INNER);
    report.check(format!("ping B -> A {A_INNER}"), ok, detail);

    // Capture the underlay while the transfer runs.
    let wire = work.join("wire.pcap");
    let tcpdump = super::start_capture(&a, "veth0", &wire)?;

    let bytes = opts.megabytes * 1_000_000;
    super::transfer_check(
        &mut report,
        format!("TCP transfer {} MB A -> B", opts.megabytes),
        &opts.run.exe,
        (&a, &b),
        B_INNER,
        bytes,
    )?;

    super::stop_capture(tcpdump);
    wire_check(&mut report, &wire, opts.mode, opts.outer_v6, bytes)?;

    if opts.run.keep {
        report.keep_running(vec![a, b], &work, (da, db));
        return Ok(report);
    }

    report.clean_stop(&mut [(&a, &mut da), (&b, &mut db)])?;
    report.note_totals(&[("A", &da), ("B", &db)]);
    let contents = format!(
        "configs, logs, wire.pcap (the A-B link){}{}",
        if taps.is_some() {
            ", host-a/ and host-b/ (each daemon's inner and outer taps)"
        } else {
            ""
        },
        if work.join("esp_sa").exists() {
            " and esp_sa (open any capture with it: see docs/captures.md)"
        } else {
            ""
        }
    );
    report.finish_work(&work, keep_work, &contents);
    drop(a);
    drop(b);
    Ok(report)
}

/// Check the capture: every IP packet between A's and B's underlay addresses (IPv4, or IPv6
/// with `outer_v6`) is ESP (in UDP between the ports 4500 for esp-udp, or IP-in-IP), they add
/// up to at least the transfer's bytes, and for ESP the canary never appears. ARP and IPv6
/// neighbour discovery are counted apart. (A UDP GSO train crosses the veth, and so the
/// capture, as one frame: bytes are counted, not packets.)
fn wire_check(
    report: &mut Report,
    wire: &Path,
    mode: LabMode,
    outer_v6: bool,
    bytes: u64,
) -> io::Result<()> {
    let frames = pcap::read(wire)?;
    let (a, b): (std::net::IpAddr, std::net::IpAddr) = if outer_v6 {
        (
            A_OUTER6.parse().expect("literal"),
            B_OUTER6.parse().expect("literal"),
        )
    } else {
        (
            A_OUTER.parse().expect("literal"),
            B_OUTER.parse().expect("literal"),
        )
    };
    let mut by_proto = std::collections::BTreeMap::new();
    let mut bytes_of = std::collections::BTreeMap::new();
    let mut arp = 0;
    let mut other = 0;
    let mut canary = 0;
    for f in &frames {
        match f.ip() {
            Some((s, d, p, hl, total)) if (s == a && d == b) || (s == b && d == a) => {
                let nat_t = [0x11, 0x94, 0x11, 0x94]; // ports 4500 -> 4500
                let p = match f.payload.get(hl..hl + 4) {
                    Some(ports) if p == 17 && ports != nat_t => 0, // UDP on other ports: stray
                    _ => p,
                };
                *by_proto.entry(p).or_insert(0u64) += 1;
                *bytes_of.entry(p).or_insert(0u64) += total as u64;
            }
            // ARP, and IPv6's link control: neighbour discovery (ICMPv6) and multicast listener
            // reports (to ff02::/16, behind a hop-by-hop header).
            _ if f.ethertype == 0x0806 => arp += 1,
            Some((_, d, p, _, _)) if f.ethertype == 0x86dd && (p == 58 || d.is_multicast()) => {
                arp += 1
            }
            _ => other += 1,
        }
        if pcap::contains(&f.payload, transfer::CANARY) {
            canary += 1;
        }
    }
    let want = match mode {
        LabMode::Esp(_) => 50u8,
        LabMode::EspUdp(_) => 17u8,
        LabMode::IpIp => 4u8,
    };
    let tunnel_bytes = bytes_of.get(&want).copied().unwrap_or(0);
    let stray: u64 = by_proto
        .iter()
        .filter(|(p, _)| **p != want)
        .map(|(_, n)| n)
        .sum();
    let summary = by_proto
        .iter()
        .map(|(p, n)| {
            format!(
                "proto {p}: {n} frames, {} bytes",
                bytes_of.get(p).copied().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    report.check(
        match mode {
            LabMode::EspUdp(_) => "capture shows only UDP 4500 -> 4500 between A and B".into(),
            _ => format!("capture shows only protocol {want} between A and B"),
        },
        stray == 0 && tunnel_bytes >= bytes && other == 0,
        format!(
            "{} frames: {summary}; arp / IPv6 link control {arp}; other {other}",
            frames.len()
        ),
    );
    match mode {
        LabMode::Esp(_) | LabMode::EspUdp(_) => report.check(
            "no plaintext on the wire",
            canary == 0,
            format!(
                "canary {:?} found in {canary} frames",
                String::from_utf8_lossy(transfer::CANARY)
            ),
        ),
        LabMode::IpIp => report.notes.push(format!(
            "ipip is plaintext by design: the canary is visible in {canary} frames"
        )),
    }
    Ok(())
}
