//! Phase 1: acquire. Every resource the daemon holds is a field of [`Resources`], declared in
//! teardown order (Rust drops fields in declaration order): the netfilter rules go first, then
//! the kernel settings are restored, then the TUN (with its addresses and routes) closes, then
//! the control socket; sockets and the rest after. A failure half-way drops what was acquired
//! so far, in the same order, so a failed start leaves nothing behind.
//!
//! Order of acquisition: what needs privileges and can fail without side effects first (raw
//! and UDP sockets, root's state directory, the control socket as the lock against a second
//! daemon, the user to become, the metrics listener), then the TUN and its routes, kernel
//! settings, the data path and its sequence reservations, netfilter rules last; then the
//! capture directory and the privilege drop, while the process has one thread.

use super::error::DaemonError;
use super::seq::reserve_initial;
use crate::config::Config;
use crate::control::ControlSocket;
use crate::datapath::{self, EncapSpec, Inbound, Outbound, Stats, TunnelSpec};
use crate::sys::capture::Taps;
use crate::sys::packet::{NextHops, PacketSocket};
use crate::sys::privdrop::Target;
use crate::sys::raw::RawSocket;
use crate::sys::safefs::PrivateDir;
use crate::sys::seqstore::SeqStore;
use crate::sys::sysctl::Sysctls;
use crate::sys::tun::Tun;
use crate::sys::udp::UdpEncapSocket;
use crate::sys::xsk::{Steer, XdpRx};
use crate::wire::ip::{PROTO_ESP, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tracing::{info, warn};

/// What a running daemon holds, in teardown order.
pub(super) struct Resources {
    /// The root process that runs `interface.pre_down` (first of all at the stop, while the
    /// TUN and the rules are still there; `run` calls it explicitly before the drop).
    pub pre_down: Option<crate::sys::hooks::PreDown>,
    /// The NAT helper's netfilter rules (removed first). Held only to be dropped, as is the
    /// next field.
    pub _rules: Option<RulesGuard>,
    /// Kernel settings changed, restored second.
    pub _sysctls: Option<Sysctls>,
    /// The TUN device, one `Tun` per queue; closing them removes its addresses and routes.
    pub tun: Arc<Vec<Tun>>,
    /// The control socket (the lock against a second daemon).
    pub control: ControlSocket,
    /// Raw IP sockets, one per protocol in use.
    pub sockets: Arc<Vec<RawSocket>>,
    /// The ESP-in-UDP sockets (one per IP version the esp-udp peers use).
    pub udp: Arc<Vec<UdpEncapSocket>>,
    /// IKEv2's UDP port 500, one per IP version the ikev2 peers use (taken by the serving
    /// loop).
    pub ike: Vec<std::net::UdpSocket>,
    /// The metrics listener, until the serving phase takes it.
    pub metrics: Option<std::net::TcpListener>,
    /// Capture taps.
    pub taps: Option<Taps>,
    /// The data path's halves (taken by the threads) and its counters.
    pub outbound: Option<Outbound>,
    /// Inbound half.
    pub inbound: Option<Inbound>,
    /// Data-path counters.
    pub stats: Arc<Stats>,
    /// Sequence reservations (taken by the TX thread).
    pub store: Option<SeqStore>,
    /// The tunnel MTU.
    pub mtu: u16,
    /// The outer source address of each peer.
    pub sources: Vec<IpAddr>,
    /// The routes espip added to the TUN (a reload removes only these).
    pub routes: Vec<crate::prefix::Prefix>,
    /// `interface.save_keys`, opened as root.
    pub keylog: Option<super::keylog::KeyLog>,
    /// The raw-socket modes' `AF_PACKET` sockets, one per egress interface.
    pub packet: Vec<PacketSocket>,
    /// The next hops the `AF_PACKET` sockets may send to (refreshed by the serving loop).
    pub hops: Arc<arc_swap::ArcSwap<NextHops>>,
    /// Whether an `AF_PACKET` socket is open (the serving loop then keeps `hops` current).
    pub fast_path: bool,
    /// The XDP receive path (`interface.rx_path = "xdp"`), one per interface; taken by the
    /// RX thread.
    pub xdp: Vec<XdpRx>,
}

impl Resources {
    /// Acquire everything, or nothing (what was acquired is released on error).
    pub(super) fn acquire(
        cfg: &Config,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Resources, DaemonError> {
        let mtu = tunnel_mtu(cfg)?;
        // Sockets first: a missing privilege fails before any device exists.
        let (sockets, udp) = open_sockets(cfg)?;
        let ike = open_ike_sockets(cfg)?;
        // Root's own state (sysctls saved, sequence numbers): a directory no other user can write.
        let state = PrivateDir::open(&cfg.interface.state_dir)
            .map_err(|e| DaemonError::State(cfg.interface.state_dir.clone(), e))?;
        let keylog = match &cfg.interface.save_keys {
            Some(d) => Some(super::keylog::KeyLog::open(d).map_err(DaemonError::SaveKeys)?),
            None => None,
        };
        // The control socket second: it is also the lock against a second daemon for the same
        // interface (a socket left by a killed daemon does not answer and is replaced).
        let control = ControlSocket::bind(&cfg.interface.control, &cfg.interface.name)?;
        // The user to become after setup: an unknown one fails now, before anything exists.
        let run_as = match &cfg.interface.user {
            Some(u) => Some(
                crate::sys::privdrop::lookup_or_create(u)
                    .map_err(|e| DaemonError::User(u.clone(), e))?,
            ),
            None => None,
        };
        let metrics = bind_metrics(cfg)?;
        check_aliases(cfg)?;
        restore_stale(&state, cfg);
        let tuns = Tun::create_queues(
            &cfg.interface.name,
            cfg.interface.offload,
            usize::from(cfg.interface.tx_threads),
        )?;
        let tun = &tuns[0];
        // Before the privilege drop: an AF_PACKET socket needs CAP_NET_RAW.
        let packet = open_packet_sockets(cfg, rt);
        // Before the privilege drop: loading and attaching XDP needs CAP_BPF and CAP_NET_ADMIN.
        let xdp = open_xdp(cfg, rt);
        let hops = Arc::new(arc_swap::ArcSwap::from_pointee(initial_hops(
            cfg, rt, &packet,
        )));
        let added = configure_tun(cfg, rt, tun, mtu)?;
        let sysctls = kernel_settings(cfg, &state, tun)?;
        let tunnel = TunnelSpec {
            relay: cfg.interface.forward,
            mtu,
        };
        let (outbound, inbound, stats) = datapath::build(&cfg.peers, tunnel, cfg.nat_table())?;
        let mut store = SeqStore::open(&cfg.interface.state_dir, &cfg.interface.name)
            .map_err(|e| DaemonError::State(cfg.interface.state_dir.clone(), e))?;
        reserve_initial(&outbound, &mut store)?;
        drop(state);
        // Rules last: a failure above leaves nothing in netfilter.
        let rules = apply_rules(cfg)?;
        // The operator's commands: post_up now (a failure undoes the start: `res` is dropped),
        // and the root process for pre_down, before the privilege drop.
        crate::sys::hooks::post_up(&cfg.interface.post_up, tun.name())
            .map_err(|e| DaemonError::Os("interface.post_up", e))?;
        let pre_down = crate::sys::hooks::PreDown::start(&cfg.interface.pre_down, tun.name())
            .map_err(|e| DaemonError::Os("interface.pre_down", e))?;
        let mut res = Resources {
            pre_down,
            _rules: rules,
            _sysctls: sysctls,
            tun: Arc::new(tuns),
            control,
            sockets: Arc::new(sockets),
            udp: Arc::new(udp),
            ike,
            metrics,
            taps: None,
            outbound: Some(outbound),
            inbound: Some(inbound),
            stats,
            store: Some(store),
            mtu,
            sources: outer_sources(cfg),
            routes: added,
            keylog,
            fast_path: !packet.is_empty(),
            packet,
            hops,
            xdp,
        };
        prepare_capture(cfg, run_as.as_ref())?;
        // Setup is done: become the configured user, keeping CAP_NET_ADMIN and CAP_NET_RAW for
        // the cleanup on stop (rules, sysctls). Before any thread is spawned: capabilities are
        // per thread.
        if let Some(t) = &run_as {
            drop_privileges(cfg, t)?;
        }
        res.taps = match &cfg.capture {
            Some(c) => Some(
                Taps::start(c, &cfg.interface.name)
                    .map_err(|e| DaemonError::Capture(c.dir.clone(), e))?,
            ),
            None => None,
        };
        log_installed(cfg, &res.tun[0], mtu, &res.routes);
        Ok(res)
    }

    /// The transports with a socket: (IPv6, protocol 50, 4 or 17) pairs.
    pub(super) fn transports(&self) -> Vec<(bool, u8)> {
        self.sockets
            .iter()
            .map(|s| (s.is_v6(), s.protocol()))
            .chain(self.udp.iter().map(|u| (u.is_v6(), PROTO_UDP)))
            .collect()
    }

    /// Inodes of the raw and UDP sockets (for their kernel drop counters).
    pub(super) fn socket_inodes(&self) -> Vec<u64> {
        self.sockets
            .iter()
            .filter_map(crate::sys::kstats::inode)
            .chain(self.udp.iter().filter_map(crate::sys::kstats::inode))
            .collect()
    }
}

/// The TUN's addresses, MTU and routes (no IPv6 on it at all when the tunnel carries none:
/// no link-local address, so no router solicitations for the data path to count as
/// `no_route` before any traffic); the routes added.
fn configure_tun(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    tun: &Tun,
    mtu: u16,
) -> Result<Vec<crate::prefix::Prefix>, DaemonError> {
    let routes = cfg.routes();
    if !cfg.interface.addresses.iter().any(|a| a.addr.is_ipv6())
        && !routes.iter().any(|p| p.addr().is_ipv6())
    {
        if let Err(e) = crate::sys::sysctl::disable_ipv6_on(tun.name()) {
            tracing::debug!("IPv6 left on {}: {e}", tun.name());
        }
    }
    Ok(rt.block_on(crate::sys::netlink::configure(
        tun.name(),
        mtu,
        &cfg.interface.addresses,
        &cfg.routes(),
    ))?)
}

/// The next hops of the raw endpoints for the AF_PACKET fast path (none without its sockets).
fn initial_hops(cfg: &Config, rt: &tokio::runtime::Runtime, packet: &[PacketSocket]) -> NextHops {
    if packet.is_empty() {
        NextHops::default()
    } else {
        rt.block_on(crate::sys::netlink::next_hops(
            &raw_endpoints(cfg),
            cfg.interface.local,
        ))
        .unwrap_or_default()
    }
}

/// The raw sockets for the protocols the peers use, over each IP version their endpoints
/// have, and an ESP-in-UDP socket per IP version if needed. `interface.local` binds the
/// sockets of its own family.
fn open_sockets(cfg: &Config) -> Result<(Vec<RawSocket>, Vec<UdpEncapSocket>), DaemonError> {
    let mut sockets = Vec::new();
    let mut udp = Vec::new();
    for v6 in [false, true] {
        let peers = || {
            cfg.peers
                .iter()
                .filter(move |p| cfg.peer_families(p).contains(&v6))
        };
        let uses = |f: fn(&EncapSpec) -> bool| peers().any(|p| f(&p.encap));
        let local = cfg.interface.local.filter(|l| l.is_ipv6() == v6);
        let mut protocols = Vec::new();
        if uses(|e| {
            matches!(
                e,
                EncapSpec::Esp { udp_port: None, .. }
                    | EncapSpec::EspPending { udp_port: None, .. }
            )
        }) {
            protocols.push(PROTO_ESP);
        }
        if uses(|e| matches!(e, EncapSpec::IpIp)) {
            protocols.extend([PROTO_IPIP, PROTO_IPV6]);
        }
        let first = sockets.len();
        for protocol in protocols {
            let s = RawSocket::open(protocol, v6, local)
                .map_err(|source| DaemonError::RawSocket { protocol, source })?;
            sockets.push(s);
        }
        if let [.., ipip, sit] = &mut sockets[first..] {
            if ipip.protocol() == PROTO_IPIP {
                if let Err(e) = crate::sys::raw::split_merged(ipip, sit) {
                    warn!(
                        "cannot receive IP-in-IP packets that the kernel's GRO merged ({e}): \
                         with GRO on (ethtool -k), TCP through ip-in-ip peers will stall; \
                         turn it off with `ethtool -K <interface> gro off` or run espip where \
                         bpf(2) is allowed"
                    );
                }
            }
        }
        if uses(|e| {
            matches!(
                e,
                EncapSpec::Esp {
                    udp_port: Some(_),
                    ..
                } | EncapSpec::EspPending {
                    udp_port: Some(_),
                    ..
                }
            )
        }) {
            let port = cfg.interface.listen_port;
            udp.push(
                UdpEncapSocket::open(v6, local, port)
                    .map_err(|source| DaemonError::UdpSocket { port, source })?,
            );
        }
    }
    Ok((sockets, udp))
}

/// The outer destinations of the peers that use a raw socket (ESP as protocol 50, IP-in-IP):
/// the ones the `AF_PACKET` fast path may carry.
pub(super) fn raw_endpoints(cfg: &Config) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = Vec::new();
    for p in &cfg.peers {
        let raw = matches!(
            p.encap,
            EncapSpec::Esp { udp_port: None, .. }
                | EncapSpec::EspPending { udp_port: None, .. }
                | EncapSpec::IpIp
        );
        if raw {
            for e in p.endpoints() {
                if !e.is_unspecified() && !v.contains(&e) {
                    v.push(e);
                }
            }
        }
    }
    v
}

/// The interfaces the raw-mode endpoints are routed over now, each once.
fn egress_interfaces(cfg: &Config, rt: &tokio::runtime::Runtime) -> Vec<u32> {
    let mut v = Vec::new();
    for dst in raw_endpoints(cfg) {
        let found = rt.block_on(crate::sys::netlink::egress_interface(
            dst,
            cfg.interface.local,
        ));
        if let Some(ifindex) = found.filter(|i| !v.contains(i)) {
            v.push(ifindex);
        }
    }
    v
}

/// The `AF_PACKET` sockets (`interface.tx_path = "auto"`): one per interface the raw-mode
/// endpoints are routed over now. One that cannot be opened is logged and left out: those
/// packets use the raw socket.
fn open_packet_sockets(cfg: &Config, rt: &tokio::runtime::Runtime) -> Vec<PacketSocket> {
    if cfg.interface.tx_path != crate::config::TxPath::Auto {
        return Vec::new();
    }
    let ttl = read_sysctl_u8("/proc/sys/net/ipv4/ip_default_ttl", 64);
    let hop_limit = read_sysctl_u8("/proc/sys/net/ipv6/conf/default/hop_limit", 64);
    let mut v: Vec<PacketSocket> = Vec::new();
    for ifindex in egress_interfaces(cfg, rt) {
        match PacketSocket::open(ifindex, ttl, hop_limit) {
            Ok(p) => v.push(p),
            Err(e) => warn!("the AF_PACKET fast path is off for interface index {ifindex}: {e}; its packets go through the raw socket"),
        }
    }
    v
}

/// What the XDP program steers: the raw-mode peers' protocols per outer family, and the
/// local addresses their packets arrive at (configured, or the kernel's source towards each).
pub(super) fn xdp_steer(cfg: &Config) -> Steer {
    let mut s = Steer::default();
    for p in &cfg.peers {
        let protocols: &[u8] = match p.encap {
            EncapSpec::Esp { udp_port: None, .. }
            | EncapSpec::EspPending { udp_port: None, .. } => &[PROTO_ESP],
            EncapSpec::IpIp => &[PROTO_IPIP, PROTO_IPV6],
            _ => continue,
        };
        for e in p.endpoints().into_iter().filter(|e| !e.is_unspecified()) {
            let list = if e.is_ipv6() {
                &mut s.v6_protocols
            } else {
                &mut s.v4_protocols
            };
            for pr in protocols {
                if !list.contains(pr) {
                    list.push(*pr);
                }
            }
            if let Ok(l) = crate::sys::source_for(e, cfg.interface.local) {
                if !l.is_unspecified() && !s.locals.contains(&l) {
                    s.locals.push(l);
                }
            }
        }
    }
    s
}

/// The XDP receive path (`interface.rx_path = "xdp"`): one per interface the raw-mode
/// endpoints are routed over now. One that cannot be set up is logged and left out: those
/// packets reach the raw sockets.
fn open_xdp(cfg: &Config, rt: &tokio::runtime::Runtime) -> Vec<XdpRx> {
    if cfg.interface.rx_path != crate::config::RxPath::Xdp {
        return Vec::new();
    }
    let steer = xdp_steer(cfg);
    let mut v: Vec<XdpRx> = Vec::new();
    for ifindex in egress_interfaces(cfg, rt) {
        // The RX thread polls at most two interfaces' sockets (`edges::XSK_SLOTS`).
        if v.len() == super::edges::XSK_SLOTS / crate::sys::xsk::MAX_QUEUES as usize {
            warn!("the XDP receive path is off for interface index {ifindex}: it serves at most two interfaces; its packets reach the raw sockets");
            continue;
        }
        match XdpRx::open(ifindex, &steer) {
            Ok(x) => {
                info!(
                    interface = %x.ifname,
                    mode = x.mode,
                    queues = x.xsks.len(),
                    "receiving the raw-mode peers' packets through AF_XDP"
                );
                v.push(x);
            }
            Err(e) => warn!("the XDP receive path is off for interface index {ifindex}: {e}; its packets reach the raw sockets"),
        }
    }
    v
}

fn read_sysctl_u8(path: &str, default: u8) -> u8 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// UDP port 500 for the ikev2 peers, bound as root (a privileged port) before the drop.
fn open_ike_sockets(cfg: &Config) -> Result<Vec<std::net::UdpSocket>, DaemonError> {
    let mut v = Vec::new();
    for v6 in [false, true] {
        let used = cfg.ike.iter().any(|s| {
            cfg.peers
                .iter()
                .any(|p| p.name == s.peer && cfg.peer_families(p).contains(&v6))
        });
        if !used {
            continue;
        }
        let addr: IpAddr = match cfg.interface.local.filter(|l| l.is_ipv6() == v6) {
            Some(l) => l,
            None if v6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            None => std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        let s = socket2::Socket::new(
            if v6 {
                socket2::Domain::IPV6
            } else {
                socket2::Domain::IPV4
            },
            socket2::Type::DGRAM.cloexec(),
            Some(socket2::Protocol::UDP),
        )
        .map_err(|e| DaemonError::IkeSocket(addr, e))?;
        if v6 {
            s.set_only_v6(true)
                .map_err(|e| DaemonError::IkeSocket(addr, e))?;
        }
        s.bind(&std::net::SocketAddr::new(addr, crate::wire::ip::IKE_PORT).into())
            .map_err(|e| DaemonError::IkeSocket(addr, e))?;
        // A responder answers from where it was reached.
        crate::sys::ikesock::ask_landing(&s, v6).map_err(|e| DaemonError::IkeSocket(addr, e))?;
        v.push(s.into());
    }
    Ok(v)
}

fn bind_metrics(cfg: &Config) -> Result<Option<std::net::TcpListener>, DaemonError> {
    let Some(addr) = cfg.metrics else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(addr).map_err(|e| DaemonError::Metrics(addr, e))?;
    l.set_nonblocking(true)
        .map_err(|e| DaemonError::Metrics(addr, e))?;
    Ok(Some(l))
}

/// An alias prefix that is on-link somewhere would capture real traffic: refuse.
fn check_aliases(cfg: &Config) -> Result<(), DaemonError> {
    for m in &cfg.nat.maps {
        let found = crate::sys::iptables::on_link_overlaps(m.alias, &cfg.interface.name);
        if !found.is_empty() {
            return Err(DaemonError::AliasOnLink {
                alias: m.alias,
                found: found.join(", "),
            });
        }
    }
    Ok(())
}

/// Restore what a killed predecessor changed (through the allow-list).
fn restore_stale(state: &PrivateDir, cfg: &Config) {
    let stale = crate::sys::sysctl::restore_stale(state, &cfg.interface.name);
    if !stale.done.is_empty() {
        info!(restored = %stale.done.join(" "), "restored kernel settings a previous run left changed");
    }
    if let Some(why) = &stale.untrusted {
        warn!("a previous run's kernel-settings file was not read: {why}; if that run was killed, check net.ipv4.ip_forward and rp_filter yourself");
    }
    for r in &stale.refused {
        warn!(line = %r.escape_debug(), "state file asked for a kernel setting espip never changes; not written");
    }
}

/// `forward` and `rp_filter`, with the old values saved for the stop.
fn kernel_settings(
    cfg: &Config,
    state: &PrivateDir,
    tun: &Tun,
) -> Result<Option<Sysctls>, DaemonError> {
    let mut settings = Vec::new();
    if cfg.interface.forward {
        settings.push(("net.ipv4.ip_forward".to_string(), "1".to_string()));
    }
    if let Some(rp) = cfg.interface.rp_filter {
        let v = rp.value();
        // The effective value is the larger of "all" and the interface's own: a looser mode on
        // the TUN needs "all" lowered as well (restored on stop).
        let all: u8 = crate::sys::sysctl::value("net.ipv4.conf.all.rp_filter")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if all > v || (v == 2 && all == 1) {
            settings.push(("net.ipv4.conf.all.rp_filter".to_string(), v.to_string()));
        }
        settings.push((
            format!("net.ipv4.conf.{}.rp_filter", tun.name()),
            v.to_string(),
        ));
    }
    if settings.is_empty() {
        return Ok(None);
    }
    let g = crate::sys::sysctl::apply(state, tun.name(), &settings)
        .map_err(|e| DaemonError::Os("changing kernel settings", e))?;
    info!(
        set = %settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
        "kernel settings changed (restored on stop)"
    );
    Ok(Some(g))
}

/// The outer source of each peer's packets (for the outer tap and the Wireshark SA lines).
pub(super) fn outer_sources(cfg: &Config) -> Vec<IpAddr> {
    cfg.peers
        .iter()
        .map(|p| match p.endpoint {
            Some(e) => crate::sys::source_for(e, cfg.interface.local)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            // A learned endpoint: the source the kernel picks per packet.
            None => cfg
                .interface
                .local
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        })
        .collect()
}

/// The NAT helper's rules. Stale rules of a killed daemon are removed first (the apply list
/// starts with the removal); on failure the guard removes whatever part was installed.
fn apply_rules(cfg: &Config) -> Result<Option<RulesGuard>, DaemonError> {
    if crate::rules::daemon_applies(cfg) {
        let guard = RulesGuard(cfg.interface.name.clone());
        let n = crate::sys::iptables::run(&crate::rules::apply(cfg))?;
        info!(chain = %crate::rules::nat_chain(&cfg.interface.name), commands = n, "netfilter rules applied");
        return Ok(Some(guard));
    }
    if cfg.nat.rules == crate::config::RulesMode::Print && !cfg.nat.maps.is_empty() {
        info!(
            "[nat] rules = \"print\": install these rules yourself:\n{}",
            crate::rules::script(cfg, false)
        );
    }
    Ok(None)
}

/// The capture directory is the only one the unprivileged daemon writes: espip creates it
/// for that user, or uses it if it already is that user's; it never takes one over.
fn prepare_capture(cfg: &Config, run_as: Option<&Target>) -> Result<(), DaemonError> {
    let Some(c) = &cfg.capture else {
        return Ok(());
    };
    let root = Target {
        name: "root".into(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    };
    crate::sys::privdrop::own_dir(&c.dir, run_as.unwrap_or(&root))
        .map_err(|e| DaemonError::Capture(c.dir.clone(), e))
}

/// Become `t`, then check it can write the capture directory (a parent directory it cannot
/// search would stop the captures at the first rotation).
fn drop_privileges(cfg: &Config, t: &Target) -> Result<(), DaemonError> {
    crate::sys::privdrop::drop_to(t).map_err(|e| DaemonError::Drop(t.name.clone(), e))?;
    if let Some(c) = &cfg.capture {
        let probe = c.dir.join(format!(".{}.probe", cfg.interface.name));
        std::fs::File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                DaemonError::Capture(
                    c.dir.clone(),
                    io::Error::new(
                        e.kind(),
                        format!(
                            "after dropping privileges to {} it cannot write there: {e} (are all parent directories searchable by it?)",
                            t.name
                        ),
                    ),
                )
            })?;
    }
    info!(user = %t.name, now = %crate::sys::privdrop::current(), "privileges dropped (kept CAP_NET_ADMIN, CAP_NET_RAW)");
    Ok(())
}

/// The "interface up" and per-peer lines of the start log.
fn log_installed(cfg: &Config, tun: &Tun, mtu: u16, added: &[crate::prefix::Prefix]) {
    info!(
        interface = tun.name(),
        mtu,
        addresses = ?cfg.interface.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        routes = ?added.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "interface up"
    );
    for p in &cfg.peers {
        info!(peer = %p.name, "peer installed: {}", p.describe(cfg.interface.listen_port));
    }
}

/// Removes espip's rules when dropped (stop, or an error after they were applied).
pub(super) struct RulesGuard(String);

impl Drop for RulesGuard {
    fn drop(&mut self) {
        match crate::sys::iptables::run(&crate::rules::remove(&self.0)) {
            Ok(_) => info!(chain = %crate::rules::nat_chain(&self.0), "netfilter rules removed"),
            Err(e) => warn!("removing netfilter rules: {e}"),
        }
    }
}

/// The tunnel MTU: the configured one, or the smallest path MTU to any endpoint minus the
/// encapsulation overhead.
pub fn tunnel_mtu(cfg: &Config) -> Result<u16, DaemonError> {
    if let Some(m) = cfg.interface.mtu {
        return Ok(m);
    }
    let mut mtu = u16::MAX;
    for p in &cfg.peers {
        if p.endpoint.is_none() {
            // A learned endpoint has no route to ask yet: assume an Ethernet path (1500), as
            // WireGuard's default MTU does; `interface.mtu` says otherwise.
            let v6 = cfg.peer_families(p).contains(&true);
            mtu = mtu.min(datapath::inner_mtu(1500, &p.encap, v6));
        }
        // A multipath peer's packets may take any path: the smallest fits them all.
        for endpoint in p.endpoints() {
            let path = crate::sys::path_mtu(endpoint, cfg.interface.local).map_err(|source| {
                DaemonError::NoRouteToPeer {
                    peer: p.name.clone(),
                    endpoint,
                    source,
                }
            })?;
            mtu = mtu.min(datapath::inner_mtu(path, &p.encap, endpoint.is_ipv6()));
        }
    }
    let floor = if cfg.interface.addresses.iter().any(|a| a.addr.is_ipv6()) {
        crate::config::MIN_MTU_V6
    } else {
        crate::config::MIN_MTU_V4
    };
    Ok(mtu.max(floor))
}

/// (endpoint, source) of every peer's every path, for the outer tap's synthesised headers
/// and the Wireshark SA lines. `sources`: the source of each peer's (first) endpoint.
pub(super) fn sent_from(cfg: &Config, sources: &[IpAddr]) -> Vec<(IpAddr, IpAddr)> {
    let mut v = Vec::new();
    for (p, s) in cfg.peers.iter().zip(sources) {
        for (i, e) in p.endpoints().into_iter().enumerate() {
            let src = match i {
                0 => *s,
                _ => crate::sys::source_for(e, cfg.interface.local).unwrap_or(match e {
                    IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                }),
            };
            v.push((e, src));
        }
    }
    v
}
