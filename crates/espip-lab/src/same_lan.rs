//! Scenario 3 `same-lan` (SCENARIOS.md, seed 001 "场景2"): A 10.0.0.161 and B 10.0.0.160 on one
//! LAN segment, their traffic to each other encrypted although routing never sends on-link
//! traffic to a TUN. Each host's espip installs the article's OUTPUT DNAT (peer real -> peer
//! alias in 10.0.1.0/24, routed to the TUN), restores the real destination on egress and moves
//! the source into the alias prefix on ingress so conntrack un-NATs the replies.

use super::netns::{self, Daemon, Netns};
use super::p2p::{ping, write_private, LabKeys};
use super::{pcap, transfer, Report};
use espip_core::sa::Cipher;
use std::io;
use std::path::Path;

/// Host A's LAN address.
pub const A: &str = "10.0.0.161";
/// Host B's LAN address.
pub const B: &str = "10.0.0.160";

/// Options of `espip lab same-lan`.
#[derive(Debug, Clone)]
pub struct SameLanOptions {
    /// ESP cipher.
    pub cipher: Cipher,
    /// Size of the TCP transfer in MB.
    pub megabytes: u64,
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

/// Programs this lab needs beyond the common ones.
pub const TOOLS: &[(&str, &str)] = &[("iptables", "iptables"), ("curl", "curl")];

/// The configuration of one host.
pub fn config_text(me_a: bool, cipher: Cipher, keys: &LabKeys, state_dir: &Path) -> String {
    let (peer, endpoint, spi_out, spi_in, key_out, key_in) = if me_a {
        ("b", B, 0x2001u32, 0x2002u32, &keys.a_to_b, &keys.b_to_a)
    } else {
        ("a", A, 0x2002, 0x2001, &keys.b_to_a, &keys.a_to_b)
    };
    format!(
        "# espip lab same-lan, host {}\n[interface]\nname = \"espip0\"\n{}\n[nat]\nrules = \"apply\"\n\n[[nat.map]]\nreal = \"10.0.0.0/24\"\nalias = \"10.0.1.0/24\"\n\n[[peer]]\nname = \"{peer}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [\"{endpoint}/32\"]\nmode = \"esp\"\ncipher = \"{}\"\nspi_out = \"{spi_out:#010x}\"\nspi_in = \"{spi_in:#010x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\n",
        if me_a { "A" } else { "B" },
        super::state_lines(state_dir),
        cipher.name(),
        key_out.to_hex().as_str(),
        key_in.to_hex().as_str()
    )
}

pub(crate) fn rules_of(ns: &Netns) -> String {
    netns::run(&mut ns.command("iptables-save"))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub(crate) fn curl(ns: &Netns, url: &str) -> (bool, String) {
    match netns::run(ns.command("curl").args(["-sS", "--max-time", "5", url])) {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Run the same-lan lab.
pub fn run(opts: &SameLanOptions) -> io::Result<Report> {
    let (mut report, work, keep_work) = opts.run.begin(
        "same-lan",
        format!("espip lab same-lan (esp {})", opts.cipher.name()),
        TOOLS,
    )?;

    let a = Netns::new("lan", "a")?;
    let b = Netns::new("lan", "b")?;
    netns::veth(&a, &format!("{A}/24"), &b, &format!("{B}/24"), "lan0")?;
    // Strict reverse-path filtering, as many distributions set it: the alias routes on the TUN
    // must satisfy it.
    for ns in [&a, &b] {
        ns.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "1")?;
    }
    let keys = LabKeys::generate(opts.cipher)?;
    let cfg_a = work.join("a.toml");
    let cfg_b = work.join("b.toml");
    let taps = opts.run.pcap_dir.as_deref();
    write_private(
        &cfg_a,
        &(config_text(true, opts.cipher, &keys, &work.join("state-a"))
            + &super::capture_lines(taps, "a")),
    )?;
    write_private(
        &cfg_b,
        &(config_text(false, opts.cipher, &keys, &work.join("state-b"))
            + &super::capture_lines(taps, "b")),
    )?;

    // The capture covers everything after the daemons start.
    let wire = work.join("lan.pcap");
    let tcpdump = super::start_capture(&a, "lan0", &wire)?;

    let mut da = Daemon::start(&a, &opts.run.exe, &cfg_a, &work.join("a.log"))?;
    let mut db = Daemon::start(&b, &opts.run.exe, &cfg_b, &work.join("b.log"))?;
    if taps.is_some() {
        super::export_esp_sa(
            &work.join("state-a").join("control.sock"),
            &work.join("esp_sa"),
        )?;
    }
    rules_check(&mut report, &a, &b)?;

    let (ok, d) = ping(&a, B);
    report.check(format!("ping A -> B {B}"), ok, d);
    let (ok, d) = ping(&b, A);
    report.check(format!("ping B -> A {A}"), ok, d);

    http_both_ways(&mut report, &opts.run.exe, (&a, &b))?;

    let bytes = opts.megabytes * 1_000_000;
    super::transfer_check(
        &mut report,
        format!("TCP transfer {} MB A -> {B}", opts.megabytes),
        &opts.run.exe,
        (&a, &b),
        B,
        bytes,
    )?;

    super::stop_capture(tcpdump);
    lan_check(&mut report, &wire, bytes)?;

    if opts.run.keep {
        report.keep_running(vec![a, b], &work, (da, db));
        return Ok(report);
    }

    let clean = da.stop()? & db.stop()?;
    stop_check(&mut report, clean, &a, &b);
    report.note_totals(&[("A", &da), ("B", &db)]);
    let contents = format!(
        "configs, logs and lan.pcap (the LAN){}",
        if taps.is_some() {
            ", host-a/ and host-b/ (each daemon's inner and outer taps), esp_sa (see docs/captures.md)"
        } else {
            ""
        }
    );
    report.finish_work(&work, keep_work, &contents);
    Ok(report)
}
/// HTTP servers on A and B, each fetched by the other through the DNAT to the alias prefix.
fn http_both_ways(report: &mut Report, exe: &Path, (a, b): (&Netns, &Netns)) -> io::Result<()> {
    let servers = [
        super::http_server(a, exe, &format!("{A}:80"), "A")?,
        super::http_server(b, exe, &format!("{B}:80"), "B")?,
    ];
    let (ok, body) = curl(a, &format!("http://{B}/"));
    report.check(
        format!("HTTP A -> http://{B}/"),
        ok && body.contains("host B"),
        body,
    );
    let (ok, body) = curl(b, &format!("http://{A}/"));
    report.check(
        format!("HTTP B -> http://{A}/"),
        ok && body.contains("host A"),
        body,
    );
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    Ok(())
}

/// The daemons installed their rules: the DNAT of each peer into the alias prefix and the
/// MSS clamp.
fn rules_check(report: &mut Report, a: &Netns, b: &Netns) -> io::Result<()> {
    let (ra, rb) = (rules_of(a), rules_of(b));
    report.check(
        "daemons up, rules installed",
        ra.contains("-A ESPIP-espip0 -d 10.0.0.160/32 -j DNAT --to-destination 10.0.1.160")
            && rb.contains("-A ESPIP-espip0 -d 10.0.0.161/32 -j DNAT --to-destination 10.0.1.161")
            && ra.contains("--clamp-mss-to-pmtu"),
        format!(
            "A: {} espip rule lines, B: {}; alias route: {}",
            ra.lines().filter(|l| l.contains("ESPIP")).count(),
            rb.lines().filter(|l| l.contains("ESPIP")).count(),
            String::from_utf8_lossy(&a.ip(&["route", "show", "10.0.1.0/24"])?.stdout).trim()
        ),
    );
    Ok(())
}

/// After the stop: no espip rule, device or alias route left on either host.
fn stop_check(report: &mut Report, clean: bool, a: &Netns, b: &Netns) {
    let left: Vec<String> = [(a, "A"), (b, "B")]
        .iter()
        .flat_map(|(ns, h)| {
            let mut l = Vec::new();
            if rules_of(ns).to_lowercase().contains("espip") {
                l.push(format!("{h}: iptables rules"));
            }
            if ns.has_link("espip0") {
                l.push(format!("{h}: espip0"));
            }
            if let Ok(o) = ns.ip(&["route", "show"]) {
                if String::from_utf8_lossy(&o.stdout).contains("10.0.1.") {
                    l.push(format!("{h}: alias route"));
                }
            }
            l
        })
        .collect();
    report.check(
        "clean stop",
        clean && left.is_empty(),
        if left.is_empty() {
            "SIGTERM: both exit 0; no espip rule, route or device left".to_string()
        } else {
            format!("left behind: {}", left.join(", "))
        },
    );
}

/// The LAN capture must show no TCP, UDP or ICMP between A and B: only ESP (and ARP).
fn lan_check(report: &mut Report, wire: &Path, bytes: u64) -> io::Result<()> {
    let frames = pcap::read(wire)?;
    let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (A.parse().expect("literal"), B.parse().expect("literal"));
    let mut esp = 0u64;
    let mut clear = std::collections::BTreeMap::new();
    let mut arp = 0;
    let mut other = 0;
    let mut canary = 0;
    for f in &frames {
        match f.ipv4() {
            Some((s, d, p)) if (s == a && d == b) || (s == b && d == a) => {
                if p == 50 {
                    esp += 1;
                } else {
                    *clear.entry(p).or_insert(0u64) += 1;
                }
            }
            _ if f.ethertype == 0x0806 => arp += 1,
            _ => other += 1,
        }
        if pcap::contains(&f.payload, transfer::CANARY) {
            canary += 1;
        }
    }
    report.check(
        "LAN capture: only ESP and ARP between A and B",
        clear.is_empty() && other == 0 && esp >= bytes / 1500 && canary == 0,
        format!(
            "{} frames: esp {esp}, arp {arp}, in clear {:?}, other {other}; plaintext canary in {canary}",
            frames.len(),
            clear
        ),
    );
    Ok(())
}
