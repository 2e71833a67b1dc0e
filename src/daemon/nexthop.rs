//! The `AF_PACKET` fast path's next hops, kept current by the serving loop: every
//! [`REFRESH`] the kernel's route and neighbour tables are read for every raw-mode
//! destination of the current generation, and the table the TX threads read is swapped when
//! it changed. A destination that gains or loses its next hop is logged once per change.

use crate::sys::packet::NextHops;
use crate::telemetry::Current;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often the next hops are read again: also how long a changed MAC address or route
/// can go unnoticed (a `STALE` neighbour is left to the raw socket until the kernel has
/// confirmed it, see [`crate::sys::netlink::next_hops`]).
pub(super) const REFRESH: Duration = Duration::from_secs(1);

/// The refresh while some destination has no usable next hop (the kernel resolves it on the
/// raw socket's first packets): the fast path starts within this of the neighbour's answer.
const REFRESH_INCOMPLETE: Duration = Duration::from_millis(250);

/// Keep `hops` current for the generation in `current` until the task is dropped.
pub(super) async fn refresh(hops: Arc<ArcSwap<NextHops>>, current: Arc<Current>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        wait = REFRESH;
        let cfg = current.load().cfg.clone();
        let dsts = super::setup::raw_endpoints(&cfg);
        let Ok(new) = crate::sys::netlink::next_hops(&dsts, cfg.interface.local).await else {
            continue;
        };
        if new.0.len() < dsts.len() {
            wait = REFRESH_INCOMPLETE;
        }
        let old = hops.load_full();
        if *old == new {
            continue;
        }
        for d in &dsts {
            match (old.get(*d), new.get(*d)) {
                (None, Some(h)) => info!(
                    "fast path: outer packets to {d} go through the AF_PACKET socket (interface index {}, next hop {})",
                    h.ifindex,
                    mac(&h.dst_mac)
                ),
                (Some(_), None) => info!(
                    "fast path: outer packets to {d} go through the raw socket until the kernel has a confirmed next hop for it"
                ),
                (Some(a), Some(b)) if a != b => info!(
                    "fast path: the next hop of {d} changed to {} (interface index {})",
                    mac(&b.dst_mac),
                    b.ifindex
                ),
                _ => {}
            }
        }
        hops.store(Arc::new(new));
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
