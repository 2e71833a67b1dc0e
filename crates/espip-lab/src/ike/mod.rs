//! IKEv2 labs: `espip lab ike` (two espip daemons keyed by IKEv2, rekeying every few seconds
//! during transfers) and `espip lab strongswan` (espip against strongSwan's charon with the
//! kernel-libipsec plugin, the recipe of ../shared/strongswan-lab).
//!
//! Both capture the link for the whole run; the espip daemons write the keys of every SA as
//! it comes up (`interface.save_keys`), so that tshark can decrypt IKE and ESP of the whole
//! capture afterwards; a check counts the ESP packets whose ICV tshark verified.

mod mobike;
mod strongswan;

use super::netns::{self, Daemon, Netns};
use super::p2p::{log_field, ping, write_private, A_INNER, A_OUTER, B_INNER, B_OUTER};
use super::{pcap, LabRun, Report};
use espip_api::status::Status;
pub use mobike::{run_roaming_strongswan, SwSide};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
pub use strongswan::run_strongswan;

/// The pre-shared key the labs use (also written to strongSwan's `secrets`).
const PSK: &str = "espip-lab-pre-shared-key-0123456789";

/// Debian packages strongSwan's lab needs (program or file -> package).
pub const STRONGSWAN_TOOLS: &[(&str, &str)] = &[
    ("/usr/lib/ipsec/charon", "strongswan-charon"),
    ("swanctl", "strongswan-swanctl"),
    (
        "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
        "libcharon-extra-plugins",
    ),
    (
        "/usr/lib/ipsec/plugins/libstrongswan-openssl.so",
        "libstrongswan-standard-plugins",
    ),
    (
        "/usr/lib/ipsec/plugins/libstrongswan-curve25519.so",
        "libstrongswan-extra-plugins",
    ),
    ("tshark", "tshark"),
    ("unshare", "util-linux"),
    ("ethtool", "ethtool"),
];

/// A UDP GSO train crosses a veth, and so a capture, as one frame that tshark cannot check:
/// the labs segment in the stack instead, so the capture holds one ESP packet per frame.
fn no_udp_gso(nss: &[&Netns]) -> io::Result<()> {
    for ns in nss {
        netns::run_ok(
            ns.command("ethtool")
                .args(["-K", "veth0", "tx-udp-segmentation", "off"]),
        )?;
    }
    Ok(())
}

/// `espip lab ike` options.
#[derive(Debug, Clone)]
pub struct IkeLabOptions {
    /// Common options.
    pub run: LabRun,
    /// "esp-udp" or "esp".
    pub mode: String,
    /// IKE proposal (strongSwan notation).
    pub ike: String,
    /// ESP proposal.
    pub esp: String,
    /// CHILD_SA rekey interval, seconds.
    pub rekey: u64,
    /// How long transfers and pings run, seconds.
    pub seconds: u64,
    /// Seconds of the half-open flood (0: none).
    pub flood: u64,
}

/// `espip lab strongswan` options.
#[derive(Debug, Clone)]
pub struct StrongswanOptions {
    /// Common options.
    pub run: LabRun,
    /// espip initiates (true) or strongSwan does.
    pub espip_initiates: bool,
    /// IKE proposal.
    pub ike: String,
    /// ESP proposal.
    pub esp: String,
    /// Size of the TCP transfers, MB.
    pub megabytes: u64,
    /// Also kill strongSwan and check that DPD notices (takes about 20 s).
    pub dpd: bool,
}

fn status(control: &Path) -> Option<Status> {
    let raw = espip_api::client::request(control, "status").ok()?;
    serde_json::from_slice(&raw).ok()
}

