//! Migration operations on a service's address records, expressed as
//! standard RFC 2136 updates so they work against any primary server.
//!
//! - [`prepare`]: lower the TTL of the name's A/AAAA records (remembering the
//!   original in the returned [`Prepared`], which the caller keeps) so that
//!   resolvers drop the old answer quickly at switch time. Resolvers that
//!   cached the old answer keep it for up to the *original* TTL: switching
//!   before [`Prepared::safe_after_unix`] works but is not yet fast for them.
//! - [`switch`]: replace the addresses in ONE update whose prerequisite is the
//!   old address set: of two concurrent switches exactly one wins; the loser
//!   gets [`OpsError::Lost`] with the address that won.
//! - [`finish`]: restore the original TTL (prerequisite: the addresses are
//!   still what we left, so a later change by someone else is not undone).

use std::net::IpAddr;

use hickory_proto::op::{ResponseCode, UpdateMessage as _};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::{Deserialize, Serialize};

use crate::client::{unix_now, Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{name} has no A or AAAA record at {server}; register the service first")]
    NoAddress { name: String, server: String },
    #[error("{name}: another change won: it now points to {current:?}, not {expected:?}; nothing was changed by this call")]
    Lost {
        name: String,
        expected: Vec<IpAddr>,
        current: Vec<IpAddr>,
    },
    #[error("cannot find the zone of {name} at {server}: {why} (pass the zone explicitly)")]
    Zone {
        name: String,
        server: String,
        why: String,
    },
    #[error("bad name {0:?}: {1}")]
    Name(String, String),
    #[error("{name}: no target address given")]
    NoTarget { name: String },
}

/// What `prepare` changed and what `finish` must restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub name: String,
    pub zone: String,
    pub addrs: Vec<IpAddr>,
    pub original_ttl: u32,
    pub lowered_ttl: u32,
    pub prepared_at_unix: u64,
    /// From then on every resolver has the lowered TTL.
    pub safe_after_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switched {
    pub name: String,
    pub from: Vec<IpAddr>,
    pub to: Vec<IpAddr>,
    pub ttl: u32,
}

/// The A and AAAA records of a name, as its authoritative server holds them.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    pub records: Vec<Record>,
}

impl Addresses {
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.records.iter().filter_map(ip_of).collect();
        ips.sort();
        ips
    }
    pub fn ttl(&self) -> Option<u32> {
        self.records.iter().map(|r| r.ttl).max()
    }
}

pub fn parse_name(s: &str) -> Result<Name, OpsError> {
    let mut n = Name::from_ascii(s).map_err(|e| OpsError::Name(s.into(), e.to_string()))?;
    n.set_fqdn(true);
    Ok(n)
}

fn ip_of(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

fn rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

fn family(ip: &IpAddr) -> RecordType {
    if ip.is_ipv4() {
        RecordType::A
    } else {
        RecordType::AAAA
    }
}

/// Reads the name's addresses from the server (authoritative data).
pub async fn addresses(client: &Client, name: &Name) -> Result<Addresses, OpsError> {
    let mut records = Vec::new();
    for t in [RecordType::A, RecordType::AAAA] {
        let answer = client.query(name, t).await?;
        match answer.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            rcode => {
                return Err(ClientError::Rcode {
                    server: client.server(),
                    rcode,
                }
                .into())
            }
        }
        records.extend(
            answer
                .answers
                .into_iter()
                .filter(|r| r.record_type() == t && r.name == *name),
        );
    }
    Ok(Addresses { records })
}

/// Finds the zone that holds `name` by asking the server for its SOA.
pub async fn find_zone(client: &Client, name: &Name) -> Result<Name, OpsError> {
    let answer = client.query(name, RecordType::SOA).await?;
    let zone_err = |why: String| OpsError::Zone {
        name: name.to_string(),
        server: client.server().to_string(),
        why,
    };
    if answer.metadata.response_code == ResponseCode::Refused {
        return Err(zone_err(
            "the server is not authoritative for it (REFUSED)".into(),
        ));
    }
    answer
        .answers
        .iter()
        .chain(answer.authorities.iter())
        .find(|r| r.record_type() == RecordType::SOA)
        .map(|r| r.name.clone())
        .ok_or_else(|| zone_err("no SOA in the answer".into()))
}

