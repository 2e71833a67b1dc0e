//! Packets the kernel dropped before espip saw them: the TUN's queue (`tx_dropped` of the
//! device: packets routed into the TUN that found its queue full) and the receive buffers of
//! espip's raw and UDP sockets (the `drops` column of `/proc/net/{raw,udp}`, what
//! `SO_RXQ_OVFL` would report per message). Read from the daemon's own `/proc/self/net`,
//! which is its network namespace's view; control side only, never the data path.

use std::io;

/// The kernel's drop counters that concern one daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDrops {
    /// Packets dropped on the TUN's transmit queue (the kernel -> espip direction).
    pub tun_tx_queue: u64,
    /// Packets dropped on the TUN's receive side (espip -> kernel writes refused).
    pub tun_rx: u64,
    /// Datagrams dropped because a raw or UDP socket's receive buffer was full.
    pub socket_rcvbuf: u64,
}

/// (rx_dropped, tx_dropped) of `dev` in `/proc/net/dev` text.
pub fn dev_drops(text: &str, dev: &str) -> Option<(u64, u64)> {
    for line in text.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != dev {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets
        // errs drop ...
        return Some((*f.get(3)?, *f.get(11)?));
    }
    None
}

/// Sum of the `drops` column (the last) of the sockets in `/proc/net/{raw,udp}` text whose
/// inode (column 10) is in `inodes`.
pub fn socket_drops(text: &str, inodes: &[u64]) -> u64 {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ino: u64 = f.get(9)?.parse().ok()?;
            inodes
                .contains(&ino)
                .then(|| f.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The counters for the TUN `dev` and the sockets with `inodes`.
pub fn read(dev: &str, inodes: &[u64]) -> io::Result<KernelDrops> {
    let dev_text = std::fs::read_to_string("/proc/self/net/dev")?;
    let (rx, tx) = dev_drops(&dev_text, dev).unwrap_or((0, 0));
    let mut socket_rcvbuf = 0;
    for table in ["raw", "udp"] {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/self/net/{table}")) {
            socket_rcvbuf += socket_drops(&t, inodes);
        }
    }
    Ok(KernelDrops {
        tun_tx_queue: tx,
        tun_rx: rx,
        socket_rcvbuf,
    })
}

/// The inode of a socket (as `/proc/net/*` lists it).
pub fn inode(fd: &impl std::os::fd::AsFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_fd()).ok().map(|s| s.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev_and_socket_tables() {
        let dev = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\nespip0: 1000 10 0 3 0 0 0 0 900000 1261470 0 808426 0 0 0 0\n";
        assert_eq!(dev_drops(dev, "espip0"), Some((3, 808426)));
        assert_eq!(dev_drops(dev, "espip1"), None);
        let raw = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n   50: 00000000:0032 00000000:0000 07 00000000:00000000 00:00000000 00000000   999        0 123456 2 0000000000000000 17\n   51: 00000000:0004 00000000:0000 07 00000000:00000000 00:00000000 00000000   999        0 999999 2 0000000000000000 5\n";
        assert_eq!(socket_drops(raw, &[123456]), 17);
        assert_eq!(socket_drops(raw, &[123456, 999999]), 22);
        assert_eq!(socket_drops(raw, &[1]), 0);
    }
}
