//! RFC 2136 UPDATE processing as a pure function: current zone + request in,
//! a change set (or a response code) out. No I/O and no locks, so every rule
//! is tested directly and the server can journal the whole change set before
//! anything becomes visible.
//!
//! Sections 3.2 (prerequisites), 3.4.1 (prescan) and 3.4.2 (apply) of RFC
//! 2136, with the usual guard rails: SOA only replaced by a newer serial, the
//! apex SOA and NS never deleted, CNAME and other data never coexist, and an
//! RRset keeps one TTL (RFC 2181 §5.2: an added record sets it, as BIND does).

use std::collections::BTreeMap;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{DNSClass, LowerName, RData, Record, RecordSet, RecordType, RrKey};

/// The zone as the planner sees it.
pub type Records = BTreeMap<RrKey, Arc<RecordSet>>;

/// What an accepted update changes: the full new contents of every touched
/// RRset (`None`: the RRset is gone), SOA included.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeSet {
    pub serial: u32,
    pub rrsets: Vec<(RrKey, Option<RecordSet>)>,
}

/// Plans an update against `zone`. `Ok(None)`: valid, but changes nothing
/// (the serial does not move, as RFC 2136 §3.7 asks).
pub fn plan(
    origin: &LowerName,
    zone: &Records,
    prerequisites: &[Record],
    updates: &[Record],
) -> Result<Option<ChangeSet>, ResponseCode> {
    check_prerequisites(origin, zone, prerequisites)?;
    prescan(origin, updates)?;
    let mut work = Overlay::new(zone);
    let mut soa_set_explicitly = false;
    for rr in updates {
        soa_set_explicitly |= apply(origin, &mut work, rr);
    }
    let mut rrsets = work.changed();
    if rrsets.is_empty() {
        return Ok(None);
    }
    let soa_key = RrKey::new(origin.clone(), RecordType::SOA);
    let current_soa = soa_of(zone, origin).ok_or(ResponseCode::ServFail)?;
    let serial = if soa_set_explicitly {
        work.soa_serial(&soa_key).unwrap_or(current_soa.1.serial)
    } else {
        let next = current_soa.1.serial.wrapping_add(1);
        let mut soa = current_soa.1.clone();
        soa.serial = next;
        let record = Record::from_rdata(
            current_soa.0.name.clone(),
            current_soa.0.ttl,
            RData::SOA(soa),
        );
        let mut set = RecordSet::new(record.name.clone(), RecordType::SOA, next);
        set.insert(record, next);
        rrsets.retain(|(k, _)| k != &soa_key);
        rrsets.push((soa_key, Some(set)));
        next
    };
    Ok(Some(ChangeSet { serial, rrsets }))
}

/// The zone's SOA record and data.
pub fn soa_of<'a>(zone: &'a Records, origin: &LowerName) -> Option<(&'a Record, &'a SOA)> {
    let set = zone.get(&RrKey::new(origin.clone(), RecordType::SOA))?;
    let record = set.records_without_rrsigs().next()?;
    match &record.data {
        RData::SOA(soa) => Some((record, soa)),
        _ => None,
    }
}

fn is_empty_rdata(rr: &Record) -> bool {
    matches!(rr.data, RData::Update0(_))
        || matches!(&rr.data, RData::NULL(n) if n.anything.is_empty())
}

fn in_zone(origin: &LowerName, rr: &Record) -> bool {
    origin.zone_of(&LowerName::from(&rr.name))
}

fn name_in_use(zone: &Records, name: &LowerName) -> bool {
    zone.keys().any(|k| &k.name == name)
}

fn rrset_exists(zone: &Records, name: &LowerName, rtype: RecordType) -> bool {
    zone.get(&RrKey::new(name.clone(), rtype))
        .is_some_and(|s| !s.is_empty())
}

