//! Paths learned from the peer's packets (`max_paths`): a server whose configuration names no
//! address of the client gives each new authenticated (address, port) a path slot, moves a
//! slot whose NAT rebound it, and forgets one silent for `path_idle_s`.

use super::*;

impl Multipath {
    /// When learned path `i` was learned (0: a configured path, or not yet).
    pub(super) fn learned_at(&self, i: usize) -> u64 {
        if self.paths[i].learned {
            self.stats[i].learned.changed_at.load(Relaxed)
        } else {
            0
        }
    }

    /// Whether the paths are learned (`max_paths`) rather than configured.
    pub fn learns(&self) -> bool {
        self.learns
    }

    /// Path `i`'s endpoint and UDP port (0: protocol 50, or the configured port is the
    /// caller's to use); `None`: a learned path that has not heard from anyone yet.
    pub fn endpoint_of(&self, i: usize) -> Option<(IpAddr, u16)> {
        let p = &self.paths[i];
        if p.learned {
            self.stats[i].learned.get().map(|a| (a.ip(), a.port()))
        } else {
            Some((p.endpoint, p.port))
        }
    }

    /// Whether learned path `i` has nobody behind it at `now`: never learned, or silent for
    /// `path_idle_s`.
    pub fn forgotten(&self, i: usize, now: u64) -> bool {
        let s = &self.stats[i];
        self.paths[i].learned
            && (s.learned.get().is_none()
                || now.saturating_sub(s.heard.load(Relaxed))
                    >= u64::from(self.spec.path_idle_s) * 1_000_000_000)
    }

