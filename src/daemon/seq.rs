//! Sequence-number reservations: loaded and reserved before the first packet, extended by
//! the control side ahead of need (every [`RESERVATION_TICK`]: when half of a block is used,
//! the next block is written and synced, then its limit published to the SA atomically), the
//! last number sent recorded at a clean stop. The data path never waits for the disk: if the
//! disk stalls for longer than half a block lasts, the SA drops (`seq_unreserved`) rather
//! than risk a repeat.

use crate::control::Refused;
use crate::datapath::Outbound;
use crate::sys::seqstore::{SeqError, SeqStore, RESERVE};
use crate::telemetry::RateLimit;
use std::time::Duration;

/// How often the control side checks the reservations. Tuning constant: half a block (2^21
/// numbers) lasts 2 s at a million packets per second, twenty ticks.
pub(super) const RESERVATION_TICK: Duration = Duration::from_millis(100);
use tracing::{info, warn};

/// Resume every outbound SA after its saved reservation (1 for a new key) and reserve the
/// first block before anything is sent.
pub(super) fn reserve_initial(out: &Outbound, store: &mut SeqStore) -> Result<(), SeqError> {
    for idx in 0..out.peer_count() {
        let Some((spi, fp, _, _)) = out.sa_reservation(idx) else {
            continue;
        };
        let fp = fp.to_string();
        let saved = store.load(spi, &fp)?;
        reserve_from(out, idx, &fp, saved, store)?;
    }
    Ok(())
}

/// Start peer `idx`'s SA after `saved` (the key's last reservation; `None`: a new key) and
/// make its first block durable before publishing it.
fn reserve_from(
    out: &Outbound,
    idx: usize,
    fp: &str,
    saved: Option<u64>,
    store: &mut SeqStore,
) -> Result<(), SeqError> {
    let start = saved.map_or(1, |r| r.saturating_add(1));
    let limit = start.saturating_add(RESERVE - 1);
    store.save(fp, limit)?;
    out.set_next_seq(idx, start);
    out.set_limit(idx, limit);
    if start > 1 {
        if let Some((spi, ..)) = out.sa_reservation(idx) {
            info!(
                spi = format!("{spi:#010x}"),
                start, "outbound SA resumes after its saved sequence number"
            );
        }
    }
    Ok(())
}

/// At a reload: reserve sequence numbers for the SAs of `next` that are new (not continued
/// from `prev`). A key the daemon holds already (an SA being replaced by one with the same
/// key) continues after its reservation; a new key's file comes from `key_files` (opened by
/// root in `espip reload`) or is opened here (a daemon still running as root). Two SAs of
/// one generation under one key are refused: they would share nonces.
pub(super) fn reserve_new(
    next: &Outbound,
    prev: &Outbound,
    store: &mut SeqStore,
    mut key_files: Vec<(String, std::fs::File)>,
) -> Result<(), Refused> {
    let mut seen = std::collections::HashSet::new();
    for idx in 0..next.peer_count() {
        let Some((spi, fp, _, _)) = next.sa_reservation(idx) else {
            continue;
        };
        let fp = fp.to_string();
        if !seen.insert(fp.clone()) {
            return Err(Refused::SharedKey(fp));
        }
        if next.sa_continues(idx, prev) {
            continue;
        }
        let saved = if let Some(r) = store.reserved(&fp) {
            Some(r)
        } else if let Some(i) = key_files.iter().position(|(f, _)| *f == fp) {
            let (_, file) = key_files.swap_remove(i);
            store.adopt(&fp, file)?
        } else {
            store.load(spi, &fp).map_err(Refused::StateOutOfReach)?
        };
        reserve_from(next, idx, &fp, saved, store)?;
    }
    Ok(())
}

/// Extend reservations that are half used. A failed write leaves the limit where it is, so the
/// SA stops at the end of what is on disk (`seq_unreserved`) rather than risk a repeat.
pub(super) fn extend_reservations(
    out: &Outbound,
    store: &mut SeqStore,
    warn_state: &mut RateLimit,
) {
    for idx in 0..out.peer_count() {
        let Some((spi, fp, next, limit)) = out.sa_reservation(idx) else {
            continue;
        };
        if next.saturating_add(RESERVE / 2) <= limit {
            continue;
        }
        let fp = fp.to_string();
        let new = limit.saturating_add(RESERVE);
        match store.save(&fp, new) {
            Ok(()) => out.set_limit(idx, new),
            Err(e) if warn_state.ready() => warn!(
                spi = format!("{spi:#010x}"),
                "cannot extend the sequence number reservation: {e}; the SA stops at {limit}"
            ),
            Err(_) => {}
        }
    }
}

/// On a clean stop, record the last sequence number actually sent.
pub(super) fn record_final(out: &Outbound, store: &mut SeqStore) {
    for idx in 0..out.peer_count() {
        if let Some((spi, fp, next, _)) = out.sa_reservation(idx) {
            if let Err(e) = store.save(fp, next.saturating_sub(1)) {
                warn!("recording the last sequence number of SA {spi:#010x}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{self, EncapSpec, Lifetime, PeerSpec, TunnelSpec};
    use crate::sa::{Cipher, KeyMaterial};

    #[test]
    fn the_control_side_extends_a_half_used_reservation_before_the_sa_needs_it() {
        let key = KeyMaterial::new(Cipher::Aes128Gcm, &[7; 20]).unwrap();
        let peer = PeerSpec {
            name: "b".into(),
            endpoint: Some("192.0.2.2".parse().unwrap()),
            allowed_ips: vec!["10.4.2.5/32".parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: Cipher::Aes128Gcm,
                spi_out: 0x1001,
                key_out: key.clone(),
                spi_in: 0x1002,
                key_in: key.clone(),
                replay_window: 64,
                esn: false,
                lifetime: Lifetime::default(),
                udp_port: None,
            },
            route: true,
            multipath: None,
            negotiated: None,
        };
        let tunnel = TunnelSpec {
            relay: false,
            mtu: 1400,
        };
        let (out, _, _) = datapath::build(&[peer], tunnel, Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("espip-seqtick-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = SeqStore::open(&dir, "espip0").unwrap();
        reserve_initial(&out, &mut store).unwrap();
        let fp = key.fingerprint();
        assert_eq!(out.sa_reservation(0).unwrap().3, RESERVE);
        let mut warn = RateLimit::default();
        // Less than half used: nothing to do.
        out.set_next_seq(0, RESERVE / 2 - 1);
        extend_reservations(&out, &mut store, &mut warn);
        assert_eq!(out.sa_reservation(0).unwrap().3, RESERVE);
        // Half used: the next block is durable first, then published.
        out.set_next_seq(0, RESERVE / 2 + 1);
        extend_reservations(&out, &mut store, &mut warn);
        assert_eq!(out.sa_reservation(0).unwrap().3, 2 * RESERVE);
        assert_eq!(
            crate::sys::seqstore::peek(&dir, &fp).unwrap(),
            Some(2 * RESERVE)
        );
        // A clean stop records the last number sent.
        record_final(&out, &mut store);
        assert_eq!(
            crate::sys::seqstore::peek(&dir, &fp).unwrap(),
            Some(RESERVE / 2)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
