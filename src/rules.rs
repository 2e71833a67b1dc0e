//! The netfilter rules of the NAT helper, from one source: the daemon executes these commands
//! (`RulesMode::Apply`) and `espip rules` prints them as the shell scripts shipped in
//! `iptables/`. Nothing else writes rules.
//!
//! All rules live in espip's own chains, `ESPIP-<interface>` (nat) and `ESPIP-<interface>-MSS`
//! (mangle), reached by one jump each from OUTPUT / POSTROUTING tagged with the comment
//! `espip:<interface>`. Removal deletes only those jumps and chains, never a user's rules.

use crate::config::{Config, RulesMode};
use crate::datapath::EncapSpec;
use std::net::IpAddr;

pub use crate::sys::iptables::IptCmd;

fn cmd(may_fail: bool, args: &[&str]) -> IptCmd {
    IptCmd {
        args: args.iter().map(|s| s.to_string()).collect(),
        may_fail,
    }
}

/// The nat chain of an interface.
pub fn nat_chain(iface: &str) -> String {
    format!("ESPIP-{iface}")
}

/// The mangle chain of an interface.
pub fn mss_chain(iface: &str) -> String {
    format!("ESPIP-{iface}-MSS")
}

/// The nat POSTROUTING chain of an interface (MASQUERADE).
pub fn post_chain(iface: &str) -> String {
    format!("ESPIP-{iface}-POST")
}

/// The comment that tags espip's jump rules.
pub fn tag(iface: &str) -> String {
    format!("espip:{iface}")
}

/// Commands that remove every rule espip installs for `iface` (each may find nothing).
pub fn remove(iface: &str) -> Vec<IptCmd> {
    let (nat, mss, post, tag) = (
        nat_chain(iface),
        mss_chain(iface),
        post_chain(iface),
        tag(iface),
    );
    let mut out = Vec::new();
    for (table, hook, chain) in [
        ("nat", "OUTPUT", &nat),
        ("mangle", "POSTROUTING", &mss),
        ("nat", "POSTROUTING", &post),
    ] {
        out.push(cmd(
            true,
            &[
                "-t",
                table,
                "-D",
                hook,
                "-m",
                "comment",
                "--comment",
                &tag,
                "-j",
                chain,
            ],
        ));
        out.push(cmd(true, &["-t", table, "-F", chain]));
        out.push(cmd(true, &["-t", table, "-X", chain]));
    }
    out
}

/// The rules of `cfg` in commented sections (without the leading removal).
fn sections(cfg: &Config) -> Vec<(&'static str, Vec<IptCmd>)> {
    let iface = &cfg.interface.name;
    let (nat, mss, post, tag) = (
        nat_chain(iface),
        mss_chain(iface),
        post_chain(iface),
        tag(iface),
    );
    let mut out = Vec::new();
    if !cfg.nat.maps.is_empty() {
        let mut dnat = vec![cmd(false, &["-t", "nat", "-N", &nat])];
        // The tunnel's own packets to a peer's real address must not be moved into the alias.
        let protos = tunnel_protocols(cfg);
        for m in &protos {
            let mut args = vec!["-t", "nat", "-A", &nat];
            args.extend(m.iter().map(String::as_str));
            args.extend(["-j", "RETURN"]);
            dnat.push(cmd(false, &args));
        }
        dnat.extend(alias_maps(cfg, &nat));
        dnat.push(jump("nat", "OUTPUT", &tag, &nat));
        out.push((
            "Locally generated packets to a peer's real address are moved into its alias\n#    (DNAT), which is routed to the TUN; the tunnel's own packets are left alone.",
            dnat,
        ));
        // Sockets chose their MSS for the LAN's MTU before the DNAT moved them into the tunnel.
        out.push((
            "Clamp the TCP MSS of SYNs leaving through the tunnel to its MTU.",
            vec![
                cmd(false, &["-t", "mangle", "-N", &mss]),
                cmd(
                    false,
                    &[
                        "-t",
                        "mangle",
                        "-A",
                        &mss,
                        "-o",
                        iface,
                        "-p",
                        "tcp",
                        "--tcp-flags",
                        "SYN,RST",
                        "SYN",
                        "-j",
                        "TCPMSS",
                        "--clamp-mss-to-pmtu",
                    ],
                ),
                jump("mangle", "POSTROUTING", &tag, &mss),
            ],
        ));
    }
    if !cfg.nat.masquerade.is_empty() {
        let mut m = vec![cmd(false, &["-t", "nat", "-N", &post])];
        for p in &cfg.nat.masquerade {
            m.push(cmd(
                false,
                &[
                    "-t",
                    "nat",
                    "-A",
                    &post,
                    "-s",
                    &p.to_string(),
                    "!",
                    "-o",
                    iface,
                    "-j",
                    "MASQUERADE",
                ],
            ));
        }
        m.push(jump("nat", "POSTROUTING", &tag, &post));
        out.push((
            "Tunnel clients leaving through another interface take this host's address\n#    (MASQUERADE), so the hosts they reach can answer.",
            m,
        ));
    }
    out
}
/// The jump from a built-in chain (`hook` of `table`) to espip's `chain`, tagged with the
/// interface's comment so removal finds it.
fn jump(table: &str, hook: &str, tag: &str, chain: &str) -> IptCmd {
    cmd(
        false,
        &[
            "-t",
            table,
            "-A",
            hook,
            "-m",
            "comment",
            "--comment",
            tag,
            "-j",
            chain,
        ],
    )
}

