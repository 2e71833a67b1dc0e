//! Sequence-number reservations: loaded and reserved before the first packet, extended by
//! the TX thread ahead of need, the last number sent recorded at a clean stop.

use crate::datapath::Outbound;
use crate::sys::seqstore::{SeqError, SeqStore, RESERVE};
use crate::telemetry::RateLimit;
use tracing::{info, warn};

/// Resume every outbound SA after its saved reservation (1 for a new key) and reserve the
/// first block before anything is sent.
pub(super) fn reserve_initial(out: &mut Outbound, store: &mut SeqStore) -> Result<(), SeqError> {
    for idx in 0..out.peer_count() {
        let Some((spi, fp, _, _)) = out.sa_reservation(idx) else {
            continue;
        };
        let fp = fp.to_string();
        let start = store.load(spi, &fp)?.map_or(1, |r| r.saturating_add(1));
        let limit = start.saturating_add(RESERVE - 1);
        store.save(&fp, limit)?;
        out.set_next_seq(idx, start);
        out.set_limit(idx, limit);
        if start > 1 {
            info!(
                spi = format!("{spi:#010x}"),
                start, "outbound SA resumes after its saved sequence number"
            );
        }
    }
    Ok(())
}

/// Extend reservations that are half used. A failed write leaves the limit where it is, so the
/// SA stops at the end of what is on disk (`seq_unreserved`) rather than risk a repeat.
pub(super) fn extend_reservations(
    out: &mut Outbound,
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