/// The first ikev2 peer's state in `s`: (IKE SAs established, CHILD_SAs installed, child
/// rekeys, IKE rekeys).
fn ike_counts(s: &Status) -> (usize, usize, u64, u64) {
    let Some(k) = s.ike.first() else {
        return (0, 0, 0, 0);
    };
    let est = k
        .sas
        .iter()
        .filter(|x| x.kind == "ike" && x.state == "established")
        .count();
    let child = k
        .sas
        .iter()
        .filter(|x| x.kind == "child" && x.state == "installed")
        .count();
    (est, child, k.child_rekeys, k.ike_rekeys)
}

fn wait_for(what: impl Fn() -> bool, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    what()
}

fn drops(s: &Status, name: &str) -> u64 {
    s.drops.get(name).copied().unwrap_or(0)
}

/// Keys of every SA seen while the lab runs: Wireshark `esp_sa` and `ikev2_decryption_table`
/// lines, collected from the daemons' control sockets.
#[derive(Default)]
struct KeyLog {
    esp: BTreeSet<String>,
    ike: BTreeSet<String>,
}

impl KeyLog {
    fn poll(&mut self, control: &Path) {
        if let Ok(raw) = espip_api::client::request(control, "sa-keys") {
            let raw = zeroize::Zeroizing::new(raw);
            if let Ok(v) = serde_json::from_slice::<Vec<espip_api::status::SaExport>>(&raw) {
                self.esp.extend(
                    v.into_iter()
                        .filter_map(|s| s.wireshark.map(|l| l.to_string())),
                );
            }
        }
        if let Ok(raw) = espip_api::client::request(control, "ike-keys") {
            let raw = zeroize::Zeroizing::new(raw);
            if let Ok(v) = serde_json::from_slice::<Vec<String>>(&raw) {
                self.ike.extend(v);
            }
        }
    }

    /// Add what a daemon's `interface.save_keys` directory holds: every SA it had, each
    /// written the moment it came up (however short its life).
    fn load(&mut self, dir: &Path) {
        for (name, set) in [
            ("esp_sa", &mut self.esp),
            ("ikev2_decryption_table", &mut self.ike),
        ] {
            if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
                let text = zeroize::Zeroizing::new(text);
                set.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
            }
        }
    }

    /// Write both tables into `home/.config/wireshark` (where tshark reads them) and next to
    /// the capture.
    fn write(&self, work: &Path) -> io::Result<PathBuf> {
        let home = work.join("home");
        let dir = home.join(".config/wireshark");
        std::fs::create_dir_all(&dir)?;
        let esp: String = self.esp.iter().map(|l| format!("{l}\n")).collect();
        let ike: String = self.ike.iter().map(|l| format!("{l}\n")).collect();
        for d in [&dir, &work.to_path_buf()] {
            write_private(&d.join("esp_sa"), &esp)?;
            write_private(&d.join("ikev2_decryption_table"), &ike)?;
        }
        Ok(home)
    }
}

/// What one tshark pass over a capture found (with the key tables under `home`).
#[derive(Default)]
struct Decrypted {
    esp: u64,
    esp_decrypted: u64,
    icv_good: u64,
    icv_bad: u64,
    spis: BTreeSet<String>,
    ike: u64,
    ike_encrypted: u64,
    ike_decrypted: u64,
    /// Decrypted IKE messages carrying traffic selectors or a DELETE.
    ike_inner: u64,
    /// IKE SPIi values in IKE headers.
    ike_spis: BTreeSet<String>,
}

