//! `espip lab roaming --keying ikev2 --strongswan client|server`: MOBIKE (RFC 4555) against
//! strongSwan's charon, which enables it by default. The client A changes its address twice
//! during a TCP transfer to B; the client's UPDATE_SA_ADDRESSES moves the server's IKE SA and
//! CHILD_SA to the new address.
//! - `client`: charon is the client (initiator; its kernel-netlink plugin sees the address
//!   change and sends the update); espip is the server with A's first address as its
//!   `endpoint`: only MOBIKE can move it (without it, espip drops IKE and ESP from elsewhere).
//! - `server`: espip is the client (initiator without `interface.local`: it asks the kernel
//!   for its source address towards B and announces a change); charon is the server with
//!   `remote_addrs = %any`.
//!
//! Checks: MOBIKE negotiated, the transfer intact across both moves, after each move the
//! server sends to the new address and a ping through the tunnel is answered (the outage is
//! reported), the same IKE SA on both sides throughout, and charon's log shows the
//! UPDATE_SA_ADDRESSES exchanges.

use super::strongswan::{charon_conf, Charon};
use super::*;
use crate::roaming::{moves_during_transfer, RoamingOptions};

/// Which side strongSwan plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwSide {
    /// strongSwan is the client that moves (initiator).
    Client,
    /// strongSwan is the server (responder, `remote_addrs = %any`).
    Server,
}

const IKE: &str = "aes128gcm16-prfsha256-x25519";
/// strongSwan's kernel-libipsec does not do ESN.
const ESP: &str = "aes128gcm16";

/// charon's `swanctl.conf`: MOBIKE on (its default, said aloud), ESP in UDP, no rekeys or DPD
/// of its own during the lab.
fn swanctl_conf(side: SwSide) -> String {
    let (addrs, me, them, mine, theirs) = match side {
        SwSide::Client => (
            format!("remote_addrs = {B_OUTER}"),
            "a.lab",
            "b.lab",
            A_INNER,
            B_INNER,
        ),
        SwSide::Server => (
            format!("local_addrs = {B_OUTER}\n    remote_addrs = %any"),
            "b.lab",
            "a.lab",
            B_INNER,
            A_INNER,
        ),
    };
    format!(
        "connections {{\n  lab {{\n    version = 2\n    {addrs}\n    proposals = {IKE}\n    encap = yes\n    mobike = yes\n    dpd_delay = 0\n    rekey_time = 0\n    local {{\n      auth = psk\n      id = {me}\n    }}\n    remote {{\n      auth = psk\n      id = {them}\n    }}\n    children {{\n      lab {{\n        local_ts = {mine}/32\n        remote_ts = {theirs}/32\n        esp_proposals = {ESP}\n        rekey_time = 0\n        start_action = none\n      }}\n    }}\n  }}\n}}\nsecrets {{\n  ike-lab {{\n    id-a = a.lab\n    id-b = b.lab\n    secret = \"{PSK}\"\n  }}\n}}\n"
    )
}

/// espip's configuration: the server keeps `interface.local` and names A's first address;
/// the client has no `interface.local` (its source follows its routes).
fn espip_conf(side: SwSide, state: &Path) -> String {
    let espip_is_a = side == SwSide::Server;
    let text = interface(espip_is_a, state)
        + &espip_peer(
            "esp-udp",
            espip_is_a,
            if espip_is_a { "initiator" } else { "responder" },
            IKE,
            ESP,
            3600,
            7200,
            3,
            if espip_is_a { "b.lab" } else { "a.lab" },
        );
    if !espip_is_a {
        return text;
    }
    text.lines()
        .filter(|l| !l.starts_with("local ="))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// From `swanctl --list-sas`: the IKE SA's SPIs ("spi_i_spi_r") and the peer's address.
fn sw_sa(sw: &Charon) -> (Option<String>, Option<String>) {
    let list = sw.swanctl(&["--list-sas"]).unwrap_or_default();
    let spis = list.lines().find(|l| l.contains("ESTABLISHED")).map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w[w.len().saturating_sub(2)..].join(" ")
    });
    let remote = list
        .lines()
        .find(|l| l.trim_start().starts_with("remote "))
        .and_then(|l| l.split(" @ ").nth(1))
        .map(|a| a.replace('[', ":").replace(']', ""));
    (spis, remote)
}

/// espip's IKEv2 peer status.
fn espip_ike(ctl: &Path) -> Option<espip_api::status::IkePeerStatus> {
    status(ctl).and_then(|s| s.ike.into_iter().next())
}

/// The established IKE SAs' SPIs espip shows.
fn espip_ike_sas(ctl: &Path) -> Vec<String> {
    espip_ike(ctl)
        .map(|p| {
            p.sas
                .into_iter()
                .filter(|sa| sa.kind == "ike" && sa.state == "established")
                .map(|sa| sa.spis)
                .collect()
        })
        .unwrap_or_default()
}

