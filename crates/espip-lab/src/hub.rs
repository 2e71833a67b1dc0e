//! Scenario 5 `hub` (seed 003): a virtual LAN 192.168.0.0/24 with hub H (.1) and three clients
//! (.11, .12, .13) reaching H over an underlay switch 172.16.0.0/24. H relays client-to-client
//! packets inside the daemon (decapsulate, re-encapsulate for the other client; the kernel's
//! forwarding path never sees them) and gives clients a way out to an "internet" host I
//! 198.51.100.2 through MASQUERADE, installed and removed by espip like every rule.

use super::gateway::esp_peer;
use super::netns::{self, Daemon, Netns};
use super::p2p::{log_field, ping, write_private, LabKeys};
use super::same_lan::{curl, rules_of};
use super::Report;
use espip_core::sa::Cipher;
use std::io;
use std::path::Path;

/// Options of `espip lab hub`.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// ESP cipher.
    pub cipher: Cipher,
    /// What every lab takes: --keep, --pcap, installing, the binary.
    pub run: super::LabRun,
}

/// Number of clients.
pub const CLIENTS: u8 = 3;

/// The hub's and each client's configuration.
pub fn configs(cipher: Cipher, keys: &[LabKeys], work: &Path) -> (String, Vec<String>) {
    let mut hub = format!(
        "# espip lab hub, the hub H\n[interface]\nname = \"espip0\"\naddress = [\"192.168.0.1/24\"]\nlocal = \"172.16.0.1\"\nforward = true\n{}\n[nat]\nmasquerade = [\"192.168.0.0/24\"]\n",
        super::state_lines(&work.join("state-h"))
    );
    let mut clients = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let n = 11 + i as u8;
        let (to_client, to_hub) = (0x4000 + u32::from(n) * 2, 0x4001 + u32::from(n) * 2);
        hub.push_str(&esp_peer(
            &format!("c{}", i + 1),
            &format!("172.16.0.{n}"),
            &[&format!("192.168.0.{n}/32")],
            cipher,
            to_client,
            to_hub,
            (&k.a_to_b, &k.b_to_a),
        ));
        clients.push(format!(
            "# espip lab hub, client c{}\n[interface]\nname = \"espip0\"\naddress = [\"192.168.0.{n}/24\"]\nlocal = \"172.16.0.{n}\"\n{}{}",
            i + 1,
            super::state_lines(&work.join(format!("state-c{}", i + 1))),
            esp_peer("hub", "172.16.0.1", &["192.168.0.0/24", "198.51.100.0/24"], cipher, to_hub, to_client, (&k.b_to_a, &k.a_to_b))
        ));
    }
    (hub, clients)
}

