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
