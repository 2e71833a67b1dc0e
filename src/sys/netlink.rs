//! Interface configuration over rtnetlink: MTU, addresses, up, and a route per `allowed_ips`
//! prefix. Everything is attached to the TUN device, so the kernel removes it with the device.

use crate::config::IfAddr;
use crate::prefix::Prefix;
use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::net::IpAddr;

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
