//! `espip lab roaming` (issue 29): a road warrior. The server B names no address of its
//! client A (no `endpoint`); A has no `interface.local`. A TCP transfer runs from A to B over
//! a 40 Mbit/s link while A's address changes twice; B learns A's first address from its
//! first authenticated packet and follows each move. Reported: the transfer's hash on both
//! ends, and after each move how long until a ping through the tunnel was answered again.

use super::netns::{self, Daemon, Netns};
use super::p2p::{
    config_text, topology, write_private, LabKeys, LabMode, A_INNER, A_OUTER, B_INNER,
};
use super::Report;
use espip_core::sa::Cipher;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Options of `espip lab roaming`.
#[derive(Debug, Clone)]
pub struct RoamingOptions {
    /// ESP as protocol 50 or in UDP (static keys).
    pub mode: LabMode,
    /// Size of the TCP transfer in MB (10^6 bytes).
    pub megabytes: u64,
    /// An IKEv2 pair instead of static keys (ESP in UDP; `mode`'s cipher is not used: the
    /// pair's proposals are AES-128-GCM).
    pub ikev2: bool,
    /// With `ikev2`: strongSwan's charon plays this side, with MOBIKE (see
    /// [`crate::ike::run_roaming_strongswan`]).
    pub strongswan: Option<crate::ike::SwSide>,
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

/// The addresses A moves through (its first one is the p2p lab's).
pub(crate) const MOVES: [&str; 2] = ["192.0.2.11", "192.0.2.12"];

/// How long after `start` a ping (one every 20 ms) from `ns` to `to` is answered.
pub(crate) fn outage(ns: &Netns, to: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let o = netns::run(ns.command("ping").args(["-c", "1", "-W", "0.02", to])).ok()?;
        if o.status.success() {
            return Some(start.elapsed());
        }
    }
    None
}

/// B's view of A: (endpoint, moves).
fn learned(b_ctl: &std::path::Path) -> (String, u64) {
    match espip_api::client::request(b_ctl, "status")
        .ok()
        .and_then(|r| serde_json::from_slice::<espip_api::status::Status>(&r).ok())
        .and_then(|s| s.peers.into_iter().next())
    {
        Some(p) => (p.endpoint, p.endpoint_moves),
        None => ("?".into(), 0),
    }
}

