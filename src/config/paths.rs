//! `[[peer.path]]` and the multipath settings of a peer (`scheduler`, `probe_interval_ms`,
//! `dead_after`, `reorder_ms`, `reorder_packets`, `reorder_bytes`).

use super::mode::{endpoint, Mode};
use super::raw::RawPeer;
use super::{invalid, ConfigError};
use crate::multipath::{MultipathSpec, PathSpec, PeerPaths, Scheduler, MAX_PATHS};
use std::net::IpAddr;

/// Replay window of a peer with several paths unless configured: packets of one SA arrive
/// out of order by up to the paths' delay difference times the rate (100 ms at 1 Gbit/s of
/// 1400-byte packets is about 9000 packets).
pub const MULTIPATH_REPLAY_WINDOW: u32 = 1 << 15;

/// A single-endpoint peer with a multipath setting: named, since it would do nothing.
pub(super) fn refuse_path_settings(
    p: &RawPeer,
    k: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    for (field, set) in [
        ("scheduler", p.scheduler.is_some()),
        ("probe_interval_ms", p.probe_interval_ms.is_some()),
        ("dead_after", p.dead_after.is_some()),
        ("reorder_ms", p.reorder_ms.is_some()),
        ("reorder_packets", p.reorder_packets.is_some()),
        ("reorder_bytes", p.reorder_bytes.is_some()),
        ("adapt", p.adapt.is_some()),
        ("equal_delay", p.equal_delay.is_some()),
        ("repair", p.repair.is_some()),
        ("capacity_trains", p.capacity_trains.is_some()),
        ("fast_acks", p.fast_acks.is_some()),
    ] {
        if set {
            return Err(invalid(
                k(field),
                "(set)",
                "nothing for a peer with one endpoint: give the peer [[peer.path]] tables (and no endpoint) to use several paths",
            ));
        }
    }
    Ok(())
}

/// `max_paths` of a peer without `endpoint`: its learned paths and settings when it is more
/// than 1 (`None`: a single learned endpoint).
pub(super) fn learned_paths(
    p: &RawPeer,
    mode: Mode,
    k: &dyn Fn(&str) -> String,
) -> Result<Option<PeerPaths>, ConfigError> {
    let n = match p.max_paths {
        None | Some(1) => {
            if p.path_idle.is_some() {
                return Err(invalid(
                    k("path_idle"),
                    "(set)",
                    "nothing without max_paths = 2 or more: it says when a learned path is forgotten",
                ));
            }
            return Ok(None);
        }
        Some(n) if (2..=MAX_PATHS as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(invalid(
                k("max_paths"),
                n,
                format!("a number from 1 to {MAX_PATHS}: how many (address, port)s of the peer are paths at once"),
            ))
        }
    };
    if mode == Mode::IpIp {
        return Err(invalid(
            k("max_paths"),
            n,
            "1 (or mode = \"esp\" / \"esp-udp\"): paths are learned from authenticated packets, and ipip has none",
        ));
    }
    Ok(Some(PeerPaths {
        spec: multipath_spec(p, k)?,
        paths: (0..n).map(PathSpec::learned).collect(),
    }))
}

/// `max_paths` and `path_idle` on a peer with an `endpoint` or `[[peer.path]]` tables:
/// named, since they would do nothing.
pub(super) fn refuse_learned_settings(
    p: &RawPeer,
    k: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    for (field, set) in [
        ("max_paths", p.max_paths.is_some()),
        ("path_idle", p.path_idle.is_some()),
    ] {
        if set {
            return Err(invalid(
                k(field),
                "(set)",
                "nothing for a peer whose endpoint or paths are configured: leave out endpoint and [[peer.path]] to learn the peer's paths from its packets",
            ));
        }
    }
    Ok(())
}

