//! `espip lab multipath` (seed 000's goal): hosts A and B joined by two to four links through middle
//! namespaces, one TCP connection carried over both at once.
//!
//! ```text
//!            link 1: IPv4 10.1.0.1 - 10.1.0.2, rate / RTT / loss of --link1
//!        +-- l1 ==[ m1: relay (delay, loss), tbf ]== l1 --+
//!   A ---+                                                  +--- B
//!        +-- l2 ==[ m2: relay (delay, loss), tbf ]== l2 --+
//!            link 2: IPv6 only 2001:db8:12::1 - ::2, --link2
//! ```
//!
//! A middle namespace copies frames between its two interfaces with `espip lab-tool relay`
//! (this kernel has no netem: the relay holds each frame for half the RTT and drops a share at
//! random) and limits each direction with `tbf`. Checks: all paths up; one plain TCP stream
//! through the tunnel against the best single link measured alone in the same run; link 1 cut
//! in the middle of a transfer (hash equal, the stall measured) and restored (the path comes
//! back); link 1's rate halved and restored during a transfer (its estimate follows);
//! `redundant` under random loss on both links (TCP's retransmissions counted); a
//! capture of each link shows only the tunnel and no plaintext; nothing left behind.

mod compare;
mod ikev2;
mod links;
mod plot;
mod rate;
mod uplinks;

pub use links::{parse_links, LinkSpec, LinkSpecError, LINK1, LINK2, MAX_LINKS};

use super::netns::{self, Daemon, Netns};
use super::p2p::{write_private, LabKeys};
use super::{pcap, transfer, Report};
use espip_core::sa::Cipher;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A's tunnel address.
pub const A_INNER: &str = "10.4.9.1";
/// B's tunnel address.
pub const B_INNER: &str = "10.4.9.2";
/// Which hosts the two links join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// Each link joins A and B directly, with addresses of its own (link 2 IPv6 only); each
    /// side names the other's two addresses.
    #[default]
    Pair,
    /// Seed 000's real setting: A has two uplinks and two default routes (metrics 100 and
    /// 200, as DHCP leaves them), uplink 2 behind a NAT; B has one address, reached over
    /// both. A's paths name their uplink (`local`, `device`), not a route.
    Uplinks,
}

/// Options of `espip lab multipath`.
#[derive(Debug, Clone)]
pub struct MultipathOptions {
    /// The hosts' links.
    pub topology: Topology,
    /// ESP in UDP (default), ESP or IP-in-IP.
    pub mode: super::p2p::LabMode,
    /// The links (2 to [`MAX_LINKS`]; the uplinks topology has 2).
    pub links: Vec<LinkSpec>,
    /// Scheduler of the first phases (aggregate, cut).
    pub scheduler: espip_core::multipath::Scheduler,
    /// Seconds of the aggregate transfer (its size follows the links' sum).
    pub seconds: u64,
    /// Random loss on both links for the redundant phase, percent (0: skip the phase).
    pub redundant_loss: f64,
    /// Also measure kernel MPTCP (`mptcpize run iperf3`, one subflow per link) and espip with
    /// iperf3 on the same links, side by side.
    pub compare_mptcp: bool,
    /// Comparison runs (with `compare_mptcp`), each over fresh paths (both daemons restarted).
    pub runs: usize,
    /// glorytun's binary: measured in each comparison run too.
    pub glorytun: Option<PathBuf>,
    /// `equal_delay` of both peers (`spread`: deliver every packet as late as the slowest
    /// path's).
    pub equal_delay: bool,
    /// Comparison runs alternate this boolean setting of both peers (`equal_delay`,
    /// `repair`) on (odd runs) and off (even runs): an A/B in one lab.
    pub ab: Option<&'static str>,
    /// Draw the cut transfer (the stream and each path over time, the cut marked) here (SVG).
    pub plot: Option<PathBuf>,
    /// TCP congestion control of the iperf3 comparison (`iperf3 -C`: `cubic`, `bbr`; `None`:
    /// the kernel's default). A namespace may not change its default to an algorithm the host
    /// has not allowed, so it is set per socket.
    pub congestion: Option<String>,
    /// Halve link 1's rate during a transfer and restore it ([`rate::rate_change_check`]).
    pub rate_change: bool,
    /// `spread` adapts to measured delivery (false: the links' rates as static weights).
    pub adapt: bool,
    /// The peers keyed by IKEv2 (A initiates) instead of static keys, with CHILD_SAs rekeyed
    /// every few seconds all through the lab ([`ikev2::REKEY_LINES`]).
    pub ikev2: bool,
    /// What every lab takes.
    pub run: super::LabRun,
}

