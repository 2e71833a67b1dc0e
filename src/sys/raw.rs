//! Raw IPv4 sockets for one IP protocol (50 ESP, 4 IPv4-in-IP, 41 IPv6-in-IP), with batched
//! `recvmmsg` / `sendmmsg`.
//!
//! The kernel builds the outer IPv4 header on send (no `IP_HDRINCL`); a received datagram
//! starts with the outer IPv4 header, which [`strip_ipv4_header`] validates and removes. This
//! kernel has no ESP/IPIP modules, so raw sockets see every such packet; on a kernel that has
//! them, both would receive a copy.

use crate::buf::PacketBuf;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use super::{set_int, SOCKET_BUFFER};

/// A raw IPv4 socket of one protocol.
pub struct RawSocket {
    sock: Socket,
    protocol: u8,
}

impl RawSocket {
    /// Open a non-blocking raw socket for `protocol`, bound to `local` if given.
    pub fn open(protocol: u8, local: Option<Ipv4Addr>) -> io::Result<RawSocket> {
        let sock = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(protocol))),
        )?;
        sock.set_nonblocking(true)?;
        sock.set_cloexec(true)?;
        force_buffer(&sock, libc::SO_RCVBUFFORCE);
        force_buffer(&sock, libc::SO_SNDBUFFORCE);
        // Outer packets larger than the path are fragmented by the kernel instead of being
        // refused: a lowered path MTU costs fragmentation, not a black hole.
        let _ = set_int(
            &sock,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
        if let Some(l) = local {
            sock.bind(&SocketAddr::new(IpAddr::V4(l), 0).into())?;
        }
        Ok(RawSocket { sock, protocol })
    }

    /// The IP protocol.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Receive up to `bufs.len()` datagrams in one `recvmmsg` call. Each buffer is reset and
    /// filled from its headroom; returns how many were filled (`WouldBlock` if none).
    pub fn recv_batch(&self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        const MAX: usize = 64;
        let mut iovs: [MaybeUninit<libc::iovec>; MAX] = [const { MaybeUninit::uninit() }; MAX];
        // SAFETY: mmsghdr is plain old data; zero is a valid value for every field.
        let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
        let n = super::mmsg::point_at_read_areas(bufs, &mut iovs, &mut hdrs);
        // SAFETY: hdrs[..n] point at n initialised iovecs, each covering a live, exclusively
        // borrowed buffer area; the kernel writes at most iov_len bytes into each.
        let got = unsafe { super::mmsg::recvmmsg(self.sock.as_raw_fd(), &mut hdrs[..n])? };
        for i in 0..got {
            bufs[i].set_len(hdrs[i].msg_len as usize);
        }
        Ok(got)
    }

    /// Send each `(packet, destination)` with one `sendmmsg` call per 64 packets. Returns how
    /// many the kernel took; an error is returned only when none of a call's packets went out.
    pub fn send_batch<'a>(
        &self,
        pkts: impl IntoIterator<Item = (&'a [u8], Ipv4Addr)>,
    ) -> io::Result<usize> {
        const MAX: usize = 64;
        let mut it = pkts.into_iter().peekable();
        let mut sent = 0;
        while it.peek().is_some() {
            let mut chunk: [(&[u8], Ipv4Addr); MAX] = [(&[][..], Ipv4Addr::UNSPECIFIED); MAX];
            let mut len = 0;
            for p in it.by_ref().take(MAX) {
                chunk[len] = p;
                len += 1;
            }
            let chunk = &chunk[..len];
            let mut iovs: [MaybeUninit<libc::iovec>; MAX] = [const { MaybeUninit::uninit() }; MAX];
            // SAFETY: sockaddr_in and mmsghdr are plain old data; zero is valid.
            let mut addrs: [libc::sockaddr_in; MAX] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
            for (i, (pkt, dst)) in chunk.iter().enumerate() {
                iovs[i].write(libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                });
                addrs[i].sin_family = libc::AF_INET as libc::sa_family_t;
                addrs[i].sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
                hdrs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
                hdrs[i].msg_hdr.msg_iovlen = 1;
                hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            }
            // SAFETY: hdrs[..chunk.len()] point at initialised iovecs over live packet slices
            // (only read by the kernel) and at initialised sockaddr_in values.
            let rc = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    chunk.len() as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // A short count means the kernel refused packet `rc` (it reports the error on
            // the next call); the rest of this chunk is dropped rather than retried.
            sent += rc as usize;
        }
        Ok(sent)
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

fn force_buffer(sock: &Socket, opt: libc::c_int) {
    // Best effort: without CAP_NET_ADMIN the FORCE variants fail; the kernel default stays.
    let _ = set_int(sock, libc::SOL_SOCKET, opt, SOCKET_BUFFER as libc::c_int);
}

/// Validate and remove the outer IPv4 header of a datagram from a raw socket; returns the outer
/// source and protocol. `None` for anything that is not a sane IPv4 header.
pub fn strip_ipv4_header(buf: &mut PacketBuf) -> Option<(IpAddr, u8)> {
    let b = buf.as_slice();
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if ihl < 20 || total < ihl || total > b.len() {
        return None;
    }
    let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let proto = b[9];
    buf.truncate(total);
    buf.pull_front(ihl)?;
    Some((IpAddr::V4(src), proto))
}
