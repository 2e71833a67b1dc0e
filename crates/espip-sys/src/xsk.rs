//! The XDP receive path of the raw-socket modes (`interface.rx_path = "xdp"`): an XDP
//! program on the interface steers the tunnel's outer packets to `AF_XDP` sockets in copy
//! mode, so the kernel's IP input, route lookup and raw-socket delivery never run for them.
//!
//! - The program (eBPF, assembled here and loaded with `bpf(2)` like [`super::bpf`]'s socket
//!   filters; no loader crate) matches an Ethernet frame carrying an unfragmented IPv4 packet
//!   with no options, or an IPv6 packet with no extension header, whose protocol (next header)
//!   is one the peers use (50, 4, 41) and whose destination is one of this host's outer
//!   addresses. It redirects those to the `XSKMAP` entry of the receiving queue
//!   (`bpf_redirect_map`, `XDP_PASS` when the queue has no socket); everything else passes to
//!   the stack, where the raw sockets still listen (fragments, IPv4 options, a queue without a
//!   socket, an address added later).
//! - It is attached with a `bpf_link` (`BPF_LINK_CREATE`): the link belongs to the descriptor,
//!   so the program is detached when espip stops or is killed; nothing to clean up after a
//!   SIGKILL, and an interface that already has an XDP program is left alone (`EBUSY`).
//! - One `AF_XDP` socket per receive queue (at most [`MAX_QUEUES`]), each with its own UMEM of
//!   [`FRAMES`] frames, in copy mode (`XDP_COPY`: works with every driver and with generic
//!   XDP); the RX thread copies each frame out and gives it back to the fill ring at once.
//!
//! The packets it takes skip netfilter's `PREROUTING` and `INPUT` hooks and `rp_filter`
//! (docs/security.md). espip checks what the kernel's IP input would have: the IPv4 header
//! checksum and lengths (the outer source is checked against the peer by the core, and ESP's
//! ICV or IP-in-IP's inner checksum check cover the rest).

use super::bpf::{insn, Insn};
use crate::bpf::{bpf, owned};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s `BPF_XDP`.
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `BPF_FUNC_redirect_map`.
const REDIRECT_MAP: i32 = 51;
/// XDP verdicts.
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_COPY: u16 = 1 << 1;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;

/// Frames per socket (and the size of its fill and RX rings): 1024 full-size frames, a
/// little over a millisecond at 10 Gbit/s; 2 or 4 MB of UMEM per queue.
pub const FRAMES: u32 = 1024;
/// Receive queues with a socket of their own; packets on other queues go to the stack.
pub const MAX_QUEUES: u32 = 8;
/// Ethernet header (no VLAN tag: the program passes tagged frames to the stack).
const ETH_LEN: usize = 14;

/// What the XDP program steers to espip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Steer {
    /// IPv4 protocols (50, 4, 41) of the raw-mode peers with IPv4 endpoints.
    pub v4_protocols: Vec<u8>,
    /// IPv6 next headers of the raw-mode peers with IPv6 endpoints.
    pub v6_protocols: Vec<u8>,
    /// This host's outer addresses (the packets' destination).
    pub locals: Vec<IpAddr>,
}

impl Steer {
    /// Whether some family has both a protocol and a local address.
    pub fn steers_anything(&self) -> bool {
        let has = |v6: bool| self.locals.iter().any(|l| l.is_ipv6() == v6);
        !self.v4_protocols.is_empty() && has(false) || !self.v6_protocols.is_empty() && has(true)
    }
}

/// Why the XDP path could not be set up (the raw sockets take the packets then).
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("{0}: {1}")]
    Sys(&'static str, io::Error),
    #[error("interface index {0} has no name (it went away?)")]
    NoInterface(u32),
    #[error("the interface's MTU {0} does not fit a {1}-byte frame")]
    Mtu(u32, usize),
    #[error("nothing to steer (no raw-mode peer with a known local address)")]
    Nothing,
}

