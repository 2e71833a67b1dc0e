//! The hot path allocates nothing: with a counting allocator, packets through `Outbound` and
//! `Inbound` in steady state (after the first packets of each SA) make zero heap allocations,
//! in both directions, for ESP (each cipher, with and without ESN), ESP in UDP and IP-in-IP.
//! Only allocations of the measuring thread are counted (the test harness has its own).

use espip_core::buf::{PacketBuf, MAX_PACKET};
use espip_core::datapath::{self, EncapSpec, Lifetime, PeerSpec, TunnelSpec, Verdict, Wire};
use espip_core::sa::{Cipher, KeyMaterial};
use espip_core::wire::ip::emit_ipv4_header;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(Cell::get)
}

fn peer(name: &str, endpoint: &str, allowed: &str, encap: EncapSpec) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec![allowed.parse().unwrap()],
        encap,
        route: true,
        multipath: None,
        negotiated: None,
    }
}

fn esp(c: Cipher, out: u8, inn: u8, esn: bool, udp_port: Option<u16>) -> EncapSpec {
    let key = |fill| KeyMaterial::new(c, &vec![fill; c.key_len() + 4]).unwrap();
    EncapSpec::Esp {
        cipher: c,
        spi_out: 0x1000 + u32::from(out),
        key_out: key(out),
        spi_in: 0x1000 + u32::from(inn),
        key_in: key(inn),
        replay_window: 1024,
        esn,
        lifetime: Lifetime::default(),
        udp_port,
    }
}

/// `n` packets from A to B and `n` from B to A, after a warm-up; the allocations of that.
fn exchange(enc_a: EncapSpec, enc_b: EncapSpec, n: usize) -> u64 {
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let (out_a, mut in_a, _) = datapath::build(
        &[peer("b", "192.0.2.2", "10.4.2.5/32", enc_a)],
        t,
        Default::default(),
    )
    .unwrap();
    let (out_b, mut in_b, _) = datapath::build(
        &[peer("a", "192.0.2.1", "10.4.2.99/32", enc_b)],
        t,
        Default::default(),
    )
    .unwrap();
    let mut buf = PacketBuf::new(MAX_PACKET);
    let mut pkt = vec![0xabu8; 1400];
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    let mut now = 0u64;
    let mut step = |count: usize, now: &mut u64| {
        for i in 0..count {
            *now += 1000;
            let len = 100 + (i * 37) % 1300;
            for dir in 0..2 {
                let (out, inb, src, dst, from) = if dir == 0 {
                    (&out_a, &mut in_b, [10, 4, 2, 99], [10, 4, 2, 5], a)
                } else {
                    (&out_b, &mut in_a, [10, 4, 2, 5], [10, 4, 2, 99], b)
                };
                emit_ipv4_header(&mut pkt[..len], src.into(), dst.into(), 17, len as u16);
                buf.reset();
                buf.read_area()[..len].copy_from_slice(&pkt[..len]);
                buf.set_len(len);
                let v = out.process(&mut buf, *now);
                let Verdict::Send(wire) = v else {
                    panic!("outbound: {v:?}");
                };
                let v = match wire {
                    Wire::EspInUdp { .. } => {
                        inb.process_udp(&mut buf, SocketAddr::new(from, 4500), *now)
                    }
                    w => inb.process(&mut buf, from, w.protocol(), *now),
                };
                assert_eq!(v, Verdict::ToTun, "inbound");
            }
        }
    };
    // Warm-up: the first packets of each SA may set things up.
    step(64, &mut now);
    allocations(|| step(n, &mut now))
}

#[test]
fn steady_state_packets_allocate_nothing() {
    // The counter sees an allocation when there is one.
    assert!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))) >= 1);
    for c in Cipher::ALL {
        for esn in [false, true] {
            let n = exchange(esp(c, 1, 2, esn, None), esp(c, 2, 1, esn, None), 2000);
            assert_eq!(
                n, 0,
                "ESP {c:?} esn {esn}: {n} allocations for 4000 packets"
            );
        }
        let n = exchange(
            esp(c, 1, 2, false, Some(4500)),
            esp(c, 2, 1, false, Some(4500)),
            2000,
        );
        assert_eq!(n, 0, "ESP in UDP {c:?}: {n} allocations");
    }
    let n = exchange(EncapSpec::IpIp, EncapSpec::IpIp, 2000);
    assert_eq!(n, 0, "IP-in-IP: {n} allocations");
}