/// Run the lab.
pub fn run_roaming_strongswan(opts: &RoamingOptions, side: SwSide) -> io::Result<Report> {
    let who = match side {
        SwSide::Client => "strongSwan is the client that moves; espip the server",
        SwSide::Server => "espip is the client that moves; strongSwan the server",
    };
    let mut tools = STRONGSWAN_TOOLS.to_vec();
    tools.push(("tc", "iproute2"));
    let (mut report, work, keep_work) = opts.run.begin(
        "roaming",
        format!("espip lab roaming (IKEv2 with MOBIKE; {who})"),
        &tools,
    )?;
    let (a, b) = crate::p2p::topology("mob")?;
    for ns in [&a, &b] {
        netns::run_ok(ns.command("tc").args([
            "qdisc", "add", "dev", "veth0", "root", "tbf", "rate", "40mbit", "burst", "64kb",
            "latency", "50ms",
        ]))?;
    }
    let (sw_ns, espip_ns, sw_inner) = match side {
        SwSide::Client => (&a, &b, A_INNER),
        SwSide::Server => (&b, &a, B_INNER),
    };
    no_udp_gso(&[espip_ns])?;
    // charon routes the child's traffic from its inner address, which lives on its veth.
    sw_ns.ip(&["addr", "add", &format!("{sw_inner}/32"), "dev", "veth0"])?;
    let sw_dir = work.join("sw");
    charon_conf(&sw_dir)?;
    write_private(&sw_dir.join("swanctl.conf"), &swanctl_conf(side))?;
    let state = work.join("state");
    let cfg = work.join("espip.toml");
    write_private(
        &cfg,
        &(espip_conf(side, &state) + &crate::capture_lines(opts.run.pcap_dir.as_deref(), "espip")),
    )?;
    write_private(&work.join("psk"), &format!("{PSK}\n"))?;
    let ctl = state.join("control.sock");
    let sw = Charon::start(sw_ns, &sw_dir)?;
    let mut d = Daemon::start(espip_ns, &opts.run.exe, &cfg, &work.join("espip.log"))?;
    if side == SwSide::Client {
        let out = sw.swanctl(&[
            "--initiate",
            "--ike",
            "lab",
            "--child",
            "lab",
            "--timeout",
            "10",
        ])?;
        report.notes.push(format!(
            "swanctl --initiate: {}",
            out.lines().last().unwrap_or("").trim()
        ));
    }
    let up = wait_for(
        || espip_ike(&ctl).is_some_and(|p| p.mobike) && sw_sa(&sw).0.is_some(),
        Duration::from_secs(15),
    );
    let first = crate::roaming::outage(&a, B_INNER, Duration::from_secs(5));
    let p = espip_ike(&ctl);
    report.check(
        "the IKE SA is up with MOBIKE on both sides, and the tunnel carries pings",
        up && first.is_some(),
        format!(
            "espip: mobike {:?}, peer at {:?}; strongSwan's IKE SA {:?}; ping A -> B {}",
            p.as_ref().map(|p| p.mobike),
            p.as_ref().and_then(|p| p.peer_address.clone()),
            sw_sa(&sw).0,
            if first.is_some() {
                "answered"
            } else {
                "not answered"
            }
        ),
    );
    let (espip_before, sw_before) = (espip_ike_sas(&ctl), sw_sa(&sw).0);
    // Where the server sends to A now.
    let view = || -> (String, Option<u64>) {
        let at = match side {
            SwSide::Client => espip_ike(&ctl).and_then(|p| p.peer_address),
            SwSide::Server => sw_sa(&sw).1,
        };
        (at.unwrap_or_else(|| "?".into()), None)
    };
    let bytes = opts.megabytes * 1_000_000;
    let result = moves_during_transfer(&mut report, &opts.run.exe, (&a, &b), &view, bytes)?;
    let (espip_after, sw_after) = (espip_ike_sas(&ctl), sw_sa(&sw).0);
    let updates = espip_ike(&ctl).map_or(0, |p| p.address_updates);
    let sw_log = sw.log();
    let sw_updates = sw_log
        .lines()
        .filter(|l| l.contains("INFORMATIONAL") && l.contains("N(UPD_SA_ADDR)"))
        .count();
    report.check(
        "the same IKE SA on both sides across both moves, moved by UPDATE_SA_ADDRESSES",
        !espip_after.is_empty()
            && espip_after == espip_before
            && sw_after.is_some()
            && sw_after == sw_before
            && updates >= 2
            && sw_updates >= 2,
        format!(
            "espip's IKE SA before {espip_before:?}, after {espip_after:?}; strongSwan's before {sw_before:?}, after {sw_after:?}; espip counted {updates} address updates; charon logged {sw_updates} INFORMATIONAL messages with N(UPD_SA_ADDR)"
        ),
    );
    crate::roaming::transfer_check(&mut report, opts.megabytes, &result);
    if opts.run.keep {
        report.keep_running(vec![a, b], &work, (d, sw));
        return Ok(report);
    }
    report.clean_stop(&mut [(espip_ns, &mut d)])?;
    drop(sw);
    finish_work(&mut report, &work, keep_work);
    Ok(report)
}
