//! Raw IP sockets for one IP protocol (50 ESP, 4 IPv4-in-IP, 41 IPv6-in-IP) over IPv4 or over
//! IPv6, with batched `recvmmsg` / `sendmmsg`.
//!
//! The kernel builds the outer header on send (no `IP_HDRINCL`). Received over IPv4, a
//! datagram starts with the outer IPv4 header, which [`strip_ipv4`] validates and
//! removes; over IPv6 the kernel hands over only what follows the IPv6 header, and the source
//! comes from the message's address. This kernel has no ESP/IPIP modules, so raw sockets see
//! every such packet; on a kernel that has them, both would receive a copy.

use super::mmsg::{empty_slot, read_sockaddr, write_sockaddr, Cmsg, SockAddrSlot, CMSG_ROOM};
use espip_core::buf::PacketBuf;
use espip_core::datapath::{Landing, Via};
use espip_core::wire::ip::checksum;
use espip_core::wire::ipv4::Ipv4Packet;
use espip_core::wire::ipv6::{Ipv6Packet, HEADER_LEN as IPV6_HEADER_LEN};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use super::{set_int, SOCKET_BUFFER};

/// A raw socket of one protocol over IPv4 or IPv6.
pub struct RawSocket {
    sock: Socket,
    protocol: u8,
    v6: bool,
    /// IP-in-IP only: the socket that takes the packets the kernel's GRO merged, which this
    /// one then drops ([`split_merged`]).
    merged: Option<super::grorx::GroSocket>,
}

impl RawSocket {
    /// Open a non-blocking raw socket for `protocol` over IPv6 (`v6`) or IPv4, bound to
    /// `local` if given (it must be of that family).
    pub fn open(protocol: u8, v6: bool, local: Option<IpAddr>) -> io::Result<RawSocket> {
        let sock = Socket::new(
            if v6 { Domain::IPV6 } else { Domain::IPV4 },
            Type::RAW,
            Some(Protocol::from(i32::from(protocol))),
        )?;
        sock.set_nonblocking(true)?;
        sock.set_cloexec(true)?;
        force_buffer(&sock, libc::SO_RCVBUFFORCE);
        force_buffer(&sock, libc::SO_SNDBUFFORCE);
        // Outer packets larger than the path are fragmented by the kernel (IPv6: by this host,
        // as the sender) instead of being refused: a lowered path MTU costs fragmentation,
        // not a black hole.
        super::fragment_rather_than_refuse(&sock, v6);
        if v6 {
            // The header is not handed over: where each packet landed comes as a control
            // message (which path of a peer sharing its address it came by).
            super::mmsg::ask_landing(&sock, v6);
        }
        if let Some(l) = local {
            sock.bind(&SocketAddr::new(l, 0).into())?;
        }
        Ok(RawSocket {
            sock,
            protocol,
            v6,
            merged: None,
        })
    }

    /// The IP protocol.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// The socket for the merged IP-in-IP packets of this family, if [`split_merged`] made one.
    pub fn merged(&self) -> Option<&super::grorx::GroSocket> {
        self.merged.as_ref()
    }

