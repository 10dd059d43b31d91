//! The update journal: acknowledged updates survive a crash.
//!
//! An append-only file. Each entry is one whole accepted UPDATE (every RRset
//! it changed, SOA included), written with a single `write` and made durable
//! with `fdatasync` *before* the server answers NOERROR. The entry carries its
//! length and a BLAKE3 checksum, so an entry torn by a crash is recognised and
//! dropped on load: a multi-record update is on disk all or not at all, and
//! the one that was torn was never acknowledged.
//!
//! ```text
//! file   := MAGIC entry*
//! entry  := len:u32le  check:[u8;16] (BLAKE3 of payload)  payload
//! payload:= kind:u8 (0 delta, 1 snapshot)  serial:u32le  nsets:u32le  rrset*
//! rrset  := name_len:u16le name(wire)  type:u16le  nrec:u16le  (rec_len:u16le record(wire))*
//! ```
//!
//! When the journal grows past [`Journal::COMPACT_AFTER`] entries it is
//! replaced (write to a temporary file, fsync, rename, fsync the directory)
//! by one snapshot entry holding the whole zone.

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hickory_proto::rr::{LowerName, Name, Record, RecordSet, RecordType, RrKey};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};

use crate::zone::{ChangeSet, Records};

const MAGIC: &[u8; 8] = b"DYNJNL1\n";
const HEADER: usize = 4 + 16;
/// One entry may not exceed this (a whole-zone snapshot included).
const MAX_ENTRY: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot {what} journal {path}: {source} (check the directory exists and is writable by this user)")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path} is not a dyndns journal (bad header); move it aside to start from the zone file")]
    Magic { path: PathBuf },
    #[error(
        "journal {path} is corrupt at byte {offset} ({why}) with intact data after it; refusing to start rather than lose acknowledged updates (inspect it, or move it aside to start from the zone file)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("cannot encode an update for the journal: {0}")]
    Encode(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delta = 0,
    Snapshot = 1,
}

/// One decoded entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub snapshot: bool,
    pub change: ChangeSet,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    entries: usize,
    /// Length of the intact journal: a failed append is cut back to it.
    len: u64,
}

/// What [`Journal::open`] found.
pub struct Opened {
    pub journal: Journal,
    pub entries: Vec<Entry>,
    /// Bytes of a torn last entry that were dropped (never acknowledged).
    pub torn_bytes: u64,
}

impl Journal {
    pub const COMPACT_AFTER: usize = 1000;