/// The tunnel's own packets, as iptables matches (ESP, ESP in UDP to a port, IP-in-IP): they go
/// to a peer's real address and must not be moved into the alias.
fn tunnel_protocols(cfg: &Config) -> Vec<Vec<String>> {
    let mut protos: Vec<Vec<String>> = Vec::new();
    for p in &cfg.peers {
        match p.encap {
            EncapSpec::Esp {
                udp_port: Some(port),
                ..
            }
            | EncapSpec::EspPending {
                udp_port: Some(port),
                ..
            } => protos.push(vec![
                "-p".into(),
                "udp".into(),
                "--dport".into(),
                port.to_string(),
            ]),
            EncapSpec::Esp { .. } | EncapSpec::EspPending { .. } => {
                protos.push(vec!["-p".into(), "esp".into()])
            }
            EncapSpec::IpIp => {
                protos.push(vec!["-p".into(), "4".into()]);
                protos.push(vec!["-p".into(), "41".into()]);
            }
        }
    }
    protos.sort();
    protos.dedup();
    protos
}

/// The DNAT (a host) or NETMAP (a prefix) of each peer's allowed prefix on the LAN into its
/// alias.
fn alias_maps(cfg: &Config, nat: &str) -> Vec<IptCmd> {
    let mut dnat = Vec::new();
    for p in &cfg.peers {
        for a in &p.allowed_ips {
            let inside = cfg
                .nat
                .maps
                .iter()
                .any(|m| m.real.contains(a.addr()) && a.len() >= m.real.len());
            let (true, Some(IpAddr::V4(alias))) = (inside, cfg.nat_table().to_alias(a.addr()))
            else {
                continue;
            };
            let dst = a.to_string();
            if a.len() == 32 {
                dnat.push(cmd(
                    false,
                    &[
                        "-t",
                        "nat",
                        "-A",
                        nat,
                        "-d",
                        &dst,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &alias.to_string(),
                    ],
                ));
            } else {
                let to = format!("{alias}/{}", a.len());
                dnat.push(cmd(
                    false,
                    &[
                        "-t", "nat", "-A", nat, "-d", &dst, "-j", "NETMAP", "--to", &to,
                    ],
                ));
            }
        }
    }
    dnat
}

/// Commands that install the rules of `cfg` (after removing stale ones). Empty when the
/// configuration needs no rules.
pub fn apply(cfg: &Config) -> Vec<IptCmd> {
    let secs = sections(cfg);
    if secs.is_empty() {
        return Vec::new();
    }
    let mut out = remove(&cfg.interface.name);
    for (_, cmds) in secs {
        out.extend(cmds);
    }
    out
}

/// `a` as one POSIX shell word: as is when every character is one no shell treats specially,
/// else in single quotes (a quote inside becomes `'\''`). Every argument of a printed script
/// goes through this, so no configured name can add shell syntax.
pub fn shell_word(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:,=@%+".contains(&b));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn render(cmds: &[IptCmd]) -> String {
    let mut s = String::new();
    for c in cmds {
        s.push_str("iptables");
        for a in &c.args {
            s.push(' ');
            s.push_str(&shell_word(a));
        }
        if c.may_fail {
            s.push_str(" 2>/dev/null || true");
        }
        s.push('\n');
    }
    s
}