fn sys(what: &'static str) -> impl FnOnce(io::Error) -> XdpError {
    move |e| XdpError::Sys(what, e)
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// eBPF opcodes used below.
mod op {
    /// `dst = *(u32 *)(src + off)`, `u16`, `u8`.
    pub const LDX_W: u8 = 0x61;
    pub const LDX_H: u8 = 0x69;
    pub const LDX_B: u8 = 0x71;
    /// `dst = src`, `dst += imm`, `dst = imm`, `dst >>= imm` (64-bit).
    pub const MOV_X: u8 = 0xbf;
    pub const ADD_K: u8 = 0x07;
    pub const MOV_K: u8 = 0xb7;
    pub const RSH_K: u8 = 0x77;
    pub const AND_K: u8 = 0x57;
    /// `if dst > src goto` (64-bit), `goto`.
    pub const JGT_X: u8 = 0x2d;
    pub const JA: u8 = 0x05;
    /// 32-bit compares (`BPF_JMP32`): an address word with its top bit set must not be
    /// sign-extended.
    pub const JEQ32_K: u8 = 0x16;
    pub const JNE32_K: u8 = 0x56;
    /// `dst = imm64` (two slots; with `src = 1` the immediate is a map descriptor).
    pub const LD_IMM64: u8 = 0x18;
    pub const CALL: u8 = 0x85;
    pub const EXIT: u8 = 0x95;
}

/// A label's place, once known.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    Pass,
    Redirect,
    V4,
    V6,
    V4Dst,
    V6Dst,
    /// The next IPv6 address to compare (the n-th).
    V6Addr(usize),
}

/// A tiny assembler: instructions with symbolic jump targets.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    jumps: Vec<(usize, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn emit(&mut self, i: Insn) {
        self.code.push(i);
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.jumps.push((self.code.len(), to));
        self.code.push(insn(code, dst, src, 0, imm));
    }
    fn label(&mut self, l: Label) {
        self.labels.push((l, self.code.len()));
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| *l == to)
                .map(|(_, p)| *p)
                .expect("every jump target is placed");
            self.code[at].off = (target as isize - at as isize - 1) as i16;
        }
        self.code
    }
}