fn nstat(ns: &Netns, key: &str) -> u64 {
    netns::run(ns.command("nstat").args(["-az", key]))
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Run the hub lab.
pub fn run(opts: &HubOptions) -> io::Result<Report> {
    let (mut report, work, keep_work) = opts.run.begin(
        "hub",
        format!(
            "espip lab hub (esp {}, {CLIENTS} clients)",
            opts.cipher.name()
        ),
        &[
            ("curl", "curl"),
            ("iptables", "iptables"),
            ("nstat", "iproute2"),
        ],
    )?;
    let taps = opts.run.pcap_dir.as_deref();

    let (sw, h, i, clients) = hosts()?;
    let keys: Vec<LabKeys> = (0..CLIENTS)
        .map(|_| LabKeys::generate(opts.cipher))
        .collect::<Result<_, _>>()?;
    let (mut hub_cfg, mut client_cfgs) = configs(opts.cipher, &keys, &work);
    hub_cfg.push_str(&super::capture_lines(taps, "h"));
    for (k, c) in client_cfgs.iter_mut().enumerate() {
        c.push_str(&super::capture_lines(taps, &format!("c{}", k + 1)));
    }
    let links = if taps.is_some() {
        capture_links(&h, &clients, &work)?
    } else {
        Vec::new()
    };
    write_private(&work.join("h.toml"), &hub_cfg)?;
    let mut dh = Daemon::start(&h, &opts.run.exe, &work.join("h.toml"), &work.join("h.log"))?;
    let mut dcs = Vec::new();
    for (k, (c, text)) in clients.iter().zip(&client_cfgs).enumerate() {
        let path = work.join(format!("c{}.toml", k + 1));
        write_private(&path, text)?;
        dcs.push(Some(Daemon::start(
            c,
            &opts.run.exe,
            &path,
            &work.join(format!("c{}.log", k + 1)),
        )?));
    }
    if taps.is_some() {
        super::export_esp_sa(&work.join("state-h/control.sock"), &work.join("esp_sa"))?;
    }
    report.check(
        "hub up with MASQUERADE installed",
        rules_of(&h).contains("-A ESPIP-espip0-POST -s 192.168.0.0/24 ! -o espip0 -j MASQUERADE"),
        format!(
            "{} espip rule lines on H",
            rules_of(&h).lines().filter(|l| l.contains("ESPIP")).count()
        ),
    );

    pairs_check(&mut report, &h, &clients);

    internet_check(&mut report, &opts.run.exe, &i, &clients[0])?;

    // A client that goes away does not disturb the others.
    if let Some(mut d) = dcs[1].take() {
        d.stop()?;
    }
    let (ok13, _) = ping(&clients[0], "192.168.0.13");
    let (ok12, _) = ping(&clients[0], "192.168.0.12");
    report.check(
        "with c2 stopped, c1 and c3 still talk",
        ok13 && !ok12,
        format!(
            "c1->c3 {}, c1->c2 {}",
            if ok13 { "ok" } else { "FAIL" },
            if ok12 {
                "answers?!"
            } else {
                "silent, as expected"
            }
        ),
    );

    for l in links {
        super::stop_capture(l);
    }
    if opts.run.keep {
        let mut namespaces = clients;
        namespaces.extend([h, i, sw]);
        report.keep_running(namespaces, &work, (dh, dcs));
        return Ok(report);
    }
    let mut clean = dh.stop()?;
    for d in dcs.iter_mut().flatten() {
        clean &= d.stop()?;
    }
    let left = rules_of(&h).contains("ESPIP");
    let relayed: u64 = log_field(&dh.log(), "drop totals", "relayed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fwd = netns::run(h.command("sysctl").args(["-n", "net.ipv4.ip_forward"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    // 6 directed pairs x 3 echo requests, each relayed once as request and once as reply.
    report.check(
        "clean stop; the hub's relay counter",
        clean && !left && fwd == "0" && relayed >= 6 * 3 * 2,
        format!(
            "rules {}; H ip_forward back to {fwd}; H relayed {relayed} packets between clients",
            if left { "LEFT" } else { "removed" }
        ),
    );
    report.notes.push(format!(
        "H: drops [{}]",
        log_field(&dh.log(), "drop totals", "drops").unwrap_or_default()
    ));
    report.finish_work(
        &work,
        keep_work,
        "configs, logs, h.pcap (hub link), wan.pcap, c1-c3.pcap (client links), host-*/ (the daemons' inner and outer taps), esp_sa (see docs/captures.md)",
    );
    Ok(report)
}

/// The hub lab's hosts: a switch, hub H on it with a WAN link to the internet host I, and
/// the clients on the switch.
fn hosts() -> io::Result<(Netns, Netns, Netns, Vec<Netns>)> {
    let sw = Netns::new("hub", "sw")?;
    netns::bridge(&sw, "br0")?;
    let h = Netns::new("hub", "h")?;
    let i = Netns::new("hub", "inet")?;
    netns::plug(&h, "eth0", "172.16.0.1/24", &sw, "br0", "p-h")?;
    netns::veth(&h, "198.51.100.1/24", &i, "198.51.100.2/24", "wan0")?;
    let clients: Vec<Netns> = (1..=CLIENTS)
        .map(|n| Netns::new("hub", &format!("c{n}")))
        .collect::<Result<_, _>>()?;
    for (k, c) in clients.iter().enumerate() {
        netns::plug(
            c,
            "eth0",
            &format!("172.16.0.{}/24", 11 + k),
            &sw,
            "br0",
            &format!("p-c{}", k + 1),
        )?;
    }
    Ok((sw, h, i, clients))
}

/// Captures of the hub's two links and each client's link.
fn capture_links(
    h: &Netns,
    clients: &[Netns],
    work: &Path,
) -> io::Result<Vec<std::process::Child>> {
    let mut links = Vec::new();
    links.push(super::start_capture(h, "eth0", &work.join("h.pcap"))?);
    links.push(super::start_capture(h, "wan0", &work.join("wan.pcap"))?);
    for (k, c) in clients.iter().enumerate() {
        links.push(super::start_capture(
            c,
            "eth0",
            &work.join(format!("c{}.pcap", k + 1)),
        )?);
    }
    Ok(links)
}

/// Every pair of clients pings through the hub, which relays inside the daemon (its kernel
/// forwards nothing).
fn pairs_check(report: &mut Report, h: &Netns, clients: &[Netns]) {
    let forwarded_before = nstat(h, "IpForwDatagrams");
    let mut all = true;
    let mut lines = Vec::new();
    for (a, from) in clients.iter().enumerate() {
        for b in 0..CLIENTS as usize {
            if a != b {
                let (ok, _) = ping(from, &format!("192.168.0.{}", 11 + b));
                all &= ok;
                lines.push(format!(
                    "c{}->c{} {}",
                    a + 1,
                    b + 1,
                    if ok { "ok" } else { "FAIL" }
                ));
            }
        }
    }
    report.check(
        "every pair of clients pings through the hub",
        all,
        lines.join(", "),
    );
    let forwarded = nstat(h, "IpForwDatagrams") - forwarded_before;
    report.check(
        "the hub relayed inside the daemon, not through its kernel",
        forwarded == 0,
        format!("H's kernel forwarded {forwarded} datagrams during the pings"),
    );
}

/// A client fetches a page from the internet host, which sees the hub's address (the hub
/// masquerades its clients).
fn internet_check(report: &mut Report, exe: &Path, i: &Netns, c1: &Netns) -> io::Result<()> {
    let mut server = super::http_server(i, exe, "198.51.100.2:80", "I")?;
    let (ok, body) = curl(c1, "http://198.51.100.2/");
    report.check(
        "c1 fetches a page from the internet host, which sees H's address",
        ok && body.contains("you are 198.51.100.1"),
        body,
    );
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}