/// The running lab: namespaces, relays, daemons.
struct Lab {
    a: Netns,
    b: Netns,
    m: Vec<Netns>,
    /// The NAT in front of A's uplink 2 ([`Topology::Uplinks`]).
    nat: Option<Netns>,
    relays: Vec<Option<Child>>,
    work: PathBuf,
    /// The lab is kept running after this process ends (`--keep`): its relays must outlive it.
    keep: bool,
}

impl Lab {
    fn cut_file(&self, link: usize) -> PathBuf {
        self.work.join(format!("cut-link{}", link + 1))
    }

    /// (Re)start the relay of `link` with `loss` percent.
    fn relay(&mut self, exe: &Path, link: usize, spec: &LinkSpec, loss: f64) -> io::Result<()> {
        if let Some(mut c) = self.relays[link].take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let log = std::fs::File::create(self.work.join(format!("relay{}.log", link + 1)))?;
        let mut cmd = self.m[link].command(exe);
        // A lab killed outright takes its relays with it (`ip netns exec` execs the relay,
        // which keeps the parent-death signal); a kept lab leaves them to `espip lab down`.
        if !self.keep {
            espip_sys::proc::die_with_parent(&mut cmd);
        }
        let child = cmd
            .args(["lab-tool", "relay", "--ifaces", "mid-a", "mid-b"])
            .arg("--delay-ms")
            .arg(format!("{}", spec.rtt_ms / 2.0))
            .arg("--loss-percent")
            .arg(format!("{loss}"))
            .arg("--jitter-ms")
            .arg(format!("{}", spec.jitter_ms))
            .arg("--cut")
            .arg(self.cut_file(link))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.relays[link] = Some(child);
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.relays.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One host's configuration.
fn config_text(
    opts: &MultipathOptions,
    me_a: bool,
    keys: Option<&LabKeys>,
    scheduler: espip_core::multipath::Scheduler,
    state_dir: &Path,
) -> String {
    use super::p2p::LabMode;
    let (addr, peer, allowed, k) = if me_a {
        (A_INNER, "b", B_INNER, 1)
    } else {
        (B_INNER, "a", A_INNER, 0)
    };
    let udp = matches!(opts.mode, LabMode::EspUdp(_));
    let ep = |a: &str| match (udp, a.contains(':')) {
        (true, true) => format!("[{a}]:4500"),
        (true, false) => format!("{a}:4500"),
        _ => a.to_string(),
    };
    let mut s = format!(
        "# espip lab multipath, host {}\n[interface]\nname = \"espip0\"\naddress = [\"{addr}/24\"]\n{}\n[[peer]]\nname = \"{peer}\"\nallowed_ips = [\"{allowed}/32\"]\nscheduler = \"{}\"\nadapt = {}\nequal_delay = {}\n",
        if me_a { "A" } else { "B" },
        super::state_lines(state_dir),
        scheduler.name(),
        opts.adapt,
        opts.equal_delay
    );
    match (opts.mode, keys) {
        (LabMode::EspUdp(_), None) if opts.ikev2 => s.push_str(&ikev2::peer_lines(me_a)),
        (LabMode::Esp(c) | LabMode::EspUdp(c), Some(keys)) => {
            let (spi_out, spi_in, key_out, key_in) = if me_a {
                (0x1001u32, 0x1002u32, &keys.a_to_b, &keys.b_to_a)
            } else {
                (0x1002, 0x1001, &keys.b_to_a, &keys.a_to_b)
            };
            s.push_str(&format!(
                "mode = \"{}\"\ncipher = \"{}\"\nspi_out = \"{spi_out:#010x}\"\nspi_in = \"{spi_in:#010x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\nesn = true\n",
                if udp { "esp-udp" } else { "esp" },
                c.name(),
                key_out.to_hex().as_str(),
                key_in.to_hex().as_str()
            ));
        }
        _ => s.push_str("mode = \"ipip\"\n"),
    }
    if opts.topology == Topology::Uplinks {
        s.push_str(&uplinks::path_lines(me_a, &opts.links, !opts.adapt));
        return s;
    }
    for (i, spec) in opts.links.iter().enumerate() {
        s.push_str(&format!(
            "\n[[peer.path]]\nname = \"link{}\"\nendpoint = \"{}\"\n{}",
            i + 1,
            ep(&links::addr(i, spec.ipv6, k)),
            weight_line(!opts.adapt, spec)
        ));
    }
    s
}

/// A path's `weight` line: the link's rate with `--static-weights` (`adapt = false`: the
/// weights are the schedule), none otherwise. The default settings are what is measured: a
/// user does not know the rates of the links (and the starting shares they give are what
/// a fresh path's first flow runs on until the paths are measured).
fn weight_line(weights: bool, spec: &LinkSpec) -> String {
    if weights {
        format!("weight = {}\n", spec.mbit.round().max(1.0) as u32)
    } else {
        String::new()
    }
}

/// The daemon's status (JSON over the control socket).
fn status(control: &Path) -> Option<espip_api::status::Status> {
    let raw = espip_api::client::request(control, "status").ok()?;
    serde_json::from_slice(&raw).ok()
}

fn path_states(control: &Path) -> Vec<(String, String, Option<f64>)> {
    status(control)
        .and_then(|s| s.peers.into_iter().next()?.multipath)
        .map(|m| {
            m.paths
                .into_iter()
                .map(|p| (p.name, p.state, p.rtt_ms))
                .collect()
        })
        .unwrap_or_default()
}

/// Wait up to `limit` for every path (or path `only`) to be in `state`.
fn wait_paths(
    control: &Path,
    state: &str,
    only: Option<usize>,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let p = path_states(control);
        let ok = !p.is_empty()
            && p.iter()
                .enumerate()
                .filter(|(i, _)| only.map_or(true, |o| o == *i))
                .all(|(_, (_, s, _))| s == state);
        if ok {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// TCP segments sent and retransmitted by `ns` so far (`/proc/net/snmp` of the namespace).
fn tcp_counters(ns: &Netns) -> Option<(u64, u64)> {
    let out = netns::run(ns.command("cat").arg("/proc/net/snmp")).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |k: &str| -> Option<u64> {
        values
            .get(names.iter().position(|n| *n == k)?)?
            .parse()
            .ok()
    };
    Some((get("OutSegs")?, get("RetransSegs")?))
}

/// The links as the title names them: "link 1 IPv4 100 Mbit/s RTT 10 ms, ...".
fn links_title(opts: &MultipathOptions) -> String {
    opts.links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let what = match (opts.topology, i) {
                (Topology::Uplinks, 0) => "uplink 1".to_string(),
                (Topology::Uplinks, _) => "uplink 2 behind a NAT".to_string(),
                (Topology::Pair, _) => {
                    format!("link {} IPv{}", i + 1, if l.ipv6 { 6 } else { 4 })
                }
            };
            let mut loss = if l.loss_percent > 0.0 {
                format!(" loss {}%", l.loss_percent)
            } else {
                String::new()
            };
            if l.jitter_ms > 0.0 {
                loss += &format!(" jitter {} ms", l.jitter_ms);
            }
            format!("{what} {} Mbit/s RTT {} ms{loss}", l.mbit, l.rtt_ms)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run the multipath lab.
pub fn run(opts: &MultipathOptions) -> io::Result<Report> {
    use super::p2p::LabMode;
    let (mut report, work, keep_work) = opts.run.begin(
        "multipath",
        format!(
            "espip lab multipath ({}, {}; {})",
            match opts.mode {
                LabMode::Esp(c) => format!("esp {}", c.name()),
                LabMode::EspUdp(c) => format!("esp-udp {}", c.name()),
                LabMode::IpIp => "ipip".into(),
            },
            if opts.ikev2 {
                format!("{}, IKEv2", opts.scheduler.name())
            } else {
                opts.scheduler.name().to_string()
            },
            links_title(opts)
        ),
        match (opts.compare_mptcp, opts.topology) {
            (true, _) => &[
                ("tc", "iproute2"),
                ("iperf3", "iperf3"),
                ("mptcpize", "mptcpd"),
            ],
            (false, Topology::Uplinks) => &[("tc", "iproute2"), ("iptables", "iptables")],
            (false, Topology::Pair) => &[("tc", "iproute2")],
        },
    )?;
    let mut lab = links::topology(opts.topology, &opts.links, &work, opts.run.keep)?;
    // Every connection starts as the first one to its host: Linux caches the slow-start
    // threshold of a closed connection per destination, and a transfer that ended in a cut
    // left the next one to B's tunnel address starting in congestion avoidance at a few
    // Mbit/s (found with --plot: 2-6 Mbit/s for seconds, while MPTCP, on another address,
    // did not meet it).
    for ns in [&lab.a, &lab.b] {
        ns.sysctl("net.ipv4.tcp_no_metrics_save", "1")?;
    }
    for (i, spec) in opts.links.iter().enumerate() {
        lab.relay(&opts.run.exe, i, spec, spec.loss_percent)?;
    }
    let keys = match opts.mode {
        _ if opts.ikev2 => {
            write_private(&work.join("psk"), &format!("{}\n", crate::ike::LAB_PSK))?;
            None
        }
        LabMode::Esp(c) | LabMode::EspUdp(c) => Some(LabKeys::generate(c)?),
        LabMode::IpIp => None,
    };
    let taps = opts.run.pcap_dir.as_deref();
    let cfg = |me_a: bool, s: espip_core::multipath::Scheduler| {
        let host = if me_a { "a" } else { "b" };
        config_text(
            opts,
            me_a,
            keys.as_ref(),
            s,
            &work.join(format!("state-{host}")),
        ) + &super::capture_lines(taps, host)
    };
    let (cfg_a, cfg_b) = (work.join("a.toml"), work.join("b.toml"));
    write_private(&cfg_a, &cfg(true, opts.scheduler))?;
    write_private(&cfg_b, &cfg(false, opts.scheduler))?;

    let best_alone = alone_rates(&mut report, &lab, opts)?;

    let mut da = Daemon::start(&lab.a, &opts.run.exe, &cfg_a, &work.join("a.log"))?;
    let mut db = Daemon::start(&lab.b, &opts.run.exe, &cfg_b, &work.join("b.log"))?;
    let (ctl_a, ctl_b) = (
        work.join("state-a").join("control.sock"),
        work.join("state-b").join("control.sock"),
    );
    if keys.is_some() {
        super::export_esp_sa(&ctl_a, &work.join("esp_sa"))?;
    }
    let probing = !matches!(opts.mode, LabMode::IpIp);
    if opts.ikev2 {
        ikev2::up_check(&mut report, &ctl_a);
    }
    if probing {
        paths_up_check(&mut report, &ctl_a);
    }
    let since = ikev2::baseline(&ctl_a, &ctl_b);
    let (ok, detail) = super::p2p::ping(&lab.a, B_INNER);
    report.check(format!("ping A -> B {B_INNER}"), ok, detail);

    stream_check(&mut report, &lab, opts, &work, best_alone, (&ctl_a, &ctl_b))?;
    if opts.topology == Topology::Uplinks {
        uplinks::uplinks_check(&mut report, &ctl_a, &ctl_b);
        if probing {
            uplinks::rebinding_check(&mut report, &lab, &ctl_b)?;
        }
    }

    if opts.ikev2 {
        ikev2::rekeys_check(&mut report, &lab.a, (&ctl_a, &ctl_b), &since, &work)?;
    }
    if opts.compare_mptcp {
        let d = compare::Daemons {
            a: &mut da,
            b: &mut db,
            cfg: (&cfg_a, &cfg_b),
            ctl_a: &ctl_a,
        };
        compare::compare(&mut report, &lab, opts, d, best_alone)?;
    }
    if probing {
        cut_check(&mut report, &lab, opts, &ctl_a, 0)?;
        if opts.topology == Topology::Uplinks {
            // Either uplink may go: the LTE stick as much as the DSL line.
            cut_check(&mut report, &lab, opts, &ctl_a, 1)?;
        }
    }
    if probing && opts.rate_change && opts.topology == Topology::Pair {
        rate::rate_change_check(&mut report, &lab, opts, &ctl_a)?;
    }
    if probing && opts.redundant_loss > 0.0 {
        redundant_check(&mut report, &mut lab, opts, &cfg_a, &cfg_b, &cfg)?;
    }

    if opts.run.keep {
        let mut kept = vec![&lab.a, &lab.b];
        kept.extend(lab.m.iter());
        kept.extend(lab.nat.as_ref());
        report.kept(&kept, Some(&work));
        std::mem::forget((da, db, lab));
        return Ok(report);
    }
    report.clean_stop(&mut [(&lab.a, &mut da), (&lab.b, &mut db)])?;
    let contents = format!(
        "configs, logs, wire-l1.pcap, wire-l2.pcap, ... (A's side of each link){}",
        if work.join("esp_sa").exists() {
            " and esp_sa (tshark decrypts both captures with it)"
        } else {
            ""
        }
    );
    report.finish_work(&work, keep_work, &contents);
    drop(lab);
    Ok(report)
}

/// The best single link alone: plain TCP between the hosts' link addresses, no tunnel, 4 s
/// worth of each link's rate; noted, and the best returned.
fn alone_rates(report: &mut Report, lab: &Lab, opts: &MultipathOptions) -> io::Result<f64> {
    let targets: Vec<String> = match opts.topology {
        Topology::Pair => opts
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| links::addr(i, l.ipv6, 1))
            .collect(),
        Topology::Uplinks => uplinks::alone_targets().map(str::to_string).to_vec(),
    };
    let alone: Vec<f64> = targets
        .iter()
        .zip(&opts.links)
        .map(|(addr, spec)| {
            let bytes = (spec.mbit * 1e6 / 8.0 * 4.0) as u64;
            let target = if addr.contains(':') {
                format!("[{addr}]")
            } else {
                addr.to_string()
            };
            super::transfer(&opts.run.exe, (&lab.a, &lab.b), &target, bytes)
                .map(|r| if r.ok(bytes) { r.mbit_s() } else { 0.0 })
                .unwrap_or(0.0)
        })
        .collect();
    report.notes.push(format!(
        "plain TCP over each link alone (no tunnel, 4 s worth): {}",
        alone
            .iter()
            .enumerate()
            .map(|(i, r)| format!("link {} {r:.1} Mbit/s", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let best_alone = alone.iter().copied().fold(0.0, f64::max);

    Ok(best_alone)
}

/// (seconds since the start, each path's capacity estimate in Mbit/s), every 200 ms until
/// `stop`.
fn estimate_samples(ctl: &Path, stop: &std::sync::atomic::AtomicBool) -> Vec<(f64, Vec<f64>)> {
    let start = Instant::now();
    let mut v = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(m) = status(ctl).and_then(|s| s.peers.into_iter().next()?.multipath) {
            let caps = m.paths.iter().map(|p| p.capacity_bps / 1e6).collect();
            v.push((start.elapsed().as_secs_f64(), caps));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    v
}

/// When each path's estimate first reached 80% of its link's rate during the transfer (the
/// transfer's start is 0), and the estimates 2 s in.
fn found_note(opts: &MultipathOptions, samples: &[(f64, Vec<f64>)]) -> String {
    let found: Vec<String> = opts
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            samples
                .iter()
                .find(|(_, c)| c.get(i).is_some_and(|c| *c >= 0.8 * l.mbit))
                .map_or(format!("link {} never", i + 1), |(t, _)| {
                    format!("link {} {t:.1} s", i + 1)
                })
        })
        .collect();
    let at2 = samples
        .iter()
        .find(|(t, _)| *t >= 2.0)
        .map(|(_, c)| {
            c.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "capacity estimates reached 80% of the link's rate after: {}; estimates 2 s in: {at2} Mbit/s",
        found.join(", ")
    )
}

/// The links' nominal rates added, Mbit/s.
fn nominal_sum(opts: &MultipathOptions) -> f64 {
    opts.links.iter().map(|l| l.mbit).sum()
}

/// Both paths come up: their probes are answered within 5 s.
fn paths_up_check(report: &mut Report, ctl_a: &Path) {
    let up = wait_paths(ctl_a, "up", None, Duration::from_secs(5));
    let paths = path_states(ctl_a);
    report.check(
        "all paths up (probes answered)",
        up.is_some(),
        format!(
            "after {}: {}",
            up.map_or("5 s (timeout)".into(), |d| format!("{} ms", d.as_millis())),
            paths
                .iter()
                .map(|(n, s, r)| format!("{n} {s} rtt {:.1} ms", r.unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
}

/// One TCP stream over both links, both captured on A's side: its hash, its rate next to the
/// best link alone, each path's share, B's reorder stage, and what the captures hold.
fn stream_check(
    report: &mut Report,
    lab: &Lab,
    opts: &MultipathOptions,
    work: &Path,
    best_alone: f64,
    (ctl_a, ctl_b): (&Path, &Path),
) -> io::Result<()> {
    let secs = opts.seconds.max(2);
    // Capture every link (on A's side) during the aggregate transfer.
    let caps: Vec<(PathBuf, Child)> = (0..opts.links.len())
        .map(links::dev)
        .map(|dev| {
            let f = work.join(format!("wire-{dev}.pcap"));
            super::start_capture(&lab.a, &dev, &f).map(|c| (f, c))
        })
        .collect::<io::Result<_>>()?;
    let sum = nominal_sum(opts);
    let bytes = (sum * 1e6 / 8.0 * secs as f64) as u64;
    // A's capacity estimates, sampled every 200 ms during the transfer (how fast each path's
    // rate is found).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (r, samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| estimate_samples(ctl_a, &stop));
        let r = super::transfer(&opts.run.exe, (&lab.a, &lab.b), B_INNER, bytes);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (r, sampler.join().unwrap_or_default())
    });
    let r = r?;
    let rate = r.mbit_s();
    report.notes.push(found_note(opts, &samples));
    // Correctness is the check; the rate is a measurement (reported, compared in
    // docs/multipath.md), not something a timed run on a shared machine can assert.
    report.check(
        format!("one TCP stream over all links ({} MB)", bytes / 1_000_000),
        r.ok(bytes),
        format!(
            "sha256 {}; {rate:.1} Mbit/s",
            if r.ok(bytes) { "equal" } else { "DIFFERS" }
        ),
    );
    let beats = match opts.scheduler {
        espip_core::multipath::Scheduler::Spread | espip_core::multipath::Scheduler::Earliest => {
            rate > best_alone
        }
        _ => rate > 0.7 * best_alone,
    };
    report.notes.push(format!(
        "one TCP stream: {rate:.1} Mbit/s = {:.2} of the links' nominal sum {sum} Mbit/s, {:.2}x the best single link alone ({})",
        rate / sum,
        rate / best_alone.max(1e-9),
        match (opts.scheduler, beats) {
            (espip_core::multipath::Scheduler::Spread | espip_core::multipath::Scheduler::Earliest, true) => {
                "it beat it"
            }
            (espip_core::multipath::Scheduler::Spread | espip_core::multipath::Scheduler::Earliest, false) => {
                "it did NOT beat it"
            }
            (_, true) => "within 0.7 of it, as one link's worth should be",
            (_, false) => "below 0.7 of it",
        }
    ));
    if let Some(st) = status(ctl_a) {
        if let Some(m) = st.peers.first().and_then(|p| p.multipath.as_ref()) {
            report.notes.push(format!(
                "A's paths after it: {}",
                m.paths
                    .iter()
                    .map(|p| format!(
                        "{} share {:.0}% sent {:.1} MB rtt {:.1} ms, estimate {:.0} Mbit/s, quiet {}x",
                        p.name,
                        p.share * 100.0,
                        p.tx_bytes as f64 / 1e6,
                        p.rtt_ms.unwrap_or(0.0),
                        p.capacity_bps / 1e6,
                        p.quiet_count
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }
    if let Some(m) = status(ctl_b).and_then(|s| s.peers.into_iter().next()?.multipath) {
        report.notes.push(format!(
            "B's reorder stage: held {}, gaps skipped {}, late {}, hold {:.1} ms, asked again {}, repaired {}",
            m.reorder_held,
            m.reorder_gaps_skipped,
            m.reorder_late,
            m.reorder_hold_ms,
            m.reorder_asked,
            m.reorder_repaired
        ));
    }
    for (f, c) in caps {
        super::stop_capture(c);
        wire_check(report, &f, opts.mode)?;
    }

    Ok(())
}

/// Link `link` (0 or 1) cut in the middle of a transfer and restored: the transfer completes
/// with an equal hash, the longest stall of B's received bytes that began within a second of
/// the cut is measured (and the longest later one shown), the path is found down and back.
fn cut_check(
    report: &mut Report,
    lab: &Lab,
    opts: &MultipathOptions,
    ctl_a: &Path,
    link: usize,
) -> io::Result<()> {
    let sum = nominal_sum(opts);
    let bytes = (sum * 1e6 / 8.0 * 8.0) as u64;
    // What the receiving application's socket has taken in order (`ss`: bytes_received), so
    // a hole TCP waits for counts as a stall even while later packets arrive.
    let rx = || -> u64 {
        netns::run(
            lab.b
                .command("ss")
                .args(["-tinH", "state", "established", "( sport = :5002 )"]),
        )
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let at = text.find("bytes_received:")? + "bytes_received:".len();
            let digits: String = text[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
    };
    let cut = lab.cut_file(link);
    let (result, samples, per_path, cut_at) = std::thread::scope(|s| {
        let t =
            s.spawn(|| super::transfer_on(&opts.run.exe, (&lab.a, &lab.b), B_INNER, 5002, bytes));
        let start = Instant::now();
        let mut samples = Vec::new();
        // What A sent on each path, every 100 ms (for --plot).
        let mut per_path: Vec<(Duration, Vec<u64>)> = Vec::new();
        let mut cut_at = None;
        while !t.is_finished() {
            let now = start.elapsed();
            if cut_at.is_none() && now >= Duration::from_secs(3) {
                let _ = std::fs::write(&cut, b"cut\n");
                cut_at = Some(now);
            }
            samples.push((now, rx()));
            if opts.plot.is_some()
                && per_path
                    .last()
                    .map_or(true, |(t, _)| now - *t >= Duration::from_millis(100))
            {
                per_path.push((now, compare::path_tx(ctl_a)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (t.join(), samples, per_path, cut_at)
    });
    if let (Some(file), 0) = (&opts.plot, link) {
        plot_cut(report, opts, file, &samples, &per_path, cut_at)?;
    }
    let result = result.map_err(|_| io::Error::other("transfer thread panicked"))??;
    let cut_at = cut_at.unwrap_or(Duration::MAX);
    // The longest time B's received bytes did not grow that began within a second of the
    // cut (the cut's stall), and the longest one after (the links left: on a lossy link, a
    // lost retransmission waits for TCP's timeout, cut or not).
    let (mut stall, mut later) = (Duration::ZERO, Duration::ZERO);
    let mut last_change = cut_at;
    let mut last = None;
    for (t, b) in samples.iter().filter(|(t, _)| *t >= cut_at) {
        if last != Some(*b) {
            last = Some(*b);
            last_change = *t;
        }
        if last_change < cut_at.saturating_add(Duration::from_secs(1)) {
            stall = stall.max(*t - last_change);
        } else {
            later = later.max(*t - last_change);
        }
    }
    let down = path_states(ctl_a)
        .get(link)
        .is_some_and(|(_, s, _)| s == "down");
    report.check(
        format!("link {} cut 3 s into a transfer", link + 1),
        result.ok(bytes) && down && cut_at != Duration::MAX,
        format!(
            "{} MB at {:.1} Mbit/s, sha256 {}; longest stall after the cut {} ms (later: {} \
             ms); path link{} {}",
            bytes / 1_000_000,
            result.mbit_s(),
            if result.ok(bytes) { "equal" } else { "DIFFERS" },
            stall.as_millis(),
            later.as_millis(),
            link + 1,
            if down { "down" } else { "NOT found down" }
        ),
    );
    let _ = std::fs::remove_file(&cut);
    let back = wait_paths(ctl_a, "up", Some(link), Duration::from_secs(5));
    report.check(
        format!("link {} restored: the path comes back", link + 1),
        back.is_some(),
        back.map_or("not up 5 s after the link came back".into(), |d| {
            format!("up {} ms after the link came back", d.as_millis())
        }),
    );
    Ok(())
}

/// Draw the cut transfer into `file` and say so in the report.
fn plot_cut(
    report: &mut Report,
    opts: &MultipathOptions,
    file: &Path,
    stream: &[(Duration, u64)],
    per_path: &[(Duration, Vec<u64>)],
    cut_at: Option<Duration>,
) -> io::Result<()> {
    let paths: Vec<(String, Vec<(f64, f64)>)> = (0..opts.links.len())
        .map(|i| {
            let s: Vec<(Duration, u64)> = per_path
                .iter()
                .filter_map(|(t, v)| v.get(i).map(|b| (*t, *b)))
                .collect();
            (format!("link {}", i + 1), plot::rates(&s))
        })
        .collect();
    let title = format!(
        "espip {}, link 1 cut 3 s in: {}",
        opts.scheduler.name(),
        links_title(opts)
    );
    plot::draw(
        file,
        &title,
        &plot::rates(stream),
        &paths,
        cut_at.map(|c| c.as_secs_f64()),
    )?;
    report
        .notes
        .push(format!("plot of the cut transfer: {}", file.display()));
    Ok(())
}

/// Both links lose `redundant_loss` percent at random; with `redundant`, every packet goes on
/// both, so TCP should see about loss squared. Reloaded (the daemons keep running).
fn redundant_check(
    report: &mut Report,
    lab: &mut Lab,
    opts: &MultipathOptions,
    cfg_a: &Path,
    cfg_b: &Path,
    cfg: &dyn Fn(bool, espip_core::multipath::Scheduler) -> String,
) -> io::Result<()> {
    use espip_core::multipath::Scheduler;
    let loss = opts.redundant_loss;
    for (path, me_a) in [(cfg_a, true), (cfg_b, false)] {
        write_private(path, &cfg(me_a, Scheduler::Redundant))?;
        let out = netns::run(
            Command::new(&opts.run.exe)
                .arg("reload")
                .arg("-c")
                .arg(path),
        )?;
        if !out.status.success() {
            report.check(
                "reload to scheduler redundant",
                false,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            );
            return Ok(());
        }
    }
    let slow = opts.links.iter().map(|l| l.mbit).fold(f64::MAX, f64::min);
    let bytes = (slow * 1e6 / 8.0 * 5.0) as u64;
    // The same transfer without random loss first: TCP retransmits what its own probing for
    // bandwidth overflows (the links' queues); only the difference is the random loss TCP saw.
    let mut runs = Vec::new();
    for (port, l) in [(5003u16, 0.0), (5004, loss)] {
        for (i, spec) in opts.links.iter().enumerate() {
            lab.relay(&opts.run.exe, i, spec, l)?;
        }
        let before = tcp_counters(&lab.a);
        let r = super::transfer_on(&opts.run.exe, (&lab.a, &lab.b), B_INNER, port, bytes)?;
        let share = match (before, tcp_counters(&lab.a)) {
            (Some((o0, r0)), Some((o1, r1))) if o1 > o0 => {
                Some((r1 - r0) as f64 / (o1 - o0) as f64 * 100.0)
            }
            _ => None,
        };
        runs.push((r, share));
    }
    let (clean, lossy) = (&runs[0], &runs[1]);
    let seen = match (clean.1, lossy.1) {
        (Some(c), Some(l)) => Some((l - c).max(0.0)),
        _ => None,
    };
    report.check(
        format!("redundant with {loss}% random loss on each link"),
        lossy.0.ok(bytes) && clean.0.ok(bytes) && seen.is_some_and(|s| s < loss / 2.0),
        format!(
            "{} MB at {:.1} Mbit/s (without loss {:.1}), sha256 {}; TCP retransmitted {:.2}% of its segments ({:.2}% without loss: {:.2}% from the random loss; each link alone loses {loss}%)",
            bytes / 1_000_000,
            lossy.0.mbit_s(),
            clean.0.mbit_s(),
            if lossy.0.ok(bytes) { "equal" } else { "DIFFERS" },
            lossy.1.unwrap_or(f64::NAN),
            clean.1.unwrap_or(f64::NAN),
            seen.unwrap_or(f64::NAN),
        ),
    );
    Ok(())
}

/// The capture of one link shows only the tunnel's protocol between A and B (besides ARP /
/// neighbour discovery) and, for ESP, not the transfer's canary.
fn wire_check(report: &mut Report, wire: &Path, mode: super::p2p::LabMode) -> io::Result<()> {
    use super::p2p::LabMode;
    let frames = pcap::read(wire)?;
    let want = match mode {
        LabMode::Esp(_) => 50u8,
        LabMode::EspUdp(_) => 17,
        LabMode::IpIp => 4,
    };
    let (mut tunnel, mut tunnel_bytes, mut link, mut other, mut canary) = (0u64, 0u64, 0, 0, 0);
    for f in &frames {
        match f.ip() {
            Some((_, _, p, _, total)) if p == want => {
                tunnel += 1;
                tunnel_bytes += total as u64;
            }
            _ if f.ethertype == 0x0806 => link += 1,
            Some((_, d, p, _, _)) if f.ethertype == 0x86dd && (p == 58 || d.is_multicast()) => {
                link += 1
            }
            _ => other += 1,
        }
        if pcap::contains(&f.payload, transfer::CANARY) {
            canary += 1;
        }
    }
    let name = wire
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into());
    let esp = !matches!(mode, LabMode::IpIp);
    report.check(
        format!(
            "{name}: only the tunnel{}",
            if esp { ", no plaintext" } else { "" }
        ),
        tunnel > 0 && other == 0 && (!esp || canary == 0),
        format!(
            "{tunnel} tunnel frames ({:.1} MB), {link} ARP/ND, {other} other, canary in {canary}",
            tunnel_bytes as f64 / 1e6
        ),
    );
    Ok(())
}

/// The default cipher of the lab.
pub const DEFAULT_CIPHER: Cipher = Cipher::Aes128Gcm;
