//! `espip lab multipath --topology uplinks`: seed 000's real setting, a client with two
//! uplinks (a DSL line and an LTE stick) talking to one server address.
//!
//! ```text
//!        l1 10.1.0.1 ==[ m1: relay, tbf ]== l1 10.1.0.2 --+
//!   A --+  default via 10.1.0.2 metric 100                 +-- B: 203.0.113.1 (lo)
//!        l2 192.168.8.100 -- NAT -- 10.2.0.2 ==[ m2 ]== l2 10.2.0.1
//!           default via 192.168.8.1 metric 200
//! ```
//!
//! A's two default routes are what DHCP leaves on such a host: routing alone sends
//! everything out of uplink 1. A's paths name their uplink instead (path 1 by `local`, path 2
//! by `device`), so each leaves by its own without policy routing. Uplink 2 is masqueraded by
//! the NAT namespace, so B sees the NAT's address on path 2. B names both of A's outer
//! addresses as it sees them (the NAT's for path 2).

use super::links::{relayed_link, LINK1};
use super::{Lab, LinkSpec};
use crate::netns::Netns;
use std::io;
use std::path::Path;

/// B's one address.
pub(super) const SERVER: &str = "203.0.113.1";
/// A's address on uplink 2 (behind the NAT).
const A_UPLINK2: &str = "192.168.8.100";
/// The NAT's address on A's side.
const NAT_LAN: &str = "192.168.8.1";
/// The NAT's outer address (what B sees of uplink 2), and B's address on that link.
const LINK2: [&str; 2] = ["10.2.0.2", "10.2.0.1"];

/// Build A, B, the NAT and the two middles (relays not started).
pub(super) fn build(links: &[LinkSpec], work: &Path, keep: bool) -> io::Result<Lab> {
    let a = Netns::new("lab", "a")?;
    let b = Netns::new("lab", "b")?;
    let nat = Netns::new("lab", "nat")?;
    let m = vec![Netns::new("lab", "m1")?, Netns::new("lab", "m2")?];
    relayed_link((&a, "l1"), (&b, "l1"), &m[0], &links[0])?;
    relayed_link((&nat, "wan"), (&b, "l2"), &m[1], &links[1])?;
    crate::netns::veth_pair(&a, "l2", &nat, "lan")?;
    // UDP GSO trains from A are forwarded whole by the NAT: cut them before the relay.
    a.ip(&["link", "set", "l2", "gso_max_segs", "1"])?;
    for ns in [&a, &b, &nat] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    }
    // A: one address per uplink, two default routes.
    a.ip(&["addr", "add", &format!("{}/24", LINK1[0]), "dev", "l1"])?;
    a.ip(&["addr", "add", &format!("{A_UPLINK2}/24"), "dev", "l2"])?;
    for dev in ["l1", "l2"] {
        a.ip(&["link", "set", dev, "up"])?;
    }
    a.ip(&[
        "route", "add", "default", "via", LINK1[1], "dev", "l1", "metric", "100",
    ])?;
    a.ip(&[
        "route", "add", "default", "via", NAT_LAN, "dev", "l2", "metric", "200",
    ])?;
    // Only to measure uplink 2 alone: B's link-2 address over uplink 2.
    a.ip(&[
        "route",
        "add",
        &format!("{}/32", LINK2[1]),
        "via",
        NAT_LAN,
        "dev",
        "l2",
    ])?;
    // The NAT: forwards and masquerades what leaves by its outer side.
    nat.ip(&["addr", "add", &format!("{NAT_LAN}/24"), "dev", "lan"])?;
    nat.ip(&["addr", "add", &format!("{}/24", LINK2[0]), "dev", "wan"])?;
    for dev in ["lan", "wan"] {
        nat.ip(&["link", "set", dev, "up"])?;
    }
    nat.ip(&["route", "add", "default", "via", LINK2[1]])?;
    nat.sysctl("net.ipv4.ip_forward", "1")?;
    let out = crate::netns::run(nat.command("iptables").args([
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "wan",
        "-j",
        "MASQUERADE",
    ]))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "iptables MASQUERADE in the NAT namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // B: one address, reached over both links.
    b.ip(&["addr", "add", &format!("{}/24", LINK1[1]), "dev", "l1"])?;
    b.ip(&["addr", "add", &format!("{}/24", LINK2[1]), "dev", "l2"])?;
    b.ip(&["addr", "add", &format!("{SERVER}/32"), "dev", "lo"])?;
    for dev in ["lo", "l1", "l2"] {
        b.ip(&["link", "set", dev, "up"])?;
    }
    for key in ["all", "default", "l1", "l2"] {
        b.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
    }
    Ok(Lab {
        a,
        b,
        m,
        nat: Some(nat),
        relays: vec![None, None],
        work: work.to_path_buf(),
        keep,
    })
}

/// The `[[peer.path]]` tables of one host (ESP in UDP: the NAT forbids anything else).
pub(super) fn path_lines(me_a: bool, links: &[LinkSpec], weights: bool) -> String {
    let weight = |i: usize| super::weight_line(weights, &links[i]);
    if me_a {
        format!(
            "\n# Uplink 1 by its source address, uplink 2 by its interface: each path leaves by its\n# own uplink although routing sends everything out of uplink 1.\n[[peer.path]]\nname = \"link1\"\nendpoint = \"{SERVER}:4500\"\nlocal = \"{}\"\n{}\n[[peer.path]]\nname = \"link2\"\nendpoint = \"{SERVER}:4500\"\ndevice = \"l2\"\n{}",
            LINK1[0],
            weight(0),
            weight(1)
        )
    } else {
        // No address of A: its two paths are learned from its packets.
        "\n# A's paths, learned from its authenticated packets: no address of A here.\nmax_paths = 2\n"
            .to_string()
    }
}

