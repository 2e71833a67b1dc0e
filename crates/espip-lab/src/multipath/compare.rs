//! The comparison runs (`--compare-mptcp`, `--runs N`, `--glorytun PATH`): one TCP stream of
//! iperf3 through espip over fresh paths (both daemons restarted before each run), kernel
//! MPTCP with one subflow per link, and glorytun on the same links, one after the other in
//! every run; each tunnel's rate against its own encapsulation ceiling.

use super::{links, status, wait_paths, Lab, MultipathOptions, B_INNER};
use crate::netns::{self, Daemon, Netns};
use crate::Report;
use std::io;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// What one iperf3 run measured: the receiver's rate over the whole run and per second.
#[derive(Debug, Clone, Default)]
pub(super) struct Iperf {
    /// Mbit/s received over the run.
    pub mbit: f64,
    /// Mbit/s received in each second (the receiver's intervals).
    pub intervals: Vec<f64>,
    /// Segments the sender retransmitted (0 where iperf3 does not say).
    pub retransmits: u64,
}

/// `iperf3 -J --get-server-output` from A to `to` (`mptcp`: both ends under `mptcpize run`)
/// for `seconds` with congestion control `cc`.
pub(super) fn iperf3(
    lab: &Lab,
    to: &str,
    port: u16,
    seconds: u64,
    mptcp: bool,
    cc: Option<&str>,
) -> io::Result<Iperf> {
    let cmd = |ns: &Netns| {
        let mut c = ns.command(if mptcp { "mptcpize" } else { "iperf3" });
        if mptcp {
            c.args(["run", "iperf3"]);
        }
        c
    };
    let mut server = cmd(&lab.b)
        .args(["-s", "-1", "-J", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut client = cmd(&lab.a);
    client.args([
        "-c",
        to,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
    ]);
    client.args(["-J", "--get-server-output"]);
    if let Some(cc) = cc {
        client.args(["-C", cc]);
    }
    let out = netns::run(&mut client);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out?.stdout)
        .map_err(|e| io::Error::other(format!("iperf3 output: {e}")))?;
    let mbit = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .ok_or_else(|| io::Error::other(format!("iperf3: {}", v["error"])))?;
    let intervals = v["server_output_json"]["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                // The server's last interval is what came in after the client's last full
                // second (often a few milliseconds): its rate is noise, not a second.
                .filter(|i| i["sum"]["seconds"].as_f64().unwrap_or(1.0) >= 0.5)
                .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                .map(|b| b / 1e6)
                .collect()
        })
        .unwrap_or_default();
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok(Iperf {
        mbit,
        intervals,
        retransmits,
    })
}

/// The most one TCP stream (timestamps on, IPv4 inside) can get through espip's tunnel of
/// `mtu` over `links` in `mode`, Mbit/s: each link's rate times the segment's payload over
/// the frame that carries it (the links' `tbf` counts every byte of the frame, Ethernet
/// header included). ESP: header 8, IV 8, the inner packet and its 2 trailer bytes padded to
/// 4, ICV 16 (AES-GCM and ChaCha20-Poly1305 alike); ESP in UDP adds 8; IP-in-IP only the
/// outer IP header.
pub(super) fn espip_ceiling(links: &[links::LinkSpec], mode: crate::p2p::LabMode, mtu: u32) -> f64 {
    use crate::p2p::LabMode;
    let payload = f64::from(mtu.saturating_sub(52));
    links
        .iter()
        .map(|l| {
            let ip = if l.ipv6 { 40 } else { 20 };
            let esp = 8 + 8 + (mtu + 2).div_ceil(4) * 4 + 16;
            let inner = match mode {
                LabMode::EspUdp(_) => 8 + esp,
                LabMode::Esp(_) => esp,
                LabMode::IpIp => mtu,
            };
            l.mbit * payload / f64::from(14 + ip + inner)
        })
        .sum()
}

/// Kernel MPTCP's ceiling on the same links (all subflows IPv4, 1500-byte frames): a segment
/// carries about 1428 bytes (IP 20, TCP 20, timestamps 12, the DSS option 20) of a 1514-byte
/// frame.
pub(super) fn mptcp_ceiling(links: &[links::LinkSpec]) -> f64 {
    links.iter().map(|l| l.mbit * 1428.0 / 1514.0).sum()
}

