//! Namespace tests: The NAT helper's netfilter rules: they survive a SIGKILL until the next start removes them, user rules are untouched, wrong same-LAN setups get clear errors.
//! Shared harness in `common/`; see its documentation for the rules (root, namespace
//! names, cleanup).

mod common;
#[allow(unused_imports)]
use common::*;

fn same_lan_host(tag: &str) -> (Netns, Netns, PathBuf) {
    let a = Netns::new(tag, "a").unwrap();
    let b = Netns::new(tag, "b").unwrap();
    netns::veth(&a, "10.0.0.161/24", &b, "10.0.0.160/24", "lan0").unwrap();
    let keys = LabKeys::generate(Cipher::Aes128Gcm).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.toml"),
        espip_lab::same_lan::config_text(true, Cipher::Aes128Gcm, &keys, &dir.join("state")),
    )
    .unwrap();
    (a, b, dir)
}

fn espip_rules(ns: &Netns) -> Vec<String> {
    let out = netns::run(&mut ns.command("iptables-save")).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.to_lowercase().contains("espip"))
        .map(String::from)
        .collect()
}

#[test]
fn rules_survive_sigkill_until_restart_and_user_rules_are_untouched() {
    let Some(_g) = serial() else { return };
    let (a, _b, dir) = same_lan_host("rules");
    let user_rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.77/32",
        "-j",
        "RETURN",
    ];
    netns::run_ok(a.command("iptables").args(user_rule)).unwrap();
    let cfg = dir.join("a.toml");
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("1.log")).unwrap();
    let installed = espip_rules(&a);
    assert!(installed.len() >= 7, "{installed:?}");
    // SIGKILL: the TUN and its routes go with the process, the rules stay...
    d.stop_with(nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!a.has_link("espip0"));
    assert_eq!(
        espip_rules(&a),
        installed,
        "netfilter rules outlive a SIGKILL"
    );
    // ...until the next start, which removes them before installing its own (no duplicates).
    let mut d = Daemon::start(&a, &exe(), &cfg, &dir.join("2.log")).unwrap();
    assert_eq!(
        espip_rules(&a),
        installed,
        "restart replaced the stale rules, no duplicates"
    );
    assert!(d.stop().unwrap());
    assert!(espip_rules(&a).is_empty(), "stop removes every espip rule");
    assert!(!a.has_link("espip0"));
    let save =
        String::from_utf8_lossy(&netns::run(&mut a.command("iptables-save")).unwrap().stdout)
            .into_owned();
    assert!(
        save.contains("-A OUTPUT -d 192.0.2.77/32 -j RETURN"),
        "the user's rule survives:\n{save}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_same_lan_setups_get_clear_errors() {
    let Some(_g) = serial() else { return };
    let (a, _b, dir) = same_lan_host("wrong");
    let cfg = dir.join("a.toml");
    // The alias prefix is on-link.
    a.ip(&["addr", "add", "10.0.1.5/24", "dev", "lan0"])
        .unwrap();
    let e = Daemon::start(&a, &exe(), &cfg, &dir.join("onlink.log"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("alias 10.0.1.0/24 is on-link") && e.contains("lan0"),
        "{e}"
    );
    a.ip(&["addr", "del", "10.0.1.5/24", "dev", "lan0"])
        .unwrap();
    // No iptables on PATH: the error names the package, and nothing is left behind.
    let log = dir.join("noipt.log");
    let out = netns::run(
        a.command("/usr/bin/env")
            .arg("PATH=/nonexistent")
            .arg(exe())
            .args(["run", "--config"])
            .arg(&cfg),
    )
    .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("apt-get install iptables"),
        "{msg}"
    );
    assert!(!a.has_link("espip0"));
    assert!(espip_rules(&a).is_empty());
    let _ = (log, std::fs::remove_dir_all(&dir));
}
