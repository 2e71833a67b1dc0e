//! Interface configuration over rtnetlink: MTU, addresses, up, and a route per `allowed_ips`
//! prefix. Everything is attached to the TUN device, so the kernel removes it with the device.

use espip_core::prefix::Prefix;
use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::net::IpAddr;

/// An address on the TUN, with its prefix length (host bits kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A netlink step failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}")]
pub struct NetlinkError {
    what: String,
    why: String,
}

fn ctx(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError {
        what,
        why: e.to_string(),
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Configure the TUN `name`: MTU, addresses, up, routes for `routes`. Returns the route list
/// actually added (prefixes already covered by an identical route are skipped).
pub async fn configure(
    name: &str,
    mtu: u16,
    addresses: &[IfAddr],
    routes: &[Prefix],
) -> Result<Vec<Prefix>, NetlinkError> {
    let (handle, task) = connect()?;
    let index = link_index(&handle, name).await?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(u32::from(mtu))
                .build(),
        )
        .execute()
        .await
        .map_err(ctx(format!("set mtu {mtu} on {name}")))?;
    for a in addresses {
        match handle.address().add(index, a.addr, a.len).execute().await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(ctx(format!("add address {a} to {name}"))(e)),
        }
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(ctx(format!("set {name} up")))?;
    let added = add_routes(&handle, name, index, routes).await?;
    task.abort();
    Ok(added)
}

fn route_message(
    p: &Prefix,
    index: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(p.addr(), p.len())
        .map_err(|e| NetlinkError {
            what: format!("route {p}"),
            why: e.to_string(),
        })?
        .output_interface(index)
        .build())
}

async fn add_routes(
    handle: &rtnetlink::Handle,
    name: &str,
    index: u32,
    routes: &[Prefix],
) -> Result<Vec<Prefix>, NetlinkError> {
    let mut added = Vec::new();
    for p in routes {
        match handle.route().add(route_message(p, index)?).execute().await {
            Ok(()) => added.push(*p),
            // The connected route of an interface address already covers it.
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(ctx(format!("add route {p} dev {name}"))(e)),
        }
    }
    Ok(added)
}

/// A reload's route changes on the TUN `name`: remove `remove` (routes espip added before;
/// one already gone is fine), then add `add`. Returns the routes actually added.
pub async fn update_routes(
    name: &str,
    add: &[Prefix],
    remove: &[Prefix],
) -> Result<Vec<Prefix>, NetlinkError> {
    let (handle, task) = connect()?;
    let index = link_index(&handle, name).await?;
    for p in remove {
        match handle.route().del(route_message(p, index)?).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => {}
            Err(e) => return Err(ctx(format!("remove route {p} dev {name}"))(e)),
        }
    }
    let added = add_routes(&handle, name, index, add).await;
    task.abort();
    added
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<u32, NetlinkError> {
    Ok(handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(ctx(format!("find interface {name}")))?
        .ok_or_else(|| NetlinkError {
            what: format!("find interface {name}"),
            why: "no such interface".into(),
        })?
        .header
        .index)
}

/// A netlink connection, served by a task the caller aborts when done.
fn connect() -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>), NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError {
        what: "open netlink socket".into(),
        why: e.to_string(),
    })?;
    Ok((handle, tokio::spawn(conn)))
}

