//! Scenario 2 `gateway`: the SEED VPN lab of seed 002. Host U 192.168.56.9 reaches the VPN
//! server's outside address 192.168.56.10; the server's inside address 192.168.50.1 is on a
//! private LAN with host V 192.168.50.11. Tunnel: U 10.4.2.99, server 10.4.2.5. U routes
//! 192.168.50.0/24 into the tunnel, the server forwards (espip sets ip_forward and restores it).
//! Checks: U pings V, fetches a page from V, V sees 10.4.2.99; the outside link carries only
//! ESP; a clean stop restores the server's ip_forward. When a step fails the report says which
//! setting is missing.

use super::netns::{self, Daemon, Netns};
use super::p2p::{ping, write_private, LabKeys};
use super::same_lan::curl;
use super::{pcap, Report};
use espip_core::sa::Cipher;
use std::io;
use std::path::Path;

/// Options of `espip lab gateway`.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// ESP cipher.
    pub cipher: Cipher,
    /// Reproduce the article author's mistake: the server does not forward (the lab must then
    /// fail and say so).
    pub without_forward: bool,
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

pub(crate) fn esp_peer(
    name: &str,
    endpoint: &str,
    allowed: &[&str],
    cipher: Cipher,
    spi_out: u32,
    spi_in: u32,
    keys: (&espip_core::sa::KeyMaterial, &espip_core::sa::KeyMaterial),
) -> String {
    format!(
        "\n[[peer]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [{}]\nmode = \"esp\"\ncipher = \"{}\"\nspi_out = \"{spi_out:#010x}\"\nspi_in = \"{spi_in:#010x}\"\nkey_out = \"{}\"\nkey_in = \"{}\"\n",
        allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "),
        cipher.name(),
        keys.0.to_hex().as_str(),
        keys.1.to_hex().as_str()
    )
}

/// U's and the server's configurations.
pub fn configs(cipher: Cipher, keys: &LabKeys, work: &std::path::Path) -> (String, String) {
    let u = format!(
        "# espip lab gateway, host U\n[interface]\nname = \"espip0\"\naddress = [\"10.4.2.99/24\"]\nlocal = \"192.168.56.9\"\n{}{}",
        super::state_lines(&work.join("state-u")),
        esp_peer("server", "192.168.56.10", &["10.4.2.5/32", "192.168.50.0/24"], cipher, 0x3001, 0x3002, (&keys.a_to_b, &keys.b_to_a))
    );
    let s = format!(
        "# espip lab gateway, the VPN server\n[interface]\nname = \"espip0\"\naddress = [\"10.4.2.5/24\"]\nlocal = \"192.168.56.10\"\nforward = true\n{}{}",
        super::state_lines(&work.join("state-s")),
        esp_peer("u", "192.168.56.9", &["10.4.2.99/32"], cipher, 0x3002, 0x3001, (&keys.b_to_a, &keys.a_to_b))
    );
    (u, s)
}

