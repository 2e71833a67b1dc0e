//! The raw-socket modes' fast transmit path: an `AF_PACKET` transmit ring (`PACKET_TX_RING`,
//! `TPACKET_V2`) on the egress interface. espip writes each outer packet as a whole Ethernet
//! frame (its own outer IPv4/IPv6 header, the next hop's MAC address that the resolver read
//! from the kernel's neighbour table) into a shared ring and hands a whole batch to the kernel
//! with one `sendto`. The kernel then skips its IP output path per packet (route lookup,
//! `ip_append_data`'s copy with checksum, netfilter's OUTPUT/POSTROUTING, neighbour output).
//!
//! What this path does not do, and the raw socket does: fragment an outer packet larger than
//! the interface's MTU, resolve a next hop that is not in the neighbour table yet, and pass
//! the outer packets through netfilter's output hooks. The caller falls back to the raw socket
//! packet by packet for the first two; the third is documented (docs/configuration.md,
//! `interface.tx_path`). The frames still pass the device's queueing discipline and its
//! packet taps (`tcpdump` on the interface sees them): no `PACKET_QDISC_BYPASS`.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

/// Where an outer packet to one destination leaves: resolved by the control side from the
/// kernel's route and neighbour tables ([`crate::sys::netlink::next_hop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// The outer destination this entry is for.
    pub dst: IpAddr,
    /// The egress interface.
    pub ifindex: u32,
    /// The outer source address the kernel would pick (or `interface.local`).
    pub src: IpAddr,
    /// The egress interface's MAC address.
    pub src_mac: [u8; 6],
    /// The next hop's MAC address (the destination's, or its gateway's).
    pub dst_mac: [u8; 6],
    /// The egress interface's MTU: larger outer packets go through the raw socket, which
    /// fragments.
    pub mtu: u32,
}

/// The next hops of every outer destination the fast path may use; a destination not listed
/// goes through the raw socket.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NextHops(pub Vec<NextHop>);

impl NextHops {
    /// The entry for `dst`.
    pub fn get(&self, dst: IpAddr) -> Option<&NextHop> {
        self.0.iter().find(|h| h.dst == dst)
    }
}

/// Offset of a frame's data in a `TPACKET_V2` transmit slot (without `PACKET_TX_HAS_OFF`):
/// `TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)`, the aligned `tpacket2_hdr`.
const DATA_OFFSET: usize = 32;
const ETH_HLEN: usize = 14;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const SOL_PACKET: libc::c_int = 263;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_LOSS: libc::c_int = 14;
const TPACKET_V2: libc::c_int = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Why a packet did not go into the ring: the caller sends it through the raw socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Outer packet larger than the interface's MTU (the raw socket fragments it).
    TooBig,
    /// Every slot is still owned by the kernel.
    Full,
    /// This ring is on another interface than the next hop's.
    OtherInterface,
}

/// An `AF_PACKET` socket with a `TPACKET_V2` transmit ring, bound to one interface. Owned by
/// one thread (the slot index is its state).
pub struct PacketRing {
    fd: OwnedFd,
    ifindex: u32,
    map: *mut u8,
    map_len: usize,
    frame_size: usize,
    frames: usize,
    /// The next slot to fill; the kernel walks the slots in the same order.
    next: usize,
    /// Slots filled since the last flush, and the EtherType they carry (one `sendto` names
    /// one protocol, so a change of IP version flushes first).
    queued: usize,
    queued_proto: u16,
    /// The outer IPv4 identification of the next packet.
    ip_id: u16,
    ttl: u8,
    hop_limit: u8,
}

// SAFETY: the mapping belongs to this value alone; it is used by one thread at a time (the
// owner holds it behind `&mut`).
unsafe impl Send for PacketRing {}