/// The next hop of each outer destination in `dsts` (with the outer source `local` when
/// configured), for the `AF_PACKET` fast path: the kernel's route for it (policy rules
/// included: `ip route get`), then the neighbour entry of its gateway or of itself on that
/// interface. A destination is left out (and goes through the raw socket, which lets the
/// kernel resolve it) when the route is not a unicast route over an Ethernet interface, or the
/// neighbour has no link-layer address, or is `STALE` (the raw socket's traffic makes the
/// kernel confirm it again, so a changed MAC address is learnt within a refresh).
pub async fn next_hops(
    dsts: &[IpAddr],
    local: Option<IpAddr>,
) -> Result<crate::packet::NextHops, NetlinkError> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
    let (handle, task) = connect()?;
    let mut hops = Vec::new();
    let mut neighbours = None;
    for &dst in dsts {
        let Some(route) = route_to(&handle, dst, local).await else {
            continue;
        };
        if route.header.kind != RouteType::Unicast {
            continue;
        }
        let ip = |a: &RouteAddress| match a {
            RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
            RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
            _ => None,
        };
        let (mut oif, mut gateway, mut src) = (None, None, local);
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(g) => gateway = ip(g),
                RouteAttribute::PrefSource(s) if src.is_none() => src = ip(s),
                _ => {}
            }
        }
        let (Some(oif), Some(src)) = (oif, src) else {
            continue;
        };
        if src.is_ipv6() != dst.is_ipv6() {
            continue;
        }
        let Ok(Some(link)) = handle
            .link()
            .get()
            .match_index(oif)
            .execute()
            .try_next()
            .await
        else {
            continue;
        };
        if link.header.link_layer_type != LinkLayerType::Ether {
            continue;
        }
        let (mut src_mac, mut mtu) = (None, None);
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => {
                    src_mac = Some([m[0], m[1], m[2], m[3], m[4], m[5]])
                }
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                _ => {}
            }
        }
        let (Some(src_mac), Some(mtu)) = (src_mac, mtu) else {
            continue;
        };
        if neighbours.is_none() {
            let mut all = Vec::new();
            let mut s = handle.neighbours().get().execute();
            while let Ok(Some(n)) = s.try_next().await {
                all.push(n);
            }
            neighbours = Some(all);
        }
        let via = gateway.unwrap_or(dst);
        let mac = neighbours
            .as_ref()
            .and_then(|all| neighbour_mac(all, oif, via));
        let Some(dst_mac) = mac else {
            continue;
        };
        hops.push(crate::packet::NextHop {
            dst,
            ifindex: oif,
            src,
            src_mac,
            dst_mac,
            mtu,
        });
    }
    task.abort();
    Ok(crate::packet::NextHops(hops))
}

/// The link-layer address of `via` on interface `oif` in the neighbour table, if its entry is
/// usable (reachable, being confirmed, permanent or without ARP).
fn neighbour_mac(
    all: &[rtnetlink::packet_route::neighbour::NeighbourMessage],
    oif: u32,
    via: IpAddr,
) -> Option<[u8; 6]> {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    all.iter().find_map(|n| {
        let usable = matches!(
            n.header.state,
            NeighbourState::Reachable
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        if n.header.ifindex != oif || !usable {
            return None;
        }
        let mut addr = None;
        let mut lladdr = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                    addr = Some(IpAddr::V4(*v))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                    addr = Some(IpAddr::V6(*v))
                }
                NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                    lladdr = Some([m[0], m[1], m[2], m[3], m[4], m[5]])
                }
                _ => {}
            }
        }
        (addr == Some(via)).then_some(lladdr).flatten()
    })
}

/// The interface the kernel routes `dst` over (from `local` when given), if any.
pub async fn egress_interface(dst: IpAddr, local: Option<IpAddr>) -> Option<u32> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let (handle, task) = connect().ok()?;
    let route = route_to(&handle, dst, local).await;
    task.abort();
    route?.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The kernel's route to `dst` (from `local` when given): `ip route get`, policy rules
/// included. `None` when there is none or the request fails.
async fn route_to(
    handle: &rtnetlink::Handle,
    dst: IpAddr,
    local: Option<IpAddr>,
) -> Option<rtnetlink::packet_route::route::RouteMessage> {
    let host = |a: IpAddr| if a.is_ipv6() { 128 } else { 32 };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, host(dst))
        .ok()?;
    if let Some(l) = local.filter(|l| l.is_ipv6() == dst.is_ipv6()) {
        b = b.source_prefix(l, host(l)).ok()?;
    }
    handle
        .route()
        .get(b.build())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
}
