//! Namespace test of an IKEv2 responder whose peers have no `endpoint` (issue 29; strongSwan's
//! `remote_addrs = %any`): two initiators at addresses the server's configuration does not
//! name each get the peer their identity (IDi) names, with that peer's pre-shared key; a third
//! that claims one of those identities without its key gets nothing and disturbs nothing.

mod common;
use common::*;
use espip_lab::netns::{bridge, plug};
use std::time::{Duration, Instant};

const SERVER_OUTER: &str = "192.0.2.2";
const SERVER_INNER: &str = "10.4.2.5";

/// A client: its namespace name suffix, outer and inner address, identity, key file.
struct Client {
    host: &'static str,
    outer: &'static str,
    inner: &'static str,
    id: &'static str,
    psk: &'static str,
}

const ALICE: Client = Client {
    host: "alice",
    outer: "192.0.2.1",
    inner: "10.4.2.99",
    id: "alice.lab",
    psk: "psk-alice",
};
const BOB: Client = Client {
    host: "bob",
    outer: "192.0.2.3",
    inner: "10.4.2.98",
    id: "bob.lab",
    psk: "psk-bob",
};
/// Claims alice's identity with a key of its own.
const MALLORY: Client = Client {
    host: "mallory",
    outer: "192.0.2.4",
    inner: "10.4.2.97",
    id: "alice.lab",
    psk: "psk-mallory",
};

struct Lab {
    ns: Vec<(String, Netns)>,
    daemons: Vec<(String, Daemon)>,
    dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, d) in &mut self.daemons {
            let _ = d.stop();
        }
        if std::env::var_os("ESPIP_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Lab {
    fn ns(&self, host: &str) -> &Netns {
        &self.ns.iter().find(|(h, _)| h == host).unwrap().1
    }

    fn ctl(&self, host: &str) -> PathBuf {
        self.dir.join(format!("state-{host}/control.sock"))
    }

    fn start(&mut self, host: &str, text: &str) {
        let cfg = self.dir.join(format!("{host}.toml"));
        write_private(&cfg, text);
        let d = Daemon::start(
            self.ns(host),
            &exe(),
            &cfg,
            &self.dir.join(format!("{host}.log")),
        )
        .unwrap();
        self.daemons.push((host.to_string(), d));
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (h, _) in &self.daemons {
            s += &format!(
                "--- {h}.log\n{}\n",
                std::fs::read_to_string(self.dir.join(format!("{h}.log"))).unwrap_or_default()
            );
        }
        s
    }
}

fn interface(inner: &str, outer: &str, state: &Path) -> String {
    format!(
        "[interface]\nname = \"espip0\"\naddress = [\"{inner}/24\"]\nlocal = \"{outer}\"\nstate_dir = \"{}\"\ncontrol = \"{}\"\n",
        state.display(),
        state.join("control.sock").display()
    )
}

fn ike_peer(name: &str, endpoint: Option<&str>, allowed: &str, role: &str, c: &Client) -> String {
    let (local_id, remote_id) = if role == "initiator" {
        (c.id, "server.lab")
    } else {
        ("server.lab", c.id)
    };
    format!(
        "[[peer]]\nname = \"{name}\"\n{}allowed_ips = [\"{allowed}/32\"]\nmode = \"esp-udp\"\nkeying = \"ikev2\"\nrole = \"{role}\"\npsk_file = \"{}\"\nlocal_id = \"{local_id}\"\nremote_id = \"{remote_id}\"\nike_proposals = [\"aes128gcm16-prfsha256-x25519\"]\nesp_proposals = [\"aes128gcm16-esn\"]\ndpd_interval = 3\n",
        endpoint.map_or(String::new(), |e| format!("endpoint = \"{e}\"\n")),
        c.psk
    )
}

fn client_config(c: &Client, dir: &Path) -> String {
    interface(c.inner, c.outer, &dir.join(format!("state-{}", c.host)))
        + &ike_peer("server", Some(SERVER_OUTER), SERVER_INNER, "initiator", c)
}