/// B's established IKE SAs (SPIs), from its status.
fn ike_sas(b_ctl: &Path) -> Vec<String> {
    espip_api::client::request(b_ctl, "status")
        .ok()
        .and_then(|r| serde_json::from_slice::<espip_api::status::Status>(&r).ok())
        .map(|s| {
            s.ike
                .iter()
                .flat_map(|p| p.sas.iter())
                .filter(|sa| sa.kind == "ike" && sa.state == "established")
                .map(|sa| sa.spis.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Run the roaming lab.
pub fn run(opts: &RoamingOptions) -> io::Result<Report> {
    if let (true, Some(side)) = (opts.ikev2, opts.strongswan) {
        return crate::ike::run_roaming_strongswan(opts, side);
    }
    let mode_name = match opts.mode {
        LabMode::Esp(c) => format!("esp {}", c.name()),
        LabMode::EspUdp(c) => format!("esp-udp {}", c.name()),
        LabMode::IpIp => {
            return Err(io::Error::other(
                "roaming needs an ESP mode: ipip peers are told apart by address",
            ))
        }
    };
    let (mut report, work, keep_work) = opts.run.begin(
        "roaming",
        format!(
            "espip lab roaming ({}; server without endpoint, client moves twice)",
            if opts.ikev2 {
                "esp-udp, IKEv2: the server is a responder that finds the client by its identity"
                    .to_string()
            } else {
                mode_name
            }
        ),
        &[("tc", "iproute2")],
    )?;
    let (a, b) = topology("roam")?;
    let (LabMode::Esp(c) | LabMode::EspUdp(c)) = opts.mode else {
        unreachable!("checked above")
    };
    write_configs(opts, c, &work)?;
    // A link slow enough that the transfer outlasts the moves.
    for ns in [&a, &b] {
        netns::run_ok(ns.command("tc").args([
            "qdisc", "add", "dev", "veth0", "root", "tbf", "rate", "40mbit", "burst", "64kb",
            "latency", "50ms",
        ]))?;
    }
    let mut db = Daemon::start(&b, &opts.run.exe, &work.join("b.toml"), &work.join("b.log"))?;
    let mut da = Daemon::start(&a, &opts.run.exe, &work.join("a.toml"), &work.join("a.log"))?;
    let b_ctl = work.join("state-b/control.sock");

    if opts.ikev2 {
        // B learns A's address from A's IKE_AUTH, before any ESP.
        let start = Instant::now();
        let mut ep = learned(&b_ctl).0;
        while !ep.starts_with(A_OUTER) && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
            ep = learned(&b_ctl).0;
        }
        let back = netns::run(
            b.command("ping")
                .args(["-c", "2", "-i", "0.2", "-W", "1", A_INNER]),
        )?;
        report.check(
            "B learns A's address from A's IKE_AUTH and reaches A first",
            ep.starts_with(A_OUTER) && back.status.success(),
            format!(
                "B's endpoint for A {:.1} s after start: {ep}; ping B -> A: {}",
                start.elapsed().as_secs_f64(),
                if back.status.success() {
                    "answered"
                } else {
                    "no answer"
                }
            ),
        );
    } else {
        before_a_speaks(&mut report, (&a, &b), &b_ctl)?;
    }

    let bytes = opts.megabytes * 1_000_000;
    let sas_before = ike_sas(&b_ctl);
    let view = || {
        let (ep, moves) = learned(&b_ctl);
        (ep, Some(moves))
    };
    let result = moves_during_transfer(&mut report, &opts.run.exe, (&a, &b), &view, bytes)?;
    if opts.ikev2 {
        let after = ike_sas(&b_ctl);
        report.check(
            "the IKE SA survives both moves (no new IKE_SA_INIT)",
            !after.is_empty() && after == sas_before,
            format!("B's IKE SA before: {sas_before:?}; after: {after:?}"),
        );
    }
    transfer_check(&mut report, opts.megabytes, &result);
    if opts.run.keep {
        report.keep_running(vec![a, b], &work, (da, db));
        return Ok(report);
    }
    report.clean_stop(&mut [(&a, &mut da), (&b, &mut db)])?;
    report.note_totals(&[("A", &da), ("B", &db)]);
    report.finish_work(&work, keep_work, "configs and logs");
    Ok(report)
}

/// The transfer's check: its hash on both ends and its rate.
pub(crate) fn transfer_check(report: &mut Report, megabytes: u64, result: &super::TransferResult) {
    report.check(
        format!("TCP transfer of {megabytes} MB A -> B across both moves"),
        result.ok(megabytes * 1_000_000),
        format!(
            "sent {:?}, received {:?} ({:.1} Mbit/s incl. setup)",
            result.sent.as_ref().map(|d| d.bytes),
            result.got.as_ref().map(|d| d.bytes),
            result.mbit_s()
        ),
    );
}

/// Static keys: B has nowhere to send until A's first packet, which teaches B its address.
fn before_a_speaks(report: &mut Report, (a, b): (&Netns, &Netns), b_ctl: &Path) -> io::Result<()> {
    let before = netns::run(
        b.command("ping")
            .args(["-c", "2", "-i", "0.2", "-W", "1", A_INNER]),
    )?;
    let (ep, _) = learned(b_ctl);
    report.check(
        "B has nowhere to send before A speaks",
        !before.status.success() && ep == "(none yet)",
        format!(
            "ping B -> A: {}; B's endpoint for A: {ep}",
            if before.status.success() {
                "answered"
            } else {
                "no answer (no_endpoint)"
            }
        ),
    );
    let first = outage(a, B_INNER, Duration::from_secs(5));
    let (ep, _) = learned(b_ctl);
    report.check(
        "A's first packet teaches B its address",
        first.is_some() && ep.split(':').next() == Some(A_OUTER),
        format!("ping A -> B answered; B's endpoint for A: {ep}"),
    );
    Ok(())
}

/// The configurations: the client's source follows its address (no `local`); the server
/// names no address of the client (no `endpoint`).
fn write_configs(opts: &RoamingOptions, c: Cipher, work: &Path) -> io::Result<()> {
    let keys = LabKeys::generate(c)?;
    let taps = opts.run.pcap_dir.as_deref();
    for (me_a, host) in [(true, "a"), (false, "b")] {
        let drop = if me_a { "local =" } else { "endpoint =" };
        let state = work.join(format!("state-{host}"));
        let text = if opts.ikev2 {
            crate::ike::pair_config(me_a, &state, 3)
        } else {
            config_text(opts.mode, me_a, Some(&keys), false, &state)
        };
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with(drop))
            .map(|l| format!("{l}\n"))
            .collect();
        write_private(
            &work.join(format!("{host}.toml")),
            &(text + &super::capture_lines(taps, host)),
        )?;
    }
    if opts.ikev2 {
        write_private(&work.join("psk"), &format!("{}\n", crate::ike::LAB_PSK))?;
    }
    Ok(())
}

/// A's address changes twice (`MOVES`) while a transfer of `bytes` runs: each move is a check
/// (B follows, and how long the first ping took to be answered); the transfer's result.
/// `view`: where B sends to A now ("address" or "address:port"), and how many times B's
/// endpoint for A moved if B counts that (espip's learned endpoint does).
pub(crate) fn moves_during_transfer(
    report: &mut Report,
    exe: &Path,
    (a, b): (&Netns, &Netns),
    view: &dyn Fn() -> (String, Option<u64>),
    bytes: u64,
) -> io::Result<super::TransferResult> {
    let moved = std::thread::scope(|s| -> io::Result<_> {
        let t = s.spawn(|| super::transfer(exe, (a, b), B_INNER, bytes));
        let mut moved = Vec::new();
        let mut from = A_OUTER;
        for to in MOVES {
            std::thread::sleep(Duration::from_millis(1500));
            let running = !t.is_finished();
            a.ip(&["addr", "del", &format!("{from}/24"), "dev", "veth0"])?;
            a.ip(&["addr", "add", &format!("{to}/24"), "dev", "veth0"])?;
            let took = outage(a, B_INNER, Duration::from_secs(10));
            // (B may answer a ping before its view shows the move: give it a second.)
            let mut seen = view();
            let t0 = Instant::now();
            while seen.0.split(':').next() != Some(to) && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(50));
                seen = view();
            }
            moved.push((to, running, took, seen));
            from = to;
        }
        let result = t
            .join()
            .map_err(|_| io::Error::other("transfer thread panicked"))??;
        Ok((moved, result))
    })?;
    let (moved, result) = moved;
    for (i, (to, running, took, (ep, moves))) in moved.iter().enumerate() {
        report.check(
            format!("A moves to {to} during the transfer: B follows"),
            *running
                && took.is_some()
                && ep.split(':').next() == Some(*to)
                && moves.map_or(true, |m| m == i as u64 + 1),
            format!(
                "transfer running: {running}; first ping answered {} after the move; B's endpoint for A: {ep}{}",
                took.map_or("never (10 s)".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3)),
                moves.map_or(String::new(), |m| format!(" ({m} move{})", if m == 1 { "" } else { "s" }))
            ),
        );
    }
    Ok(result)
}