/// A 4-byte group of a packet as the little-endian `u32` the program loads.
fn word(b: &[u8]) -> i32 {
    i32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The XDP program for `steer`, redirecting through the map `map_fd`; `miss` is the verdict
/// when the receiving queue has no socket (`XDP_PASS`; the tests use `XDP_DROP` to see what
/// the program chose).
fn program(steer: &Steer, map_fd: RawFd, miss: i32) -> Vec<Insn> {
    use op::*;
    use Label::*;
    let v4 = !steer.v4_protocols.is_empty() && steer.locals.iter().any(IpAddr::is_ipv4);
    let v6 = !steer.v6_protocols.is_empty() && steer.locals.iter().any(IpAddr::is_ipv6);
    let mut a = Asm::default();
    // r1: the context (kept for the redirect); r2: data; r3: data_end.
    a.emit(insn(LDX_W, 2, 1, 0, 0));
    a.emit(insn(LDX_W, 3, 1, 4, 0));
    // Ethernet + the IPv4 header: 34 bytes at least.
    a.emit(insn(MOV_X, 4, 2, 0, 0));
    a.emit(insn(ADD_K, 4, 0, 0, 34));
    a.jump(JGT_X, 4, 3, 0, Pass);
    a.emit(insn(LDX_H, 5, 2, 12, 0));
    if v4 {
        a.jump(JEQ32_K, 5, 0, 0x0008, V4); // 0x0800, read little-endian
    }
    if v6 {
        a.jump(JEQ32_K, 5, 0, 0xdd86u16 as i32, V6);
    }
    a.jump(JA, 0, 0, 0, Pass);

    if v4 {
        a.label(V4);
        // Version 4, no options (anything else is the stack's).
        a.emit(insn(LDX_B, 5, 2, 14, 0));
        a.jump(JNE32_K, 5, 0, 0x45, Pass);
        // Not a fragment: MF and the offset are zero (bytes 20-21, read little-endian).
        a.emit(insn(LDX_H, 5, 2, 20, 0));
        a.emit(insn(AND_K, 5, 0, 0, 0xff3f));
        a.jump(JNE32_K, 5, 0, 0, Pass);
        a.emit(insn(LDX_B, 5, 2, 23, 0));
        for p in &steer.v4_protocols {
            a.jump(JEQ32_K, 5, 0, i32::from(*p), V4Dst);
        }
        a.jump(JA, 0, 0, 0, Pass);
        a.label(V4Dst);
        a.emit(insn(LDX_W, 5, 2, 30, 0));
        for l in &steer.locals {
            if let IpAddr::V4(v4) = l {
                a.jump(JEQ32_K, 5, 0, word(&v4.octets()), Redirect);
            }
        }
        a.jump(JA, 0, 0, 0, Pass);
    }
    if v6 {
        a.label(V6);
        a.emit(insn(MOV_X, 4, 2, 0, 0));
        a.emit(insn(ADD_K, 4, 0, 0, 54));
        a.jump(JGT_X, 4, 3, 0, Pass);
        a.emit(insn(LDX_B, 5, 2, 14, 0));
        a.emit(insn(RSH_K, 5, 0, 0, 4));
        a.jump(JNE32_K, 5, 0, 6, Pass);
        a.emit(insn(LDX_B, 5, 2, 20, 0));
        for p in &steer.v6_protocols {
            a.jump(JEQ32_K, 5, 0, i32::from(*p), V6Dst);
        }
        a.jump(JA, 0, 0, 0, Pass);
        a.label(V6Dst);
        let addrs: Vec<[u8; 16]> = steer
            .locals
            .iter()
            .filter_map(|l| match l {
                IpAddr::V6(v) => Some(v.octets()),
                IpAddr::V4(_) => None,
            })
            .collect();
        for (n, addr) in addrs.iter().enumerate() {
            a.label(V6Addr(n));
            for (k, w) in addr.chunks(4).enumerate() {
                a.emit(insn(LDX_W, 5, 2, 38 + 4 * k as i16, 0));
                a.jump(JNE32_K, 5, 0, word(w), V6Addr(n + 1));
            }
            a.jump(JA, 0, 0, 0, Redirect);
        }
        a.label(V6Addr(addrs.len()));
        a.jump(JA, 0, 0, 0, Pass);
    }

    a.label(Redirect);
    // bpf_redirect_map(map, ctx->rx_queue_index, miss)
    a.emit(insn(LDX_W, 2, 1, 16, 0));
    a.emit(insn(LD_IMM64, 1, 1, 0, map_fd));
    a.emit(insn(0, 0, 0, 0, 0));
    a.emit(insn(MOV_K, 3, 0, 0, miss));
    a.emit(insn(CALL, 0, 0, 0, REDIRECT_MAP));
    a.emit(insn(EXIT, 0, 0, 0, 0));

    a.label(Pass);
    a.emit(insn(MOV_K, 0, 0, 0, XDP_PASS));
    a.emit(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

fn create_map(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_XSKMAP,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    super::bpf::load(BPF_PROG_TYPE_XDP, "espip_xdp", insns)
}

/// A memory mapping, unmapped on drop.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    /// Anonymous memory (`fd` `None`) or one of an `AF_XDP` socket's rings.
    fn new(len: usize, fd: Option<RawFd>, offset: libc::off_t) -> io::Result<Mmap> {
        let (flags, fd) = match fd {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            Some(fd) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd),
        };
        // SAFETY: a new mapping at an address the kernel picks; it checks fd and offset.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: p.cast(), len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: this mapping, made by `Mmap::new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `struct xdp_ring_offset`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RingOff {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

/// `struct xdp_mmap_offsets`.
#[repr(C)]
#[derive(Default)]
struct MmapOffsets {
    rx: RingOff,
    tx: RingOff,
    fr: RingOff,
    cr: RingOff,
}

/// `struct xdp_umem_reg`.
#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

/// `struct sockaddr_xdp`.
#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

/// `struct xdp_statistics` (the fields of Linux 5.9+).
#[repr(C)]
#[derive(Default)]
struct XdpStatistics {
    rx_dropped: u64,
    rx_invalid_descs: u64,
    tx_invalid_descs: u64,
    rx_ring_full: u64,
    rx_fill_ring_empty_descs: u64,
    tx_ring_empty_descs: u64,
}

fn setsockopt<T>(fd: &OwnedFd, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes from a live value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_XDP,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt<T: Default>(fd: &OwnedFd, name: libc::c_int) -> io::Result<T> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_XDP,
            name,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// One `AF_XDP` socket on one receive queue, with its UMEM, fill ring and RX ring (the
/// completion ring exists because the kernel requires one; nothing is sent on it).
pub struct Xsk {
    fd: OwnedFd,
    umem: Mmap,
    frame: usize,
    rx: Mmap,
    fill: Mmap,
    off: MmapOffsets,
    rx_cons: u32,
    fill_prod: u32,
}

// SAFETY: the mappings are plain memory shared with the kernel; an `Xsk` is used by one thread
// at a time (`&mut self` for every ring operation).
unsafe impl Send for Xsk {}

impl Xsk {
    fn open(ifindex: u32, queue: u32, frame: usize) -> Result<Xsk, XdpError> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(XdpError::Sys("socket(AF_XDP)", io::Error::last_os_error()));
        }
        let fd = owned(fd.into());
        let len = frame * FRAMES as usize;
        let umem = Mmap::new(len, None, 0).map_err(sys("mmap (UMEM)"))?;
        let reg = UmemReg {
            addr: umem.ptr as u64,
            len: len as u64,
            chunk_size: frame as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&fd, XDP_UMEM_REG, &reg).map_err(sys("XDP_UMEM_REG"))?;
        for (name, what) in [
            (XDP_UMEM_FILL_RING, "XDP_UMEM_FILL_RING"),
            (XDP_UMEM_COMPLETION_RING, "XDP_UMEM_COMPLETION_RING"),
            (XDP_RX_RING, "XDP_RX_RING"),
        ] {
            setsockopt(&fd, name, &FRAMES).map_err(sys(what))?;
        }
        let off: MmapOffsets =
            getsockopt(&fd, XDP_MMAP_OFFSETS).map_err(sys("XDP_MMAP_OFFSETS"))?;
        let rx = Mmap::new(
            off.rx.desc as usize + FRAMES as usize * 16,
            Some(fd.as_raw_fd()),
            0,
        )
        .map_err(sys("mmap (RX ring)"))?;
        let fill = Mmap::new(
            off.fr.desc as usize + FRAMES as usize * 8,
            Some(fd.as_raw_fd()),
            XDP_UMEM_PGOFF_FILL_RING,
        )
        .map_err(sys("mmap (fill ring)"))?;
        let mut x = Xsk {
            fd,
            umem,
            frame,
            rx,
            fill,
            off,
            rx_cons: 0,
            fill_prod: 0,
        };
        for i in 0..FRAMES as usize {
            x.give((i * frame) as u64);
        }
        x.publish_fill();
        let sa = SockaddrXdp {
            family: AF_XDP as u16,
            flags: XDP_COPY,
            ifindex,
            queue_id: queue,
            shared_umem_fd: 0,
        };
        // SAFETY: bind reads one sockaddr_xdp of the given size.
        let r = unsafe {
            libc::bind(
                x.fd.as_raw_fd(),
                (&sa as *const SockaddrXdp).cast(),
                std::mem::size_of::<SockaddrXdp>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(XdpError::Sys("bind(AF_XDP)", io::Error::last_os_error()));
        }
        Ok(x)
    }

    /// A ring's producer or consumer counter.
    fn counter(m: &Mmap, at: u64) -> &AtomicU32 {
        assert!(at as usize + 4 <= m.len);
        // SAFETY: the kernel's offsets point at aligned u32 counters inside the mapping (checked
        // to be inside above), shared with the kernel and only accessed atomically.
        unsafe { &*(m.ptr.add(at as usize) as *const AtomicU32) }
    }

    /// Put a frame on the fill ring (published by [`Xsk::publish_fill`]).
    fn give(&mut self, addr: u64) {
        let slot = (self.fill_prod & (FRAMES - 1)) as usize;
        let at = self.off.fr.desc as usize + slot * 8;
        assert!(at + 8 <= self.fill.len);
        // SAFETY: inside the fill ring's descriptor array (checked above); the kernel reads the
        // slot only after the producer store that publishes it.
        unsafe { (self.fill.ptr.add(at) as *mut u64).write(addr) };
        self.fill_prod = self.fill_prod.wrapping_add(1);
    }

    fn publish_fill(&self) {
        Self::counter(&self.fill, self.off.fr.producer).store(self.fill_prod, Ordering::Release);
    }

    /// Take up to `max` received frames: `f(i, frame)` for each (the Ethernet frame as the
    /// interface received it); each frame goes back to the fill ring after `f`. How many.
    pub fn recv(&mut self, max: usize, mut f: impl FnMut(usize, &[u8])) -> usize {
        let prod = Self::counter(&self.rx, self.off.rx.producer).load(Ordering::Acquire);
        let n = (prod.wrapping_sub(self.rx_cons) as usize).min(max);
        for i in 0..n {
            let slot = (self.rx_cons & (FRAMES - 1)) as usize;
            let at = self.off.rx.desc as usize + slot * 16;
            assert!(at + 16 <= self.rx.len);
            // SAFETY: inside the RX ring's descriptor array (checked above), a descriptor the
            // kernel published before the producer value read with Acquire.
            let (addr, len) = unsafe {
                let d = self.rx.ptr.add(at);
                ((d as *const u64).read(), (d.add(8) as *const u32).read())
            };
            let (start, len) = (addr as usize, len as usize);
            if start
                .checked_add(len)
                .is_some_and(|end| end <= self.umem.len)
            {
                // SAFETY: inside the UMEM (checked above), written by the kernel before it
                // published the descriptor; the frame is ours until it goes back to the fill
                // ring below.
                let frame = unsafe { std::slice::from_raw_parts(self.umem.ptr.add(start), len) };
                f(i, frame);
            }
            self.rx_cons = self.rx_cons.wrapping_add(1);
            self.give(addr - addr % self.frame as u64);
        }
        if n > 0 {
            Self::counter(&self.rx, self.off.rx.consumer).store(self.rx_cons, Ordering::Release);
            self.publish_fill();
        }
        n
    }

    /// Frames the kernel could not give this socket (RX ring full, no free frame, too large).
    pub fn dropped(&self) -> u64 {
        getsockopt::<XdpStatistics>(&self.fd, XDP_STATISTICS)
            .map(|s| s.rx_dropped + s.rx_ring_full + s.rx_fill_ring_empty_descs)
            .unwrap_or(0)
    }
}

impl AsFd for Xsk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The XDP program on one interface, its map and link, and the sockets of its receive queues.
/// Dropping it detaches the program.
pub struct XdpRx {
    pub xsks: Vec<Xsk>,
    /// How the program is attached: "native" (the driver's XDP) or "generic".
    pub mode: &'static str,
    pub ifname: String,
    _map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl XdpRx {
    /// Attach to the interface `ifindex`, with a socket on each of its first
    /// [`MAX_QUEUES`] receive queues.
    pub fn open(ifindex: u32, steer: &Steer) -> Result<XdpRx, XdpError> {
        if !steer.steers_anything() {
            return Err(XdpError::Nothing);
        }
        let ifname = nix::net::if_::if_indextoname(ifindex)
            .map_err(|_| XdpError::NoInterface(ifindex))?
            .to_string_lossy()
            .into_owned();
        let sysfs = format!("/sys/class/net/{ifname}");
        let mtu: u32 = std::fs::read_to_string(format!("{sysfs}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1500);
        let frame = [2048, 4096]
            .into_iter()
            .find(|f| mtu as usize + ETH_LEN + 4 <= *f)
            .ok_or(XdpError::Mtu(mtu, 4096))?;
        let queues = std::fs::read_dir(format!("{sysfs}/queues"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count() as u32
            })
            .unwrap_or(1)
            .clamp(1, MAX_QUEUES);
        let map = create_map(queues).map_err(sys("bpf(BPF_MAP_CREATE, XSKMAP)"))?;
        let prog = load(&program(steer, map.as_raw_fd(), XDP_PASS))
            .map_err(sys("bpf(BPF_PROG_LOAD, XDP)"))?;
        let mut xsks = Vec::new();
        for q in 0..queues {
            let x = Xsk::open(ifindex, q, frame)?;
            let (key, value) = (q, x.fd.as_raw_fd() as u32);
            let mut attr = MapUpdate {
                map_fd: map.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                ..Default::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(sys("bpf(BPF_MAP_UPDATE_ELEM)"))?;
            xsks.push(x);
        }
        let attach = |flags| {
            let mut attr = LinkCreate {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags,
            };
            bpf(BPF_LINK_CREATE, &mut attr).map(owned)
        };
        let (link, mode) = match attach(XDP_FLAGS_DRV_MODE) {
            Ok(l) => (l, "native"),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(XdpError::Sys("the interface already has an XDP program", e))
            }
            Err(_) => (
                attach(XDP_FLAGS_SKB_MODE).map_err(sys("bpf(BPF_LINK_CREATE, XDP)"))?,
                "generic",
            ),
        };
        Ok(XdpRx {
            xsks,
            mode,
            ifname,
            _map: map,
            _prog: prog,
            _link: link,
        })
    }
}

/// Run the program for `steer` on `frame` in the kernel (`BPF_PROG_TEST_RUN`), with an
/// empty map and `XDP_DROP` for a queue without a socket: `Ok(true)` when it would steer the
/// frame to espip. Needs `CAP_BPF` (root).
pub fn would_steer(steer: &Steer, frame: &[u8]) -> io::Result<bool> {
    let map = create_map(1)?;
    let prog = load(&program(steer, map.as_raw_fd(), XDP_DROP))?;
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    match attr.retval as i32 {
        XDP_DROP => Ok(true),
        XDP_PASS => Ok(false),
        other => Err(io::Error::other(format!("unexpected XDP verdict {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let steer = Steer {
            v4_protocols: vec![50, 4, 41],
            v6_protocols: vec![50, 4, 41],
            locals: vec![
                "192.0.2.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
            ],
        };
        let p = program(&steer, 3, XDP_PASS);
        for (i, x) in p.iter().enumerate() {
            if matches!(x.code, op::JGT_X | op::JA | op::JEQ32_K | op::JNE32_K) {
                let t = i as isize + 1 + x.off as isize;
                assert!(
                    t > i as isize && (t as usize) < p.len(),
                    "jump at {i} to {t}"
                );
            }
        }
        assert_eq!(p.last().unwrap().code, op::EXIT);
    }

    /// An Ethernet frame: `ethertype`, then `ip`.
    fn frame(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        f.extend(ethertype.to_be_bytes());
        f.extend(ip);
        f
    }

    fn ipv4(protocol: u8, dst: [u8; 4], frag: u16, ihl: u8) -> Vec<u8> {
        let len = usize::from(ihl) * 4 + 64;
        let mut p = vec![0u8; len];
        p[0] = 0x40 | ihl;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[192, 0, 2, 2]);
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn ipv6(next: u8, dst: std::net::Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 64];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&64u16.to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    /// The program in the kernel (`BPF_PROG_TEST_RUN`, as root): exactly the tunnel's
    /// unfragmented packets to this host's addresses are steered.
    #[test]
    fn the_program_steers_exactly_the_tunnels_packets_to_this_host() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: loading an XDP program needs root");
            return;
        }
        let local6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let other6: std::net::Ipv6Addr = "2001:db8::9".parse().unwrap();
        let steer = Steer {
            v4_protocols: vec![50],
            v6_protocols: vec![4, 41],
            locals: vec![
                "192.0.2.1".parse().unwrap(),
                "198.51.100.200".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
                IpAddr::V6(local6),
            ],
        };
        let me = [192, 0, 2, 1];
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("ESP to this host", frame(0x0800, &ipv4(50, me, 0, 5)), true),
            // An address whose last byte has the top bit set (a sign-extension trap).
            (
                "ESP to the second address",
                frame(0x0800, &ipv4(50, [198, 51, 100, 200], 0, 5)),
                true,
            ),
            (
                "ESP to another host",
                frame(0x0800, &ipv4(50, [192, 0, 2, 9], 0, 5)),
                false,
            ),
            (
                "IP-in-IP over IPv4 (not a peer's protocol)",
                frame(0x0800, &ipv4(4, me, 0, 5)),
                false,
            ),
            ("UDP", frame(0x0800, &ipv4(17, me, 0, 5)), false),
            (
                "a first fragment (MF)",
                frame(0x0800, &ipv4(50, me, 0x2000, 5)),
                false,
            ),
            (
                "a later fragment",
                frame(0x0800, &ipv4(50, me, 0x0010, 5)),
                false,
            ),
            ("DF set", frame(0x0800, &ipv4(50, me, 0x4000, 5)), true),
            ("IPv4 options", frame(0x0800, &ipv4(50, me, 0, 6)), false),
            (
                "IPv4 in IPv6 to this host",
                frame(0x86dd, &ipv6(4, local6)),
                true,
            ),
            (
                "IPv6 in IPv6 to this host",
                frame(0x86dd, &ipv6(41, local6)),
                true,
            ),
            (
                "IPv4 in IPv6 to another host",
                frame(0x86dd, &ipv6(4, other6)),
                false,
            ),
            (
                "ESP over IPv6 (not a peer's)",
                frame(0x86dd, &ipv6(50, local6)),
                false,
            ),
            (
                "an IPv6 extension header first",
                frame(0x86dd, &ipv6(0, local6)),
                false,
            ),
            ("ARP", frame(0x0806, &[0u8; 28]), false),
            ("a VLAN tag", frame(0x8100, &ipv4(50, me, 0, 5)), false),
            (
                "a short frame",
                frame(0x0800, &ipv4(50, me, 0, 5)[..12]),
                false,
            ),
        ];
        for (what, f, steered) in cases {
            assert_eq!(would_steer(&steer, &f).unwrap(), steered, "{what}");
        }
    }
}