/// One tshark pass over `pcap` with the key tables under `home`.
fn tshark_pass(home: &Path, pcap: &Path) -> io::Result<Decrypted> {
    let out = Command::new("tshark")
        .env("HOME", home)
        .args(["-n", "-r"])
        .arg(pcap)
        .args(["-o", "esp.enable_encryption_decode:TRUE"])
        .args(["-o", "esp.enable_authentication_check:TRUE"])
        .args(["-Y", "esp || isakmp", "-T", "fields"])
        .args(["-E", "occurrence=a", "-E", "separator=|"])
        .args(["-e", "esp.spi", "-e", "esp.icv_good", "-e", "esp.icv_bad"])
        .args([
            "-e",
            "ip.version",
            "-e",
            "isakmp.ispi",
            "-e",
            "isakmp.enc.iv",
        ])
        .args(["-e", "isakmp.enc.pad_length", "-e", "isakmp.ts.type"])
        .args(["-e", "isakmp.delete.spi"])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut d = Decrypted::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('|').collect();
        let get = |i: usize| f.get(i).copied().unwrap_or("");
        if !get(0).is_empty() {
            d.esp += 1;
            d.spis.insert(get(0).to_string());
            // The inner packet is a second IP header.
            if get(3).contains(',') {
                d.esp_decrypted += 1;
            }
            match (get(1), get(2)) {
                ("1", _) => d.icv_good += 1,
                (_, "1") => d.icv_bad += 1,
                _ => {}
            }
        } else if !get(4).is_empty() {
            d.ike += 1;
            d.ike_spis.insert(get(4).to_ascii_lowercase());
            if !get(5).is_empty() {
                d.ike_encrypted += 1;
                if !get(6).is_empty() {
                    d.ike_decrypted += 1;
                    if !get(7).is_empty() || !get(8).is_empty() {
                        d.ike_inner += 1;
                    }
                }
            }
        }
    }
    Ok(d)
}

/// The decryption checks on a capture: every ESP packet decrypted by tshark with the exported
/// SAs and its ICV verified (AES-GCM without ESN: tshark 4.0 has neither ChaCha20-Poly1305
/// nor an ESN flag in its SA table), and every IKE message after IKE_SA_INIT decrypted with
/// the exported IKE SA keys.
fn decrypt_checks(
    report: &mut Report,
    keys: &KeyLog,
    work: &Path,
    wire: &Path,
    (aes, esn, ike_aes): (bool, bool, bool),
) -> io::Result<Decrypted> {
    let home = keys.write(work)?;
    let d = tshark_pass(&home, wire)?;
    let spis = &d.spis;
    let esp = d.esp;
    if aes && esn {
        // Wireshark 4.0 decrypts (CTR) but computes the ICV without the high sequence bits.
        report.check(
            "tshark decrypts every ESP packet with the exported SAs (ESN: ICV not checkable by tshark 4.0)",
            esp > 0 && d.esp_decrypted == esp,
            format!(
                "{} of {esp} ESP packets decrypted; {} SPIs in the capture; {} esp_sa lines",
                d.esp_decrypted,
                spis.len(),
                keys.esp.len()
            ),
        );
    } else if aes {
        // tshark 4.0 leaves the ICV of some frames unchecked (0.1-0.2 % here, a different
        // set on each run, decrypted all the same): they count as neither good nor bad, and
        // the check wants every packet decrypted, none bad, and 99 % verified good.
        report.check(
            "tshark decrypts every ESP packet with the exported SAs, ICVs good",
            esp > 0 && d.esp_decrypted == esp && d.icv_bad == 0 && d.icv_good * 100 >= esp * 99,
            format!(
                "{} of {esp} ESP packets decrypted, ICV good {}, bad {}, left unchecked by tshark {}; {} SPIs in the capture; {} esp_sa lines",
                d.esp_decrypted,
                d.icv_good,
                d.icv_bad,
                esp - d.icv_good - d.icv_bad,
                spis.len(),
                keys.esp.len()
            ),
        );
    } else {
        report.notes.push(format!(
            "{esp} ESP packets, {} SPIs: tshark 4.0 cannot decrypt ChaCha20-Poly1305 ESP (no check)",
            spis.len()
        ));
    }
    if !ike_aes {
        report.notes.push(
            "tshark 4.0 has no ChaCha20-Poly1305 for IKEv2: the IKE messages stay encrypted (no check)".into(),
        );
        return Ok(d);
    }
    report.check(
        "tshark decrypts every IKE message with the exported IKE SA keys",
        d.ike_encrypted > 0 && d.ike_decrypted == d.ike_encrypted && d.ike_inner > 0,
        format!(
            "{} IKE messages, {} with an Encrypted payload, {} decrypted ({} with traffic selectors or DELETE inside); {} IKE SA key lines",
            d.ike,
            d.ike_encrypted,
            d.ike_decrypted,
            d.ike_inner,
            keys.ike.len()
        ),
    );
    Ok(d)
}

