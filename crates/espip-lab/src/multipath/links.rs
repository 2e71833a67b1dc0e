//! The lab's links: what each is (`RATE/RTT[/LOSS][/ipv6]`), its addresses, and the relayed
//! veth pairs that emulate it.

use super::{uplinks, Lab, Topology};
use crate::netns::{self, Netns};
use std::io;
use std::path::Path;

/// Link 1 (IPv4): A's and B's addresses.
pub const LINK1: [&str; 2] = ["10.1.0.1", "10.1.0.2"];
/// Link 2 (IPv6 only, the default pair's second link): A's and B's addresses.
pub const LINK2: [&str; 2] = ["2001:db8:12::1", "2001:db8:12::2"];
/// Most links a lab builds.
pub const MAX_LINKS: usize = 4;

/// One emulated link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// Rate each way, Mbit/s.
    pub mbit: f64,
    /// Round-trip time added, ms (half each way).
    pub rtt_ms: f64,
    /// Random loss each way, percent.
    pub loss_percent: f64,
    /// Extra one-way delay of each frame, uniform in 0..this many ms, order kept (a radio
    /// link's varying queue; the relay never reorders a link).
    pub jitter_ms: f64,
    /// IPv6 only (else IPv4 only).
    pub ipv6: bool,
}

/// Why a link given as `RATE/RTT[/LOSS%][/JITTERms][/ipv6]` was refused (`spec`: what was
/// given).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkSpecError {
    /// Not RATE/RTT followed by at most one loss, one jitter and one family field.
    #[error("{0:?}: expected RATE_MBIT/RTT_MS[/LOSS%][/JITTERms][/ipv6], e.g. 100/10, 25/40/1%, 20/60/2%/15ms or 15/100/ipv6")]
    Format(String),
    /// A field that is not a number.
    #[error("{spec:?}: {what} {value:?} is not a number")]
    NotANumber {
        /// The link as given.
        spec: String,
        /// rate, RTT, loss or jitter.
        what: &'static str,
        /// The field.
        value: String,
    },
    /// A field out of its range.
    #[error("{spec:?}: {what} must be 0..{max}")]
    OutOfRange {
        /// The link as given.
        spec: String,
        /// rate, RTT, loss or jitter.
        what: &'static str,
        /// Its largest value.
        max: f64,
    },
    /// A rate below 1 Mbit/s.
    #[error("{0:?}: the rate must be at least 1 Mbit/s")]
    RateTooLow(String),
    /// Fewer than two or more than [`MAX_LINKS`] links.
    #[error("{0} links: the lab builds 2 to 4")]
    Count(usize),
}

impl std::str::FromStr for LinkSpec {
    type Err = LinkSpecError;

    /// `RATE/RTT[/LOSS%][/JITTERms][/ipv6]`: `100/10` (100 Mbit/s, 10 ms), `25/40/1%` (and
    /// 1 % loss; a bare third number is the loss too), `20/60/2%/15ms` (and up to 15 ms of
    /// jitter each way), `15/100/ipv6` (IPv6 only).
    fn from_str(s: &str) -> Result<Self, LinkSpecError> {
        let parts: Vec<&str> = s.split('/').map(str::trim).collect();
        let num = |v: &str, what: &'static str, max: f64| -> Result<f64, LinkSpecError> {
            let x: f64 = v.parse().map_err(|_| LinkSpecError::NotANumber {
                spec: s.into(),
                what,
                value: v.into(),
            })?;
            if !(0.0..=max).contains(&x) {
                return Err(LinkSpecError::OutOfRange {
                    spec: s.into(),
                    what,
                    max,
                });
            }
            Ok(x)
        };
        if parts.len() < 2 {
            return Err(LinkSpecError::Format(s.into()));
        }
        let mbit = num(parts[0], "rate", 10_000.0)?;
        if mbit < 1.0 {
            return Err(LinkSpecError::RateTooLow(s.into()));
        }
        let mut link = LinkSpec {
            mbit,
            rtt_ms: num(parts[1], "RTT", 2000.0)?,
            loss_percent: 0.0,
            jitter_ms: 0.0,
            ipv6: false,
        };
        let (mut loss, mut jitter) = (false, false);
        for (k, f) in parts[2..].iter().enumerate() {
            let lower = f.to_ascii_lowercase();
            if lower == "ipv6" && !link.ipv6 {
                link.ipv6 = true;
            } else if let (Some(v), false) = (lower.strip_suffix('%'), loss) {
                link.loss_percent = num(v, "loss", 50.0)?;
                loss = true;
            } else if let (Some(v), false) = (lower.strip_suffix("ms"), jitter) {
                link.jitter_ms = num(v, "jitter", 1000.0)?;
                jitter = true;
            } else if k == 0
                && !lower.is_empty()
                && lower.chars().all(|c| c.is_ascii_digit() || c == '.')
            {
                link.loss_percent = num(f, "loss", 50.0)?;
                loss = true;
            } else {
                return Err(LinkSpecError::Format(s.into()));
            }
        }
        Ok(link)
    }
}