/// The tunnel device's MTU in `ns`.
fn mtu_of(ns: &Netns, dev: &str) -> Option<u32> {
    let out = netns::run(ns.command("ip").args(["-j", "link", "show", "dev", dev])).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["mtu"].as_u64().map(|m| m as u32)
}

/// Give the IPv6-only links IPv4 addresses too and let MPTCP open one subflow per link.
fn mptcp_setup(lab: &Lab, opts: &MultipathOptions) -> io::Result<()> {
    let n = opts.links.len();
    for (k, ns) in [&lab.a, &lab.b].into_iter().enumerate() {
        for (i, l) in opts.links.iter().enumerate() {
            if l.ipv6 {
                let a = format!("{}/24", links::addr4(i, k));
                ns.ip(&["addr", "add", &a, "dev", &links::dev(i)])?;
            }
        }
        let more = (n - 1).to_string();
        ns.ip(&[
            "mptcp",
            "limits",
            "set",
            "subflow",
            &more,
            "add_addr_accepted",
            &more,
        ])?;
    }
    for i in 1..n {
        let addr = links::addr4(i, 0);
        let dev = links::dev(i);
        lab.a
            .ip(&["mptcp", "endpoint", "add", &addr, "dev", &dev, "subflow"])?;
    }
    Ok(())
}

/// glorytun between A (client) and B (server) on the links' IPv4 addresses, one path per
/// link with the link's rate fixed (its README's setup); stopped when dropped.
struct Glorytun {
    children: Vec<Child>,
}

impl Drop for Glorytun {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// glorytun's inner addresses: A and B.
const GT_INNER: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

fn glorytun_up(
    lab: &Lab,
    opts: &MultipathOptions,
    exe: &Path,
    work: &Path,
) -> io::Result<Glorytun> {
    let key = work.join("glorytun.key");
    let out = netns::run(lab.a.command(exe).arg("keygen"))?;
    crate::p2p::write_private(&key, &String::from_utf8_lossy(&out.stdout))?;
    // Its control socket is /run/glorytun.<uid>/<device>, shared by every namespace: the
    // device names carry this process's id.
    let tag = std::process::id() % 100_000;
    let devs = [format!("gt{tag}a"), format!("gt{tag}b")];
    let log = |n: &str| std::fs::File::create(work.join(format!("glorytun-{n}.log")));
    let mut g = Glorytun {
        children: Vec::new(),
    };
    let mut server = lab.b.command(exe);
    espip_sys::proc::die_with_parent(&mut server);
    server
        .args(["bind", "from", "addr", "0.0.0.0", "port", "5000", "keyfile"])
        .arg(&key)
        .args(["dev", &devs[1]])
        .stdout(log("b")?)
        .stderr(log("b-err")?);
    g.children.push(server.spawn()?);
    let mut client = lab.a.command(exe);
    espip_sys::proc::die_with_parent(&mut client);
    client
        .args([
            "bind",
            "to",
            "addr",
            &links::addr4(0, 1),
            "port",
            "5000",
            "keyfile",
        ])
        .arg(&key)
        .args(["dev", &devs[0]])
        .stdout(log("a")?)
        .stderr(log("a-err")?);
    g.children.push(client.spawn()?);
    std::thread::sleep(Duration::from_millis(500));
    for (k, ns) in [&lab.a, &lab.b].into_iter().enumerate() {
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", GT_INNER[k]),
            "dev",
            &devs[k],
        ])?;
        ns.ip(&["link", "set", &devs[k], "up"])?;
    }
    for (i, l) in opts.links.iter().enumerate() {
        let bytes = format!("{}", (l.mbit * 1e6 / 8.0) as u64);
        let status = lab
            .a
            .command(exe)
            .args(["path", "dev", &devs[0], "addr", &links::addr4(i, 0)])
            .args(["to", "addr", &links::addr4(i, 1), "port", "5000"])
            .args(["set", "up", "rate", "fixed", "tx", &bytes, "rx", &bytes])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "glorytun path on link {} refused ({status})",
                i + 1
            )));
        }
    }
    // Until the paths have exchanged their first beats, nothing passes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !crate::p2p::ping(&lab.a, GT_INNER[1]).0 {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other("glorytun: no ping through it after 10 s"));
        }
    }
    Ok(g)
}

