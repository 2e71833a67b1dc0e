//! Scenario 4 `upstream` (seed 004): an asymmetric, upstream-only tunnel through a censoring
//! firewall. Inside net 10.0.2.0/24: client C .244, relay RA .201, firewall F .1. Outside net
//! 10.0.3.0/24: F .1, relay RB .29, server S .26 (HTTP). F forwards between the nets and drops
//! upstream HTTP requests (`-m string --string "GET "`). C routes S via RA; RA sends C's packets
//! in IP-in-IP (protocol 4, unencrypted as in the article) to RB; RB decapsulates and forwards
//! them to S with C's own source address; S's replies go straight back through F.

use super::netns::{self, Daemon, Netns};
use super::p2p::{log_field, write_private};
use super::same_lan::curl;
use super::Report;
use std::io;
use std::path::Path;

/// Options of `espip lab upstream`.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

/// The relays' configurations (RA, RB).
pub fn configs(work: &Path) -> (String, String) {
    let ra = format!(
        "# espip lab upstream, relay RA: takes C's packets for S and sends them to RB\n[interface]\nname = \"espip0\"\nlocal = \"10.0.2.201\"\nforward = true\n{}\n[[peer]]\nname = \"rb\"\nendpoint = \"10.0.3.29\"\nallowed_ips = [\"10.0.3.26/32\"]\nmode = \"ipip\"\n",
        super::state_lines(&work.join("state-ra"))
    );
    // rp_filter "off", not "loose": RB's TUN has no IPv4 address, and Linux's reverse-path
    // check refuses every source on an interface without one unless the filter is off
    // (`__fib_validate_source`, "last_resort").
    let rb = format!(
        "# espip lab upstream, relay RB: forwards C's packets to S with C's own source\n[interface]\nname = \"espip0\"\nlocal = \"10.0.3.29\"\nforward = true\nrp_filter = \"off\"\n{}\n[[peer]]\nname = \"ra\"\nendpoint = \"10.0.2.201\"\nallowed_ips = [\"10.0.2.0/24\"]\nroute = false\nmode = \"ipip\"\n",
        super::state_lines(&work.join("state-rb"))
    );
    (ra, rb)
}