/// `--links`: two to four links, comma-separated.
pub fn parse_links(s: &str) -> Result<Vec<LinkSpec>, LinkSpecError> {
    let links = s
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<LinkSpec>, _>>()?;
    if !(2..=MAX_LINKS).contains(&links.len()) {
        return Err(LinkSpecError::Count(links.len()));
    }
    Ok(links)
}

/// Link `i`'s interface on A and B.
pub fn dev(i: usize) -> String {
    format!("l{}", i + 1)
}

/// Link `i`'s address on A (`k` 0) or B (`k` 1): 10.(i+1).0.(k+1)/24, or for an IPv6 link
/// 2001:db8:1(i+1)::(k+1)/64 (link 1 IPv4 and link 2 IPv6 are [`LINK1`] and [`LINK2`]).
pub fn addr(i: usize, ipv6: bool, k: usize) -> String {
    if ipv6 {
        format!("2001:db8:1{}::{}", i + 1, k + 1)
    } else {
        format!("10.{}.0.{}", i + 1, k + 1)
    }
}

/// The IPv4 address of link `i` on A or B, whatever the link carries (MPTCP's subflows
/// are IPv4 here).
pub fn addr4(i: usize, k: usize) -> String {
    addr(i, false, k)
}

/// A relayed link: `host_a`'s `dev_a` and `host_b`'s `dev_b` joined through `mid` (relay not
/// started), limited to `spec`'s rate in each direction.
pub(super) fn relayed_link(
    (host_a, dev_a): (&Netns, &str),
    (host_b, dev_b): (&Netns, &str),
    mid: &Netns,
    spec: &LinkSpec,
) -> io::Result<()> {
    for (host, dev, side) in [(host_a, dev_a, "mid-a"), (host_b, dev_b, "mid-b")] {
        netns::veth_pair(host, dev, mid, side)?;
        // The middle only relays: no address, no IPv6 of its own, no forwarding.
        mid.sysctl(&format!("net.ipv6.conf.{side}.disable_ipv6"), "1")?;
        mid.ip(&["link", "set", "dev", side, "up"])?;
        // A frame's due time is its arrival plus the delay; tbf then paces what the relay
        // writes.
        tbf(mid, side, "add", spec.mbit)?;
        // UDP GSO trains must be cut into frames before the relay sees them.
        host.ip(&["link", "set", dev, "gso_max_segs", "1"])?;
    }
    mid.sysctl("net.ipv4.ip_forward", "0")
}

/// `tc qdisc ACTION dev SIDE root tbf` at `mbit`: bursts of 10 ms at the rate (at least 16 KB),
/// a queue of 50 ms.
fn tbf(mid: &Netns, side: &str, action: &str, mbit: f64) -> io::Result<()> {
    let burst = ((mbit * 1e6 / 8.0 * 0.01) as u64).max(16_384);
    netns::run_ok(
        mid.command("tc")
            .args(["qdisc", action, "dev", side, "root", "tbf", "rate"])
            .arg(format!("{mbit}mbit"))
            .arg("burst")
            .arg(burst.to_string())
            .args(["latency", "50ms"]),
    )
    .map(drop)
}

