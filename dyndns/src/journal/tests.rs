use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::rr::rdata::A;
use hickory_proto::rr::RData;
use proptest::prelude::*;

use super::*;

fn change(serial: u32, name: &str, ips: &[[u8; 4]]) -> ChangeSet {
    let n = Name::from_str(name).expect("name");
    let key = RrKey::new(LowerName::from(&n), RecordType::A);
    let set = if ips.is_empty() {
        None
    } else {
        let mut s = RecordSet::with_ttl(n.clone(), RecordType::A, 60);
        s.set_records(
            ips.iter()
                .map(|ip| Record::from_rdata(n.clone(), 60, RData::A(A(Ipv4Addr::from(*ip)))))
                .collect(),
        );
        Some(s)
    };
    ChangeSet {
        serial,
        rrsets: vec![(key, set)],
    }
}

#[test]
fn entries_round_trip_through_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.jnl");
    let c1 = change(2, "a.example.test.", &[[10, 0, 0, 1], [10, 0, 0, 2]]);
    let c2 = change(3, "a.example.test.", &[]);
    {
        let mut j = Journal::open(&path).expect("open").journal;
        j.append(&c1).expect("append");
        j.append(&c2).expect("append");
    }
    let opened = Journal::open(&path).expect("reopen");
    assert_eq!(opened.torn_bytes, 0);
    let got: Vec<ChangeSet> = opened.entries.into_iter().map(|e| e.change).collect();
    assert_eq!(got, vec![c1, c2]);
}

#[test]
fn a_torn_last_entry_is_dropped_whole_and_the_file_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.jnl");
    let c1 = change(2, "a.example.test.", &[[10, 0, 0, 1]]);
    let c2 = change(3, "b.example.test.", &[[10, 0, 0, 2], [10, 0, 0, 3]]);
    {
        let mut j = Journal::open(&path).expect("open").journal;
        j.append(&c1).expect("append");
        j.append(&c2).expect("append");
    }
    let full = std::fs::read(&path).expect("read");
    let one = MAGIC.len() + HEADER + encode_payload(Kind::Delta, &c1).expect("encode").len();
    // cut the second entry at every possible point: never half of it
    for cut in one..full.len() {
        std::fs::write(&path, &full[..cut]).expect("write");
        let opened = Journal::open(&path).expect("open torn");
        assert_eq!(opened.entries.len(), 1, "cut at {cut}");
        assert_eq!(opened.entries[0].change, c1);
        assert_eq!(opened.torn_bytes as usize, cut - one);
        assert_eq!(std::fs::metadata(&path).expect("meta").len() as usize, one);
    }
}

#[test]
fn corruption_followed_by_intact_data_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.jnl");
    {
        let mut j = Journal::open(&path).expect("open").journal;
        j.append(&change(2, "a.example.test.", &[[10, 0, 0, 1]]))
            .expect("append");
        j.append(&change(3, "a.example.test.", &[[10, 0, 0, 2]]))
            .expect("append");
    }
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[MAGIC.len() + HEADER + 2] ^= 0xff; // inside the first payload
    std::fs::write(&path, &bytes).expect("write");
    let err = Journal::open(&path).err().expect("must refuse");
    assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("refusing to start"), "{err}");

    std::fs::write(&path, b"not a journal").expect("write");
    assert!(matches!(
        Journal::open(&path),
        Err(JournalError::Magic { .. })
    ));
}

#[test]
fn compaction_keeps_the_zone_and_replay_restores_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("z.jnl");
    let mut zone = Records::new();
    let mut j = Journal::open(&path).expect("open").journal;
    for i in 0..20u8 {
        let c = change(
            u32::from(i) + 2,
            &format!("h{}.example.test.", i % 5),
            &[[10, 0, 0, i]],
        );
        j.append(&c).expect("append");
        apply(&mut zone, &c);
    }
    j.compact(21, &zone).expect("compact");
    assert_eq!(j.entries(), 1);
    let c = change(22, "h0.example.test.", &[]);
    j.append(&c).expect("append");
    apply(&mut zone, &c);
    drop(j);

    let opened = Journal::open(&path).expect("reopen");
    assert!(opened.entries[0].snapshot);
    let mut replayed = Records::new();
    // stale data that the snapshot must clear
    apply(
        &mut replayed,
        &change(1, "stale.example.test.", &[[1, 1, 1, 1]]),
    );
    replay(&mut replayed, &opened.entries);
    assert_eq!(replayed, zone);
}

proptest! {
    /// The decoder takes any bytes: an error or an entry, never a panic.
    #[test]
    fn decode_payload_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_payload(&bytes);
    }

    /// Flipping any byte of a valid file is detected (checksum) or torn, never misread.
    #[test]
    fn a_flipped_byte_is_never_silently_accepted(pos in 0usize..200, bit in 0u8..8) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.jnl");
        let c = change(2, "a.example.test.", &[[10, 0, 0, 1], [10, 0, 0, 2]]);
        Journal::open(&path).expect("open").journal.append(&c).expect("append");
        let mut bytes = std::fs::read(&path).expect("read");
        let pos = pos % bytes.len();
        bytes[pos] ^= 1 << bit;
        std::fs::write(&path, &bytes).expect("write");
        // an error (corrupt, bad header) is fine; a different update is not
        if let Ok(o) = Journal::open(&path) {
            prop_assert!(o.entries.is_empty() || o.entries[0].change == c);
        }
    }
}