/// What one comparison run measured.
struct Run {
    /// The A/B setting of this run's daemons (`--ab-equal-delay`, `--ab-repair`): on or off.
    ab: bool,
    espip: Iperf,
    /// Share of A's bytes sent on each path during espip's run.
    shares: Vec<f64>,
    mptcp: Option<f64>,
    glorytun: Option<f64>,
}

/// The daemons the runs restart, with what starting them takes.
pub(super) struct Daemons<'a> {
    pub a: &'a mut Daemon,
    pub b: &'a mut Daemon,
    pub cfg: (&'a Path, &'a Path),
    pub ctl_a: &'a Path,
}

/// Median and range of `v`, as "median (min-max)".
fn median_range(v: &[f64]) -> String {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => "-".into(),
        1 => format!("{:.1}", s[0]),
        n => {
            let m = if n % 2 == 1 {
                s[n / 2]
            } else {
                (s[n / 2 - 1] + s[n / 2]) / 2.0
            };
            format!("{m:.1} ({:.1}-{:.1})", s[0], s[n - 1])
        }
    }
}

/// A's bytes sent per path so far.
pub(super) fn path_tx(ctl: &Path) -> Vec<u64> {
    status(ctl)
        .and_then(|s| s.peers.into_iter().next()?.multipath)
        .map(|m| m.paths.iter().map(|p| p.tx_bytes).collect())
        .unwrap_or_default()
}

/// `runs` comparison runs; each line of the report is one run, the last line the medians and
/// ranges.
pub(super) fn compare(
    report: &mut Report,
    lab: &Lab,
    opts: &MultipathOptions,
    d: Daemons,
    best_alone: f64,
) -> io::Result<()> {
    mptcp_setup(lab, opts)?;
    let work = &lab.work;
    let gt = match &opts.glorytun {
        Some(exe) => match glorytun_up(lab, opts, exe, work) {
            Ok(g) => Some(g),
            Err(e) => {
                report.notes.push(format!("glorytun: not measured: {e}"));
                None
            }
        },
        None => None,
    };
    let secs = opts.seconds.max(5);
    let cc = opts.congestion.as_deref();
    let mtu = mtu_of(&lab.a, "espip0").unwrap_or(1400);
    let ceiling = espip_ceiling(&opts.links, opts.mode, mtu);
    let mptcp_ceiling = mptcp_ceiling(&opts.links);
    let mut runs = Vec::new();
    for k in 1..=opts.runs.max(1) {
        // Fresh paths: nothing learnt from the run before.
        // The A/B setting, on in odd runs, off in even ones.
        let ab = opts.ab;
        let on = ab.map_or(true, |_| k % 2 == 1);
        if let Some(key) = ab {
            for cfg in [d.cfg.0, d.cfg.1] {
                let text = std::fs::read_to_string(cfg)?;
                let text = text
                    .replace(&format!("{key} = true\n"), "")
                    .replace(&format!("{key} = false\n"), "")
                    .replace("\nadapt = ", &format!("\n{key} = {on}\nadapt = "));
                crate::p2p::write_private(cfg, &text)?;
            }
        }
        for (d, ns, cfg, host) in [
            (&mut *d.a, &lab.a, d.cfg.0, "a"),
            (&mut *d.b, &lab.b, d.cfg.1, "b"),
        ] {
            d.stop()?;
            *d = Daemon::start(
                ns,
                &opts.run.exe,
                cfg,
                &work.join(format!("{host}-run{k}.log")),
            )?;
        }
        if opts.mode != crate::p2p::LabMode::IpIp {
            wait_paths(d.ctl_a, "up", None, Duration::from_secs(10));
        }
        let before = path_tx(d.ctl_a);
        let espip = iperf3(lab, B_INNER, 5302, secs, false, cc)?;
        let after = path_tx(d.ctl_a);
        let sent: Vec<f64> = after
            .iter()
            .zip(before.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b) as f64)
            .collect();
        let total: f64 = sent.iter().sum::<f64>().max(1.0);
        let mptcp = iperf3(lab, &links::addr4(0, 1), 5301, secs, true, cc).ok();
        let glorytun = match &gt {
            Some(_) => iperf3(lab, GT_INNER[1], 5303, secs, false, cc)
                .ok()
                .map(|r| r.mbit),
            None => None,
        };
        let run = Run {
            ab: on,
            espip,
            shares: sent.iter().map(|s| s / total).collect(),
            mptcp: mptcp.map(|r| r.mbit),
            glorytun,
        };
        let mut line = run_line(k, &run, ceiling, mptcp_ceiling, best_alone);
        if let Some(key) = ab {
            line = line.replacen(": espip", &format!(": espip ({key} {on})"), 1);
        }
        report.notes.push(line);
        runs.push(run);
    }
    let col = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    if let Some(key) = opts.ab {
        let on = col(&|r| r.ab.then_some(r.espip.mbit));
        let off = col(&|r| (!r.ab).then_some(r.espip.mbit));
        report.notes.push(format!(
            "A/B, alternating runs: espip with {key} {} Mbit/s, without {} Mbit/s",
            median_range(&on),
            median_range(&off)
        ));
    }
    let espip = col(&|r| Some(r.espip.mbit));
    let share: Vec<f64> = espip.iter().map(|e| e / ceiling).collect();
    let mptcp = col(&|r| r.mptcp);
    report.notes.push(format!(
        "{} runs, iperf3 {secs} s, congestion control {}: espip {} Mbit/s, share of its ceiling {ceiling:.1}: {}; kernel MPTCP {} (ceiling {mptcp_ceiling:.1}: {}); glorytun {}; best link alone {best_alone:.1}",
        runs.len(),
        cc.unwrap_or("default"),
        median_range(&espip),
        median_range(&share.iter().map(|s| s * 100.0).collect::<Vec<_>>()) + " %",
        median_range(&mptcp),
        median_range(&mptcp.iter().map(|m| m / mptcp_ceiling * 100.0).collect::<Vec<_>>()) + " %",
        if gt.is_some() {
            median_range(&col(&|r| r.glorytun))
        } else {
            "not run (--glorytun PATH)".into()
        },
    ));
    drop(gt);
    Ok(())
}

