//! A peer's learned outer address: written by the inbound half when an authenticated packet
//! comes from a new address (roaming, as WireGuard does), and by the IKE edge when an IKE_AUTH
//! authenticated a peer without endpoint; read by the outbound half for every packet it
//! sends. Readers take no lock: a sequence lock over four words, so a reader never sees half
//! of an IPv6 address; a writer takes the odd version with a compare-and-swap (writes are
//! rare: a move).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// The learned endpoint of one peer, with when it last moved and how often.
#[derive(Debug, Default)]
pub struct EndpointCell {
    /// Even: stable; odd: a write is under way. 0: nothing learned yet.
    version: AtomicU64,
    /// The address's 16 bytes (an IPv4 address as IPv4-mapped IPv6).
    hi: AtomicU64,
    lo: AtomicU64,
    /// Bit 16: IPv4; bits 0-15: the UDP port (0 for IP protocol 50).
    meta: AtomicU64,
    /// When it was learned or last moved (the caller's clock, nanoseconds).
    pub changed_at: AtomicU64,
    /// Times it moved after it was first learned.
    pub moves: AtomicU64,
}

const V4: u64 = 1 << 16;

impl EndpointCell {
    /// The learned address and port (`None`: no authenticated packet yet).
    pub fn get(&self) -> Option<SocketAddr> {
        loop {
            let v1 = self.version.load(Ordering::Acquire);
            if v1 == 0 {
                return None;
            }
            if v1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let (hi, lo, meta) = (
                self.hi.load(Ordering::Relaxed),
                self.lo.load(Ordering::Relaxed),
                self.meta.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            if self.version.load(Ordering::Relaxed) == v1 {
                let v6 = Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo));
                let ip = match (meta & V4 != 0, v6.to_ipv4_mapped()) {
                    (true, Some(v4)) => IpAddr::V4(v4),
                    _ => IpAddr::V6(v6),
                };
                return Some(SocketAddr::new(ip, (meta & 0xffff) as u16));
            }
        }
    }

    /// Record that an authenticated packet came from `from` at `now` (port 0 for protocol
    /// 50). Returns true when that moved the endpoint (or learned the first one).
    pub fn learn(&self, from: SocketAddr, now: u64) -> bool {
        let before = self.get();
        if before == Some(from) {
            return false;
        }
        let (ip6, v4) = match from.ip() {
            IpAddr::V4(a) => (a.to_ipv6_mapped(), V4),
            IpAddr::V6(a) => (a, 0),
        };
        let bits = u128::from(ip6);
        // Take the write side: an even version made odd.
        let v = loop {
            let v = self.version.load(Ordering::Relaxed);
            if v % 2 == 0
                && self
                    .version
                    .compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break v;
            }
            std::hint::spin_loop();
        };
        fence(Ordering::Release);
        self.hi.store((bits >> 64) as u64, Ordering::Relaxed);
        self.lo.store(bits as u64, Ordering::Relaxed);
        self.meta
            .store(v4 | u64::from(from.port()), Ordering::Relaxed);
        self.version.store(v + 2, Ordering::Release);
        self.changed_at.store(now, Ordering::Relaxed);
        if before.is_some() {
            self.moves.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Take over what `old` learned (a reload that keeps the peer).
    pub fn copy_from(&self, old: &EndpointCell) {
        if let Some(a) = old.get() {
            self.learn(a, old.changed_at.load(Ordering::Relaxed));
            self.moves
                .store(old.moves.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// The address of ours a peer (or path) last reached us at, which our packets to it leave
/// from (WireGuard's sticky source). Written by the RX thread after a packet authenticated;
/// forgotten by any thread when the kernel refuses to send from it (the address left this
/// host: this host roamed), so the next packets leave from the routed source until a packet
/// lands on an address again.
#[derive(Debug, Default)]
pub struct ReplySource {
    cell: EndpointCell,
    stale: std::sync::atomic::AtomicBool,
}

impl ReplySource {
    /// The source to send from (`None`: the routed one).
    pub fn get(&self) -> Option<IpAddr> {
        if self.stale.load(Ordering::Relaxed) {
            return None;
        }
        self.cell.get().map(|a| a.ip())
    }

    /// An authenticated packet landed on `at` at `now` (only the RX thread calls this).
    pub fn learn(&self, at: IpAddr, now: u64) {
        self.cell.learn(SocketAddr::new(at, 0), now);
        if self.stale.load(Ordering::Relaxed) {
            self.stale.store(false, Ordering::Relaxed);
        }
    }

    /// The kernel refused to send from `src`: if that is this source, stop using it.
    pub fn refused(&self, src: IpAddr) {
        if self.cell.get().map(|a| a.ip()) == Some(src) {
            self.stale.store(true, Ordering::Relaxed);
        }
    }

    /// Take over what `old` learned (a reload that keeps the peer or path).
    pub fn copy_from(&self, old: &ReplySource) {
        self.cell.copy_from(&old.cell);
        self.stale
            .store(old.stale.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The unspecified address of `ip`'s family.
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn a_reply_source_refused_by_the_kernel_is_forgotten_until_a_packet_lands_again() {
        let r = ReplySource::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(r.get(), None);
        r.learn(a, 1);
        assert_eq!(r.get(), Some(a));
        r.refused(b);
        assert_eq!(
            r.get(),
            Some(a),
            "another source's refusal is not this one's"
        );
        r.refused(a);
        assert_eq!(r.get(), None, "the routed source after a refusal");
        r.learn(b, 2);
        assert_eq!(r.get(), Some(b));
    }

    #[test]
    fn learns_moves_and_counts() {
        let c = EndpointCell::default();
        assert_eq!(c.get(), None);
        let a: SocketAddr = "192.0.2.1:4500".parse().unwrap();
        let b: SocketAddr = "[2001:db8::7]:0".parse().unwrap();
        assert!(c.learn(a, 5));
        assert_eq!(c.get(), Some(a));
        assert!(!c.learn(a, 6), "the same address is no move");
        assert_eq!(c.changed_at.load(Ordering::Relaxed), 5);
        assert!(c.learn(b, 9));
        assert_eq!(c.get(), Some(b));
        assert_eq!(c.moves.load(Ordering::Relaxed), 1);
        // An IPv4-mapped IPv6 address stays IPv6.
        let m: SocketAddr = "[::ffff:192.0.2.1]:1".parse().unwrap();
        c.learn(m, 10);
        assert_eq!(c.get(), Some(m));
        let d = EndpointCell::default();
        d.copy_from(&c);
        assert_eq!(d.get(), Some(m));
        assert_eq!(d.moves.load(Ordering::Relaxed), 2);
    }

    /// A reader never sees a mix of two addresses while the writer moves between them (the
    /// daemon's RX thread writes while its TX threads read: a test thread stands for them).
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn readers_never_see_a_torn_address() {
        let c = Arc::new(EndpointCell::default());
        let a: SocketAddr = "[2001:db8::1:2:3:4]:1111".parse().unwrap();
        let b: SocketAddr = "10.9.8.7:2222".parse().unwrap();
        c.learn(a, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let got = c.get().unwrap();
                    assert!(got == a || got == b, "torn read: {got}");
                    n += 1;
                }
                n
            })
        };
        for i in 0..200_000u64 {
            c.learn(if i % 2 == 0 { b } else { a }, i);
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