#[allow(clippy::too_many_arguments)] // one lab peer's settings, named at each call
fn espip_peer(
    mode: &str,
    me_a: bool,
    role: &str,
    ike: &str,
    esp: &str,
    child_life: u64,
    ike_life: u64,
    dpd: u64,
    remote_id: &str,
) -> String {
    let (endpoint, allowed, local_id) = if me_a {
        (B_OUTER, B_INNER, "a.lab")
    } else {
        (A_OUTER, A_INNER, "b.lab")
    };
    format!(
        "[[peer]]\nname = \"{}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [\"{allowed}/32\"]\nmode = \"{mode}\"\nkeying = \"ikev2\"\nrole = \"{role}\"\npsk_file = \"psk\"\nlocal_id = \"{local_id}\"\nremote_id = \"{remote_id}\"\nike_proposals = [\"{ike}\"]\nesp_proposals = [\"{esp}\"]\nchild_lifetime = {child_life}\nike_lifetime = {ike_life}\nrekey_margin = 1\nrekey_jitter = 0\ndpd_interval = {dpd}\n",
        if me_a { "b" } else { "a" }
    )
}

fn interface(me_a: bool, state: &Path) -> String {
    let (addr, local) = if me_a {
        (A_INNER, A_OUTER)
    } else {
        (B_INNER, B_OUTER)
    };
    // Every SA's keys as it comes up, so tshark can decrypt all of the capture.
    format!(
        "[interface]\nname = \"espip0\"\naddress = [\"{addr}/24\"]\nlocal = \"{local}\"\nsave_keys = \"{}\"\n{}\n",
        state.join("keys").display(),
        super::state_lines(state)
    )
}

/// A's (`me_a`) or B's configuration of an espip-to-espip IKEv2 pair over ESP in UDP
/// (A initiates; AES-128-GCM, X25519; hour-long lifetimes; DPD every `dpd` s), its state in
/// `state`, the pre-shared key in the file `psk` beside the configuration ([`LAB_PSK`]).
/// For tests that need a running IKEv2 pair without the lab's checks.
pub fn pair_config(me_a: bool, state: &Path, dpd: u64) -> String {
    interface(me_a, state)
        + &espip_peer(
            "esp-udp",
            me_a,
            if me_a { "initiator" } else { "responder" },
            "aes128gcm16-prfsha256-x25519",
            "aes128gcm16-esn",
            3600,
            7200,
            dpd,
            if me_a { "b.lab" } else { "a.lab" },
        )
}

/// The pre-shared key of [`pair_config`].
pub const LAB_PSK: &str = PSK;

fn aes(esp: &str) -> bool {
    esp.starts_with("aes")
}

/// Pings from `ns` to `to` at 50 per second for `seconds`: (sent, received).
pub(crate) fn ping_train(
    ns: &Netns,
    to: &str,
    src: Option<&str>,
    seconds: u64,
) -> io::Result<Child> {
    let mut c = ns.command("ping");
    c.args([
        "-q",
        "-i",
        "0.02",
        "-W",
        "1",
        "-c",
        &(seconds * 50).to_string(),
    ]);
    if let Some(s) = src {
        c.args(["-I", s]);
    }
    c.arg(to)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
}

pub(crate) fn ping_result(c: Child) -> (u64, u64) {
    let out = c.wait_with_output().map(|o| o.stdout).unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    // "400 packets transmitted, 400 received, 0% packet loss, time 7980ms"
    let line = text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or("");
    let num = |word: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}

