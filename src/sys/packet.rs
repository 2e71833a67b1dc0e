//! The raw-socket modes' fast transmit path: an `AF_PACKET` socket on the egress interface.
//! espip writes each outer packet's Ethernet header and outer IPv4/IPv6 header itself (the
//! next hop's MAC address comes from the kernel's neighbour table, read by the control side)
//! and hands a batch of frames to the kernel with one `sendmmsg`. The kernel then skips its
//! IP output path per packet: route lookup, `ip_append_data`'s copy with checksum,
//! netfilter's OUTPUT and POSTROUTING hooks, neighbour output.
//!
//! What this path does not do, and the raw socket does: fragment an outer packet larger than
//! the interface's MTU, resolve a next hop that is not in the neighbour table yet, and pass
//! the outer packets through netfilter's output hooks. The caller sends the first two through
//! the raw socket, packet by packet; the third is documented (`interface.tx_path`). The
//! frames still pass the device's queueing discipline and its packet taps (`tcpdump` on the
//! interface sees them): no `PACKET_QDISC_BYPASS`.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

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

/// An `AF_PACKET` socket bound to one interface that sends whole Ethernet frames with
/// `sendmmsg`: each frame is two pieces (the Ethernet and outer IP header espip writes, and
/// the packet in its buffer), copied once by the kernel into a linear buffer. Shared by the
/// threads (no state but the IPv4 identification counter).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    ip_id: std::sync::atomic::AtomicU16,
    ttl: u8,
    hop_limit: u8,
}

/// A new `AF_PACKET` `SOCK_RAW` socket (non-blocking, close-on-exec) with protocol 0, so it
/// receives nothing until [`bind`] names one, and its send or receive buffer (`buffer`:
/// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE`) raised. Needs `CAP_NET_RAW`.
pub(super) fn af_packet(buffer: libc::c_int) -> io::Result<OwnedFd> {
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
    let _ = super::set_int(
        &fd,
        libc::SOL_SOCKET,
        buffer,
        super::SOCKET_BUFFER as libc::c_int,
    );
    Ok(fd)
}

/// Bind an `AF_PACKET` socket to interface `ifindex` (0: every interface) and Ethernet
/// protocol `protocol` (host order; 0: none).
pub(super) fn bind(fd: &OwnedFd, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind reads a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ethernet + IPv6 header, the longest espip writes.
const MAX_HDR: usize = ETH_HLEN + 40;

impl PacketSocket {
    /// Open a sending `AF_PACKET` socket on interface `ifindex`. Needs `CAP_NET_RAW`.
    pub fn open(ifindex: u32, ttl: u8, hop_limit: u8) -> io::Result<PacketSocket> {
        let fd = af_packet(libc::SO_SNDBUFFORCE)?;
        // Protocol 0: no receive hook.
        bind(&fd, ifindex, 0)?;
        let mut seed = [0u8; 2];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Ok(PacketSocket {
            fd,
            ifindex,
            ip_id: std::sync::atomic::AtomicU16::new(u16::from_be_bytes(seed)),
            ttl,
            hop_limit,
        })
    }

    /// The interface this socket sends on.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Whether a packet of `len` bytes to `hop` can go through this socket (same interface,
    /// the outer packet within the interface's MTU).
    pub fn takes(&self, hop: &NextHop, len: usize) -> bool {
        let ip_len = if hop.dst.is_ipv6() { 40 } else { 20 };
        hop.ifindex == self.ifindex
            && hop.src.is_ipv6() == hop.dst.is_ipv6()
            && ip_len + len <= (hop.mtu as usize).min(usize::from(u16::MAX))
    }

    /// Send each `(next hop, IP protocol, payload)` (all [`PacketSocket::takes`]) as one
    /// frame, 64 per `sendmmsg`. Returns how many the kernel took; an error only when none
    /// of a call's frames went out.
    pub fn send_batch<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a NextHop, u8, &'a [u8])>,
    ) -> io::Result<usize> {
        const MAX: usize = 64;
        let mut items = items.into_iter().peekable();
        let mut sent = 0;
        while items.peek().is_some() {
            let mut hdrs = [[0u8; MAX_HDR]; MAX];
            // SAFETY: iovec is plain old data; zero is valid.
            let mut iovs: [[libc::iovec; 2]; MAX] = unsafe { std::mem::zeroed() };
            // SAFETY: sockaddr_ll is plain old data; zero is valid.
            let mut addrs: [libc::sockaddr_ll; MAX] = unsafe { std::mem::zeroed() };
            // SAFETY: mmsghdr is plain old data; zero is valid.
            let mut msgs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
            let mut n = 0;
            for (hop, proto, payload) in items.by_ref().take(MAX) {
                let h = &mut hdrs[n];
                let (ip_len, ethertype) = match hop.dst {
                    IpAddr::V4(_) => (20, ETH_P_IP),
                    IpAddr::V6(_) => (40, ETH_P_IPV6),
                };
                h[..6].copy_from_slice(&hop.dst_mac);
                h[6..12].copy_from_slice(&hop.src_mac);
                h[12..14].copy_from_slice(&ethertype.to_be_bytes());
                let ip = &mut h[ETH_HLEN..ETH_HLEN + ip_len];
                match (hop.src, hop.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => write_ipv4(
                        ip,
                        (20 + payload.len()) as u16,
                        self.ip_id.fetch_add(1, Ordering::Relaxed),
                        self.ttl,
                        proto,
                        s.octets(),
                        d.octets(),
                    ),
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        ip[..4].copy_from_slice(&[0x60, 0, 0, 0]);
                        ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
                        ip[6] = proto;
                        ip[7] = self.hop_limit;
                        ip[8..24].copy_from_slice(&s.octets());
                        ip[24..40].copy_from_slice(&d.octets());
                    }
                    // Never resolved so (the resolver pairs the families); skipped.
                    _ => continue,
                }
                iovs[n] = [
                    libc::iovec {
                        iov_base: h.as_mut_ptr().cast(),
                        iov_len: ETH_HLEN + ip_len,
                    },
                    libc::iovec {
                        iov_base: payload.as_ptr() as *mut libc::c_void,
                        iov_len: payload.len(),
                    },
                ];
                let a = &mut addrs[n];
                a.sll_family = libc::AF_PACKET as u16;
                a.sll_protocol = ethertype.to_be();
                a.sll_ifindex = self.ifindex as i32;
                n += 1;
            }
            for i in 0..n {
                let m = &mut msgs[i].msg_hdr;
                m.msg_iov = iovs[i].as_mut_ptr();
                m.msg_iovlen = 2;
                m.msg_name = (&mut addrs[i] as *mut libc::sockaddr_ll).cast();
                m.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            }
            if n == 0 {
                continue;
            }
            // SAFETY: msgs[..n] point at initialised iovecs over live header arrays and packet
            // slices (only read by the kernel) and at initialised link-layer addresses.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    n as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                if sent == 0 {
                    return Err(io::Error::last_os_error());
                }
                return Ok(sent);
            }
            sent += rc as usize;
        }
        Ok(sent)
    }
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