impl PacketRing {
    /// Open a transmit ring of `frames` slots on interface `ifindex` whose MTU is at most
    /// `max_mtu` (larger frames are refused at push time). `ttl` / `hop_limit` go into the
    /// outer IPv4 / IPv6 headers. Needs `CAP_NET_RAW`.
    pub fn open(
        ifindex: u32,
        max_mtu: u32,
        frames: usize,
        ttl: u8,
        hop_limit: u8,
    ) -> io::Result<PacketRing> {
        // Protocol 0: a socket that sends only; it registers no receive hook, so it costs
        // the receive path nothing.
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setopt(&fd, PACKET_VERSION, TPACKET_V2)?;
        // A malformed frame is skipped (marked available again), not left to stop the ring.
        setopt(&fd, PACKET_LOSS, 1)?;
        let frame_size = (DATA_OFFSET + ETH_HLEN + max_mtu as usize).next_power_of_two();
        let block_size = frame_size.max(1 << 16);
        let per_block = block_size / frame_size;
        let blocks = frames.div_ceil(per_block).max(1);
        let req = libc::tpacket_req {
            tp_block_size: block_size as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: frame_size as u32,
            tp_frame_nr: (blocks * per_block) as u32,
        };
        // SAFETY: `req` is a valid tpacket_req of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_TX_RING,
                (&req as *const libc::tpacket_req).cast(),
                std::mem::size_of::<libc::tpacket_req>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let map_len = block_size * blocks;
        // SAFETY: maps the ring the kernel just allocated for this socket; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED,
                fd.as_raw_fd(),
                0,
            )
        };
        let map = if map == libc::MAP_FAILED {
            // MAP_LOCKED needs RLIMIT_MEMLOCK room; the ring works without it.
            // SAFETY: as above.
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            m
        } else {
            map
        };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binds to the interface with protocol 0 (no receive hook).
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmaps what was mapped above.
            unsafe { libc::munmap(map, map_len) };
            return Err(e);
        }
        let mut seed = [0u8; 2];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Ok(PacketRing {
            fd,
            ifindex,
            map: map.cast(),
            map_len,
            frame_size,
            frames: blocks * per_block,
            next: 0,
            queued: 0,
            queued_proto: ETH_P_IP,
            ip_id: u16::from_be_bytes(seed),
            ttl,
            hop_limit,
        })
    }

    /// The interface this ring sends on.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    fn slot(&self, i: usize) -> *mut u8 {
        // Blocks are a whole number of frames apart, so slot i is at i * frame_size.
        // SAFETY: i < frames, so the slot lies inside the mapping.
        unsafe { self.map.add(i * self.frame_size) }
    }

    fn status(&self, i: usize) -> u32 {
        // SAFETY: the slot's first word is tp_status, shared with the kernel.
        let s = unsafe { std::ptr::read_volatile(self.slot(i).cast::<u32>()) };
        fence(Ordering::Acquire);
        s
    }

    /// Put one outer packet into the ring: `payload` (an ESP packet, or the inner packet of
    /// IP-in-IP) of IP protocol `proto` to `hop.dst`, behind an outer header espip writes.
    /// Nothing leaves until [`PacketRing::flush`].
    pub fn push(&mut self, hop: &NextHop, proto: u8, payload: &[u8]) -> Result<(), Refused> {
        if hop.ifindex != self.ifindex {
            return Err(Refused::OtherInterface);
        }
        let (ip_len, ethertype) = match hop.dst {
            IpAddr::V4(_) => (20, ETH_P_IP),
            IpAddr::V6(_) => (40, ETH_P_IPV6),
        };
        let total = ip_len + payload.len();
        if total > hop.mtu as usize
            || total > usize::from(u16::MAX)
            || DATA_OFFSET + ETH_HLEN + total > self.frame_size
        {
            return Err(Refused::TooBig);
        }
        let mut st = self.status(self.next);
        if st == TP_STATUS_WRONG_FORMAT {
            st = TP_STATUS_AVAILABLE;
        }
        if st != TP_STATUS_AVAILABLE {
            // The kernel still owns it: hand over what is queued, then look again.
            let _ = self.flush();
            if self.status(self.next) != TP_STATUS_AVAILABLE {
                return Err(Refused::Full);
            }
        }
        if self.queued > 0 && self.queued_proto != ethertype {
            let _ = self.flush();
        }
        let slot = self.slot(self.next);
        // SAFETY: the slot is available (owned by us until we set SEND_REQUEST) and holds
        // DATA_OFFSET + ETH_HLEN + total bytes (checked against frame_size above).
        let frame = unsafe {
            std::slice::from_raw_parts_mut(slot.add(DATA_OFFSET), ETH_HLEN + total)
        };
        frame[..6].copy_from_slice(&hop.dst_mac);
        frame[6..12].copy_from_slice(&hop.src_mac);
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        match (hop.src, hop.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let id = self.ip_id;
                self.ip_id = self.ip_id.wrapping_add(1);
                write_ipv4(
                    &mut frame[ETH_HLEN..ETH_HLEN + 20],
                    total as u16,
                    id,
                    self.ttl,
                    proto,
                    s.octets(),
                    d.octets(),
                );
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = &mut frame[ETH_HLEN..ETH_HLEN + 40];
                h[..4].copy_from_slice(&[0x60, 0, 0, 0]);
                h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
                h[6] = proto;
                h[7] = self.hop_limit;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
            }
            // A source of the other family: never resolved so (the resolver pairs them).
            _ => return Err(Refused::OtherInterface),
        }
        frame[ETH_HLEN + ip_len..].copy_from_slice(payload);
        // SAFETY: tp_len is the second u32 of the slot's tpacket2_hdr.
        unsafe {
            std::ptr::write_volatile(slot.add(4).cast::<u32>(), (ETH_HLEN + total) as u32);
        }
        fence(Ordering::Release);
        // SAFETY: tp_status; from here the kernel owns the slot.
        unsafe { std::ptr::write_volatile(slot.cast::<u32>(), TP_STATUS_SEND_REQUEST) };
        self.next = (self.next + 1) % self.frames;
        self.queued += 1;
        self.queued_proto = ethertype;
        Ok(())
    }

    /// Hand every queued frame to the kernel (one `sendto`). Returns how many were queued.
    pub fn flush(&mut self) -> io::Result<usize> {
        let n = self.queued;
        if n == 0 {
            return Ok(0);
        }
        self.queued = 0;
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_protocol = self.queued_proto.to_be();
        // SAFETY: no buffer (the ring holds the data); the address is a valid sockaddr_ll.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(n)
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in open; the socket closes after.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

fn setopt(fd: &OwnedFd, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_PACKET,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An outer IPv4 header without options (RFC 791) with its checksum: DF clear, as the raw
/// socket sends (espip lets the kernel fragment rather than refuse, see `sys::raw`).
fn write_ipv4(h: &mut [u8], total: u16, id: u16, ttl: u8, proto: u8, s: [u8; 4], d: [u8; 4]) {
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&[0, 0]);
    h[8] = ttl;
    h[9] = proto;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&s);
    h[16..20].copy_from_slice(&d);
    let sum = ipv4_checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum (RFC 1071) of a header whose checksum field is zero.
fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_matches_rfc1071_example() {
        // The header of RFC 1071's worked example style: a known IPv4 header whose checksum
        // is 0xb861 (the classic example from Wikipedia's "IPv4 header checksum").
        let mut h = [0u8; 20];
        write_ipv4(
            &mut h,
            0x0073,
            0,
            0x40,
            0x11,
            [0xc0, 0xa8, 0x00, 0x01],
            [0xc0, 0xa8, 0x00, 0xc7],
        );
        // That example also has DF set (0x4000); espip's header clears it, so the sum
        // differs by exactly 0x4000 from 0xb861.
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), 0xb861 + 0x4000);
        // And a header with its checksum in place sums to 0xffff (checksum 0).
        assert_eq!(ipv4_checksum(&h), 0);
    }
}