/// Where plain TCP goes to measure each uplink alone: B's address on each link.
pub(super) fn alone_targets() -> [&'static str; 2] {
    [LINK1[1], LINK2[1]]
}

/// A's paths name their uplinks and each carried part of the stream; B saw path 2 from the
/// NAT's address.
pub(super) fn uplinks_check(report: &mut crate::Report, ctl_a: &Path, ctl_b: &Path) {
    let paths = |ctl: &Path| {
        super::status(ctl)
            .and_then(|s| s.peers.into_iter().next()?.multipath)
            .map(|m| m.paths)
            .unwrap_or_default()
    };
    let a = paths(ctl_a);
    let total: u64 = a.iter().map(|p| p.tx_bytes).sum();
    let ways: Vec<String> = a
        .iter()
        .map(|p| {
            format!(
                "{} from {} via {} sent {:.1} MB ({:.0}%)",
                p.name,
                p.local.as_deref().unwrap_or("its address"),
                p.device.as_deref().unwrap_or("the routed interface"),
                p.tx_bytes as f64 / 1e6,
                p.tx_bytes as f64 * 100.0 / total.max(1) as f64
            )
        })
        .collect();
    let devices: Vec<Option<&str>> = a.iter().map(|p| p.device.as_deref()).collect();
    let both = a.len() == 2 && a.iter().all(|p| p.tx_bytes * 20 >= total && total > 0);
    report.check(
        "both uplinks carry the stream, each by its own interface",
        both && devices == [Some("l1"), Some("l2")],
        ways.join("; "),
    );
    let b = paths(ctl_b);
    let heard = |from: &str| {
        b.iter()
            .any(|p| p.endpoint.starts_with(&format!("{from}:")) && p.rx_bytes > 0)
    };
    report.check(
        "B learned both paths, path 2 from the NAT's address (max_paths = 2, no address of A in its configuration)",
        b.len() == 2 && heard(LINK1[0]) && heard(LINK2[0]),
        b.iter()
            .map(|p| {
                format!(
                    "{} {} received {:.1} MB",
                    p.name,
                    p.endpoint,
                    p.rx_bytes as f64 / 1e6
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
}

/// The NAT in front of uplink 2 rebinds: its UDP mappings are flushed and new ones take ports
/// 20000-20099, so A's path 2 reaches B from a new port. B's path for it follows (once the old
/// binding has been silent two probe intervals) and its other path stays where it was; pings
/// across the rebinding show what it cost.
pub(super) fn rebinding_check(
    report: &mut crate::Report,
    lab: &Lab,
    ctl_b: &Path,
) -> io::Result<()> {
    let name = "the NAT rebinds uplink 2 to a new port: B's path 2 follows, path 1 stays";
    let Some(nat) = lab.nat.as_ref() else {
        return Ok(());
    };
    let rule = crate::netns::run(nat.command("iptables").args([
        "-t",
        "nat",
        "-R",
        "POSTROUTING",
        "1",
        "-o",
        "wan",
        "-p",
        "udp",
        "-j",
        "MASQUERADE",
        "--to-ports",
        "20000-20099",
    ]))?;
    if !rule.status.success() {
        report.check(
            name,
            false,
            format!("iptables: {}", String::from_utf8_lossy(&rule.stderr).trim()),
        );
        return Ok(());
    }
    match crate::netns::run(nat.command("conntrack").args(["-D", "-p", "udp"])) {
        Ok(_) => {}
        Err(e) => {
            report.check(
                name,
                false,
                format!("conntrack (Debian package conntrack) is needed to flush the NAT's mappings: {e}"),
            );
            return Ok(());
        }
    }
    let started = std::time::Instant::now();
    let ping = crate::netns::run(lab.a.command("ping").args([
        "-c",
        "40",
        "-i",
        "0.05",
        "-W",
        "1",
        super::B_INNER,
    ]))?;
    let text = String::from_utf8_lossy(&ping.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or("no ping summary")
        .to_string();
    let paths = super::status(ctl_b)
        .and_then(|s| s.peers.into_iter().next()?.multipath)
        .map(|m| m.paths)
        .unwrap_or_default();
    let port_of = |from: &str| {
        paths
            .iter()
            .find_map(|p| p.endpoint.strip_prefix(&format!("{from}:")))
            .and_then(|p| p.parse::<u16>().ok())
    };
    let moved = port_of(LINK2[0]).is_some_and(|p| (20000..20100).contains(&p));
    let stayed = port_of(LINK1[0]) == Some(4500);
    let up = paths.iter().all(|p| p.state == "up");
    report.check(
        name,
        moved && stayed && up && ping.status.success(),
        format!(
            "B's paths after {:.1} s: {}; pings across it: {summary}",
            started.elapsed().as_secs_f64(),
            paths
                .iter()
                .map(|p| format!("{} {} {}", p.name, p.endpoint, p.state))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}