/// (peer, "ike SPIs") of every established IKE SA the daemon at `ctl` shows.
fn established(ctl: &Path) -> Vec<(String, String)> {
    ike_sas(ctl)
        .into_iter()
        .filter(|(_, sa, state)| sa.starts_with("ike ") && state == "established")
        .map(|(peer, sa, _)| (peer, sa))
        .collect()
}

fn pings(ns: &Netns, to: &str) -> bool {
    ns.command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", to])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_responder_without_endpoints_finds_each_initiator_by_its_identity() {
    let Some(_g) = serial() else { return };
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let tag = "ikeid";
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lab = Lab {
        ns: Vec::new(),
        daemons: Vec::new(),
        dir: dir.clone(),
    };
    let sw = Netns::new(tag, "sw").unwrap();
    bridge(&sw, "br0").unwrap();
    for (i, (host, outer)) in [
        ("server", SERVER_OUTER),
        (ALICE.host, ALICE.outer),
        (BOB.host, BOB.outer),
        (MALLORY.host, MALLORY.outer),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = Netns::new(tag, host).unwrap();
        plug(
            &ns,
            "veth0",
            &format!("{outer}/24"),
            &sw,
            "br0",
            &format!("p{i}"),
        )
        .unwrap();
        lab.ns.push((host.to_string(), ns));
    }
    lab.ns.push(("sw".into(), sw));
    for (file, key) in [
        ("psk-alice", "alice-and-server-share-this-key-0123"),
        ("psk-bob", "bob-and-server-share-another-key-4567"),
        ("psk-mallory", "mallory-guesses-a-key-of-her-own-89ab"),
    ] {
        write_private(&dir.join(file), &format!("{key}\n"));
    }

    // The server names no client address: two responders found by identity.
    let server = interface(SERVER_INNER, SERVER_OUTER, &dir.join("state-server"))
        + &ike_peer("alice", None, ALICE.inner, "responder", &ALICE)
        + &ike_peer("bob", None, BOB.inner, "responder", &BOB);
    lab.start("server", &server);
    for c in [&ALICE, &BOB] {
        lab.start(c.host, &client_config(c, &dir));
    }
    let up = wait(Duration::from_secs(20), || {
        let s = established(&lab.ctl("server"));
        ["alice", "bob"]
            .iter()
            .all(|p| s.iter().any(|(q, _)| q == p))
            && !established(&lab.ctl("alice")).is_empty()
            && !established(&lab.ctl("bob")).is_empty()
    });
    assert!(
        up,
        "the server did not give alice and bob their peers:\n{}",
        lab.logs()
    );
    // The server first: it knows where each client is from its IKE_AUTH, before any ESP.
    for c in [&ALICE, &BOB] {
        assert!(
            pings(lab.ns("server"), c.inner),
            "the server cannot reach {} (its address learned from IKE_AUTH):\n{}",
            c.host,
            lab.logs()
        );
        assert!(
            pings(lab.ns(c.host), SERVER_INNER),
            "{} cannot reach the server through its CHILD_SA:\n{}",
            c.host,
            lab.logs()
        );
    }
    // Each got its own peer: alice's IKE SA is on peer alice, bob's on bob.
    let before = established(&lab.ctl("server"));
    let alice_sa = before.iter().find(|(p, _)| p == "alice").unwrap().1.clone();
    let alice_side = established(&lab.ctl("alice"));
    assert_eq!(
        alice_side[0].1, alice_sa,
        "alice's IKE SA is not the one the server holds for peer alice"
    );

    // Mallory claims alice's identity without alice's key.
    lab.start(MALLORY.host, &client_config(&MALLORY, &dir));
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        established(&lab.ctl("mallory")).is_empty(),
        "mallory got an IKE SA with alice's identity and another key:\n{}",
        lab.logs()
    );
    let after = established(&lab.ctl("server"));
    assert!(
        after.iter().any(|(p, s)| p == "alice" && *s == alice_sa),
        "mallory's attempt moved alice's IKE SA: before {before:?}, after {after:?}"
    );
    assert!(
        pings(lab.ns(ALICE.host), SERVER_INNER) && pings(lab.ns("server"), ALICE.inner),
        "alice lost the tunnel to mallory's attempt:\n{}",
        lab.logs()
    );
    // The lobby answered every IKE_SA_INIT (alice, bob, mallory's tries) and shows it.
    let st = status_at(&lab.ctl("server"));
    let lobby = st
        .ike
        .iter()
        .find(|p| p.peer == "(responders without endpoint)")
        .expect("the lobby in espip show");
    assert!(lobby.responses >= 3, "{lobby:?}");
    assert!(lobby.remote_id.contains("alice.lab") && lobby.remote_id.contains("bob.lab"));
    let alice = st.ike.iter().find(|p| p.peer == "alice").unwrap();
    assert!(
        alice
            .failures
            .iter()
            .any(|(f, n)| f == "AUTHENTICATION_FAILED" && *n >= 1),
        "mallory's failure is alice's: {alice:?}"
    );
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(
        log.contains("authentication_failed") || log.contains("AUTHENTICATION_FAILED"),
        "the server did not log mallory's failed IKE_AUTH:\n{log}"
    );
}

