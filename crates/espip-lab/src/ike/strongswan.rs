//! `espip lab strongswan`: espip against strongSwan's charon, keyed by IKEv2, with rekeys by
//! both sides under load, dead peer detection, DELETE on stop, a wrong key, and the capture
//! decrypted with both sides' keys.

use super::*;

/// A charon in its namespace with a private /run, stopped when dropped.
pub(super) struct Charon {
    child: Option<Child>,
    vici: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Where this charon's lines start in the log (kept across restarts: appended).
    log_from: u64,
}

impl Charon {
    pub(super) fn start(ns: &Netns, dir: &Path) -> io::Result<Charon> {
        let rt = dir.join("rt");
        std::fs::create_dir_all(&rt)?;
        let vici = rt.join("charon.vici");
        let _ = std::fs::remove_file(&vici);
        let conf = dir.join("strongswan.conf");
        let log = dir.join("charon.log");
        let log_from = std::fs::metadata(&log).map_or(0, |m| m.len());
        let child = ns
            .command("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /run && exec env STRONGSWAN_CONF={} /usr/lib/ipsec/charon",
                rt.display(),
                conf.display()
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("charon.stdout"))?)
            .stderr(Stdio::null())
            .spawn()?;
        let mut c = Charon {
            child: Some(child),
            vici,
            conf,
            log,
            log_from,
        };
        if !wait_for(|| c.vici.exists(), Duration::from_secs(10)) {
            c.kill();
            return Err(io::Error::other(
                "strongSwan's charon did not open its vici socket within 10 s (see charon.stdout)",
            ));
        }
        let out = c.swanctl(&[
            "--load-all",
            "--file",
            &dir.join("swanctl.conf").display().to_string(),
        ])?;
        if !out.contains("successfully loaded 1 connections") {
            c.kill();
            return Err(io::Error::other(format!("swanctl --load-all: {out}")));
        }
        Ok(c)
    }

    fn swanctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("swanctl");
        c.args(args)
            .arg("--uri")
            .arg(format!("unix://{}", self.vici.display()))
            .env("STRONGSWAN_CONF", &self.conf);
        c
    }

    pub(super) fn swanctl(&self, args: &[&str]) -> io::Result<String> {
        let out = self.swanctl_command(args).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }

    /// What this charon logged (not an earlier one's lines).
    pub(super) fn log(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(self.log_from).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Rekeys started by both sides at the same moment (`espip rekey` and `swanctl --rekey`,
/// spawned together), CHILD_SA and IKE SA in turn, under 50 pings a second. Whether two
/// requests cross on the wire depends on the moment each leaves; when they do, each side
/// answers the other's and the SA with the lowest nonce is deleted by its maker (RFC 7296
/// sections 2.8.1, 2.8.2). The check: no ping lost, every rekey done; the detail counts the
/// collisions each side resolved.
fn simultaneous_rekeys(
    report: &mut Report,
    sw: &Charon,
    da: &Daemon,
    a: &Netns,
    ctl: &Path,
    exe: &Path,
) -> io::Result<()> {
    const ROUNDS: usize = 8;
    // Which side's new SA stayed, by each side's own log: espip's "the peer's ... stays" is
    // charon's "rekey collision won", espip's "ours ... stays" charon's "rekey collision lost"
    // (or, when espip's DELETE of the old IKE SA reaches charon before the answer to its own
    // request, "peer did not notice IKE_SA rekey collision, abort active rekeying": charon
    // drops its own and keeps espip's).
    let tally = || {
        let (e, c) = (da.log(), sw.log());
        [
            e.matches("the peer's").count(),
            e.matches(": ours").count(),
            c.matches("rekey collision won").count(),
            c.matches("rekey collision lost").count() + c.matches("abort active rekeying").count(),
        ]
    };
    let before = tally();
    let failures = || status(ctl).and_then(|s| s.ike.first().map(|k| k.failures.clone()));
    let failures_before = failures().unwrap_or_default();
    let log_from = da.log().len();
    let sw_log_from = sw.log().len();
    let pinger = ping_train(a, B_INNER, None, 2 * ROUNDS as u64 + 2)?;
    std::thread::sleep(Duration::from_millis(500));
    let (mut espip_ok, mut sw_ok) = (0, 0);
    for round in 0..ROUNDS {
        let ike = round % 2 == 1;
        let mut ours = Command::new(exe);
        ours.args(["rekey", "--socket"]).arg(ctl);
        if ike {
            ours.arg("--ike");
        }
        let theirs = sw.swanctl_command(&["--rekey", if ike { "--ike" } else { "--child" }, "lab"]);
        let spawn = |mut c: Command| c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let (o, t) = (spawn(ours)?, spawn(theirs)?);
        let (o, t) = (o.wait_with_output()?, t.wait_with_output()?);
        if o.status.success() {
            espip_ok += 1;
        }
        if String::from_utf8_lossy(&t.stdout).contains("completed successfully") {
            sw_ok += 1;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let (sent, got) = ping_result(pinger);
    // Both sides settle on the same single CHILD_SA: espip's inbound SPI is strongSwan's
    // outbound one and the other way round, and nothing else is installed on either side.
    let pair = || single_child_pair(ctl, sw);
    let agree = || pair().is_some_and(|(o, t)| o.0 == t.1 && o.1 == t.0);
    let settled = wait_for(agree, Duration::from_secs(10));
    let detail_pair = pair().map_or("no single CHILD_SA on one side".into(), |(o, t)| {
        format!(
            "espip in {} out {}, strongSwan in {} out {}",
            o.0, o.1, t.0, t.1
        )
    });
    let after = tally();
    let [peers_kept, own_kept, sw_won, sw_lost] =
        std::array::from_fn(|i| after[i].saturating_sub(before[i]));
    // Within this check: an expiry in an earlier check is that check's to judge.
    let expired = da
        .log()
        .get(log_from..)
        .is_some_and(|l| l.contains("hard lifetime reached"));
    let ok = sent > 0 && sent == got && espip_ok == ROUNDS && !expired && settled;
    let mut detail = format!(
        "{got} of {sent} pings answered; one CHILD_SA on both sides: {detail_pair}; {ROUNDS} rounds (CHILD_SA and IKE SA in turn), rekeys asked of espip {espip_ok}, of strongSwan {sw_ok} (swanctl --rekey fails when espip's request already put the SA into rekeying); collisions: espip kept strongSwan's SA {peers_kept} times and its own {own_kept} times, charon logged its own kept {sw_won} times and espip's {sw_lost} times; a CHILD_SA past its hard lifetime: {expired}"
    );
    if !ok {
        let failures_after = failures().unwrap_or_default();
        detail.push_str(&collision_diagnosis(
            (da, sw),
            (log_from, sw_log_from),
            &failures_before,
            &failures_after,
        ));
    }
    report.check(
        "rekeys started by both sides at the same moment: none lost, both sides keep the same SA",
        ok,
        detail,
    );
    Ok(())
}
/// The single installed CHILD_SA on both sides, as (espip's inbound, outbound SPI) and
/// (strongSwan's inbound, outbound SPI); `None` unless each side has exactly one.
fn single_child_pair(ctl: &Path, sw: &Charon) -> Option<((String, String), (String, String))> {
    let st = status(ctl)?;
    let k = st.ike.first()?;
    let mut ours = k
        .sas
        .iter()
        .filter(|x| x.kind == "child" && x.state != "deleting" && x.state != "rekeyed");
    let one = ours.next()?;
    if ours.next().is_some() || one.state != "installed" {
        return None;
    }
    let (i, o) = one.spis.split_once(' ')?;
    let ours = (
        i.trim_end_matches("_i").to_string(),
        o.trim_end_matches("_o").to_string(),
    );
    let theirs = strongswan_child(&sw.swanctl(&["--list-sas"]).ok()?)?;
    Some((ours, theirs))
}

/// Why a simultaneous-rekey check failed, for the report (a failure under load is rare and
/// the work directory goes with the lab): espip's IKE failures that grew during the check,
/// and both sides' SA events since the check began.
fn collision_diagnosis(
    (da, sw): (&Daemon, &Charon),
    (log_from, sw_log_from): (usize, usize),
    failures_before: &BTreeMap<String, u64>,
    failures_after: &BTreeMap<String, u64>,
) -> String {
    let mut detail = String::new();
    // A failure under load is rare and the work directory goes with the lab: the SA
    // events of this check from espip's log go into the report, to diagnose it from CI.
    let log = da.log();
    let events: Vec<&str> = log
        .get(log_from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("CHILD_SA") || l.contains("IKE"))
        .collect();
    // What espip refused or dropped meanwhile (a DELETE that never took effect shows
    // up here: invalid_message_id, unknown_ike_spi, unexpected_message...).
    let grew: Vec<String> = failures_after
        .iter()
        .filter_map(|(r, n)| {
            let d = n.saturating_sub(*failures_before.get(r).unwrap_or(&0));
            (d > 0).then(|| format!("{r} {d}"))
        })
        .collect();
    detail.push_str(&format!(
        "\n    espip's IKE failures and dropped messages during the check: {}",
        if grew.is_empty() {
            "none".to_string()
        } else {
            grew.join(", ")
        }
    ));
    detail.push_str("\n    espip's SA events during the check:");
    for l in &events[events.len().saturating_sub(60)..] {
        detail.push_str("\n      ");
        detail.push_str(l);
    }
    // And strongSwan's side of the same minutes: what it sent, received, installed and
    // deleted, and how it resolved collisions.
    let c = sw.log();
    let theirs: Vec<&str> = c
        .get(sw_log_from..)
        .unwrap_or("")
        .lines()
        .filter(|l| {
            [
                "CHILD_SA",
                "collision",
                "rekey",
                "DELETE",
                "sending packet",
                "received packet",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    detail.push_str("\n    charon's events during the check:");
    for l in &theirs[theirs.len().saturating_sub(150)..] {
        detail.push_str("\n      ");
        detail.push_str(l);
    }
    detail
}

/// Every key charon logged (`ike = 4`, `chd = 4`): SK_ei/SK_er of each IKE SA and the ESP
/// "encryption initiator/responder key" (key || salt) of each CHILD_SA, as lowercase hex.
/// charon's worker threads interleave their lines, so a hex dump is followed per thread.
pub(super) fn charon_keys(log: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    // thread -> (bytes wanted, hex so far)
    let mut open: std::collections::HashMap<&str, (usize, String)> = Default::default();
    for line in log.lines() {
        // "06:21:24 16[IKE] Sk_ei secret => 20 bytes @ 0x..." / "06:21:24 16[IKE]    0: 6A 2E ..."
        let mut parts = line.splitn(3, ' ');
        let (Some(_), Some(tag), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some((thread, _)) = tag.split_once('[') else {
            continue;
        };
        let trimmed = msg.trim_start();
        if let Some((want, hex)) = open.get_mut(thread) {
            if let Some((_, dump)) = trimmed
                .split_once(": ")
                .filter(|(n, _)| n.parse::<u32>().is_ok())
            {
                // "6A 2E ... 5F  j.....": the bytes end at the two spaces before the
                // printable column (which may hold a space, so it is cut off first).
                let bytes = dump.split("  ").next().unwrap_or("");
                hex.extend(
                    bytes
                        .split_whitespace()
                        .take_while(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
                        .map(|b| b.to_ascii_lowercase()),
                );
                if hex.len() >= 2 * *want {
                    keys.insert(hex[..2 * *want].to_string());
                    open.remove(thread);
                }
                continue;
            }
            open.remove(thread);
        }
        let named = [
            "Sk_ei secret",
            "Sk_er secret",
            "encryption initiator key",
            "encryption responder key",
        ]
        .iter()
        .any(|n| trimmed.starts_with(n));
        if named {
            if let Some(n) = trimmed
                .split_once("=> ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                open.insert(thread, (n, String::new()));
            }
        }
    }
    keys
}

/// The keys espip wrote (`save_keys`) against the keys strongSwan's charon logged for the same
/// SAs: each side derived them on its own (SKEYSEED, prf+, KEYMAT), so equal keys check the
/// key schedule of RFC 7296 sections 2.14 and 2.17 against an independent implementation.
/// Compared: the SAs that carried messages in the capture. An SA espip made as the responder
/// whose answer charon dropped (see docs/ike.md) was never derived by charon, and never used.
fn key_checks(report: &mut Report, keys: &KeyLog, seen: &Decrypted, charon_log: &Path) {
    let logged = charon_keys(&std::fs::read_to_string(charon_log).unwrap_or_default());
    let hex = |f: &str| {
        f.trim_matches('"')
            .trim_start_matches("0x")
            .to_ascii_lowercase()
    };
    let wire_spis: BTreeSet<String> = seen.spis.iter().map(|s| hex(s)).collect();
    let field = |l: &str, i: usize| l.split(',').nth(i).map(hex).unwrap_or_default();
    let esp_used: Vec<&String> = keys
        .esp
        .iter()
        .filter(|l| wire_spis.contains(&field(l, 3)))
        .collect();
    let ike_used: Vec<&String> = keys
        .ike
        .iter()
        .filter(|l| seen.ike_spis.contains(&field(l, 0)))
        .collect();
    let unused = keys.esp.len() + keys.ike.len() - esp_used.len() - ike_used.len();
    let esp: Vec<String> = esp_used.iter().map(|l| field(l, 5)).collect();
    let ike: Vec<String> = ike_used
        .iter()
        .flat_map(|l| [field(l, 2), field(l, 3)])
        .collect();
    if esp.is_empty() && ike.is_empty() {
        report.notes.push(
            "no key lines to compare with charon's log (ChaCha20-Poly1305 has no Wireshark line)"
                .into(),
        );
        return;
    }
    let esp_eq = esp.iter().filter(|k| logged.contains(*k)).count();
    let ike_eq = ike.iter().filter(|k| logged.contains(*k)).count();
    report.check(
        "espip's keys equal the keys strongSwan derived and logged",
        !logged.is_empty() && esp_eq == esp.len() && ike_eq == ike.len(),
        format!(
            "ESP keys {esp_eq} of {} equal, IKE SK_ei/SK_er {ike_eq} of {} equal, of the SAs that carried messages in the capture ({} key lines of SAs that never did; {} keys in charon's log)",
            esp.len(),
            ike.len(),
            unused,
            logged.len()
        ),
    );
}

/// The SPIs (in, out) of the one INSTALLED CHILD_SA in `swanctl --list-sas` output, if
/// exactly one is installed.
fn strongswan_child(list: &str) -> Option<(String, String)> {
    let mut found = Vec::new();
    let mut lines = list.lines();
    while let Some(l) = lines.next() {
        if !l.contains(", INSTALLED,") {
            continue;
        }
        let (mut i, mut o) = (None, None);
        for m in lines.by_ref().take(4) {
            let mut w = m.split_whitespace();
            match (w.next(), w.next()) {
                (Some("in"), Some(spi)) => i = Some(spi.trim_end_matches(',').to_string()),
                (Some("out"), Some(spi)) => o = Some(spi.trim_end_matches(',').to_string()),
                _ => {}
            }
        }
        found.push((i?, o?));
    }
    (found.len() == 1).then(|| found.remove(0))
}

/// `swanctl --rekey ...` and its outcome as "--child lab: ok" (or FAILED).
fn swanctl_rekey(sw: &Charon, args: &[&str; 3]) -> io::Result<String> {
    let out = sw.swanctl(args)?;
    Ok(format!(
        "{} {}: {}",
        args[1],
        args[2],
        if out.contains("completed successfully") {
            "ok"
        } else {
            "FAILED"
        }
    ))
}

/// strongSwan's configuration for host B: charon with kernel-libipsec (userspace ESP in UDP
/// through a TUN), the key log at level 4, and one connection `lab` / child `lab`.
/// charon's `strongswan.conf` in `dir`: the plugins the lab needs (kernel-libipsec for ESP,
/// kernel-netlink for routes and address events), its vici socket and its log in `dir`.
pub(super) fn charon_conf(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let conf = format!(
        "charon {{\n  load_modular = no\n  load = random nonce openssl gcm aes sha1 sha2 hmac kdf curve25519 chapoly pem pkcs1 pkcs8 x509 pubkey kernel-libipsec kernel-netlink socket-default vici\n  port = 500\n  port_nat_t = 4500\n  install_routes = yes\n  retransmit_tries = 3\n  plugins {{\n    vici {{\n      socket = unix://{}\n    }}\n    kernel-libipsec {{\n      allow_peer_ts = no\n    }}\n  }}\n  filelog {{\n    main {{\n      path = {}\n      time_format = %H:%M:%S\n      append = yes\n      flush_line = yes\n      default = 1\n      ike = 4\n      chd = 4\n      cfg = 1\n      knl = 1\n    }}\n  }}\n}}\nswanctl {{\n  load = pem pkcs1 x509 pubkey random nonce sha1 sha2 aes hmac\n}}\n",
        dir.join("rt/charon.vici").display(),
        dir.join("charon.log").display()
    );
    std::fs::write(dir.join("strongswan.conf"), conf)
}

fn strongswan_files(dir: &Path, ike: &str, esp: &str, psk: &str) -> io::Result<()> {
    charon_conf(dir)?;
    let swanctl = format!(
        "connections {{\n  lab {{\n    version = 2\n    local_addrs = {B_OUTER}\n    remote_addrs = {A_OUTER}\n    proposals = {ike}\n    encap = yes\n    mobike = no\n    dpd_delay = 0\n    rekey_time = 0\n    local {{\n      auth = psk\n      id = b.lab\n    }}\n    remote {{\n      auth = psk\n      id = a.lab\n    }}\n    children {{\n      lab {{\n        local_ts = {B_INNER}/32\n        remote_ts = {A_INNER}/32\n        esp_proposals = {esp}\n        rekey_time = 0\n        start_action = none\n      }}\n    }}\n  }}\n}}\nsecrets {{\n  ike-lab {{\n    id-a = a.lab\n    id-b = b.lab\n    secret = \"{psk}\"\n  }}\n}}\n"
    );
    write_private(&dir.join("swanctl.conf"), &swanctl)
}

/// `espip lab strongswan`.
pub fn run_strongswan(opts: &StrongswanOptions) -> io::Result<Report> {
    let who = if opts.espip_initiates {
        "espip initiates"
    } else {
        "strongSwan initiates"
    };
    let (mut report, work, keep_work) = opts.run.begin(
        "strongswan",
        format!(
            "espip lab strongswan ({who}; IKE {}, ESP {}; strongSwan {})",
            opts.ike,
            opts.esp,
            strongswan_version().unwrap_or_else(|| "?".into())
        ),
        STRONGSWAN_TOOLS,
    )?;
    let mut lab = SwLab::start(opts, &work)?;
    let mut da = Daemon::start(&lab.a, &opts.run.exe, &lab.cfg_a, &work.join("a.log"))?;
    sw_establish(&mut report, &mut lab, &da)?;
    sw_rekeys_under_pings(&mut report, &mut lab)?;
    sw_transfers_while_rekeying(&mut report, &mut lab)?;
    simultaneous_rekeys(&mut report, &lab.sw, &da, &lab.a, &lab.ctl, &opts.run.exe)?;
    sw_after_rekeys(&mut report, &mut lab)?;
    if opts.dpd {
        sw_dpd(&mut report, &mut lab, &da)?;
    }
    sw_clean_stop(&mut report, &mut lab, &mut da, &work)?;
    crate::stop_capture(lab.tcpdump);
    sw_wrong_psk(&mut report, &lab.a, &lab.sw, opts, &work, &lab.cfg_a)?;
    drop(lab.sw);
    // strongSwan offers and accepts "no ESN" for aes128gcm16 (its default).
    let esn = opts.esp.ends_with("-esn");
    let seen = decrypt_checks(
        &mut report,
        &lab.keys,
        &work,
        &lab.wire,
        (aes(&opts.esp), esn, aes(&opts.ike)),
    )?;
    key_checks(
        &mut report,
        &lab.keys,
        &seen,
        &lab.sw_dir.join("charon.log"),
    );
    finish_work(&mut report, &work, keep_work);
    Ok(report)
}

/// The strongSwan lab's parts its steps share: espip in `a`, charon in `b`, the capture of
/// their link, and the keys espip exported so far.
struct SwLab<'o> {
    opts: &'o StrongswanOptions,
    a: Netns,
    b: Netns,
    sw: Charon,
    sw_dir: PathBuf,
    cfg_a: PathBuf,
    ctl: PathBuf,
    wire: PathBuf,
    tcpdump: Child,
    keys: KeyLog,
}

impl<'o> SwLab<'o> {
    /// The namespaces, strongSwan's files and charon, espip's configuration, the capture.
    fn start(opts: &'o StrongswanOptions, work: &Path) -> io::Result<SwLab<'o>> {
        let (a, b) = crate::p2p::topology("sw")?;
        no_udp_gso(&[&a])?;
        // charon routes the child's traffic from its inner address, which lives on its veth.
        b.ip(&["addr", "add", &format!("{B_INNER}/32"), "dev", "veth0"])?;
        let sw_dir = work.join("sw");
        strongswan_files(&sw_dir, &opts.ike, &opts.esp, PSK)?;
        let cfg_a = work.join("a.toml");
        let role = if opts.espip_initiates {
            "initiator"
        } else {
            "responder"
        };
        // espip as the responder names no address of strongSwan (as a road-warrior server
        // does, strongSwan's `remote_addrs = %any`): it finds the peer by its identity.
        let peer = espip_peer(
            "esp-udp", true, role, &opts.ike, &opts.esp, 9, 8, 2, "b.lab",
        );
        let peer: String = if opts.espip_initiates {
            peer
        } else {
            peer.lines()
                .filter(|l| !l.starts_with("endpoint ="))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        write_private(&cfg_a, &(interface(true, &work.join("state-a")) + &peer))?;
        write_private(&work.join("psk"), &format!("{PSK}\n"))?;
        let wire = work.join("wire.pcap");
        let tcpdump = crate::start_capture(&a, "veth0", &wire)?;
        let sw = Charon::start(&b, &sw_dir)?;
        Ok(SwLab {
            opts,
            ctl: work.join("state-a").join("control.sock"),
            a,
            b,
            sw,
            sw_dir,
            cfg_a,
            wire,
            tcpdump,
            keys: KeyLog::default(),
        })
    }

    /// strongSwan initiates when espip does not.
    fn initiate_if_responder(&self, timeout: &str) -> io::Result<Option<String>> {
        if self.opts.espip_initiates {
            return Ok(None);
        }
        self.sw
            .swanctl(&[
                "--initiate",
                "--ike",
                "lab",
                "--child",
                "lab",
                "--timeout",
                timeout,
            ])
            .map(Some)
    }

    /// Export the keys espip has now, sleeping `pause` first.
    fn poll_keys_after(&mut self, pause: Duration) {
        std::thread::sleep(pause);
        self.keys.poll(&self.ctl);
    }
}

/// The SAs come up; pings both ways; a transfer each way.
fn sw_establish(report: &mut Report, lab: &mut SwLab<'_>, da: &Daemon) -> io::Result<()> {
    if let Some(out) = lab.initiate_if_responder("10")? {
        report.notes.push(format!(
            "swanctl --initiate: {}",
            out.lines().last().unwrap_or("").trim()
        ));
    }
    let ctl = lab.ctl.clone();
    let up = wait_for(
        || status(&ctl).is_some_and(|s| ike_counts(&s).1 == 1),
        Duration::from_secs(10),
    );
    lab.keys.poll(&ctl);
    let sas = lab.sw.swanctl(&["--list-sas"])?;
    report.check(
        "IKE SA and CHILD_SA up with strongSwan",
        up && sas.contains("ESTABLISHED") && sas.contains("INSTALLED"),
        format!(
            "espip: {}; strongSwan: {}",
            log_field(&da.log(), "IKE SA established", "proposal")
                .map_or("no IKE SA".into(), |p| format!("IKE {p}")),
            sas.lines()
                .filter(|l| l.contains("ESTABLISHED") || l.contains("INSTALLED"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    );
    let (a, b) = (&lab.a, &lab.b);
    let (ok, detail) = ping(a, B_INNER);
    report.check(format!("ping espip -> strongSwan {B_INNER}"), ok, detail);
    let out = netns::run(
        b.command("ping")
            .args(["-c", "3", "-i", "0.2", "-W", "2", "-I", B_INNER, A_INNER]),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    report.check(
        format!("ping strongSwan -> espip {A_INNER}"),
        out.status.success(),
        text.lines()
            .find(|l| l.contains("transmitted"))
            .unwrap_or("no answer")
            .to_string(),
    );
    let megabytes = lab.opts.megabytes;
    for (what, pair, to) in [
        ("espip -> strongSwan", (a, b), B_INNER),
        ("strongSwan -> espip", (b, a), A_INNER),
    ] {
        crate::transfer_check(
            report,
            format!("TCP transfer {megabytes} MB {what}"),
            &lab.opts.run.exe,
            pair,
            to,
            megabytes * 1_000_000,
        )?;
    }
    lab.keys.poll(&ctl);
    Ok(())
}

/// Rekeys by both sides under 50 pings a second: espip rekeys its CHILD_SA every ~8 s and its
/// IKE SA every ~7 s on its own; strongSwan is told to rekey both in between.
fn sw_rekeys_under_pings(report: &mut Report, lab: &mut SwLab<'_>) -> io::Result<()> {
    let before = status(&lab.ctl).map_or((0, 0, 0, 0), |s| ike_counts(&s));
    let pinger = ping_train(&lab.a, B_INNER, None, 20)?;
    let t0 = Instant::now();
    let mut sw_rekeys = Vec::new();
    for (at, args) in [
        (3u64, ["--rekey", "--child", "lab"]),
        (11, ["--rekey", "--ike", "lab"]),
        (13, ["--rekey", "--child", "lab"]),
    ] {
        while t0.elapsed() < Duration::from_secs(at) {
            lab.poll_keys_after(Duration::from_millis(250));
        }
        sw_rekeys.push(swanctl_rekey(&lab.sw, &args)?);
    }
    while t0.elapsed() < Duration::from_secs(20) {
        lab.poll_keys_after(Duration::from_millis(250));
    }
    let (sent, got) = ping_result(pinger);
    lab.keys.poll(&lab.ctl);
    let after = status(&lab.ctl).map_or((0, 0, 0, 0), |s| ike_counts(&s));
    let child_rekeys = after.2 - before.2;
    let ike_rekeys = after.3 - before.3;
    report.check(
        "rekeys by both sides during 50 pings a second: none lost",
        sent > 0
            && sent == got
            && child_rekeys >= 3
            && ike_rekeys >= 2
            && sw_rekeys.iter().all(|r| r.ends_with("ok")),
        format!(
            "{got} of {sent} answered; {child_rekeys} CHILD_SA rekeys and {ike_rekeys} IKE SA rekeys in all; strongSwan's: {}",
            sw_rekeys.join(", ")
        ),
    );
    Ok(())
}

/// TCP transfers back to back for 12 s (in a second thread) while strongSwan rekeys the
/// CHILD_SA and the IKE SA and espip rekeys both on its own: every hash must be equal.
/// (Pings are the loss probe of [`sw_rekeys_under_pings`]: saturating TCP would add
/// congestion loss to them.)
fn sw_transfers_while_rekeying(report: &mut Report, lab: &mut SwLab<'_>) -> io::Result<()> {
    let bytes_each = lab.opts.megabytes.min(10) * 1_000_000;
    let t1 = Instant::now();
    let (exe, a, b) = (&lab.opts.run.exe, &lab.a, &lab.b);
    let (sw, ctl, keys) = (&lab.sw, &lab.ctl, &mut lab.keys);
    let (rekeys_2, (transfers, equal)) = std::thread::scope(|scope| -> io::Result<_> {
        let mover = scope.spawn(|| {
            let (mut n, mut ok) = (0u32, 0u32);
            while t1.elapsed() < Duration::from_secs(12) {
                if let Ok(r) = crate::transfer(exe, (a, b), B_INNER, bytes_each) {
                    n += 1;
                    if r.ok(bytes_each) {
                        ok += 1;
                    }
                }
            }
            (n, ok)
        });
        let mut done = Vec::new();
        for (at, args) in [
            (3u64, ["--rekey", "--child", "lab"]),
            (7, ["--rekey", "--ike", "lab"]),
        ] {
            while t1.elapsed() < Duration::from_secs(at) {
                keys.poll(ctl);
                std::thread::sleep(Duration::from_millis(250));
            }
            done.push(swanctl_rekey(sw, &args)?);
        }
        Ok((done, mover.join().unwrap_or((0, 0))))
    })?;
    keys.poll(ctl);
    report.check(
        format!(
            "{transfers} TCP transfers of {} MB while both sides rekey: every hash equal",
            bytes_each / 1_000_000
        ),
        transfers > 0 && equal == transfers && rekeys_2.iter().all(|r| r.ends_with("ok")),
        format!(
            "{equal} of {transfers} equal; strongSwan's: {}",
            rekeys_2.join(", ")
        ),
    );
    Ok(())
}

/// A transfer after all the rekeys, and no replay or ICV failure at espip in the whole run.
fn sw_after_rekeys(report: &mut Report, lab: &mut SwLab<'_>) -> io::Result<()> {
    crate::transfer_check(
        report,
        format!("TCP transfer {} MB after the rekeys", lab.opts.megabytes),
        &lab.opts.run.exe,
        (&lab.a, &lab.b),
        B_INNER,
        lab.opts.megabytes * 1_000_000,
    )?;
    lab.keys.poll(&lab.ctl);
    let s = status(&lab.ctl);
    report.check(
        "no replay or bad_icv drops at espip",
        s.as_ref()
            .is_some_and(|s| drops(s, "replay") + drops(s, "bad_icv") == 0),
        s.as_ref().map_or("no status".into(), |s| {
            format!(
                "replay {} bad_icv {} unknown_spi {} no_sa {}",
                drops(s, "replay"),
                drops(s, "bad_icv"),
                drops(s, "unknown_spi"),
                drops(s, "no_sa")
            )
        }),
    );
    Ok(())
}

/// Dead peer detection: strongSwan is killed (no DELETE); espip must notice on its own, and
/// the tunnel must come back when charon is started again.
fn sw_dpd(report: &mut Report, lab: &mut SwLab<'_>, da: &Daemon) -> io::Result<()> {
    lab.sw.kill();
    let t0 = Instant::now();
    let ctl = lab.ctl.clone();
    let gone = wait_for(
        || status(&ctl).is_some_and(|s| ike_counts(&s).0 == 0),
        Duration::from_secs(30),
    );
    report.check(
        "DPD notices that strongSwan died",
        gone && da.log().contains("peer_dead"),
        format!(
            "IKE SA gone after {:.1} s (dpd_interval 2 s, then 4 retransmissions)",
            t0.elapsed().as_secs_f64()
        ),
    );
    lab.sw = Charon::start(&lab.b, &lab.sw_dir)?;
    lab.initiate_if_responder("10")?;
    let back = wait_for(
        || status(&ctl).is_some_and(|s| ike_counts(&s).1 == 1),
        Duration::from_secs(15),
    );
    lab.keys.poll(&ctl);
    let (ok, detail) = ping(&lab.a, B_INNER);
    report.check(
        "strongSwan restarted: the tunnel comes back",
        back && ok,
        detail,
    );
    Ok(())
}

/// A clean stop sends DELETE.
fn sw_clean_stop(
    report: &mut Report,
    lab: &mut SwLab<'_>,
    da: &mut Daemon,
    work: &Path,
) -> io::Result<()> {
    lab.keys.poll(&lab.ctl);
    let clean = da.stop()?;
    lab.keys.load(&work.join("state-a").join("keys"));
    let deleted = wait_for(
        || lab.sw.log().contains("received DELETE for IKE_SA"),
        Duration::from_secs(3),
    );
    report.check(
        "clean stop: strongSwan receives espip's DELETE",
        clean && deleted,
        format!(
            "espip exit {}; charon logged \"received DELETE for IKE_SA\": {deleted}",
            if clean { "0" } else { "non-zero" }
        ),
    );
    Ok(())
}

/// A wrong pre-shared key: AUTHENTICATION_FAILED on both sides, named in espip's log.
fn sw_wrong_psk(
    report: &mut Report,
    a: &Netns,
    sw: &Charon,
    opts: &StrongswanOptions,
    work: &Path,
    cfg_a: &Path,
) -> io::Result<()> {
    write_private(&work.join("psk"), "not-the-key-strongswan-has-0123456789\n")?;
    let mut wrong = Daemon::start(a, &opts.run.exe, cfg_a, &work.join("a-wrong-psk.log"))?;
    if !opts.espip_initiates {
        sw.swanctl(&[
            "--initiate",
            "--ike",
            "lab",
            "--child",
            "lab",
            "--timeout",
            "5",
        ])?;
    }
    let failed = wait_for(
        || wrong.log().contains("AUTHENTICATION_FAILED"),
        Duration::from_secs(8),
    );
    // charon: "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]" when it refused espip's AUTH,
    // "received AUTHENTICATION_FAILED notify error" when espip refused its own.
    let sw_failed = wait_for(
        || {
            let l = sw.log();
            l.contains("AUTH_FAILED") || l.contains("AUTHENTICATION_FAILED")
        },
        Duration::from_secs(3),
    );
    let line = wrong
        .log()
        .lines()
        .find(|l| l.contains("AUTHENTICATION_FAILED"))
        .map(|l| {
            l.split("espip::daemon::ike:")
                .last()
                .unwrap_or(l)
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let _ = wrong.stop();
    report.check(
        "a wrong pre-shared key fails with AUTHENTICATION_FAILED on both sides",
        failed && sw_failed,
        format!("espip: {line}; strongSwan logged it: {sw_failed}"),
    );
    Ok(())
}

fn strongswan_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "strongswan-charon"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