    /// Whether this socket carries its protocol over IPv6.
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// Receive up to `bufs.len()` datagrams in one `recvmmsg` call. Each buffer is reset and
    /// filled from its headroom; returns how many were filled (`WouldBlock` if none). Over
    /// IPv4 a buffer holds the whole packet (see [`strip_ipv4`]) and `from` is left
    /// alone; over IPv6 it holds what follows the IPv6 header, `from[i]` is the sender and
    /// `landing[i]` its destination and interface (from `IPV6_PKTINFO`; over IPv4 the header
    /// tells the destination).
    pub fn recv_batch(
        &self,
        bufs: &mut [PacketBuf],
        from: &mut [Option<IpAddr>],
        landing: &mut [Landing],
    ) -> io::Result<usize> {
        const MAX: usize = 64;
        let mut iovs: [MaybeUninit<libc::iovec>; MAX] = [const { MaybeUninit::uninit() }; MAX];
        // SAFETY: mmsghdr is plain old data; zero is a valid value for every field.
        let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
        let mut names = [empty_slot(); MAX];
        let mut ctrl = [Cmsg::EMPTY; MAX];
        let n = super::mmsg::point_at_read_areas(bufs, &mut iovs, &mut hdrs);
        if self.v6 {
            for ((h, name), c) in hdrs[..n].iter_mut().zip(names.iter_mut()).zip(&mut ctrl) {
                h.msg_hdr.msg_name = (name as *mut SockAddrSlot).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<SockAddrSlot>() as u32;
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = CMSG_ROOM as _;
            }
        }
        // SAFETY: hdrs[..n] point at n initialised iovecs, each covering a live, exclusively
        // borrowed buffer area, and (IPv6) at name slots and control buffers of the lengths
        // given; the kernel writes at most those lengths.
        let got = unsafe { super::mmsg::recvmmsg(self.sock.as_raw_fd(), &mut hdrs[..n])? };
        for i in 0..got {
            bufs[i].set_len(hdrs[i].msg_len as usize);
            if self.v6 {
                if let Some(f) = from.get_mut(i) {
                    *f = read_sockaddr(&names[i]).map(|a| a.ip());
                }
                if let Some(l) = landing.get_mut(i) {
                    *l = super::mmsg::landing(&hdrs[i].msg_hdr);
                }
            }
        }
        Ok(got)
    }

    /// Send each `(packet, destination)` (of this socket's family) with one `sendmmsg` call per
    /// 64 packets. A packet the kernel refuses (no route, unreachable, a source the host does
    /// not have) is handed to `refused` with its destination and the error, and the packets
    /// after it still go; when the socket itself cannot take more (`EAGAIN`, `ENOBUFS`) the
    /// rest of the call's packets are refused with it. Returns how many the kernel took.
    pub fn send_batch<'a>(
        &self,
        pkts: impl IntoIterator<Item = (&'a [u8], IpAddr, Via)>,
        mut refused: impl FnMut(IpAddr, Via, &io::Error),
    ) -> usize {
        const MAX: usize = 64;
        let mut pkts = pkts.into_iter().peekable();
        let mut sent = 0;
        while pkts.peek().is_some() {
            let mut chunk: [(&[u8], IpAddr, Via); MAX] =
                [(&[], IpAddr::V4(Ipv4Addr::UNSPECIFIED), Via::ROUTED); MAX];
            let mut len = 0;
            for p in pkts.by_ref().take(MAX) {
                chunk[len] = p;
                len += 1;
            }
            let chunk = &chunk[..len];
            let mut iovs: [MaybeUninit<libc::iovec>; MAX] = [const { MaybeUninit::uninit() }; MAX];
            let mut addrs = [empty_slot(); MAX];
            // SAFETY: mmsghdr is plain old data; zero is valid.
            let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
            let mut ctrl = [super::mmsg::Cmsg::EMPTY; MAX];
            for (i, (pkt, dst, via)) in chunk.iter().enumerate() {
                iovs[i].write(libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                });
                let namelen = write_sockaddr(&mut addrs[i], SocketAddr::new(*dst, 0));
                hdrs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
                hdrs[i].msg_hdr.msg_iovlen = 1;
                hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut SockAddrSlot).cast();
                hdrs[i].msg_hdr.msg_namelen = namelen;
                let mut used = 0;
                ctrl[i].push_via(&mut used, *via, self.v6);
                if used > 0 {
                    hdrs[i].msg_hdr.msg_control = ctrl[i].0.as_mut_ptr().cast();
                    hdrs[i].msg_hdr.msg_controllen = used as _;
                }
            }
            // A short count means the kernel stopped at packet `at` (sendmmsg drops its
            // error); the next call from there returns that error, for that packet alone.
            let mut at = 0;
            while at < len {
                // SAFETY: hdrs[at..len] point at initialised iovecs over live packet slices
                // (only read by the kernel), at initialised socket addresses and control
                // messages.
                let rc = unsafe {
                    libc::sendmmsg(
                        self.sock.as_raw_fd(),
                        hdrs[at..].as_mut_ptr(),
                        (len - at) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc > 0 {
                    sent += rc as usize;
                    at += rc as usize;
                    continue;
                }
                let err = if rc < 0 {
                    io::Error::last_os_error()
                } else {
                    io::Error::from(io::ErrorKind::WouldBlock)
                };
                let socket_full = matches!(
                    err.raw_os_error(),
                    Some(libc::EAGAIN | libc::ENOBUFS) | None
                );
                let end = if socket_full { len } else { at + 1 };
                for (_, dst, via) in &chunk[at..end] {
                    refused(*dst, *via, &err);
                }
                at = end;
            }
        }
        sent
    }
}

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for RawSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Hand the IP-in-IP packets that the kernel's GRO merged (see `sys::bpf`) to an
/// `AF_PACKET` socket that learns where the original packets ended, and make the two raw
/// IP-in-IP sockets of that family (`ipip`: protocol 4, `sit`: 41) drop them. On an error
/// nothing changed: merged packets keep arriving on the raw sockets (the caller warns).
pub fn split_merged(ipip: &mut RawSocket, sit: &RawSocket) -> io::Result<()> {
    let g = super::grorx::GroSocket::open(ipip.v6)?;
    super::bpf::merged_ipip(&ipip.sock, ipip.v6, false)?;
    if let Err(e) = super::bpf::merged_ipip(&sit.sock, sit.v6, false) {
        // SO_DETACH_FILTER takes the filter off again (its value is ignored).
        let _ = set_int(&ipip.sock, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0);
        return Err(e);
    }
    ipip.merged = Some(g);
    Ok(())
}

