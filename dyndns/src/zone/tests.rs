use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::rr::rdata::{A, CNAME, NS};
use hickory_proto::rr::Name;
use hickory_proto::serialize::txt::Parser;
use proptest::prelude::*;

use super::*;
use crate::journal;

const ZONE: &str = "$ORIGIN example.test.
$TTL 300
@   IN SOA ns1 hostmaster ( 7 3600 600 86400 60 )
    IN NS  ns1
ns1 IN A   127.0.0.1
web IN A   10.1.0.10
    IN A   10.1.0.11
alias IN CNAME web
";

fn origin() -> LowerName {
    LowerName::from(Name::from_str("example.test.").expect("name"))
}

fn zone() -> Records {
    let (_, recs) = Parser::new(
        ZONE,
        None,
        Some(Name::from_str("example.test.").expect("name")),
    )
    .parse()
    .expect("zone parses");
    recs.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

fn n(s: &str) -> Name {
    Name::from_str(s).expect("name")
}

fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(n(name), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn with_class(mut r: Record, c: DNSClass) -> Record {
    r.dns_class = c;
    r
}

fn meta(name: &str, t: RecordType, c: DNSClass) -> Record {
    with_class(Record::update0(n(name), 0, t).into_record_of_rdata(), c)
}

fn ips(zone: &Records, name: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = zone
        .get(&RrKey::new(LowerName::from(n(name)), RecordType::A))
        .map(|s| {
            s.records_without_rrsigs()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn run(zone: &mut Records, pre: &[Record], upd: &[Record]) -> Result<Option<u32>, ResponseCode> {
    let plan = plan(&origin(), zone, pre, upd)?;
    Ok(plan.map(|c| {
        journal::apply(zone, &c);
        c.serial
    }))
}

fn serial(zone: &Records) -> u32 {
    soa_of(zone, &origin()).expect("soa").1.serial
}

#[test]
fn add_replaces_rrset_and_bumps_serial_once() {
    let mut z = zone();
    let upd = [
        meta("web.example.test.", RecordType::A, DNSClass::ANY),
        a("web.example.test.", 5, [10, 2, 0, 10]),
    ];
    assert_eq!(run(&mut z, &[], &upd), Ok(Some(8)));
    assert_eq!(
        ips(&z, "web.example.test."),
        vec![Ipv4Addr::new(10, 2, 0, 10)]
    );
    assert_eq!(serial(&z), 8);
}

#[test]
fn a_no_op_update_keeps_the_serial() {
    let mut z = zone();
    // re-adding existing data with the same TTL changes nothing
    let upd = [a("web.example.test.", 300, [10, 1, 0, 10])];
    assert_eq!(run(&mut z, &[], &upd), Ok(None));
    // deleting something absent changes nothing
    let upd = [meta("nothere.example.test.", RecordType::A, DNSClass::ANY)];
    assert_eq!(run(&mut z, &[], &upd), Ok(None));
    assert_eq!(serial(&z), 7);
}

#[test]
fn value_dependent_prerequisite_makes_compare_and_swap() {
    let mut z = zone();
    let old = [
        a("web.example.test.", 0, [10, 1, 0, 10]),
        a("web.example.test.", 0, [10, 1, 0, 11]),
    ];
    let swap_to = |ip| {
        vec![
            meta("web.example.test.", RecordType::A, DNSClass::ANY),
            a("web.example.test.", 5, ip),
        ]
    };
    assert_eq!(run(&mut z, &old, &swap_to([10, 2, 0, 1])), Ok(Some(8)));
    // a second switch that expected the same old value loses, and changes nothing
    assert_eq!(
        run(&mut z, &old, &swap_to([10, 3, 0, 1])),
        Err(ResponseCode::NXRRSet)
    );
    assert_eq!(
        ips(&z, "web.example.test."),
        vec![Ipv4Addr::new(10, 2, 0, 1)]
    );
    // a subset is not the set
    let subset = [
        a("web.example.test.", 0, [10, 2, 0, 1]),
        a("web.example.test.", 0, [10, 9, 9, 9]),
    ];
    assert_eq!(run(&mut z, &subset, &[]), Err(ResponseCode::NXRRSet));
}

#[test]
fn prerequisite_metavalues() {
    let mut z = zone();
    let cases = [
        (
            meta("web.example.test.", RecordType::ANY, DNSClass::ANY),
            Ok(None),
        ),
        (
            meta("nx.example.test.", RecordType::ANY, DNSClass::ANY),
            Err(ResponseCode::NXDomain),
        ),
        (
            meta("web.example.test.", RecordType::AAAA, DNSClass::ANY),
            Err(ResponseCode::NXRRSet),
        ),
        (
            meta("web.example.test.", RecordType::ANY, DNSClass::NONE),
            Err(ResponseCode::YXDomain),
        ),
        (
            meta("web.example.test.", RecordType::A, DNSClass::NONE),
            Err(ResponseCode::YXRRSet),
        ),
        (
            meta("nx.example.test.", RecordType::ANY, DNSClass::NONE),
            Ok(None),
        ),
        (
            meta("web.other.test.", RecordType::A, DNSClass::ANY),
            Err(ResponseCode::NotZone),
        ),
    ];
    for (pre, want) in cases {
        assert_eq!(
            run(&mut z, std::slice::from_ref(&pre), &[]),
            want,
            "{pre:?}"
        );
    }
    // prerequisites need TTL 0
    let bad = with_class(
        Record::update0(n("web.example.test."), 5, RecordType::A).into_record_of_rdata(),
        DNSClass::ANY,
    );
    assert_eq!(run(&mut z, &[bad], &[]), Err(ResponseCode::FormErr));
}

#[test]
fn prescan_rejects_the_whole_update_before_any_change() {
    let mut z = zone();
    let upd = [
        a("new.example.test.", 60, [10, 0, 0, 1]),
        a("new.other.test.", 60, [10, 0, 0, 2]),
    ];
    assert_eq!(run(&mut z, &[], &upd), Err(ResponseCode::NotZone));
    assert!(ips(&z, "new.example.test.").is_empty());
    let upd = [
        a("new.example.test.", 60, [10, 0, 0, 1]),
        with_class(a("new.example.test.", 60, [10, 0, 0, 3]), DNSClass::CH),
    ];
    assert_eq!(run(&mut z, &[], &upd), Err(ResponseCode::FormErr));
    assert!(ips(&z, "new.example.test.").is_empty());
    assert_eq!(serial(&z), 7);
}

#[test]
fn apex_soa_and_ns_are_never_deleted() {
    let mut z = zone();
    let upd = [
        meta("example.test.", RecordType::ANY, DNSClass::ANY),
        meta("example.test.", RecordType::SOA, DNSClass::ANY),
        meta("example.test.", RecordType::NS, DNSClass::ANY),
        with_class(
            Record::from_rdata(n("example.test."), 0, RData::NS(NS(n("ns1.example.test.")))),
            DNSClass::NONE,
        ),
    ];
    assert_eq!(run(&mut z, &[], &upd), Ok(None));
    assert!(soa_of(&z, &origin()).is_some());
    assert!(z.contains_key(&RrKey::new(origin(), RecordType::NS)));
}

#[test]
fn cname_and_other_data_never_coexist() {
    let mut z = zone();
    // A at a CNAME is ignored; CNAME at a name with an A is ignored
    let upd = [
        a("alias.example.test.", 60, [10, 0, 0, 1]),
        Record::from_rdata(
            n("web.example.test."),
            60,
            RData::CNAME(CNAME(n("ns1.example.test."))),
        ),
    ];
    assert_eq!(run(&mut z, &[], &upd), Ok(None));
}

#[test]
fn added_record_sets_the_rrset_ttl_and_explicit_soa_needs_a_newer_serial() {
    let mut z = zone();
    assert!(
        run(&mut z, &[], &[a("web.example.test.", 5, [10, 1, 0, 12])])
            .expect("ok")
            .is_some()
    );
    let set = z
        .get(&RrKey::new(
            LowerName::from(n("web.example.test.")),
            RecordType::A,
        ))
        .expect("set");
    assert!(set.records_without_rrsigs().all(|r| r.ttl == 5));
    assert_eq!(set.records_without_rrsigs().count(), 3);

    let (rec, soa) = soa_of(&z, &origin()).expect("soa");
    let (rec, soa) = (rec.clone(), soa.clone());
    let mut older = soa.clone();
    older.serial = 2;
    let r = Record::from_rdata(rec.name.clone(), rec.ttl, RData::SOA(older));
    assert_eq!(run(&mut z, &[], &[r]), Ok(None));
    let mut newer = soa.clone();
    newer.serial = 100;
    let r = Record::from_rdata(rec.name.clone(), rec.ttl, RData::SOA(newer));
    assert_eq!(run(&mut z, &[], &[r]), Ok(Some(100)));
    assert_eq!(serial(&z), 100);
}

#[test]
fn serial_arithmetic_wraps() {
    assert!(serial_gt(1, 0));
    assert!(serial_gt(0, u32::MAX));
    assert!(!serial_gt(5, 5));
    assert!(!serial_gt(0x8000_0000, 0));
}

fn any_record() -> impl Strategy<Value = Record> {
    let names = prop::sample::select(vec![
        "example.test.",
        "web.example.test.",
        "alias.example.test.",
        "new.example.test.",
        "x.other.test.",
    ]);
    let classes = prop::sample::select(vec![
        DNSClass::IN,
        DNSClass::ANY,
        DNSClass::NONE,
        DNSClass::CH,
    ]);
    let kinds = 0u8..6;
    (names, classes, kinds, any::<[u8; 4]>(), 0u32..3).prop_map(|(name, class, kind, ip, ttl)| {
        let r = match kind {
            0 => Record::update0(n(name), ttl, RecordType::ANY).into_record_of_rdata(),
            1 => Record::update0(n(name), ttl, RecordType::A).into_record_of_rdata(),
            2 => Record::update0(n(name), ttl, RecordType::NS).into_record_of_rdata(),
            3 => Record::from_rdata(n(name), ttl, RData::CNAME(CNAME(n("web.example.test.")))),
            4 => Record::update0(n(name), ttl, RecordType::SOA).into_record_of_rdata(),
            _ => a(name, ttl, ip),
        };
        with_class(r, class)
    })
}

proptest! {
    /// Whatever the update, the planner never panics, the zone keeps its
    /// SOA and NS, a name never holds CNAME and other data, a refused update
    /// changes nothing, and an accepted change raises the serial.
    #[test]
    fn any_update_keeps_the_zone_valid(
        pre in prop::collection::vec(any_record(), 0..3),
        upd in prop::collection::vec(any_record(), 0..8),
    ) {
        let mut z = zone();
        let before = z.clone();
        match run(&mut z, &pre, &upd) {
            Err(_) | Ok(None) => prop_assert_eq!(&z, &before),
            Ok(Some(s)) => prop_assert!(serial_gt(s, 7)),
        }
        prop_assert!(soa_of(&z, &origin()).is_some());
        prop_assert!(z.get(&RrKey::new(origin(), RecordType::NS)).is_some_and(|s| !s.is_empty()));
        for (k, set) in &z {
            prop_assert!(!set.is_empty(), "empty RRset left at {:?}", k);
            if k.record_type == RecordType::CNAME {
                prop_assert!(!z.keys().any(|o| o.name == k.name && o.record_type != RecordType::CNAME));
            }
        }
    }
}

proptest! {
    /// The whole parse-and-plan path on mutated UPDATE messages: hickory's
    /// decoder and our planner return errors, never panic.
    #[test]
    fn mutated_update_messages_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in 0usize..8,
    ) {
        use hickory_proto::op::UpdateMessage as _;
        let mut msg = crate::client::Client::update_message(&n("example.test."));
        msg.add_pre_requisite(a("web.example.test.", 0, [10, 1, 0, 10]));
        msg.add_update(meta("web.example.test.", RecordType::A, DNSClass::ANY));
        msg.add_update(a("web.example.test.", 60, [10, 2, 0, 1]));
        let mut bytes = msg.to_vec().expect("encode");
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.truncate(bytes.len().saturating_sub(cut));
        let src = std::net::SocketAddr::from(([127, 0, 0, 1], 53));
        if let Ok(req) = hickory_server::server::Request::from_bytes(bytes, src, hickory_server::net::xfer::Protocol::Udp) {
            use hickory_server::zone_handler::UpdateRequest as _;
            let z = zone();
            let _ = plan(&origin(), &z, req.prerequisites(), req.updates());
        }
    }
}