/// The shell script that installs (or, with `removing`, removes) the rules of `cfg`, as
/// `espip rules` prints it and `iptables/` ships it.
pub fn script(cfg: &Config, removing: bool) -> String {
    let iface = &cfg.interface.name;
    let maps: Vec<String> = cfg
        .nat
        .maps
        .iter()
        .map(|m| format!("{} <-> {}", m.real, m.alias))
        .chain(cfg.nat.masquerade.iter().map(|p| format!("masquerade {p}")))
        .collect();
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# espip NAT helper rules for interface {iface} ({}).\n",
        if maps.is_empty() {
            "nothing configured".to_string()
        } else {
            maps.join(", ")
        }
    ));
    s.push_str("# Generated by `espip rules`; the daemon runs exactly these commands when [nat] rules = \"apply\".\n");
    s.push_str(&format!(
        "# Everything lives in chains {}, {} (nat) and {} (mangle), reached by jumps\n# tagged with the comment {}; nothing else is touched. Safe to run twice.\nset -e\n",
        nat_chain(iface),
        post_chain(iface),
        mss_chain(iface),
        tag(iface)
    ));
    if removing {
        s.push_str("\n# Remove the jumps, then empty and delete espip's chains.\n");
        s.push_str(&render(&remove(iface)));
        return s;
    }
    let secs = sections(cfg);
    if secs.is_empty() {
        s.push_str("\n# No [[nat.map]] and no masquerade: nothing to install.\n");
        return s;
    }
    s.push_str("\n# 1. Remove what an earlier run left (idempotence).\n");
    s.push_str(&render(&remove(iface)));
    for (i, (comment, cmds)) in secs.iter().enumerate() {
        s.push_str(&format!("\n# {}. {comment}\n", i + 2));
        s.push_str(&render(cmds));
    }
    if !cfg.nat.maps.is_empty() {
        s.push_str(&format!(
            "\n# The daemon also routes {} to {iface} (over netlink) while it runs:\n",
            cfg.nat
                .maps
                .iter()
                .map(|m| m.alias.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for m in &cfg.nat.maps {
            s.push_str(&format!("#   ip route replace {} dev {iface}\n", m.alias));
        }
    }
    s
}

/// True when the daemon installs rules for this configuration.
pub fn daemon_applies(cfg: &Config) -> bool {
    cfg.nat.rules == RulesMode::Apply && !sections(cfg).is_empty()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_unsafe_argument_is_one_quoted_word() {
        use super::shell_word;
        assert_eq!(shell_word("ESPIP-espip0"), "ESPIP-espip0");
        assert_eq!(shell_word("10.0.1.0/24"), "10.0.1.0/24");
        assert_eq!(shell_word("!"), "'!'");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("x;id"), "'x;id'");
        assert_eq!(shell_word("$(id)"), "'$(id)'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }

    use super::*;
    use crate::sa::{Cipher, KeyMaterial};

    /// The configuration of host A of the same-lan lab, with fixed keys.
    pub(crate) fn lab_a() -> Config {
        let keys = espip_lab::p2p::LabKeys {
            a_to_b: KeyMaterial::new(Cipher::Aes128Gcm, &[1; 20]).unwrap(),
            b_to_a: KeyMaterial::new(Cipher::Aes128Gcm, &[2; 20]).unwrap(),
        };
        let text = espip_lab::same_lan::config_text(
            true,
            Cipher::Aes128Gcm,
            &keys,
            std::path::Path::new("/tmp"),
        );
        Config::parse(&text, std::path::Path::new(".")).unwrap()
    }

    /// The scripts in iptables/ are exactly what `espip rules` prints for the lab's host A, so
    /// the shipped scripts and the daemon cannot drift apart.
    #[test]
    fn shipped_scripts_match_the_generator() {
        let cfg = lab_a();
        assert_eq!(script(&cfg, false), include_str!("../iptables/same-lan.sh"));
        assert_eq!(
            script(&cfg, true),
            include_str!("../iptables/same-lan-remove.sh")
        );
    }

    #[test]
    fn apply_starts_with_removal_and_tags_every_jump() {
        let cfg = lab_a();
        let cmds = apply(&cfg);
        assert_eq!(&cmds[..9], &remove("espip0")[..]);
        let jumps: Vec<_> = cmds
            .iter()
            .filter(|c| c.args[2] == "-A" && (c.args[3] == "OUTPUT" || c.args[3] == "POSTROUTING"))
            .collect();
        assert_eq!(jumps.len(), 2);
        assert!(jumps
            .iter()
            .all(|c| c.args.contains(&"espip:espip0".to_string())));
        assert!(cmds.iter().any(|c| c.args.join(" ")
            == "-t nat -A ESPIP-espip0 -d 10.0.0.160/32 -j DNAT --to-destination 10.0.1.160"));
        assert!(cmds
            .iter()
            .any(|c| c.args.join(" ") == "-t nat -A ESPIP-espip0 -p esp -j RETURN"));
    }
}