/// The paths and settings of a peer with `[[peer.path]]` tables.
pub(super) fn paths(
    p: &RawPeer,
    mode: Mode,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<PeerPaths, ConfigError> {
    if p.path.len() > MAX_PATHS {
        return Err(invalid(
            k("path"),
            format!("{} paths", p.path.len()),
            format!("at most {MAX_PATHS} [[peer.path]] tables"),
        ));
    }
    let mut paths: Vec<PathSpec> = Vec::new();
    for (i, raw) in p.path.iter().enumerate() {
        let spec = path(raw, i, &paths, mode, k)?;
        paths.push(spec);
    }
    let spec = multipath_spec(p, k)?;
    let scheduler = spec.scheduler;
    let name = &p.name;
    if mode == Mode::IpIp && scheduler != Scheduler::Spread {
        // (`earliest` needs measured paths: without probes it stays on the static weights.)
        warnings.push(format!(
            "peer {name:?}: ipip has no SA to authenticate probes, so its paths are never found down; scheduler {:?} works as configured order only",
            scheduler.name()
        ));
    }
    if paths.len() == 1 {
        warnings.push(format!(
            "peer {name:?} has one [[peer.path]]: it is probed, but there is nothing to spread or fail over to"
        ));
    }
    if u64::from(spec.probe_interval_ms) * u64::from(spec.dead_after) > 5000 {
        warnings.push(format!(
            "peer {name:?}: a path is found down only after {} ms (probe_interval_ms x dead_after)",
            u64::from(spec.probe_interval_ms) * u64::from(spec.dead_after)
        ));
    }
    Ok(PeerPaths { spec, paths })
}
/// The `i`th `[[peer.path]]`, checked against the paths before it.
fn path(
    raw: &super::raw::RawPath,
    i: usize,
    paths: &[PathSpec],
    mode: Mode,
    k: &dyn Fn(&str) -> String,
) -> Result<PathSpec, ConfigError> {
    let key = |field: &str| k(&format!("path[{}].{field}", i + 1));
    let name = raw.name.clone().unwrap_or_else(|| format!("path{}", i + 1));
    if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            key("name"),
            format!("{name:?}"),
            "a short name of printable ASCII characters without spaces (it appears in logs and metrics)",
        ));
    }
    if paths.iter().any(|q| q.name == name) {
        return Err(invalid(
            key("name"),
            format!("{name:?}"),
            "a name no other path of this peer has",
        ));
    }
    let (ep, port) = endpoint(&raw.endpoint, mode, &key("endpoint"))?;
    let port = match mode {
        Mode::EspUdp => port.unwrap_or(crate::wire::ip::IPSEC_NAT_T_PORT),
        _ => 0,
    };
    let local = path_local(raw.local.as_deref(), ep, &key("local"))?;
    let device = match raw.device.as_deref() {
        None => None,
        Some(d) if valid_device_name(d) => Some(d.to_string()),
        Some(d) => {
            return Err(invalid(
                key("device"),
                format!("{d:?}"),
                "an interface name as `ip link` lists it (1 to 15 characters, no '/', ':' or spaces), e.g. \"eth1\" or \"wwan0\"",
            ))
        }
    };
    let bound = local.is_some() || device.is_some();
    if let Some(q) = paths.iter().find(|q| q.endpoint == ep && q.port == port) {
        let q_bound = q.local.is_some() || q.device.is_some();
        let fix = if !bound || !q_bound {
            format!(
                "an endpoint other than path {:?}'s, or give both paths their own `local` (source address) or `device` (uplink): two routed paths to one destination take one route",
                q.name
            )
        } else if q.local == local && q.device == device {
            format!(
                "a `local` or `device` other than path {:?}'s: the two would be one path",
                q.name
            )
        } else if mode != Mode::EspUdp && (local.is_none() || q.local.is_none() || local == q.local)
        {
            format!(
                "its own `local` address next to path {:?}'s: over raw {} sockets the receiver tells paths to one address apart by the address a packet arrives at (or use mode = \"esp-udp\", which also sees the interface)",
                q.name,
                mode.name()
            )
        } else {
            String::new()
        };
        if !fix.is_empty() {
            return Err(invalid(key("endpoint"), format!("{:?}", raw.endpoint), fix));
        }
    }
    let weight = match raw.weight {
        None => 1,
        Some(w) if (1..=1000).contains(&w) => w as u32,
        Some(w) => return Err(invalid(
            key("weight"),
            w,
            "a number from 1 to 1000: the path's starting share before its capacity is measured",
        )),
    };
    Ok(PathSpec {
        name,
        endpoint: ep,
        port,
        weight,
        local,
        device,
        // Resolved by the daemon on the host it runs on.
        ifindex: 0,
        learned: false,
    })
}

