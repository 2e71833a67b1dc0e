//! The receiving half of `recvmmsg` shared by the raw sockets and the ESP-in-UDP socket:
//! message headers pointed at the read areas of a batch of buffers, and the call itself.

use crate::buf::PacketBuf;
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
