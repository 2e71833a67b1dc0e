//! The program loader of espip's eBPF programs ([`load`], `bpf(2)`, no loader crate; the XDP
//! program of `sys::xsk` uses it too), and two tiny socket filters: they split the
//! IP-in-IP packets that the kernel's GRO merged (`gso_size` set: several packets of one
//! inner flow in one buffer) from the ones it did not.
//!
//! A NIC with GRO on (the default on nearly every physical NIC) merges consecutive IP-in-IP
//! packets of one inner TCP flow (Linux's `ipip_gro_receive`, `sit_gro_receive`,
//! `ip4ip6_gro_receive`, `ip6ip6_gro_receive`; inner UDP too when the inner destination's
//! socket asked for UDP GRO). A raw socket then receives one packet of up to 64 KB whose
//! inner checksum is left partial, and nothing tells it where the original packets ended.
//! An `AF_PACKET` socket with `PACKET_VNET_HDR` is told (`gso_size`), so:
//! - [`merged_ipip`] `accept = true` on that socket takes only merged IP-in-IP packets;
//! - [`merged_ipip`] `accept = false` on the raw IP-in-IP sockets drops exactly those, so each
//!   packet reaches espip once (and the kernel, having delivered to a raw socket, sends no
//!   ICMP "protocol unreachable").
//!
//! Both read `__sk_buff.gso_size` (Linux 5.7+; `include/uapi/linux/bpf.h`) and the IP
//! protocol / next header at the network header (`SKF_NET_OFF`, as classic BPF).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `offsetof(struct __sk_buff, gso_size)` (checked against this machine's uapi header).
const SKB_GSO_SIZE: i16 = 176;
/// `SKF_NET_OFF`: a load relative to the network header.
const SKF_NET_OFF: i32 = -0x10_0000;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `SO_ATTACH_BPF`.
const SO_ATTACH_BPF: libc::c_int = 50;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Insn {
    pub(super) code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub(super) regs: u8,
    pub(super) off: i16,
    pub(super) imm: i32,
}

pub(super) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// `r6 = r1` (LD_ABS takes the context from r6).
const MOV64_X: u8 = 0xbf;
/// `r0 = *(u32 *)(src + off)`.
const LDX_W: u8 = 0x61;
/// `if dst == imm goto +off`.
const JEQ_K: u8 = 0x15;
/// `r0 = the byte at imm` (legacy packet load, socket filters only).
const LD_ABS_B: u8 = 0x30;
/// `w0 = imm` (zero-extended).
const MOV32_K: u8 = 0xb4;
const EXIT: u8 = 0x95;

/// The filter: a packet is "merged IP-in-IP" if its `gso_size` is set and its IP protocol
/// (IPv4) or next header (IPv6, `v6`) is 4 or 41. `accept`: keep those and drop the rest (the
/// `AF_PACKET` side); else drop those and keep the rest (the raw sockets).
fn program(v6: bool, accept: bool) -> [Insn; 10] {
    let proto_at = SKF_NET_OFF + if v6 { 6 } else { 9 };
    let (hit, miss) = if accept { (-1, 0) } else { (0, -1) };
    [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(LDX_W, 0, 1, SKB_GSO_SIZE, 0),
        insn(JEQ_K, 0, 0, 3, 0), // not merged: miss
        insn(LD_ABS_B, 0, 0, 0, proto_at),
        insn(JEQ_K, 0, 0, 3, 4),  // IPv4 inside: hit
        insn(JEQ_K, 0, 0, 2, 41), // IPv6 inside: hit
        insn(MOV32_K, 0, 0, 0, miss),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV32_K, 0, 0, 0, hit),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `prog_name` (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `bpf(cmd, attr)`: the one place espip calls `bpf(2)` (socket filters here, AF_XDP's map,
/// program and link in `xsk`). `attr` is the command's prefix of `union bpf_attr`, its size
/// passed; every pointer in it must point at memory alive for the call.
pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live `union bpf_attr` prefix of the given size, and (the caller's
    // contract) every pointer in it points at memory alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The descriptor a successful `bpf(2)` returned, owned.
pub(crate) fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) }
}

/// Load a program of `prog_type` named `name` (at most 15 bytes); when the kernel refuses it,
/// again with the verifier's log, whose last lines the error then carries.
pub(super) fn load(prog_type: u32, name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    // The instruction array, license and log buffer `attr` points at live through the call.
    let call = |attr: &mut ProgLoad| bpf(BPF_PROG_LOAD, attr).map(owned);
    call(&mut attr).map_err(|e| {
        let mut log = vec![0u8; 16 * 1024];
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
        let _ = call(&mut attr);
        let text = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = text
            .trim_end_matches('\0')
            .trim()
            .lines()
            .rev()
            .take(3)
            .collect();
        io::Error::new(
            e.kind(),
            format!("{e}; the verifier said: {}", lines.join(" / ")),
        )
    })
}

/// Attach the merged-IP-in-IP filter (see [`program`]) to `sock`. The program lives as long
/// as the socket: nothing to remove on stop, and nothing left after a SIGKILL.
pub fn merged_ipip(sock: &impl AsRawFd, v6: bool, accept: bool) -> io::Result<()> {
    let prog = load(
        BPF_PROG_TYPE_SOCKET_FILTER,
        "espip_merge",
        &program(v6, accept),
    )?;
    super::set_int(
        sock,
        libc::SOL_SOCKET,
        SO_ATTACH_BPF,
        prog.as_raw_fd() as libc::c_int,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_exits() {
        let p = program(false, true);
        // Each conditional jump lands on `w0 = miss` (index 6) or `w0 = hit` (index 8).
        for (i, t) in [(2usize, 6usize), (4, 8), (5, 8)] {
            assert_eq!(p[i].code, JEQ_K);
            assert_eq!(i + 1 + p[i].off as usize, t, "jump at {i}");
        }
        assert_eq!((p[6].imm, p[8].imm), (0, -1));
        assert_eq!((p[7].code, p[9].code), (EXIT, EXIT));
        assert_eq!(program(true, false)[3].imm, SKF_NET_OFF + 6);
        assert_eq!(
            (program(true, false)[6].imm, program(true, false)[8].imm),
            (-1, 0)
        );
    }
}