/// `espip lab ike`.
pub fn run_ike(opts: &IkeLabOptions) -> io::Result<Report> {
    let (mut report, work, keep_work) = opts.run.begin(
        "ike",
        format!(
            "espip lab ike ({} {} / {}, CHILD_SA rekey every {} s, {} s of traffic)",
            opts.mode, opts.ike, opts.esp, opts.rekey, opts.seconds
        ),
        &[("tshark", "tshark"), ("ethtool", "ethtool")],
    )?;
    let (a, b) = super::p2p::topology("ike")?;
    no_udp_gso(&[&a, &b])?;
    let child_life = opts.rekey + 1;
    let ike_life = opts.rekey * 3 + 1;
    for (me_a, host) in [(true, "a"), (false, "b")] {
        let text = interface(me_a, &work.join(format!("state-{host}")))
            + &espip_peer(
                &opts.mode,
                me_a,
                if me_a { "initiator" } else { "responder" },
                &opts.ike,
                &opts.esp,
                child_life,
                ike_life,
                3,
                if me_a { "b.lab" } else { "a.lab" },
            );
        write_private(&work.join(format!("{host}.toml")), &text)?;
    }
    write_private(&work.join("psk"), &format!("{PSK}\n"))?;
    let ctl_a = work.join("state-a").join("control.sock");
    let ctl_b = work.join("state-b").join("control.sock");
    let wire = work.join("wire.pcap");
    let tcpdump = super::start_capture(&a, "veth0", &wire)?;
    let mut db = Daemon::start(&b, &opts.run.exe, &work.join("b.toml"), &work.join("b.log"))?;
    let mut da = Daemon::start(&a, &opts.run.exe, &work.join("a.toml"), &work.join("a.log"))?;
    let mut keys = KeyLog::default();
    let up = wait_for(
        || {
            status(&ctl_a).is_some_and(|s| ike_counts(&s).1 == 1)
                && status(&ctl_b).is_some_and(|s| ike_counts(&s).1 == 1)
        },
        Duration::from_secs(10),
    );
    keys.poll(&ctl_a);
    keys.poll(&ctl_b);
    report.check(
        "IKE SA and CHILD_SA up on both sides",
        up,
        log_field(&da.log(), "IKE SA established", "proposal").map_or_else(
            || "no \"IKE SA established\" in A's log".into(),
            |p| format!("proposal {p}"),
        ),
    );
    let (ok, detail) = ping(&a, B_INNER);
    report.check(format!("ping A -> B {B_INNER}"), ok, detail);
    let (ok, detail) = ping(&b, A_INNER);
    report.check(format!("ping B -> A {A_INNER}"), ok, detail);

    let (sa, sb) =
        ike_traffic_while_rekeying(&mut report, opts, (&a, &b), (&ctl_a, &ctl_b), &mut keys)?;
    let want = opts.seconds / opts.rekey.max(1) / 2;
    if opts.flood > 0 {
        ike_flood_check(
            &mut report,
            opts,
            &a,
            (&mut da, &db),
            (&ctl_a, &ctl_b),
            &work,
        )?;
    }

    if opts.run.keep {
        super::stop_capture(tcpdump);
        report.keep_running(vec![a, b], &work, (da, db));
        return Ok(report);
    }
    // A stops first: B must learn it from A's DELETE. B holds every SA A used last (it
    // installs each before A may use it): its keys close the key log.
    keys.poll(&ctl_b);
    let clean_a = da.stop()?;
    keys.load(&work.join("state-a").join("keys"));
    std::thread::sleep(Duration::from_millis(300));
    let deleted = db.log().contains("deleted by the peer");
    let clean_b = db.stop()?;
    keys.load(&work.join("state-b").join("keys"));
    super::stop_capture(tcpdump);
    report.check(
        "clean stop: A's DELETE reaches B",
        clean_a && clean_b && deleted,
        format!(
            "A exit {}, B exit {}; B logged the delete: {deleted}",
            if clean_a { "0" } else { "non-zero" },
            if clean_b { "0" } else { "non-zero" }
        ),
    );
    spis_check(&mut report, &wire, want)?;
    let esn = [&sa, &sb].iter().any(|s| {
        s.as_ref().is_some_and(|s| {
            s.ike
                .iter()
                .flat_map(|k| &k.sas)
                .any(|x| x.kind == "child" && x.proposal.ends_with("-esn"))
        })
    });
    decrypt_checks(
        &mut report,
        &keys,
        &work,
        &wire,
        (aes(&opts.esp), esn, aes(&opts.ike)),
    )?;
    finish_work(&mut report, &work, keep_work);
    Ok(report)
}

