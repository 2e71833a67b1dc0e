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
/// kernel's route and neighbour tables ([`crate::netlink::next_hop`]).
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

/// The Ethernet and outer IP header of a frame to `hop` carrying `payload_len` bytes of IP
/// protocol `proto`, written into `h` with the core's wire views; returns its length (0: the
/// hop's addresses are of two families, which the resolver never pairs). IPv4: no options,
/// DF clear as the raw socket sends (espip lets the kernel fragment rather than refuse, see
/// `sys::raw`), identification `id`, TTL `ttl`; IPv6: hop limit `hop_limit`.
pub fn frame_header(
    h: &mut [u8; MAX_HDR],
    hop: &NextHop,
    proto: u8,
    payload_len: usize,
    id: u16,
    ttl: u8,
    hop_limit: u8,
) -> usize {
    use espip_core::wire::{ipv4, ipv6};
    h[..6].copy_from_slice(&hop.dst_mac);
    h[6..12].copy_from_slice(&hop.src_mac);
    let ip = &mut h[ETH_HLEN..];
    match (hop.src, hop.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ipv4::emit_header(ip, s, d, proto, (20 + payload_len) as u16);
            let mut p = ipv4::Ipv4Packet::new_checked(&mut ip[..20]).expect("20 bytes");
            p.set_ident(id);
            p.set_ttl(ttl);
            p.fill_checksum();
            h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            ETH_HLEN + 20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ipv6::emit_header(ip, s, d, proto, payload_len as u16);
            ipv6::Ipv6Packet::new_checked(&mut ip[..40])
                .expect("40 bytes")
                .set_hop_limit(hop_limit);
            h[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            ETH_HLEN + 40
        }
        _ => 0,
    }
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
/// The longest frame header espip writes: Ethernet and IPv6.
pub const MAX_HDR: usize = ETH_HLEN + 40;

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
                let hdr_len = frame_header(
                    h,
                    hop,
                    proto,
                    payload.len(),
                    self.ip_id.fetch_add(1, Ordering::Relaxed),
                    self.ttl,
                    self.hop_limit,
                );
                if hdr_len == 0 {
                    continue;
                }
                iovs[n] = [
                    libc::iovec {
                        iov_base: h.as_mut_ptr().cast(),
                        iov_len: hdr_len,
                    },
                    libc::iovec {
                        iov_base: payload.as_ptr() as *mut libc::c_void,
                        iov_len: payload.len(),
                    },
                ];
                let a = &mut addrs[n];
                a.sll_family = libc::AF_PACKET as u16;
                a.sll_protocol = u16::from_be_bytes([h[12], h[13]]).to_be();
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
        // The classic worked example (Wikipedia's "IPv4 header checksum": 0xb861, with DF
        // set); espip's header clears DF, so its checksum is exactly 0x4000 more.
        let hop = NextHop {
            dst: "192.168.0.199".parse().unwrap(),
            ifindex: 1,
            src: "192.168.0.1".parse().unwrap(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            mtu: 1500,
        };
        let mut h = [0u8; MAX_HDR];
        assert_eq!(frame_header(&mut h, &hop, 0x11, 0x73 - 20, 0, 0x40, 64), 34);
        let ip = &h[ETH_HLEN..ETH_HLEN + 20];
        assert_eq!(u16::from_be_bytes([ip[10], ip[11]]), 0xb861 + 0x4000);
        // A header with its checksum in place sums to 0xffff (checksum 0).
        assert_eq!(espip_core::wire::ip::checksum(ip), 0);
        assert_eq!(&h[12..14], &[0x08, 0x00]);
    }
}