/// What is wrong when U cannot reach V: the settings article 002's author was missing.
fn diagnose(u: &Netns, s: &Netns, v: &Netns) -> String {
    let mut why = Vec::new();
    let sysctl = |ns: &Netns, k: &str| {
        netns::run(ns.command("sysctl").args(["-n", k]))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    if sysctl(s, "net.ipv4.ip_forward") != "1" {
        why.push(
            "the server does not forward: net.ipv4.ip_forward=0 (set interface.forward = true)"
                .to_string(),
        );
    }
    let route = |ns: &Netns, to: &str| {
        ns.ip(&["route", "get", to])
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    if !route(u, "192.168.50.11").contains("dev espip0") {
        why.push("U does not route 192.168.50.0/24 into the tunnel (add it to the server peer's allowed_ips)".into());
    }
    if !route(s, "10.4.2.99").contains("dev espip0") {
        why.push("the server has no route back to 10.4.2.99 through espip0".into());
    }
    if !route(v, "10.4.2.99").contains("192.168.50.1") {
        why.push(
            "V has no route to 10.4.2.0/24 via the server 192.168.50.1 (its replies go elsewhere)"
                .into(),
        );
    }
    for ns in [u, s] {
        if sysctl(ns, "net.ipv4.conf.all.rp_filter") == "1"
            && !route(ns, "10.4.2.99").contains("espip0")
        {
            why.push(format!(
                "strict rp_filter in {} with no route back through espip0",
                ns.name()
            ));
        }
    }
    if why.is_empty() {
        "no missing setting found; see the daemon logs".into()
    } else {
        why.join("; ")
    }
}

/// Run the gateway lab.
pub fn run(opts: &GatewayOptions) -> io::Result<Report> {
    let (mut report, work, keep_work) = opts.run.begin(
        "gateway",
        format!("espip lab gateway (esp {})", opts.cipher.name()),
        &[("curl", "curl")],
    )?;
    let taps = opts.run.pcap_dir.as_deref();
    let u = Netns::new("gw", "u")?;
    let s = Netns::new("gw", "server")?;
    let v = Netns::new("gw", "v")?;
    netns::veth(&u, "192.168.56.9/24", &s, "192.168.56.10/24", "out0")?;
    netns::veth(&s, "192.168.50.1/24", &v, "192.168.50.11/24", "in0")?;
    v.ip(&["route", "add", "default", "via", "192.168.50.1"])?;
    let forward_before = netns::run(s.command("sysctl").args(["-n", "net.ipv4.ip_forward"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;

    let keys = LabKeys::generate(opts.cipher)?;
    let (mut cu, mut cs) = configs(opts.cipher, &keys, &work);
    cu.push_str(&super::capture_lines(taps, "u"));
    cs.push_str(&super::capture_lines(taps, "server"));
    if opts.without_forward {
        cs = cs.replace("forward = true\n", "");
    }
    write_private(&work.join("u.toml"), &cu)?;
    write_private(&work.join("server.toml"), &cs)?;

    let wire = work.join("outside.pcap");
    let tcpdump = super::start_capture(&u, "out0", &wire)?;
    let inside = taps
        .map(|_| super::start_capture(&v, "in0", &work.join("inside.pcap")))
        .transpose()?;
    let mut ds = Daemon::start(
        &s,
        &opts.run.exe,
        &work.join("server.toml"),
        &work.join("server.log"),
    )?;
    let mut du = Daemon::start(&u, &opts.run.exe, &work.join("u.toml"), &work.join("u.log"))?;
    if taps.is_some() {
        super::export_esp_sa(&work.join("state-u/control.sock"), &work.join("esp_sa"))?;
    }
    let fwd = netns::run(s.command("sysctl").args(["-n", "net.ipv4.ip_forward"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    report.check(
        "server forwards",
        fwd == "1",
        if fwd == "1" {
            format!("net.ipv4.ip_forward {forward_before} -> {fwd} (set by espip)")
        } else {
            format!("net.ipv4.ip_forward = {fwd}: set interface.forward = true on the server")
        },
    );

    let (ok, d) = ping(&u, "192.168.50.11");
    let d = if ok {
        d
    } else {
        format!("{d}; {}", diagnose(&u, &s, &v))
    };
    report.check("U pings V 192.168.50.11 through the tunnel", ok, d);

    http_check(&mut report, &opts.run.exe, (&u, &s, &v))?;

    super::stop_capture(tcpdump);
    if let Some(c) = inside {
        super::stop_capture(c);
    }
    let frames = pcap::read(&wire)?;
    let mut esp = 0;
    let mut clear = 0;
    for f in &frames {
        if let Some((_, _, p)) = f.ipv4() {
            if p == 50 {
                esp += 1
            } else {
                clear += 1
            }
        }
    }
    report.check(
        "outside link carries only ESP",
        clear == 0 && esp > 0,
        format!("{esp} ESP, {clear} other IPv4 packets"),
    );

    if opts.run.keep {
        report.keep_running(vec![u, s, v], &work, (du, ds));
        return Ok(report);
    }
    let clean = du.stop()? & ds.stop()?;
    let after = netns::run(s.command("sysctl").args(["-n", "net.ipv4.ip_forward"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    report.check(
        "clean stop restores the server",
        clean && after == forward_before && !s.has_link("espip0"),
        format!(
            "exit {}; ip_forward back to {after}",
            if clean { "0" } else { "non-zero" }
        ),
    );
    report.note_totals(&[("U", &du), ("server", &ds)]);
    report.finish_work(
        &work,
        keep_work,
        "configs, logs, outside.pcap (U-server), inside.pcap (server-V), host-u/ and host-server/ (the daemons' inner and outer taps), esp_sa (see docs/captures.md)",
    );
    Ok(report)
}
/// U fetches a page from V through the tunnel, and V sees U's tunnel address (no NAT on the
/// way); a failure comes with the diagnosis of where the packets stopped.
fn http_check(
    report: &mut Report,
    exe: &Path,
    (u, s, v): (&Netns, &Netns, &Netns),
) -> io::Result<()> {
    let mut server = super::http_server(v, exe, "192.168.50.11:80", "V")?;
    let (ok, body) = curl(u, "http://192.168.50.11/");
    let _ = server.kill();
    let served = server.wait_with_output()?;
    let log = String::from_utf8_lossy(&served.stdout).to_string();
    report.check(
        "U fetches http://192.168.50.11/ from V",
        ok && body.contains("host V"),
        if ok {
            body.clone()
        } else {
            format!("{body}; {}", diagnose(u, s, v))
        },
    );
    report.check(
        "V sees U's tunnel address as the source",
        log.contains("10.4.2.99 \"GET / HTTP"),
        format!("V's access log: {}", log.trim()),
    );
    Ok(())
}