fn force_buffer(sock: &Socket, opt: libc::c_int) {
    // Best effort: without CAP_NET_ADMIN the FORCE variants fail; the kernel default stays.
    let _ = set_int(sock, libc::SOL_SOCKET, opt, SOCKET_BUFFER as libc::c_int);
}

/// An outer IP header as read by [`strip_ipv4`] or [`strip_ipv6`]: its addresses and protocol
/// (next header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// The outer source: the peer (or path) it came from.
    pub src: IpAddr,
    /// The outer destination: one of this host's addresses.
    pub dst: IpAddr,
    /// IP protocol (IPv4) or next header (IPv6).
    pub protocol: u8,
}

/// Validate (with the core's [`Ipv4Packet`] view) and remove the outer IPv4 header of a
/// datagram from a raw socket or a merged IP-in-IP packet; `verify`: its header checksum too
/// (what the kernel did not check). `None` for anything that is not a sane IPv4 header.
pub fn strip_ipv4(buf: &mut PacketBuf, verify: bool) -> Option<Outer> {
    let (header_len, total, outer) = {
        let p = Ipv4Packet::new_checked(buf.as_slice()).ok()?;
        if verify && checksum(p.header()) != 0 {
            return None;
        }
        let outer = Outer {
            src: IpAddr::V4(p.src()),
            dst: IpAddr::V4(p.dst()),
            protocol: p.protocol(),
        };
        (p.header_len(), p.total_len(), outer)
    };
    if total < header_len || total > buf.len() {
        return None;
    }
    buf.truncate(total);
    buf.pull_front(header_len)?;
    Some(outer)
}

/// Validate (with the core's [`Ipv6Packet`] view) and remove the outer IPv6 header of a
/// merged IP-in-IP packet (no extension headers: the kernel's filter matched the next
/// header).
pub fn strip_ipv6(buf: &mut PacketBuf) -> Option<Outer> {
    let (payload, outer) = {
        let p = Ipv6Packet::new_checked(buf.as_slice()).ok()?;
        let outer = Outer {
            src: IpAddr::V6(p.src()),
            dst: IpAddr::V6(p.dst()),
            protocol: p.next_header(),
        };
        (p.payload_len(), outer)
    };
    if IPV6_HEADER_LEN + payload > buf.len() {
        return None;
    }
    buf.truncate(IPV6_HEADER_LEN + payload);
    buf.pull_front(IPV6_HEADER_LEN)?;
    Some(outer)
}