/// RFC 2136 §3.2.
fn check_prerequisites(
    origin: &LowerName,
    zone: &Records,
    prerequisites: &[Record],
) -> Result<(), ResponseCode> {
    // value-dependent prerequisites, gathered per RRset
    let mut wanted: BTreeMap<RrKey, Vec<&RData>> = BTreeMap::new();
    for rr in prerequisites {
        if rr.ttl != 0 {
            return Err(ResponseCode::FormErr);
        }
        if !in_zone(origin, rr) {
            return Err(ResponseCode::NotZone);
        }
        let name = LowerName::from(&rr.name);
        match rr.dns_class {
            DNSClass::ANY => {
                if !is_empty_rdata(rr) {
                    return Err(ResponseCode::FormErr);
                }
                match rr.record_type() {
                    RecordType::ANY if !name_in_use(zone, &name) => {
                        return Err(ResponseCode::NXDomain)
                    }
                    RecordType::ANY => {}
                    t if !rrset_exists(zone, &name, t) => return Err(ResponseCode::NXRRSet),
                    _ => {}
                }
            }
            DNSClass::NONE => {
                if !is_empty_rdata(rr) {
                    return Err(ResponseCode::FormErr);
                }
                match rr.record_type() {
                    RecordType::ANY if name_in_use(zone, &name) => {
                        return Err(ResponseCode::YXDomain)
                    }
                    RecordType::ANY => {}
                    t if rrset_exists(zone, &name, t) => return Err(ResponseCode::YXRRSet),
                    _ => {}
                }
            }
            DNSClass::IN => {
                wanted
                    .entry(RrKey::new(name, rr.record_type()))
                    .or_default()
                    .push(&rr.data);
            }
            _ => return Err(ResponseCode::FormErr),
        }
    }
    for (key, want) in wanted {
        let have: Vec<&RData> = zone
            .get(&key)
            .map(|s| s.records_without_rrsigs().map(|r| &r.data).collect())
            .unwrap_or_default();
        let same = want.iter().all(|w| have.contains(w)) && have.iter().all(|h| want.contains(h));
        if !same {
            return Err(ResponseCode::NXRRSet);
        }
    }
    Ok(())
}

fn is_meta(t: RecordType) -> bool {
    // 253 MAILB and 254 MAILA are query-only types
    matches!(u16::from(t), 253 | 254)
        || matches!(
            t,
            RecordType::AXFR
                | RecordType::IXFR
                | RecordType::OPT
                | RecordType::TSIG
                | RecordType::ANY
        )
}

/// RFC 2136 §3.4.1: reject the whole update before touching anything.
fn prescan(origin: &LowerName, updates: &[Record]) -> Result<(), ResponseCode> {
    for rr in updates {
        if !in_zone(origin, rr) {
            return Err(ResponseCode::NotZone);
        }
        let t = rr.record_type();
        match rr.dns_class {
            DNSClass::IN => {
                if is_meta(t) || is_empty_rdata(rr) {
                    return Err(ResponseCode::FormErr);
                }
            }
            DNSClass::ANY => {
                if rr.ttl != 0 || !is_empty_rdata(rr) || (is_meta(t) && t != RecordType::ANY) {
                    return Err(ResponseCode::FormErr);
                }
            }
            DNSClass::NONE => {
                if rr.ttl != 0 || is_meta(t) {
                    return Err(ResponseCode::FormErr);
                }
            }
            _ => return Err(ResponseCode::FormErr),
        }
    }
    Ok(())
}

/// A copy-on-write view: touched RRsets as plain record lists.
struct Overlay<'z> {
    zone: &'z Records,
    touched: BTreeMap<RrKey, Vec<Record>>,
}

impl<'z> Overlay<'z> {
    fn new(zone: &'z Records) -> Self {
        Self {
            zone,
            touched: BTreeMap::new(),
        }
    }

    fn get_mut(&mut self, key: &RrKey) -> &mut Vec<Record> {
        let zone = self.zone;
        self.touched.entry(key.clone()).or_insert_with(|| {
            zone.get(key)
                .map(|s| s.records_without_rrsigs().cloned().collect())
                .unwrap_or_default()
        })
    }