/// Transfers back to back and 50 pings a second while the SAs rekey; the SAs' status after.
fn ike_traffic_while_rekeying(
    report: &mut Report,
    opts: &IkeLabOptions,
    (a, b): (&Netns, &Netns),
    (ctl_a, ctl_b): (&Path, &Path),
    keys: &mut KeyLog,
) -> io::Result<(Option<Status>, Option<Status>)> {
    let pinger = ping_train(a, B_INNER, None, opts.seconds)?;
    let started = Instant::now();
    let (mut transfers, mut equal, mut bytes) = (0u64, 0u64, 0u64);
    // Transfers of 4 MB every half second: the rekeys fall inside transfers, and the capture
    // stays small enough for tshark to read in seconds.
    let chunk = 4_000_000;
    while started.elapsed() < Duration::from_secs(opts.seconds.saturating_sub(2)) {
        keys.poll(ctl_a);
        keys.poll(ctl_b);
        let r = super::transfer(&opts.run.exe, (a, b), B_INNER, chunk)?;
        transfers += 1;
        if r.ok(chunk) {
            equal += 1;
            bytes += chunk;
        }
        keys.poll(ctl_a);
        keys.poll(ctl_b);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(100));
            keys.poll(ctl_a);
            keys.poll(ctl_b);
        }
    }
    let (sent, got) = ping_result(pinger);
    keys.poll(ctl_a);
    keys.poll(ctl_b);
    let (sa, sb) = (status(ctl_a), status(ctl_b));
    let rekeys_a = sa.as_ref().map_or(0, |s| ike_counts(s).2);
    let ike_rekeys =
        sa.as_ref().map_or(0, |s| ike_counts(s).3) + sb.as_ref().map_or(0, |s| ike_counts(s).3);
    report.check(
        format!("{transfers} transfers of 4 MB while rekeying: every hash equal"),
        transfers > 0 && equal == transfers,
        format!(
            "{equal} of {transfers} equal, {} MB in {:.0} s",
            bytes / 1_000_000,
            started.elapsed().as_secs_f64()
        ),
    );
    let want = opts.seconds / opts.rekey.max(1) / 2;
    report.check(
        format!("CHILD_SA rekeyed every ~{} s", opts.rekey),
        rekeys_a >= want,
        format!("{rekeys_a} CHILD_SA rekeys, {ike_rekeys} IKE SA rekeys"),
    );
    report.check(
        "50 pings a second through the rekeys: none lost",
        sent > 0 && sent == got,
        format!("{got} of {sent} answered"),
    );
    let bad: Vec<String> = [("A", &sa), ("B", &sb)]
        .iter()
        .map(|(h, s)| match s {
            Some(s) => format!(
                "{h}: replay {} bad_icv {} unknown_spi {} no_sa {}",
                drops(s, "replay"),
                drops(s, "bad_icv"),
                drops(s, "unknown_spi"),
                drops(s, "no_sa")
            ),
            None => format!("{h}: no status"),
        })
        .collect();
    let clean = [&sa, &sb].iter().all(|s| {
        s.as_ref()
            .is_some_and(|s| drops(s, "replay") + drops(s, "bad_icv") == 0)
    });
    report.check("no replay or bad_icv drops", clean, bad.join("; "));
    Ok((sa, sb))
}