    /// Opens (or creates) the journal and returns its intact entries.
    pub fn open(path: &Path) -> Result<Opened, JournalError> {
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { what, path, source }
        };
        if !path.exists() {
            let mut file = File::create(path).map_err(io("create"))?;
            file.write_all(MAGIC).map_err(io("write"))?;
            file.sync_all().map_err(io("sync"))?;
            sync_dir(path).map_err(io("sync the directory of"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(io("open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("read"))?;
        let (entries, good) = decode_file(path, &bytes)?;
        let torn_bytes = (bytes.len() - good) as u64;
        if torn_bytes > 0 {
            tracing::warn!(
                journal = %path.display(),
                torn_bytes,
                "dropping a torn last entry (an update that was never acknowledged)"
            );
            file.set_len(good as u64).map_err(io("truncate"))?;
            file.sync_all().map_err(io("sync"))?;
        }
        let count = entries.len();
        Ok(Opened {
            journal: Journal {
                path: path.to_path_buf(),
                file,
                entries: count,
                len: good as u64,
            },
            entries,
            torn_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Appends one accepted update and makes it durable. On failure (disk
    /// full, I/O error) the file is cut back to its last intact entry, so a
    /// half-written entry never sits in front of later ones.
    pub fn append(&mut self, change: &ChangeSet) -> Result<(), JournalError> {
        let bytes = encode_entry(Kind::Delta, change)?;
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            if let Err(e) = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
            {
                tracing::error!(journal = %self.path.display(), error = %e, "cannot cut back a failed journal append");
            }
            return Err(JournalError::Io {
                what: "append to",
                path: self.path.clone(),
                source,
            });
        }
        self.len += bytes.len() as u64;
        self.entries += 1;
        Ok(())
    }

    /// Replaces the journal by one snapshot of `zone`, atomically.
    pub fn compact(&mut self, serial: u32, zone: &Records) -> Result<(), JournalError> {
        let snapshot = ChangeSet {
            serial,
            rrsets: zone
                .iter()
                .map(|(k, v)| (k.clone(), Some(RecordSet::clone(v))))
                .collect(),
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend(encode_entry(Kind::Snapshot, &snapshot)?);
        let tmp = self.path.with_extension("jnl.tmp");
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { what, path, source }
        };
        let mut out = File::create(&tmp).map_err(io("create", &tmp))?;
        out.write_all(&bytes).map_err(io("write", &tmp))?;
        out.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))?;
        sync_dir(&self.path).map_err(io("sync the directory of", &self.path))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io("reopen", &self.path))?;
        self.entries = 1;
        self.len = bytes.len() as u64;
        Ok(())
    }
}

/// Applies journal entries to a zone loaded from its zone file.
pub fn replay(zone: &mut Records, entries: &[Entry]) {
    for entry in entries {
        if entry.snapshot {
            zone.clear();
        }
        apply(zone, &entry.change);
    }
}

/// Applies one change set to a record map.
pub fn apply(zone: &mut Records, change: &ChangeSet) {
    for (key, set) in &change.rrsets {
        match set {
            Some(set) => {
                zone.insert(key.clone(), Arc::new(set.clone()));
            }
            None => {
                zone.remove(key);
            }
        }
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn checksum(payload: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(payload).as_bytes()[..16]);
    out
}

fn encode_entry(kind: Kind, change: &ChangeSet) -> Result<Vec<u8>, JournalError> {
    let payload = encode_payload(kind, change)?;
    if payload.len() > MAX_ENTRY {
        return Err(JournalError::Encode(format!(
            "entry of {} bytes exceeds the {} byte limit",
            payload.len(),
            MAX_ENTRY
        )));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend((payload.len() as u32).to_le_bytes());
    out.extend(checksum(&payload));
    out.extend(payload);
    Ok(out)
}

fn encode_payload(kind: Kind, change: &ChangeSet) -> Result<Vec<u8>, JournalError> {
    let enc = |e: hickory_proto::ProtoError| JournalError::Encode(e.to_string());
    let len16 = |n: usize, what: &str| {
        u16::try_from(n).map_err(|_| JournalError::Encode(format!("{what} too large ({n})")))
    };
    let mut out = vec![kind as u8];
    out.extend(change.serial.to_le_bytes());
    out.extend((change.rrsets.len() as u32).to_le_bytes());
    for (key, set) in &change.rrsets {
        let name = Name::from(&key.name).to_bytes().map_err(enc)?;
        out.extend(len16(name.len(), "name")?.to_le_bytes());
        out.extend(name);
        out.extend(u16::from(key.record_type).to_le_bytes());
        let records: Vec<&Record> = set
            .as_ref()
            .map(|s| s.records_without_rrsigs().collect())
            .unwrap_or_default();
        out.extend(len16(records.len(), "RRset")?.to_le_bytes());
        for r in records {
            let bytes = r.to_bytes().map_err(enc)?;
            out.extend(len16(bytes.len(), "record")?.to_le_bytes());
            out.extend(bytes);
        }
    }
    Ok(out)
}

/// Decodes a whole journal file. Returns the entries and the length of the
/// intact prefix; a torn tail is tolerated, corruption before intact data is
/// an error.
fn decode_file(path: &Path, bytes: &[u8]) -> Result<(Vec<Entry>, usize), JournalError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(JournalError::Magic {
            path: path.to_path_buf(),
        });
    }
    let mut at = MAGIC.len();
    let mut entries = Vec::new();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn = |why: &str, entry_end: usize| -> Result<(), JournalError> {
            if entry_end >= bytes.len() {
                Ok(())
            } else {
                Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: at as u64,
                    why: why.to_string(),
                })
            }
        };
        if rest.len() < HEADER {
            torn("short header", bytes.len())?;
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let end = at.saturating_add(HEADER).saturating_add(len);
        if len > MAX_ENTRY || rest.len() < HEADER + len {
            torn("entry runs past the end of the file", end)?;
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        if checksum(payload) != rest[4..HEADER] {
            torn("checksum mismatch", end)?;
            break;
        }
        match decode_payload(payload) {
            Ok(entry) => entries.push(entry),
            Err(why) => {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: at as u64,
                    why,
                })
            }
        }
        at = end;
    }
    Ok((entries, at.min(bytes.len())))
}

/// Decodes one payload; any malformed input is an error, never a panic.
pub fn decode_payload(payload: &[u8]) -> Result<Entry, String> {
    let mut r = Reader {
        buf: payload,
        at: 0,
    };
    let kind = match r.u8()? {
        0 => Kind::Delta,
        1 => Kind::Snapshot,
        k => return Err(format!("unknown entry kind {k}")),
    };
    let serial = r.u32()?;
    let nsets = r.u32()? as usize;
    let mut rrsets = Vec::with_capacity(nsets.min(4096));
    for _ in 0..nsets {
        let name_len = r.u16()? as usize;
        let name = Name::from_bytes(r.take(name_len)?).map_err(|e| format!("bad name: {e}"))?;
        let rtype = RecordType::from(r.u16()?);
        let nrec = r.u16()? as usize;
        let mut records = Vec::with_capacity(nrec);
        for _ in 0..nrec {
            let len = r.u16()? as usize;
            let record =
                Record::from_bytes(r.take(len)?).map_err(|e| format!("bad record: {e}"))?;
            if LowerName::from(&record.name) != LowerName::from(&name)
                || record.record_type() != rtype
            {
                return Err(format!(
                    "record {} {} filed under {name} {rtype}",
                    record.name,
                    record.record_type()
                ));
            }
            records.push(record);
        }
        let key = RrKey::new(LowerName::from(&name), rtype);
        let set = if records.is_empty() {
            None
        } else {
            let mut set = RecordSet::with_ttl(name, rtype, records[0].ttl);
            set.set_records(records);
            Some(set)
        };
        rrsets.push((key, set));
    }
    if r.at != payload.len() {
        return Err(format!("{} trailing bytes", payload.len() - r.at));
    }
    Ok(Entry {
        snapshot: kind == Kind::Snapshot,
        change: ChangeSet { serial, rrsets },
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests;