    fn types_at(&self, name: &LowerName) -> Vec<RecordType> {
        let mut types: Vec<RecordType> = self
            .zone
            .keys()
            .filter(|k| &k.name == name)
            .map(|k| k.record_type)
            .collect();
        for (k, _) in self.touched.iter().filter(|(k, _)| &k.name == name) {
            if !types.contains(&k.record_type) {
                types.push(k.record_type);
            }
        }
        types
            .into_iter()
            .filter(|t| {
                let key = RrKey::new(name.clone(), *t);
                match self.touched.get(&key) {
                    Some(v) => !v.is_empty(),
                    None => self.zone.get(&key).is_some_and(|s| !s.is_empty()),
                }
            })
            .collect()
    }

    fn soa_serial(&self, key: &RrKey) -> Option<u32> {
        match self.touched.get(key)?.first()?.data {
            RData::SOA(ref soa) => Some(soa.serial),
            _ => None,
        }
    }

    /// Touched RRsets whose contents (data and TTL) really changed.
    fn changed(&self) -> Vec<(RrKey, Option<RecordSet>)> {
        let mut out = Vec::new();
        for (key, records) in &self.touched {
            let before: Vec<(&RData, u32)> = self
                .zone
                .get(key)
                .map(|s| {
                    s.records_without_rrsigs()
                        .map(|r| (&r.data, r.ttl))
                        .collect()
                })
                .unwrap_or_default();
            let after: Vec<(&RData, u32)> = records.iter().map(|r| (&r.data, r.ttl)).collect();
            let same = before.len() == after.len() && after.iter().all(|a| before.contains(a));
            if same {
                continue;
            }
            if records.is_empty() {
                out.push((key.clone(), None));
            } else {
                let mut set =
                    RecordSet::with_ttl(records[0].name.clone(), key.record_type, records[0].ttl);
                set.set_records(records.clone());
                out.push((key.clone(), Some(set)));
            }
        }
        out
    }
}

/// RFC 2136 §3.4.2 for one RR. Returns true when it replaced the SOA.
fn apply(origin: &LowerName, work: &mut Overlay<'_>, rr: &Record) -> bool {
    let name = LowerName::from(&rr.name);
    let apex = &name == origin;
    let t = rr.record_type();
    match rr.dns_class {
        DNSClass::IN => {
            if t == RecordType::SOA {
                if !apex {
                    return false;
                }
                let RData::SOA(new) = &rr.data else {
                    return false;
                };
                let key = RrKey::new(name, RecordType::SOA);
                let set = work.get_mut(&key);
                let newer = match set.first().map(|r| &r.data) {
                    Some(RData::SOA(old)) => serial_gt(new.serial, old.serial),
                    _ => true,
                };
                if newer {
                    *set = vec![rr.clone()];
                }
                return newer;
            }
            let types = work.types_at(&name);
            if t == RecordType::CNAME && types.iter().any(|x| *x != RecordType::CNAME) {
                return false;
            }
            if t != RecordType::CNAME && types.contains(&RecordType::CNAME) {
                return false;
            }
            let set = work.get_mut(&RrKey::new(name, t));
            if t == RecordType::CNAME {
                set.clear();
            }
            if !set.iter().any(|r| r.data == rr.data) {
                set.push(rr.clone());
            }
            for r in set.iter_mut() {
                r.ttl = rr.ttl;
            }
        }
        DNSClass::ANY => {
            let types = if t == RecordType::ANY {
                work.types_at(&name)
            } else {
                vec![t]
            };
            for t in types {
                if apex && matches!(t, RecordType::SOA | RecordType::NS) {
                    continue;
                }
                work.get_mut(&RrKey::new(name.clone(), t)).clear();
            }
        }
        DNSClass::NONE => {
            if t == RecordType::SOA {
                return false;
            }
            let set = work.get_mut(&RrKey::new(name, t));
            if apex && t == RecordType::NS && set.len() <= 1 {
                return false;
            }
            set.retain(|r| r.data != rr.data);
        }
        _ => {}
    }
    false
}

/// RFC 1982 serial number comparison: is `a` newer than `b`?
pub fn serial_gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000_0000
}

#[cfg(test)]
mod tests;