fn sysctl(ns: &Netns, k: &str) -> String {
    netns::run(ns.command("sysctl").args(["-n", k]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Run the upstream lab.
pub fn run(opts: &UpstreamOptions) -> io::Result<Report> {
    let (mut report, work, keep_work) = opts.run.begin(
        "upstream",
        "espip lab upstream (ipip relays RA -> RB, censoring firewall F)".into(),
        &[("curl", "curl"), ("iptables", "iptables")],
    )?;
    let taps = opts.run.pcap_dir.as_deref();

    let UpHosts {
        f,
        c,
        ra,
        rb,
        s,
        sw_in,
        sw_out,
    } = UpHosts::new()?;
    let mut server = super::http_server(&s, &opts.run.exe, "10.0.3.26:80", "S")?;

    firewall_check(&mut report, &f, &c);

    let (mut cra, mut crb) = configs(&work);
    cra.push_str(&super::capture_lines(taps, "ra"));
    crb.push_str(&super::capture_lines(taps, "rb"));
    write_private(&work.join("ra.toml"), &cra)?;
    write_private(&work.join("rb.toml"), &crb)?;
    let before_rb = (
        sysctl(&rb, "net.ipv4.ip_forward"),
        sysctl(&rb, "net.ipv4.conf.all.rp_filter"),
    );
    let mut drb = Daemon::start(
        &rb,
        &opts.run.exe,
        &work.join("rb.toml"),
        &work.join("rb.log"),
    )?;
    let mut dra = Daemon::start(
        &ra,
        &opts.run.exe,
        &work.join("ra.toml"),
        &work.join("ra.log"),
    )?;
    c.ip(&["route", "add", "10.0.3.26/32", "via", "10.0.2.201"])?;
    let wire = work.join("ra.pcap");
    let tcpdump = super::start_capture(&ra, "eth0", &wire)?;
    let mut others = Vec::new();
    if taps.is_some() {
        for (ns, file) in [(&c, "c.pcap"), (&rb, "rb.pcap"), (&s, "s.pcap")] {
            others.push(super::start_capture(ns, "eth0", &work.join(file))?);
        }
    }

    let (ok, body) = curl(&c, "http://10.0.3.26/");
    report.check(
        "with the tunnel C's GET reaches S",
        ok && body.contains("host S"),
        body.clone(),
    );
    let _ = server.kill();
    let served = server.wait_with_output()?;
    let log = String::from_utf8_lossy(&served.stdout).to_string();
    report.check(
        "S's access log shows C's own address",
        log.contains("10.0.2.244 \"GET / HTTP"),
        format!("S's log: {}", log.trim().replace('\n', " | ")),
    );
    // TCP's last segments (and C's retransmissions to a stopped S) leave after curl returns:
    // the relays stop before the capture does, so the capture holds every packet their
    // counters count. Kept relays keep running: wait until RA has been quiet instead.
    let stopped = if opts.run.keep {
        super::settle(&work.join("state-ra/control.sock"));
        None
    } else {
        Some(dra.stop()? & drb.stop()?)
    };
    super::stop_capture(tcpdump);
    for o in others {
        super::stop_capture(o);
    }
    let (up, down, replies) = ra_link_counts(&wire)?;
    report.check(
        "capture on RA's link: tunnel upstream only, replies bypass RA",
        up > 0 && down == 0 && replies == 0,
        format!("IP-in-IP RA->RB {up}, RB->RA {down}; S->C packets seen by RA {replies}"),
    );
    let Some(clean) = stopped else {
        report.kept(&[&f, &c, &ra, &rb, &s, &sw_in, &sw_out], Some(&work));
        for d in [dra, drb] {
            std::mem::forget(d);
        }
        for ns in [f, c, ra, rb, s, sw_in, sw_out] {
            std::mem::forget(ns);
        }
        return Ok(report);
    };
    relays_check(&mut report, (&ra, &rb), (&dra, &drb), up, clean, &before_rb);
    let contents = format!(
        "configs, logs, ra.pcap{} and host-ra/, host-rb/ (the relays' inner and outer taps)",
        if taps.is_some() {
            ", c.pcap, rb.pcap, s.pcap (each host's link)"
        } else {
            ""
        }
    );
    report.finish_work(&work, keep_work, &contents);
    Ok(report)
}
/// The relays carried upstream packets only (their counters agree with the capture), and a
/// clean stop gave both their settings back.
fn relays_check(
    report: &mut Report,
    (ra, rb): (&Netns, &Netns),
    (dra, drb): (&Daemon, &Daemon),
    up: u64,
    clean: bool,
    before_rb: &(String, String),
) {
    let field = |d: &Daemon, k: &str| -> u64 {
        log_field(&d.log(), "peer totals", k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let (ra_tx, ra_rx) = (field(dra, "tx_packets"), field(dra, "rx_packets"));
    let (rb_tx, rb_rx) = (field(drb, "tx_packets"), field(drb, "rx_packets"));
    report.check(
        "the relays carried upstream packets only",
        ra_tx > 0 && ra_rx == 0 && rb_rx == ra_tx && rb_tx == 0 && up == ra_tx,
        format!(
            "RA sent {ra_tx} (captured {up}), received {ra_rx}; RB received {rb_rx}, sent {rb_tx}"
        ),
    );
    let after_rb = (
        sysctl(rb, "net.ipv4.ip_forward"),
        sysctl(rb, "net.ipv4.conf.all.rp_filter"),
    );
    report.check(
        "clean stop restores the relays' settings",
        clean && after_rb == *before_rb && sysctl(ra, "net.ipv4.ip_forward") == "0",
        format!(
            "RB ip_forward/rp_filter back to {}/{}; RA ip_forward {}",
            after_rb.0,
            after_rb.1,
            sysctl(ra, "net.ipv4.ip_forward")
        ),
    );
}

/// The upstream lab's hosts: firewall F routing between two switches, client C and relay RA
/// on the inner one, relay RB and server S on the outer one.
struct UpHosts {
    f: Netns,
    c: Netns,
    ra: Netns,
    rb: Netns,
    s: Netns,
    sw_in: Netns,
    sw_out: Netns,
}

impl UpHosts {
    fn new() -> io::Result<UpHosts> {
        let f = Netns::new("up", "f")?;
        let c = Netns::new("up", "c")?;
        let ra = Netns::new("up", "ra")?;
        let rb = Netns::new("up", "rb")?;
        let s = Netns::new("up", "s")?;
        // Two switches (bridges in namespaces of their own) and F routing between them.
        let sw_in = Netns::new("up", "swin")?;
        let sw_out = Netns::new("up", "swout")?;
        netns::bridge(&sw_in, "br0")?;
        netns::bridge(&sw_out, "br0")?;
        f.sysctl("net.ipv4.ip_forward", "1")?;
        netns::plug(&f, "in0", "10.0.2.1/24", &sw_in, "br0", "p-f")?;
        netns::plug(&f, "out0", "10.0.3.1/24", &sw_out, "br0", "p-f")?;
        netns::plug(&c, "eth0", "10.0.2.244/24", &sw_in, "br0", "p-c")?;
        netns::plug(&ra, "eth0", "10.0.2.201/24", &sw_in, "br0", "p-ra")?;
        netns::plug(&rb, "eth0", "10.0.3.29/24", &sw_out, "br0", "p-rb")?;
        netns::plug(&s, "eth0", "10.0.3.26/24", &sw_out, "br0", "p-s")?;
        for (ns, gw) in [
            (&c, "10.0.2.1"),
            (&ra, "10.0.2.1"),
            (&rb, "10.0.3.1"),
            (&s, "10.0.3.1"),
        ] {
            ns.ip(&["route", "add", "default", "via", gw])?;
        }
        netns::run_ok(f.command("iptables").args([
            "-A", "FORWARD", "-p", "tcp", "--dport", "80", "-m", "string", "--algo", "bm",
            "--string", "GET ", "-j", "DROP",
        ]))?;
        Ok(UpHosts {
            f,
            c,
            ra,
            rb,
            s,
            sw_in,
            sw_out,
        })
    }
}

/// Without the tunnel, F's "GET " rule drops C's request.
fn firewall_check(report: &mut Report, f: &Netns, c: &Netns) {
    let (ok, body) = curl(c, "http://10.0.3.26/");
    let dropped: u64 = netns::run(
        f.command("iptables")
            .args(["-L", "FORWARD", "-v", "-n", "-x"]),
    )
    .ok()
    .and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("STRING match"))
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
    })
    .unwrap_or(0);
    report.check(
        "without the tunnel the firewall blocks C's GET",
        !ok && dropped > 0,
        format!(
            "curl via F: {}; F's \"GET \" rule dropped {dropped} packets",
            if ok {
                body
            } else {
                body.lines().next().unwrap_or("").to_string()
            }
        ),
    );
}

/// In the capture on RA's link: IP-in-IP RA -> RB (up), anything from RB (down), and S's
/// replies to C (which must bypass RA).
fn ra_link_counts(wire: &Path) -> io::Result<(u64, u64, u64)> {
    let (mut up, mut down, mut replies) = (0, 0, 0);
    for fr in super::pcap::read(wire)? {
        match fr.ipv4() {
            Some((s_, d, 4)) if s_.octets() == [10, 0, 2, 201] && d.octets() == [10, 0, 3, 29] => {
                up += 1
            }
            Some((s_, _, 4)) if s_.octets() == [10, 0, 3, 29] => down += 1,
            Some((s_, d, _)) if s_.octets() == [10, 0, 3, 26] && d.octets() == [10, 0, 2, 244] => {
                replies += 1
            }
            _ => {}
        }
    }
    Ok((up, down, replies))
}