/// Adds to `msg` "the RRset of this type is exactly `ips`" (or "does not exist").
fn require_exactly(
    msg: &mut hickory_proto::op::Message,
    name: &Name,
    t: RecordType,
    ips: &[IpAddr],
) {
    let of_type: Vec<&IpAddr> = ips.iter().filter(|ip| family(ip) == t).collect();
    if of_type.is_empty() {
        let mut r = Record::update0(name.clone(), 0, t).into_record_of_rdata();
        r.dns_class = DNSClass::NONE;
        msg.add_pre_requisite(r);
    } else {
        for ip in of_type {
            let mut r = Record::from_rdata(name.clone(), 0, rdata(*ip));
            r.dns_class = DNSClass::IN;
            msg.add_pre_requisite(r);
        }
    }
}

/// Replaces the name's A and AAAA RRsets by `to` with `ttl`, if they are
/// exactly `from` now. One UPDATE message: all or nothing.
async fn replace(
    client: &Client,
    zone: &Name,
    name: &Name,
    from: &[IpAddr],
    to: &[IpAddr],
    ttl: u32,
) -> Result<(), ClientError> {
    let mut msg = Client::update_message(zone);
    for t in [RecordType::A, RecordType::AAAA] {
        let touched = from.iter().chain(to).any(|ip| family(ip) == t);
        if !touched {
            continue;
        }
        require_exactly(&mut msg, name, t, from);
        let mut del = Record::update0(name.clone(), 0, t).into_record_of_rdata();
        del.dns_class = DNSClass::ANY;
        msg.add_update(del);
        for ip in to.iter().filter(|ip| family(ip) == t) {
            msg.add_update(Record::from_rdata(name.clone(), ttl, rdata(*ip)));
        }
    }
    client.update(msg).await
}

/// Sets the TTL of `name`'s address records to what `ttl` computes from the
/// current one, keeping the addresses; reads again and retries (3 tries) if
/// they change between the read and the update. Returns the addresses and
/// the TTLs before and after.
async fn set_ttl(
    client: &Client,
    zone: &Name,
    name: &Name,
    ttl: impl Fn(u32) -> u32,
) -> Result<(Vec<IpAddr>, u32, u32), OpsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = addresses(client, name).await?;
        let ips = current.ips();
        let Some(before) = current.ttl() else {
            return Err(OpsError::NoAddress {
                name: name.to_string(),
                server: client.server().to_string(),
            });
        };
        let after = ttl(before);
        match replace(client, zone, name, &ips, &ips, after).await {
            Ok(()) => return Ok((ips, before, after)),
            // changed between our read and our update: read again
            Err(ClientError::Prerequisite { .. }) if attempt < 3 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Lowers the TTL of `name`'s address records to `ttl`.
pub async fn prepare(
    client: &Client,
    zone: &Name,
    name: &Name,
    ttl: u32,
) -> Result<Prepared, OpsError> {
    let (addrs, original_ttl, lowered_ttl) = set_ttl(client, zone, name, |t| ttl.min(t)).await?;
    let now = unix_now();
    Ok(Prepared {
        name: name.to_string(),
        zone: zone.to_string(),
        addrs,
        original_ttl,
        lowered_ttl,
        prepared_at_unix: now,
        safe_after_unix: now + u64::from(original_ttl),
    })
}

/// Points `name` at `to`, if it points at `from` now.
pub async fn switch(
    client: &Client,
    zone: &Name,
    name: &Name,
    from: &[IpAddr],
    to: &[IpAddr],
    ttl: u32,
) -> Result<Switched, OpsError> {
    if to.is_empty() {
        return Err(OpsError::NoTarget {
            name: name.to_string(),
        });
    }
    let mut from = from.to_vec();
    from.sort();
    let mut to = to.to_vec();
    to.sort();
    match replace(client, zone, name, &from, &to, ttl).await {
        Ok(()) => Ok(Switched {
            name: name.to_string(),
            from,
            to,
            ttl,
        }),
        Err(ClientError::Prerequisite { .. }) => {
            let current = addresses(client, name).await?.ips();
            Err(OpsError::Lost {
                name: name.to_string(),
                expected: from,
                current,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Restores the TTL that `prepare` lowered, keeping the current addresses.
pub async fn finish(
    client: &Client,
    zone: &Name,
    name: &Name,
    original_ttl: u32,
) -> Result<Vec<IpAddr>, OpsError> {
    Ok(set_ttl(client, zone, name, |_| original_ttl).await?.0)
}