/// A half-open flood: IKE_SA_INIT requests from A's address at B (the responder) while A
/// restarts; B answers with cookies, keeps its memory, and A connects anyway.
fn ike_flood_check(
    report: &mut Report,
    opts: &IkeLabOptions,
    a: &Netns,
    (da, db): (&mut Daemon, &Daemon),
    (ctl_a, ctl_b): (&Path, &Path),
    work: &Path,
) -> io::Result<()> {
    // A half-open flood: IKE_SA_INIT requests from A's address at B (the responder) while A
    // restarts; B answers with cookies, keeps its memory, and A connects anyway.
    let rss = |d: &Daemon| -> u64 {
        d.pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let rss_before = rss(db);
    let flood = a
        .command(&opts.run.exe)
        .args(["lab-tool", "ike-flood", "--to", &format!("{B_OUTER}:500")])
        .args(["--seconds", &opts.flood.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let _ = da.stop();
    *da = Daemon::start(a, &opts.run.exe, &work.join("a.toml"), &work.join("a2.log"))?;
    let t0 = Instant::now();
    let back = wait_for(
        || status(ctl_a).is_some_and(|s| ike_counts(&s).1 == 1),
        Duration::from_secs(opts.flood + 5),
    );
    let reconnect = t0.elapsed().as_secs_f64();
    let (ok, _) = ping(a, B_INNER);
    let sent = flood
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let rss_after = rss(db);
    let cookies = status(ctl_b)
        .and_then(|s| {
            s.ike
                .first()
                .map(|k| k.failures.get("cookie_required").copied().unwrap_or(0))
        })
        .unwrap_or(0);
    report.check(
        format!("IKE_SA_INIT flood of {} s at B: cookies, bounded memory, A reconnects during it", opts.flood),
        back && ok && cookies > 0 && rss_after < rss_before + 8 * 1024,
        format!(
            "flood {}; B answered {cookies} with a cookie; A's restart connected after {reconnect:.1} s, ping {}; B's RSS {} -> {} KiB",
            sent.trim(),
            if ok { "ok" } else { "FAILED" },
            rss_before,
            rss_after
        ),
    );
    Ok(())
}

/// The capture shows the SPIs changing: at least two per rekey expected.
fn spis_check(report: &mut Report, wire: &Path, want: u64) -> io::Result<()> {
    let frames = pcap::read(wire)?;
    let spis = esp_spis(&frames);
    report.check(
        "the capture shows the SPIs changing",
        spis.len() as u64 >= 2 * want,
        format!(
            "{} distinct ESP SPIs in {} frames",
            spis.len(),
            frames.len()
        ),
    );
    Ok(())
}

/// Distinct SPIs of ESP (protocol 50, or in UDP on port 4500) in a capture.
fn esp_spis(frames: &[pcap::Frame]) -> BTreeSet<u32> {
    let mut v = BTreeSet::new();
    for f in frames {
        let Some((_, _, p, hl, _)) = f.ip() else {
            continue;
        };
        let at = match p {
            50 => hl,
            17 if f.payload.get(hl + 2..hl + 4) == Some(&[0x11, 0x94]) => hl + 8,
            _ => continue,
        };
        if let Some(s) = f.payload.get(at..at + 4) {
            let spi = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
            if spi != 0 {
                v.insert(spi);
            }
        }
    }
    v
}

fn finish_work(report: &mut Report, work: &Path, keep: bool) {
    report.finish_work(
        work,
        keep,
        "configs, logs, wire.pcap, esp_sa and ikev2_decryption_table",
    );
}

/// What [`ike_flood`] sends.
#[derive(Debug, Default, Clone)]
pub struct FloodOptions {
    /// The IKE proposal offered (`None`: espip's default).
    pub proposal: Option<String>,
    /// Key shares of 0xff octets: not a point of any group.
    pub bad_ke: bool,
    /// To an ESP-in-UDP port, behind the non-ESP marker.
    pub natt: bool,
    /// The source address (`None`: the routed one).
    pub from: Option<std::net::IpAddr>,
}

/// Send IKE_SA_INIT requests to `to` for `seconds` (the flood tests run it in the peer's
/// namespace, so the messages come from the address the target accepts IKE from). Each is a
/// real initiator's first message, changed as `opts` says.
pub fn ike_flood(to: std::net::SocketAddr, seconds: u64, opts: &FloodOptions) -> io::Result<u64> {
    use espip_core::ike::engine::{Engine, IkeConfig, Out, Role};
    use espip_core::ike::msg;
    let bind = match opts.from {
        Some(ip) => std::net::SocketAddr::new(ip, 0),
        None if to.is_ipv4() => "0.0.0.0:0".parse().expect("address"),
        None => "[::]:0".parse().expect("address"),
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    let rng = ring::rand::SystemRandom::new();
    let proposal = opts
        .proposal
        .as_deref()
        .unwrap_or(espip_core::ike::proposal::DEFAULT_IKE_PROPOSAL);
    let cfg = IkeConfig {
        name: "flood".into(),
        role: Role::Initiator,
        psk: zeroize::Zeroizing::new(b"not the key".to_vec()),
        local_id: espip_core::ike::msg::Id::from_config("flood"),
        remote_id: espip_core::ike::msg::Id::from_config("target"),
        ike: vec![
            espip_core::ike::proposal::IkeProposal::parse(proposal).map_err(io::Error::other)?
        ],
        esp: vec![espip_core::ike::proposal::EspProposal::parse("aes128gcm16")
            .map_err(io::Error::other)?],
        ike_rekey_ms: 0,
        child_rekey_ms: 0,
        child_life_ms: 0,
        jitter_ms: 0,
        dpd_ms: 0,
        retransmit_ms: 1000,
        retransmit_tries: 0,
        local_ts: Vec::new(),
        remote_ts: Vec::new(),
        remote: to,
        local: sock.local_addr()?.ip(),
        local_port: 500,
        natt_port: 4500,
        remote_natt_port: 4500,
        force_encap: true,
        lobby: None,
        mobike: false,
    };
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        let mut e = Engine::new(cfg.clone());
        for o in e.tick(0, &rng) {
            let Out::Send { mut msg, .. } = o else {
                continue;
            };
            if opts.bad_ke {
                let h = msg::parse_header(&msg).map_err(|e| io::Error::other(format!("{e:?}")))?;
                let mut chain = msg::parse_chain(&msg, msg::HDR_LEN, h.next)
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                for p in &mut chain.payloads {
                    if let msg::Payload::Ke { data, .. } = p {
                        data.iter_mut().for_each(|b| *b = 0xff);
                    }
                }
                msg = msg::encode_plain(h, &chain.payloads);
            }
            if opts.natt {
                msg.splice(0..0, [0u8; 4]);
            }
            if sock.send_to(&msg, to).is_ok() {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::strongswan::charon_keys;

    #[test]
    fn charon_key_dumps_are_followed_per_thread_and_end_before_the_printable_column() {
        // Two threads interleave; the printable column holds a space and hex-like text.
        let log = "\
07:02:48 12[IKE] Sk_ei secret => 20 bytes @ 0x7f4c78008560
07:02:48 09[CHD] encryption initiator key => 4 bytes @ 0x7f
07:02:48 12[IKE]    0: 6A 2E 20 41 42 43 44 45 46 47 48 49 4A 4B 4C 4D  j. ABCDEFGHIJKLM
07:02:48 09[CHD]    0: 00 11 22 33                                      ..\"3
07:02:48 12[IKE]   16: AB CD EF 01                                      ....
07:02:48 12[IKE] Sk_er secret => 20 bytes @ 0x7f4c78008570
";
        let k = charon_keys(log);
        assert!(
            k.contains("6a2e204142434445464748494a4b4c4dabcdef01"),
            "{k:?}"
        );
        assert!(k.contains("00112233"));
        assert_eq!(k.len(), 2, "{k:?}");
    }
}