/// Change the rate of a relayed link (both directions), as a line whose rate moves does.
pub(super) fn set_rate(mid: &Netns, mbit: f64) -> io::Result<()> {
    for side in ["mid-a", "mid-b"] {
        tbf(mid, side, "change", mbit)?;
    }
    Ok(())
}

/// Build the namespaces and the links of `topology` (relays not started).
pub(super) fn topology(
    topology: Topology,
    links: &[LinkSpec],
    work: &Path,
    keep: bool,
) -> io::Result<Lab> {
    if topology == Topology::Uplinks {
        return uplinks::build(links, work, keep);
    }
    let a = Netns::new("lab", "a")?;
    let b = Netns::new("lab", "b")?;
    let m = (0..links.len())
        .map(|i| Netns::new("lab", &format!("m{}", i + 1)))
        .collect::<io::Result<Vec<_>>>()?;
    for (i, (mid, spec)) in m.iter().zip(links).enumerate() {
        let dev = dev(i);
        relayed_link((&a, &dev), (&b, &dev), mid, spec)?;
        for (host, k) in [(&a, 0), (&b, 1)] {
            if spec.ipv6 {
                host.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
                host.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", addr(i, true, k)),
                    "dev",
                    &dev,
                    "nodad",
                ])?;
            } else {
                host.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1")?;
                host.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", addr(i, false, k)),
                    "dev",
                    &dev,
                ])?;
            }
            host.ip(&["link", "set", &dev, "up"])?;
        }
    }
    Ok(Lab {
        a,
        b,
        relays: m.iter().map(|_| None).collect(),
        m,
        nat: None,
        work: work.to_path_buf(),
        keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_with_loss_and_family_and_refuse_the_rest() {
        let l: LinkSpec = "15/100/ipv6".parse().unwrap();
        assert!(l.ipv6 && l.mbit == 15.0 && l.rtt_ms == 100.0 && l.loss_percent == 0.0);
        let l: LinkSpec = "25/40/1".parse().unwrap();
        assert!(!l.ipv6 && l.loss_percent == 1.0);
        let l: LinkSpec = "25/40/2/IPv6".parse().unwrap();
        assert!(l.ipv6 && l.loss_percent == 2.0);
        let l: LinkSpec = "20/60/2%/15ms/ipv6".parse().unwrap();
        assert!(l.ipv6 && l.loss_percent == 2.0 && l.jitter_ms == 15.0);
        let l: LinkSpec = "20/60/15ms".parse().unwrap();
        assert!(!l.ipv6 && l.loss_percent == 0.0 && l.jitter_ms == 15.0);
        for bad in ["20/60/2%/3%", "20/60/ipv6/ipv6", "20/60/x", "20/60/15ms/2"] {
            assert!(
                matches!(bad.parse::<LinkSpec>(), Err(LinkSpecError::Format(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "20/60/2000ms".parse::<LinkSpec>(),
            Err(LinkSpecError::OutOfRange { what: "jitter", .. })
        ));
        assert!(matches!(
            "25".parse::<LinkSpec>(),
            Err(LinkSpecError::Format(_))
        ));
        assert!(matches!(
            "0.5/10".parse::<LinkSpec>(),
            Err(LinkSpecError::RateTooLow(_))
        ));
        assert!(matches!(
            "10/x".parse::<LinkSpec>(),
            Err(LinkSpecError::NotANumber { .. })
        ));
        assert_eq!(parse_links("60/10,30/100/ipv6,15/40").unwrap().len(), 3);
        assert_eq!(parse_links("60/10"), Err(LinkSpecError::Count(1)));
        assert_eq!(
            parse_links("1/1,1/1,1/1,1/1,1/1"),
            Err(LinkSpecError::Count(5))
        );
        assert_eq!(addr(0, false, 0), LINK1[0]);
        assert_eq!(addr(1, true, 1), LINK2[1]);
    }
}
