//! The receiving half of `recvmmsg` shared by the raw sockets and the ESP-in-UDP socket:
//! message headers pointed at the read areas of a batch of buffers, and the call itself.

use espip_core::buf::PacketBuf;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;

/// Reset `bufs` and point `hdrs[i]` at one iovec `iovs[i]` over `bufs[i]`'s read area, for
/// as many messages as all three have room for; returns that number. The caller may add a
/// name and control buffer to each header.
pub(super) fn point_at_read_areas(
    bufs: &mut [PacketBuf],
    iovs: &mut [MaybeUninit<libc::iovec>],
    hdrs: &mut [libc::mmsghdr],
) -> usize {
    let n = bufs.len().min(iovs.len()).min(hdrs.len());
    for i in 0..n {
        bufs[i].reset();
        let area = bufs[i].read_area();
        iovs[i].write(libc::iovec {
            iov_base: area.as_mut_ptr().cast(),
            iov_len: area.len(),
        });
        hdrs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    n
}

/// `recvmmsg(fd, hdrs, MSG_DONTWAIT)`: how many messages arrived (`WouldBlock` if none).
///
/// # Safety
/// Every header of `hdrs` must point at initialised iovecs over live buffers the caller
/// borrows exclusively (as [`point_at_read_areas`] leaves them), and at name and control
/// buffers of the lengths it gives, if any: the kernel writes into all of them.
pub(super) unsafe fn recvmmsg(fd: RawFd, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: the caller's contract above.
    let rc = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            hdrs.len() as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Room for an IPv4 or an IPv6 socket address in the kernel's layout (`sockaddr_in6` is the
/// larger of the two; a `sockaddr_in` is written at its start).
pub(super) type SockAddrSlot = libc::sockaddr_in6;

/// A zeroed slot.
pub(super) fn empty_slot() -> SockAddrSlot {
    // SAFETY: sockaddr_in6 is plain old data; zero is a valid value of every field.
    unsafe { std::mem::zeroed() }
}

/// Write `addr` into `slot`; returns the length to give the kernel.
pub(super) fn write_sockaddr(slot: &mut SockAddrSlot, addr: std::net::SocketAddr) -> u32 {
    match addr {
        std::net::SocketAddr::V4(a) => {
            let v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in (16 bytes) fits at the start of a sockaddr_in6 (28 bytes);
            // both are plain old data with no alignment above 4.
            unsafe { std::ptr::write((slot as *mut SockAddrSlot).cast::<libc::sockaddr_in>(), v4) };
            std::mem::size_of::<libc::sockaddr_in>() as u32
        }
        std::net::SocketAddr::V6(a) => {
            *slot = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            std::mem::size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

/// The address the kernel wrote into `slot` (`None` for another family).
pub(super) fn read_sockaddr(slot: &SockAddrSlot) -> Option<std::net::SocketAddr> {
    match i32::from(slot.sin6_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in at the start of the slot (family AF_INET).
            let v4 = unsafe { &*(slot as *const SockAddrSlot).cast::<libc::sockaddr_in>() };
            Some(std::net::SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into(),
                u16::from_be(v4.sin_port),
            ))
        }
        libc::AF_INET6 => Some(std::net::SocketAddr::new(
            std::net::Ipv6Addr::from(slot.sin6_addr.s6_addr).into(),
            u16::from_be(slot.sin6_port),
        )),
        _ => None,
    }
}

/// Control data of one message, aligned for `cmsghdr`: room for a `UDP_SEGMENT` or `UDP_GRO`
/// message next to an IPv6 packet-info message.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(super) struct Cmsg(pub(super) [u8; CMSG_ROOM]);

/// Bytes of [`Cmsg`].
pub(super) const CMSG_ROOM: usize = 96;

impl Cmsg {
    /// An empty one.
    pub(super) const EMPTY: Cmsg = Cmsg([0; CMSG_ROOM]);

    /// Append a control message (`level`, `ty`, `data`) at `*used` and advance it; false (and
    /// nothing written) when it does not fit.
    pub(super) fn push(&mut self, used: &mut usize, level: i32, ty: i32, data: &[u8]) -> bool {
        // CMSG_ALIGN, CMSG_LEN and CMSG_SPACE of Linux, without the unsafe libc calls.
        let align = |n: usize| n.next_multiple_of(std::mem::size_of::<usize>());
        let head = align(std::mem::size_of::<libc::cmsghdr>());
        let len = head + data.len();
        let space = head + align(data.len());
        let Some(room) = self.0.get_mut(*used..*used + space) else {
            return false;
        };
        // (cmsghdr: cmsg_len as size_t, then level and type as int; CMSG_LEN(0) is its size.)
        room[..std::mem::size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
        room[head - 8..head - 4].copy_from_slice(&level.to_ne_bytes());
        room[head - 4..head].copy_from_slice(&ty.to_ne_bytes());
        room[head..head + data.len()].copy_from_slice(data);
        room[head + data.len()..].fill(0);
        *used += space;
        true
    }

    /// Append the packet-info message that sends a datagram from `via`'s source address and
    /// out of its interface (`IP_PKTINFO`: `ipi_spec_dst`, `ipi_ifindex`; `IPV6_PKTINFO`:
    /// `ipi6_addr`, `ipi6_ifindex`). Nothing for a routed `via`.
    pub(super) fn push_via(&mut self, used: &mut usize, via: espip_core::datapath::Via, v6: bool) {
        if via.is_routed() {
            return;
        }
        let ifindex = via.ifindex;
        if v6 {
            let src = match via.src {
                Some(std::net::IpAddr::V6(a)) => a.octets(),
                _ => [0; 16],
            };
            let mut d = [0u8; 20];
            d[..16].copy_from_slice(&src);
            d[16..].copy_from_slice(&ifindex.to_ne_bytes());
            self.push(used, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &d);
        } else {
            let src = match via.src {
                Some(std::net::IpAddr::V4(a)) => a.octets(),
                _ => [0; 4],
            };
            // in_pktinfo: ipi_ifindex (int), ipi_spec_dst, ipi_addr (ignored on send).
            let mut d = [0u8; 12];
            d[..4].copy_from_slice(&(ifindex as i32).to_ne_bytes());
            d[4..8].copy_from_slice(&src);
            self.push(used, libc::IPPROTO_IP, libc::IP_PKTINFO, &d);
        }
    }
}

/// Where a received message landed, from its packet-info control message (`IP_PKTINFO` or
/// `IPV6_PKTINFO`, asked for with [`ask_landing`]): its destination address and interface.
pub(super) fn landing(h: &libc::msghdr) -> espip_core::datapath::Landing {
    let mut at = espip_core::datapath::Landing::UNKNOWN;
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // inside it, and the data of each message read here is at least as long as read.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let p = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                at.ifindex = p.ipi_ifindex as u32;
                at.dst = Some(std::net::Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)).into());
            } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let p = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                at.ifindex = p.ipi6_ifindex;
                at.dst = Some(std::net::Ipv6Addr::from(p.ipi6_addr.s6_addr).into());
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    at
}

/// Ask the kernel to tell each received message's destination and interface (see
/// [`landing`]); best effort (without it, paths sharing a peer address are told apart less
/// well).
pub(super) fn ask_landing(sock: &socket2::Socket, v6: bool) {
    let _ = if v6 {
        super::set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        super::set_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    };
}