/// An IKEv2 pair whose initiator moves (issue 29's roaming with IKEv2, without MOBIKE): B, a
/// responder without endpoint, follows A's IKE SA by its SPIs and A's ESP by the data path's
/// endpoint learning; the IKE SA and CHILD_SA stay the same across both moves.
#[test]
fn an_ikev2_initiator_that_moves_keeps_its_sas_with_a_responder_without_endpoint() {
    use espip_lab::ike::{pair_config, LAB_PSK};
    use espip_lab::p2p::{A_INNER, A_OUTER, B_INNER};
    let Some(_g) = serial() else { return };
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let tag = "ikeroam";
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = p2p::topology(tag).unwrap();
    let mut lab = Lab {
        ns: vec![("a".into(), a), ("b".into(), b)],
        daemons: Vec::new(),
        dir: dir.clone(),
    };
    write_private(&dir.join("psk"), &format!("{LAB_PSK}\n"));
    // B is started first; A's source follows its address (no `local`), B names no address
    // of A.
    for (me_a, host, drop) in [(false, "b", "endpoint ="), (true, "a", "local =")] {
        let text: String = pair_config(me_a, &dir.join(format!("state-{host}")), 3)
            .lines()
            .filter(|l| !l.starts_with(drop))
            .map(|l| format!("{l}\n"))
            .collect();
        lab.start(host, &text);
    }
    let up = wait(Duration::from_secs(15), || {
        !established(&lab.ctl("a")).is_empty() && !established(&lab.ctl("b")).is_empty()
    });
    assert!(up, "no IKE SA within 15 s:\n{}", lab.logs());
    assert!(pings(lab.ns("b"), A_INNER), "{}", lab.logs());
    let sa = established(&lab.ctl("b"));
    let mut from = A_OUTER.to_string();
    for to in ["192.0.2.11", "192.0.2.12"] {
        let a = lab.ns("a");
        a.ip(&["addr", "del", &format!("{from}/24"), "dev", "veth0"])
            .unwrap();
        a.ip(&["addr", "add", &format!("{to}/24"), "dev", "veth0"])
            .unwrap();
        let start = Instant::now();
        let answered = wait(Duration::from_secs(10), || {
            a.command("ping")
                .args(["-c", "1", "-W", "0.05", B_INNER])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert!(
            answered,
            "no answer 10 s after A moved to {to}:\n{}",
            lab.logs()
        );
        eprintln!(
            "{tag}: after the move to {to}, the first ping answered in {:?}",
            start.elapsed()
        );
        assert!(
            pings(lab.ns("b"), A_INNER),
            "B cannot reach A at {to}:\n{}",
            lab.logs()
        );
        from = to.to_string();
    }
    // Past a dead peer detection interval (3 s) on both sides: still the same IKE SA, now
    // heard from A's new address.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        established(&lab.ctl("b")),
        sa,
        "B's IKE SA changed:\n{}",
        lab.logs()
    );
    assert!(pings(lab.ns("a"), B_INNER), "{}", lab.logs());
    let st = status_at(&lab.ctl("b"));
    assert!(
        st.peers[0].endpoint.starts_with("192.0.2.12"),
        "B's endpoint for A: {:?}",
        st.peers[0].endpoint
    );
}