    /// An authenticated packet came at `now` from `from` (address and UDP port, 0 for
    /// protocol 50), which no learned path has: the path it becomes. A free slot (never used,
    /// or forgotten after `path_idle_s`) first; else one that has gone silent (nothing heard
    /// for two probe intervals: a NAT that rebound the path's port or address), the same
    /// address's first, then the longest silent. `None`: `max_paths` live paths already
    /// (the packet is dropped as `path_limit`). Only the RX thread calls this.
    pub fn adopt(&self, from: SocketAddr, now: u64) -> Option<usize> {
        if !self.learns {
            return None;
        }
        let n = self.paths.len();
        let silent_for = |i: usize| now.saturating_sub(self.stats[i].heard.load(Relaxed));
        let rebound = 2 * u64::from(self.spec.probe_interval_ms) * 1_000_000;
        let slot = (0..n)
            .find(|&i| self.stats[i].learned.get().is_none())
            .or_else(|| (0..n).find(|&i| self.forgotten(i, now)))
            .or_else(|| {
                (0..n).find(|&i| {
                    silent_for(i) >= rebound
                        && self.stats[i].learned.get().map(|a| a.ip()) == Some(from.ip())
                })
            })
            .or_else(|| {
                (0..n)
                    .filter(|&i| silent_for(i) >= rebound)
                    .max_by_key(|&i| silent_for(i))
            })?;
        let s = &self.stats[slot];
        s.learned.learn(from, now);
        s.heard.store(now, Relaxed);
        s.udp_port_seen.store(u32::from(from.port()), Relaxed);
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn slots(n: usize) -> Multipath {
        Multipath::new(
            MultipathSpec {
                path_idle_s: 60,
                ..MultipathSpec::default()
            },
            (0..n).map(PathSpec::learned).collect(),
            None,
        )
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const NOWHERE: crate::datapath::Landing = crate::datapath::Landing::UNKNOWN;

    #[test]
    fn each_new_address_and_port_takes_a_free_slot_up_to_max_paths() {
        let m = slots(2);
        assert!(m.learns());
        assert_eq!(m.endpoint_of(0), None);
        let (dsl, lte, third) = (
            at("198.51.100.7:4500"),
            at("203.0.113.9:1024"),
            at("192.0.2.5:4500"),
        );
        assert_eq!(m.path_from(dsl.ip(), dsl.port(), NOWHERE), None);
        assert_eq!(m.adopt(dsl, S), Some(0));
        assert_eq!(m.adopt(lte, S), Some(1));
        assert_eq!(m.path_from(dsl.ip(), dsl.port(), NOWHERE), Some(0));
        assert_eq!(m.path_from(lte.ip(), lte.port(), NOWHERE), Some(1));
        assert_eq!(m.endpoint_of(1), Some((lte.ip(), 1024)));
        // Another port of a known address is another path, not the same one.
        assert_eq!(m.path_from(lte.ip(), 1025, NOWHERE), None);
        // Both live (heard just now): a third is one too many.
        m.stats[0].heard.store(S + 10 * MS, Relaxed);
        m.stats[1].heard.store(S + 10 * MS, Relaxed);
        assert_eq!(m.adopt(third, S + 20 * MS), None);
        assert_eq!(m.endpoint_of(0), Some((dsl.ip(), 4500)), "nothing moved");
    }

    /// A NAT that rebinds path 2 (new port, same address) moves path 2, not path 1, once the
    /// old binding has gone silent; path 1 keeps being heard throughout.
    #[test]
    fn a_nat_rebinding_moves_that_path_not_another() {
        let m = slots(2);
        let (dsl, lte) = (at("198.51.100.7:4500"), at("203.0.113.9:1024"));
        m.adopt(dsl, S);
        m.adopt(lte, S);
        let now = 2 * S;
        m.stats[0].heard.store(now, Relaxed);
        m.stats[1].heard.store(now - 300 * MS, Relaxed);
        let rebound = at("203.0.113.9:1030");
        assert_eq!(m.adopt(rebound, now), Some(1));
        assert_eq!(m.endpoint_of(1), Some((rebound.ip(), 1030)));
        assert_eq!(m.endpoint_of(0), Some((dsl.ip(), 4500)));
        assert_eq!(m.stats[1].learned.moves.load(Relaxed), 1);
        // A rebinding to another address too: the silent slot, the live one stays.
        m.stats[1].heard.store(now - 300 * MS, Relaxed);
        let moved = at("203.0.113.77:2000");
        assert_eq!(m.adopt(moved, now), Some(1));
        assert_eq!(m.endpoint_of(0), Some((dsl.ip(), 4500)));
    }

    /// Of two silent slots, a rebinding takes the one with the same address first.
    #[test]
    fn a_rebinding_prefers_the_slot_of_its_own_address() {
        let m = slots(2);
        m.adopt(at("198.51.100.7:4500"), S);
        m.adopt(at("203.0.113.9:1024"), S);
        // Slot 0 the longer silent, but the new port is slot 1's address.
        m.stats[0].heard.store(S, Relaxed);
        m.stats[1].heard.store(2 * S, Relaxed);
        assert_eq!(m.adopt(at("203.0.113.9:1030"), 3 * S), Some(1));
    }

    /// A slot silent for `path_idle_s` is forgotten: not probed, down, and free for a new
    /// address even while the other is live.
    #[test]
    fn a_silent_path_is_forgotten_after_path_idle() {
        let m = slots(2);
        m.adopt(at("198.51.100.7:4500"), S);
        assert!(!m.forgotten(0, 2 * S));
        assert!(m.forgotten(1, 2 * S), "never learned");
        let (_, probes) = m.tick(2 * S);
        assert_eq!(
            probes.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0],
            "a slot nobody is behind is not probed"
        );
        assert_eq!(m.stats[1].state(), PathState::Down);
        let later = S + 61 * S;
        assert!(m.forgotten(0, later));
        let (events, probes) = m.tick(later);
        assert!(probes.is_empty());
        assert_eq!(
            events,
            vec![PathEvent {
                path: 0,
                state: PathState::Down
            }],
            "forgetting a path that was there is news once"
        );
        assert!(m.tick(later + S).0.is_empty());
        // Its slot takes the next address (the free slot 1 first).
        assert_eq!(m.adopt(at("192.0.2.5:4500"), later), Some(1));
        assert_eq!(m.adopt(at("192.0.2.6:4500"), later), Some(0));
    }

    /// A freshly learned path has a detection time of its own: it is not down at the next
    /// tick because the peer started long ago.
    #[test]
    fn a_path_learned_late_is_not_found_down_at_once() {
        let m = slots(2);
        m.adopt(at("198.51.100.7:4500"), S);
        m.tick(S);
        m.adopt(at("203.0.113.9:1024"), 30 * S);
        m.stats[0].heard.store(30 * S, Relaxed);
        let (events, _) = m.tick(30 * S + 100 * MS);
        assert!(
            !events
                .iter()
                .any(|e| e.path == 1 && e.state == PathState::Down),
            "{events:?}"
        );
        assert_ne!(m.stats[1].state(), PathState::Down);
    }

    /// Configured paths never learn.
    #[test]
    fn configured_paths_adopt_nothing() {
        let m = Multipath::new(
            MultipathSpec::default(),
            vec![PathSpec::routed("a", IpAddr::from([192, 0, 2, 1]), 0)],
            None,
        );
        assert!(!m.learns());
        assert_eq!(m.adopt(at("192.0.2.9:0"), S), None);
    }
}
