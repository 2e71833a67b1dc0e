//! `espip lab multipath --keying ikev2` (issue 29): the multipath peers keyed by IKEv2. A
//! initiates over its first path (with `--topology uplinks`, B is a responder without
//! endpoint that learns A's paths). One CHILD_SA pair carries every path, probes included;
//! CHILD_SAs are rekeyed every few seconds through the whole lab, so every phase runs across
//! rekeys, and a check of its own sends 50 pings a second across several of them.

use super::*;

/// CHILD_SA lifetime of the lab, rekeyed 6-8 s before it (every 4-6 s): room for a rekey's
/// retransmissions under a saturating stream before the hard lifetime.
const CHILD_LIFETIME: u64 = 12;

/// The `[[peer]]` lines after `allowed_ips` that key the peer by IKEv2.
pub(super) fn peer_lines(me_a: bool) -> String {
    let (role, local_id, remote_id) = if me_a {
        ("initiator", "a.lab", "b.lab")
    } else {
        ("responder", "b.lab", "a.lab")
    };
    format!(
        "mode = \"esp-udp\"\nkeying = \"ikev2\"\nrole = \"{role}\"\npsk_file = \"psk\"\nlocal_id = \"{local_id}\"\nremote_id = \"{remote_id}\"\nike_proposals = [\"aes128gcm16-prfsha256-x25519\"]\nesp_proposals = [\"aes128gcm16-esn\"]\nchild_lifetime = {CHILD_LIFETIME}\nrekey_margin = 6\nrekey_jitter = 2\ndpd_interval = 5\n"
    )
}

/// Drops that would be a packet lost to a rekey.
const REKEY_DROPS: [&str; 4] = ["replay", "bad_icv", "unknown_spi", "no_sa"];

/// (CHILD_SA rekeys, [`REKEY_DROPS`], A's per-path packets sent).
fn counters(ctl: &Path) -> (u64, Vec<u64>, Vec<u64>) {
    let Some(s) = status(ctl) else {
        return (0, vec![0; REKEY_DROPS.len()], Vec::new());
    };
    let rekeys = s.ike.iter().map(|p| p.child_rekeys).sum();
    let drops = REKEY_DROPS
        .iter()
        .map(|d| s.drops.get(*d).copied().unwrap_or(0))
        .collect();
    let paths = s
        .peers
        .first()
        .and_then(|p| p.multipath.as_ref())
        .map(|m| m.paths.iter().map(|p| p.tx_packets).collect())
        .unwrap_or_default();
    (rekeys, drops, paths)
}

/// The IKE SA and a CHILD_SA up on A within 10 s.
pub(super) fn up_check(report: &mut Report, ctl_a: &Path) {
    let start = std::time::Instant::now();
    let up = || {
        status(ctl_a).is_some_and(|s| {
            s.ike.iter().any(|p| {
                p.sas
                    .iter()
                    .any(|sa| sa.kind == "ike" && sa.state == "established")
                    && p.sas.iter().any(|sa| sa.kind == "child")
            })
        })
    };
    while !up() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    report.check(
        "IKEv2: the IKE SA and the CHILD_SA pair that serves both paths are up",
        up(),
        format!("after {:.1} s", start.elapsed().as_secs_f64()),
    );
}

/// Both sides' [`REKEY_DROPS`] once the paths are up: the baseline of [`rekeys_check`]. (Before
/// it, the responder's first probes may reach the initiator before it has installed the
/// CHILD_SA that the IKE_AUTH answer brings, an `unknown_spi` or two that any IKEv2 peer
/// sees: not a rekey's.)
pub(super) fn baseline(ctl_a: &Path, ctl_b: &Path) -> (Vec<u64>, Vec<u64>) {
    (counters(ctl_a).1, counters(ctl_b).1)
}

/// 50 pings a second for 12 s from A to B while the CHILD_SAs rekey (2 or more rekeys): none
/// lost, both paths carried packets, none of [`REKEY_DROPS`] on either side since the paths
/// came up (`since`: [`baseline`]; the stream and its rekeys included).
pub(super) fn rekeys_check(
    report: &mut Report,
    a: &Netns,
    (ctl_a, ctl_b): (&Path, &Path),
    since: &(Vec<u64>, Vec<u64>),
    work: &Path,
) -> io::Result<()> {
    let (ra0, _, pa0) = counters(ctl_a);
    let show = |d: &[u64]| {
        REKEY_DROPS
            .iter()
            .zip(d)
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (rb0, _, _) = counters(ctl_b);
    let (before_a, before_b) = (status(ctl_a), status(ctl_b));
    let (sent, got) = crate::ike::ping_result(crate::ike::ping_train(a, B_INNER, None, 12)?);
    // Every drop counter that moved meanwhile, both sides (a lost ping shows where).
    let moved = |before: &Option<espip_api::status::Status>, ctl: &Path| -> String {
        let now = status(ctl);
        let (Some(b), Some(n)) = (before, now) else {
            return "?".into();
        };
        let mut v: Vec<String> = n
            .drops
            .iter()
            .filter(|(k, c)| **c > b.drops.get(*k).copied().unwrap_or(0))
            .map(|(k, c)| format!("{k} +{}", c - b.drops.get(k).copied().unwrap_or(0)))
            .collect();
        v.extend(
            n.kernel_drops
                .iter()
                .filter(|(k, c)| **c > b.kernel_drops.get(*k).copied().unwrap_or(0))
                .map(|(k, c)| format!("{k} +{}", c - b.kernel_drops.get(k).copied().unwrap_or(0))),
        );
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    };
    let moved_a = moved(&before_a, ctl_a);
    let moved_b = moved(&before_b, ctl_b);
    let (ra, da, pa) = counters(ctl_a);
    let (rb, db, _) = counters(ctl_b);
    let delta = |now: &[u64], then: &[u64]| -> Vec<u64> {
        now.iter()
            .zip(then.iter().chain(std::iter::repeat(&0)))
            .map(|(n, t)| n.saturating_sub(*t))
            .collect()
    };
    let (startup_a, startup_b) = (since.0.clone(), since.1.clone());
    // CHILD_SAs that reached their hard lifetime before a rekey finished (none expected).
    let expired: usize = ["a.log", "b.log"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(work.join(f))
                .unwrap_or_default()
                .matches("hard lifetime reached before a rekey")
                .count()
        })
        .sum();
    let (da, db) = (delta(&da, &since.0), delta(&db, &since.1));
    // (Both sides count every rekey, whichever started it.)
    let rekeys = (ra - ra0).max(rb - rb0);
    let per_path: Vec<u64> = pa
        .iter()
        .zip(pa0.iter().chain(std::iter::repeat(&0)))
        .map(|(n, o)| n - o.min(n))
        .collect();
    report.check(
        "IKEv2 multipath: CHILD_SA rekeys during 50 pings a second lose nothing on any path",
        sent > 0
            && got == sent
            && rekeys >= 2
            && per_path.len() >= 2
            && per_path.iter().all(|n| *n > 0)
            && da.iter().chain(&db).all(|n| *n == 0),
        format!(
            "{got} of {sent} answered across {rekeys} CHILD_SA rekeys ({ra} since the start); packets A sent per path meanwhile {per_path:?}; drops since the paths came up (the stream included): A {}; B {}; counters that moved during the pings: A {moved_a}; B {moved_b}; before the paths were up: A {}; B {}; CHILD_SAs expired before their rekey: {expired}",
            show(&da),
            show(&db),
            show(&startup_a),
            show(&startup_b)
        ),
    );
    Ok(())
}