/// One run's line of the report.
fn run_line(k: usize, r: &Run, ceiling: f64, mptcp_ceiling: f64, best_alone: f64) -> String {
    let e = &r.espip;
    // The intervals after the first two seconds against the best link alone.
    let late = e
        .intervals
        .iter()
        .skip(2)
        .copied()
        .fold(f64::INFINITY, f64::min);
    let floor = if late.is_finite() {
        format!(
            "slowest second after 2 s {late:.1} ({} the best link alone)",
            if late >= best_alone { "above" } else { "BELOW" }
        )
    } else {
        "no per-second intervals".into()
    };
    let seconds: Vec<String> = e.intervals.iter().map(|m| format!("{m:.0}")).collect();
    format!(
        "run {k}: espip {:.1} Mbit/s = {:.3} of its ceiling {ceiling:.1}, {floor} (each second: {}; {} retransmitted segments), per-path share {}; kernel MPTCP {}; glorytun {}",
        e.mbit,
        e.mbit / ceiling,
        seconds.join(" "),
        e.retransmits,
        r.shares
            .iter()
            .map(|s| format!("{:.2}", s))
            .collect::<Vec<_>>()
            .join("/"),
        r.mptcp.map_or("failed".into(), |m| format!(
            "{m:.1} = {:.3} of its ceiling {mptcp_ceiling:.1}",
            m / mptcp_ceiling
        )),
        r.glorytun.map_or("-".into(), |g| format!("{g:.1}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::LabMode;

    #[test]
    fn the_ceiling_matches_the_measured_frames() {
        // docs/multipath.md: tunnel MTU 1418, frames 1494 (IPv4) and 1514 (IPv6), 1366 bytes
        // of TCP payload: 100 + 100 Mbit/s give 181.6.
        let l: Vec<links::LinkSpec> = links::parse_links("100/10,100/40/ipv6").unwrap();
        let c = espip_ceiling(&l, LabMode::EspUdp(espip_core::sa::Cipher::Aes128Gcm), 1418);
        assert!((c - 181.6).abs() < 0.1, "{c}");
        let m = mptcp_ceiling(&l);
        assert!((m - 188.6).abs() < 0.1, "{m}");
    }
}