/// A path's `local`: a unicast address of the endpoint's family (whether this host has it is
/// checked when the daemon starts).
fn path_local(
    raw: Option<&str>,
    endpoint: IpAddr,
    key: &str,
) -> Result<Option<IpAddr>, ConfigError> {
    let Some(l) = raw else { return Ok(None) };
    let ip = l.trim().parse::<IpAddr>().map_err(|_| {
        invalid(
            key,
            format!("{l:?}"),
            "the IP address of this host the path's packets leave from, e.g. \"192.168.8.100\" (the address of the uplink it uses)",
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(
            key,
            ip,
            "a unicast address of one of this host's uplinks",
        ));
    }
    if ip.is_ipv6() != endpoint.is_ipv6() {
        return Err(invalid(
            key,
            ip,
            format!(
                "an address of the endpoint's family ({endpoint} is IPv{})",
                if endpoint.is_ipv6() { 6 } else { 4 }
            ),
        ));
    }
    Ok(Some(ip))
}

/// Whether `d` is a name Linux accepts for an interface (`dev_valid_name`).
pub(crate) fn valid_device_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() < 16
        && d != "."
        && d != ".."
        && d.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The peer's scheduler, probe and reorder settings, with their defaults.
fn multipath_spec(p: &RawPeer, k: &dyn Fn(&str) -> String) -> Result<MultipathSpec, ConfigError> {
    let d = MultipathSpec::default();
    let scheduler = match &p.scheduler {
        None => d.scheduler,
        Some(s) => Scheduler::from_name(s).ok_or_else(|| {
            invalid(
                k("scheduler"),
                format!("{s:?}"),
                "\"spread\" (each packet on one path, by measured capacity), \"earliest\" (each packet on the path where it arrives first), \"failover\" (the first live path) or \"redundant\" (every packet on every live path)",
            )
        })?,
    };
    let num = |field: &str, v: Option<i64>, lo: i64, hi: i64, def: u32, what: &str| match v {
        None => Ok(def),
        Some(n) if (lo..=hi).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(k(field), n, format!("{what} from {lo} to {hi}"))),
    };
    let spec = MultipathSpec {
        scheduler,
        probe_interval_ms: num(
            "probe_interval_ms",
            p.probe_interval_ms,
            10,
            10_000,
            d.probe_interval_ms,
            "milliseconds between probes on each path,",
        )?,
        dead_after: num(
            "dead_after",
            p.dead_after,
            1,
            100,
            d.dead_after,
            "probe intervals without an echo before a path is down,",
        )?,
        reorder_ms: num(
            "reorder_ms",
            p.reorder_ms,
            0,
            2000,
            d.reorder_ms,
            "the longest wait for a gap, in milliseconds (0: no reordering),",
        )?,
        reorder_packets: num(
            "reorder_packets",
            p.reorder_packets,
            16,
            1 << 20,
            d.reorder_packets,
            "packets held at most,",
        )?,
        reorder_bytes: num(
            "reorder_bytes",
            p.reorder_bytes,
            1 << 16,
            1 << 30,
            d.reorder_bytes,
            "bytes held at most,",
        )?,
        adapt: p.adapt.unwrap_or(true),
        equal_delay: p.equal_delay.unwrap_or(true),
        repair: p.repair.unwrap_or(false),
        capacity_trains: p.capacity_trains.unwrap_or(true),
        fast_acks: p.fast_acks.unwrap_or(true),
        path_idle_s: num(
            "path_idle",
            p.path_idle,
            1,
            86_400,
            d.path_idle_s,
            "seconds a learned path may be silent before it is forgotten,",
        )?,
    };
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::datapath::EncapSpec;
    use std::path::Path;

    const KEY: &str = "0x000102030405060708090a0b0c0d0e0f10111213";
    const KEY_B: &str = "0x100102030405060708090a0b0c0d0e0f10111213";

    fn text(peer_extra: &str, paths: &str) -> String {
        format!(
            r#"
[interface]
name = "espip0"
address = ["10.4.9.1/24"]

[[peer]]
name = "b"
allowed_ips = ["10.4.9.2/32"]
mode = "esp-udp"
cipher = "aes-128-gcm"
spi_out = "0x1001"
spi_in = "0x1002"
key_out = "{KEY}"
key_in = "{KEY_B}"
{peer_extra}
{paths}
"#
        )
    }

    const TWO: &str = r#"
[[peer.path]]
name = "dsl"
endpoint = "198.51.100.2"
weight = 4
[[peer.path]]
name = "lte"
endpoint = "[2001:db8:12::2]:4501"
"#;

    fn err(t: &str) -> String {
        Config::parse(t, Path::new(".")).unwrap_err().to_string()
    }

    #[test]
    fn max_paths_learns_the_paths_of_a_peer_without_endpoint() {
        let c = Config::parse(
            &text(
                "max_paths = 2\npath_idle = 30\nscheduler = \"earliest\"",
                "",
            ),
            Path::new("."),
        )
        .unwrap();
        let p = &c.peers[0];
        assert_eq!(p.endpoint, None);
        assert!(p.endpoints().is_empty());
        let m = p.multipath.as_ref().expect("learned paths");
        assert_eq!(m.paths.len(), 2);
        assert!(m.paths.iter().all(|x| x.learned));
        assert_eq!(m.paths[1].name, "path2");
        assert_eq!(m.spec.path_idle_s, 30);
        assert_eq!(m.spec.scheduler, crate::multipath::Scheduler::Earliest);
        match &p.encap {
            EncapSpec::Esp {
                replay_window,
                udp_port,
                ..
            } => {
                assert_eq!(*replay_window, super::MULTIPATH_REPLAY_WINDOW);
                assert_eq!(*udp_port, Some(4500));
            }
            _ => panic!(),
        }
        // max_paths = 1 is a single learned endpoint.
        let c = Config::parse(&text("max_paths = 1", ""), Path::new(".")).unwrap();
        assert!(c.peers[0].multipath.is_none());
    }

    #[test]
    fn max_paths_and_path_idle_are_refused_where_they_would_do_nothing() {
        let e = err(&text("max_paths = 2", TWO));
        assert!(
            e.contains("max_paths") && e.contains("leave out endpoint and [[peer.path]]"),
            "{e}"
        );
        let e = err(&text("max_paths = 2\nendpoint = \"192.0.2.2\"", ""));
        assert!(e.contains("max_paths") && e.contains("configured"), "{e}");
        let e = err(&text("path_idle = 30", ""));
        assert!(
            e.contains("path_idle") && e.contains("max_paths = 2 or more"),
            "{e}"
        );
        let e = err(&text("max_paths = 9", ""));
        assert!(e.contains("max_paths") && e.contains("from 1 to 8"), "{e}");
        let e = err(&text("max_paths = 2\npath_idle = 0", ""));
        assert!(
            e.contains("path_idle") && e.contains("from 1 to 86400"),
            "{e}"
        );
    }

    #[test]
    fn two_paths_of_two_families_parse_with_their_defaults() {
        let c = Config::parse(&text("scheduler = \"redundant\"", TWO), Path::new(".")).unwrap();
        let p = &c.peers[0];
        let m = p.multipath.as_ref().expect("multipath");
        assert_eq!(m.spec.scheduler, crate::multipath::Scheduler::Redundant);
        assert_eq!((m.spec.probe_interval_ms, m.spec.dead_after), (100, 3));
        assert_eq!(m.paths.len(), 2);
        assert_eq!(
            (m.paths[0].name.as_str(), m.paths[0].port, m.paths[0].weight),
            ("dsl", 4500, 4)
        );
        assert_eq!(
            (m.paths[1].name.as_str(), m.paths[1].port, m.paths[1].weight),
            ("lte", 4501, 1)
        );
        assert_eq!(p.endpoints().len(), 2);
        assert_eq!(p.endpoint, Some(m.paths[0].endpoint));
        match &p.encap {
            EncapSpec::Esp { replay_window, .. } => {
                assert_eq!(*replay_window, super::MULTIPATH_REPLAY_WINDOW)
            }
            _ => panic!(),
        }
    }

    /// Issue 28 item 14: interface.local with several paths is refused with the reason (on
    /// 6c363c3 `check` passed and every path but the routed one was silently dead).
    #[test]
    fn interface_local_with_several_paths_is_refused() {
        let t = text("", TWO).replace(
            "[interface]\nname = \"espip0\"\n",
            "[interface]\nname = \"espip0\"\nlocal = \"198.51.100.1\"\n",
        );
        assert!(t.contains("local = "), "{t}");
        let e = err(&t);
        assert!(
            e.contains("interface.local") && e.contains("multipath peer \"b\" (2 paths)"),
            "{e}"
        );
    }

    /// Issue 29: two uplinks to one server address, told apart by source address or by
    /// interface.
    #[test]
    fn two_paths_to_one_address_by_two_uplinks_parse() {
        let paths = r#"
[[peer.path]]
name = "dsl"
endpoint = "203.0.113.1"
local = "192.168.1.20"
[[peer.path]]
name = "lte"
endpoint = "203.0.113.1"
device = "wwan0"
"#;
        let c = Config::parse(&text("", paths), Path::new(".")).unwrap();
        let m = c.peers[0].multipath.as_ref().expect("multipath");
        assert_eq!(m.paths[0].local, Some("192.168.1.20".parse().unwrap()));
        assert_eq!(m.paths[0].device, None);
        assert_eq!(m.paths[1].device.as_deref(), Some("wwan0"));
        assert_eq!(m.paths[0].endpoint, m.paths[1].endpoint);
        // Over raw ESP the receiver needs an address to tell them apart.
        let raw = text("", paths).replace("mode = \"esp-udp\"", "mode = \"esp\"");
        assert!(
            err(&raw).contains("its own `local` address"),
            "{}",
            err(&raw)
        );
    }

    #[test]
    fn mistakes_are_named_with_the_fix() {
        for (extra, paths, want) in [
            ("endpoint = \"192.0.2.2\"", TWO, "either one endpoint or several [[peer.path]]"),
            ("scheduler = \"spread\"", "", "nothing for a peer with one endpoint"),
            ("scheduler = \"fastest\"", TWO, "\"spread\""),
            ("endpoint = \"192.0.2.2\"\nscheduler = \"spread\"", "", "nothing for a peer with one endpoint"),
            ("probe_interval_ms = 1", TWO, "probe_interval_ms"),
            ("reorder_ms = 5000", TWO, "reorder_ms"),
            ("", "[[peer.path]]\nname = \"a\"\nendpoint = \"192.0.2.2\"\n[[peer.path]]\nname = \"a\"\nendpoint = \"192.0.2.3\"\n", "a name no other path of this peer has"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\n[[peer.path]]\nendpoint = \"192.0.2.2\"\n", "two routed paths to one destination"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\nlocal = \"2001:db8::1\"\n", "an address of the endpoint's family"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\nlocal = \"uplink\"\n", "the IP address of this host"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\ndevice = \"eth/1\"\n", "an interface name"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\nlocal = \"192.0.2.1\"\n[[peer.path]]\nendpoint = \"192.0.2.2\"\n", "give both paths their own `local`"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\ndevice = \"eth1\"\n[[peer.path]]\nendpoint = \"192.0.2.2\"\ndevice = \"eth1\"\n", "the two would be one path"),
            ("", "[[peer.path]]\nendpoint = \"192.0.2.2\"\nweight = 0\n", "a number from 1 to 1000"),
            ("", "[[peer.path]]\nendpoint = \"10.4.9.2\"\n", "do not contain a peer endpoint"),
        ] {
            let e = err(&text(extra, paths));
            assert!(e.contains(want), "{extra:?} {paths:?}: {e}");
        }
    }
}
