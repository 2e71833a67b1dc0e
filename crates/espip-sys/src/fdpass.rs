//! Descriptors passed over a Unix socket (`SCM_RIGHTS`): how `espip reload` hands root's
//! opened state files to the daemon.

use std::io;

/// Most descriptors one message may pass (a reload passes one state file per key; the kernel
/// passes at most 253 in one message).
pub const MAX_FDS: usize = 250;

/// One `recvmsg` on a Unix stream: bytes into `buf`, descriptors passed with `SCM_RIGHTS`
/// (at most [`MAX_FDS`] per call, more is an error: `MSG_CTRUNC`) onto `fds`, owned from then on.
pub fn recv_with_fds(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(
                v.into_iter()
                    .map(|f| unsafe { std::os::fd::OwnedFd::from_raw_fd(f) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("descriptors truncated"));
    }
    Ok(msg.bytes)
}
