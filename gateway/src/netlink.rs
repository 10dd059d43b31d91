//! Routes and policy rules through rtnetlink (no `ip` commands).
//!
//! All operations are idempotent: adding what exists and deleting what is
//! gone succeed, so a restarted gateway can simply re-apply its state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Context as _};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, RouteMessageBuilder};

/// The address the TUN device gets so that the kernel's (loose)
/// reverse-path check accepts what the data plane writes into it with a
/// source routed elsewhere (a VM at home: its own address, on its LAN). An
/// interface without an IPv4 address fails that check for every source
/// not routed through it. Link-local, /32, no route added with it.
pub const UNNUMBERED: Ipv4Addr = Ipv4Addr::new(169, 254, 74, 77);

/// The routing table of a site's reverse-tunnel default route.
pub const REVERSE_TABLE: u32 = 7477;
const RULE_PRIORITY: u32 = 7477;

pub struct Net {
    handle: Handle,
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_eexist())
}

fn missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_enoent() || m.raw_code() == -libc_esrch())
}

const fn libc_eexist() -> i32 {
    17
}
const fn libc_enoent() -> i32 {
    2
}
const fn libc_esrch() -> i32 {
    3
}

impl Net {
    /// Opens a netlink connection in the calling thread's namespace.
    pub fn connect() -> anyhow::Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn ifindex(&self, name: &str) -> anyhow::Result<u32> {
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .with_context(|| format!("no interface {name}"))?
            .ok_or_else(|| anyhow!("no interface {name}"))?;
        Ok(link.header.index)
    }

    fn host_route(addr: IpAddr, index: u32, table: Option<u32>) -> RouteMessage {
        match addr {
            IpAddr::V4(a) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(a, 32)
                    .output_interface(index);
                if let Some(t) = table {
                    b = b.table_id(t);
                }
                b.build()
            }
            IpAddr::V6(a) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(a, 128)
                    .output_interface(index);
                if let Some(t) = table {
                    b = b.table_id(t);
                }
                b.build()
            }
        }
    }

    /// `ip route replace ADDR/32 dev DEV [table T]` (/128 for IPv6).
    pub async fn add_host_route(
        &self,
        addr: IpAddr,
        dev: &str,
        table: Option<u32>,
    ) -> anyhow::Result<()> {
        let index = self.ifindex(dev).await?;
        self.handle
            .route()
            .add(Self::host_route(addr, index, table))
            .replace()
            .execute()
            .await
            .with_context(|| format!("cannot route {addr} into {dev}"))
    }

    /// `ip addr add 169.254.74.77/32 dev DEV` ([`UNNUMBERED`]); present is fine.
    pub async fn add_unnumbered(&self, dev: &str) -> anyhow::Result<()> {
        let index = self.ifindex(dev).await?;
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(UNNUMBERED), 32)
            .execute()
            .await
        {
            Err(e) if exists(&e) => Ok(()),
            r => r.with_context(|| format!("cannot give {dev} the address {UNNUMBERED}/32")),
        }
    }

    /// `ip route del ADDR/32 dev DEV [table T]`; absent is fine.
    pub async fn del_host_route(
        &self,
        addr: IpAddr,
        dev: &str,
        table: Option<u32>,
    ) -> anyhow::Result<()> {
        let Ok(index) = self.ifindex(dev).await else {
            return Ok(()); // the device is gone, and its routes with it
        };
        match self
            .handle
            .route()
            .del(Self::host_route(addr, index, table))
            .execute()
            .await
        {
            Err(e) if missing(&e) => Ok(()),
            r => r.with_context(|| format!("cannot remove the route {addr} into {dev}")),
        }
    }

    /// `ip [-6] route replace default dev DEV table T`.
    pub async fn add_default_route(&self, dev: &str, table: u32, v6: bool) -> anyhow::Result<()> {
        let index = self.ifindex(dev).await?;
        let msg = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(index)
                .table_id(table)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(index)
                .table_id(table)
                .build()
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("cannot add a default route into {dev} in table {table}"))
    }

    /// The rule's message (`ip rule add from ADDR iif DEV lookup T`).
    fn rule(
        &self,
        from: IpAddr,
        iif: &str,
        table: u32,
    ) -> rtnetlink::packet_route::rule::RuleMessage {
        let req = self.handle.rule().add();
        match from {
            IpAddr::V4(a) => {
                let mut r = req
                    .v4()
                    .source_prefix(a, 32)
                    .input_interface(iif.to_string())
                    .table_id(table)
                    .priority(RULE_PRIORITY)
                    .action(RuleAction::ToTable);
                r.message_mut().clone()
            }
            IpAddr::V6(a) => {
                let mut r = req
                    .v6()
                    .source_prefix(a, 128)
                    .input_interface(iif.to_string())
                    .table_id(table)
                    .priority(RULE_PRIORITY)
                    .action(RuleAction::ToTable);
                r.message_mut().clone()
            }
        }
    }

    /// `ip rule add from ADDR iif DEV lookup T`.
    pub async fn add_rule_from(&self, from: IpAddr, iif: &str, table: u32) -> anyhow::Result<()> {
        let mut req = self.handle.rule().add();
        *req.message_mut() = self.rule(from, iif, table);
        match req.execute().await {
            Err(e) if exists(&e) => Ok(()),
            r => r.with_context(|| {
                format!("cannot add the rule from {from} iif {iif} lookup {table}")
            }),
        }
    }

    /// `ip rule del from ADDR iif DEV lookup T`; absent is fine.
    pub async fn del_rule_from(&self, from: IpAddr, iif: &str, table: u32) -> anyhow::Result<()> {
        let msg = self.rule(from, iif, table);
        match self.handle.rule().del(msg).execute().await {
            Err(e) if missing(&e) => Ok(()),
            r => r.with_context(|| format!("cannot remove the rule from {from} iif {iif}")),
        }
    }

    /// `ip neigh add proxy ADDR dev DEV`: answer ARP (IPv4) or neighbour
    /// solicitations (IPv6) for ADDR on DEV (the moved VM's old LAN), so
    /// hosts there send its traffic to us. IPv6 also needs the interface's
    /// `proxy_ndp` switch on (the caller's).
    pub async fn add_proxy_neighbour(&self, addr: IpAddr, dev: &str) -> anyhow::Result<()> {
        let index = self.ifindex(dev).await?;
        match self
            .handle
            .neighbours()
            .add(index, addr)
            .flags(NeighbourFlags::Proxy)
            .execute()
            .await
        {
            Err(e) if exists(&e) => Ok(()),
            r => {
                r.with_context(|| format!("cannot add a proxy neighbour entry for {addr} on {dev}"))
            }
        }
    }

    /// `ip neigh del proxy ADDR dev DEV`; absent is fine.
    pub async fn del_proxy_neighbour(&self, addr: IpAddr, dev: &str) -> anyhow::Result<()> {
        let Ok(index) = self.ifindex(dev).await else {
            return Ok(());
        };
        let mut req = self
            .handle
            .neighbours()
            .add(index, addr)
            .flags(NeighbourFlags::Proxy);
        let msg = req.message_mut().clone();
        match self.handle.neighbours().del(msg).execute().await {
            Err(e) if missing(&e) => Ok(()),
            r => r.with_context(|| {
                format!("cannot remove the proxy neighbour entry for {addr} on {dev}")
            }),
        }
    }
}
