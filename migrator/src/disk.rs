//! A served disk: the image plus its role in a migration.
//!
//! ```text
//!  source:       Serving ──start_tracking──▶ Tracking ──freeze/commit──▶ Moved (writes refused)
//!                   ▲                           │
//!                   └────── stop_tracking ◀─────┘ (rollback: nothing was lost)
//!  destination:  Receiving{pending} ──all pending blocks landed──▶ Serving
//!  (VM)          Incoming ──open_receiving (commit)──▶ Receiving{pending} ...
//! ```
//!
//! At the destination, each block that stops being pending (it landed, or a
//! guest write replaced it whole) is appended to a journal, made durable
//! before anything that depends on it is acknowledged: a landed block before
//! it becomes writable, a replaced one with the write's FUA or the next FLUSH.
//! After a restart the pending set is the commit's set minus the journal, so
//! a late block never overwrites a guest write the guest was told is durable.
//!
//! `Incoming` exists so a destination QEMU can open its disk before the commit
//! point: reads see the copy as it stands (QEMU reads sector 0 when it creates
//! the device, to guess a geometry; the guest cannot run before the commit),
//! writes wait until the disk is opened at commit.
//!
//! Writes hold a shared permit on `gate` while they run; `freeze` takes it
//! exclusively, so it waits for writes in flight and holds new ones (they are
//! delayed, not failed). At the destination, a read of a block still in flight
//! waits for it (and asks the source for it first), a write covering a whole pending
//! block replaces it, a partial write waits for it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{mpsc, Notify, OwnedRwLockWriteGuard, RwLock};

use crate::image::{Extent, Image, ImageError};
use crate::precopy::{Delta, Engine, Mode};

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("request [{offset}, +{len}) is beyond the end of the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("disk has moved to {to}; this copy is read-only")]
    Moved { to: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("I/O worker failed: {0}")]
    Worker(String),
}

enum Role {
    Serving,
    Tracking(Arc<Mutex<Engine>>),
    Moved {
        to: String,
    },
    Receiving(Receiving),
    /// Before the commit point at the destination: writes wait.
    Incoming,
}

struct Receiving {
    block_size: u64,
    /// Blocks whose newest content has not arrived yet.
    pending: HashSet<u64>,
    /// Blocks being written by the receiver right now.
    landing: HashSet<u64>,
    /// Blocks already asked for on demand.
    requested: HashSet<u64>,
    fetch: mpsc::UnboundedSender<u64>,
}

/// Blocks no longer pending, `u64` little-endian each, append-only.
pub struct Journal {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl Journal {
    /// Creates (empties) the journal at `path`.
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Opens `path` to append to it, with the blocks it already holds (a
    /// torn last entry is ignored: it was never made durable).
    pub fn open(path: &std::path::Path) -> std::io::Result<(Self, HashSet<u64>)> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let done = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
            .collect();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let keep = (bytes.len() - bytes.len() % 8) as u64;
        file.set_len(keep)?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
            },
            done,
        ))
    }

    fn append(&mut self, blocks: &[u64]) -> Result<(), ImageError> {
        use std::io::Write;
        let mut b = Vec::with_capacity(blocks.len() * 8);
        for x in blocks {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.file.write_all(&b).map_err(|e| self.err(e))
    }

    fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(|e| self.err(e))
    }

    fn err(&self, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

pub struct Disk {
    image: Arc<Image>,
    name: String,
    gate: Arc<RwLock<()>>,
    frozen: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    role: Mutex<Role>,
    arrived: Notify,
    /// Deltas mode: held across write + enqueue so deltas queue in the order
    /// their writes reached the image.
    order: tokio::sync::Mutex<()>,
    /// Destination: the journal of blocks no longer pending.
    journal: Arc<Mutex<Option<Journal>>>,
}

/// What a write must do about blocks still in flight at the destination.
enum PendingCheck {
    Go,
    Wait,
}

impl Disk {
    pub fn new(image: Image, name: impl Into<String>) -> Self {
        Self {
            image: Arc::new(image),
            name: name.into(),
            gate: Arc::new(RwLock::new(())),
            frozen: Mutex::new(None),
            role: Mutex::new(Role::Serving),
            arrived: Notify::new(),
            order: tokio::sync::Mutex::new(()),
            journal: Arc::default(),
        }
    }

    /// A destination disk whose `pending` blocks are still to arrive; reads of them
    /// send the block number on `fetch`.
    pub fn receiving(
        image: Image,
        name: impl Into<String>,
        block_size: u32,
        pending: HashSet<u64>,
        fetch: mpsc::UnboundedSender<u64>,
    ) -> Self {
        let d = Self::new(image, name);
        d.open_receiving(block_size, pending, fetch, None);
        d
    }

    /// A destination disk before its commit point: clients may connect and
    /// read, but writes wait for [`Disk::open_receiving`].
    pub fn incoming(image: Image, name: impl Into<String>) -> Self {
        let d = Self::new(image, name);
        *d.lock_role() = Role::Incoming;
        d
    }

    /// The commit point at the destination: requests held since
    /// [`Disk::incoming`] proceed, with `pending` blocks still to arrive
    /// (recorded in `journal` as they stop being pending).
    pub fn open_receiving(
        &self,
        block_size: u32,
        pending: HashSet<u64>,
        fetch: mpsc::UnboundedSender<u64>,
        journal: Option<Journal>,
    ) {
        *self.journal.lock().unwrap_or_else(|p| p.into_inner()) = journal;
        *self.lock_role() = Role::Receiving(Receiving {
            block_size: block_size as u64,
            pending,
            landing: HashSet::new(),
            requested: HashSet::new(),
            fetch,
        });
        self.arrived.notify_waiters();
    }

    /// Waits while the disk is [`Role::Incoming`].
    async fn wait_open(&self) {
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !matches!(*self.lock_role(), Role::Incoming) {
                return;
            }
            notified.await;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    fn lock_role(&self) -> MutexGuard<'_, Role> {
        // A poisoned lock means a panic elsewhere already; the data is a plain enum.
        self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_read_only(&self) -> bool {
        matches!(*self.lock_role(), Role::Moved { .. })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DiskError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Image) -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, DiskError> {
        let img = self.image.clone();
        tokio::task::spawn_blocking(move || f(&img))
            .await
            .map_err(|e| DiskError::Worker(e.to_string()))?
            .map_err(DiskError::from)
    }

    fn blocks_of(bs: u64, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / bs..(offset + len - 1) / bs + 1
    }

    /// Waits until no block of the range is pending or landing (destination only).
    async fn wait_arrived(&self, offset: u64, len: u64) {
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut role = self.lock_role();
                let Role::Receiving(r) = &mut *role else {
                    return;
                };
                let mut waiting = false;
                for b in Self::blocks_of(r.block_size, offset, len) {
                    if r.pending.contains(&b) {
                        waiting = true;
                        if r.requested.insert(b) {
                            let _ = r.fetch.send(b);
                        }
                    } else if r.landing.contains(&b) {
                        waiting = true;
                    }
                }
                if !waiting {
                    return;
                }
            }
            notified.await;
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DiskError> {
        self.check_range(offset, len as u64)?;
        self.wait_arrived(offset, len as u64).await;
        self.blocking(move |img| {
            let mut buf = vec![0u8; len as usize];
            img.read_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// Before a write at the destination: whole pending blocks are superseded
    /// (journaled), a partially covered pending or landing block must arrive first.
    fn check_pending_for_write(&self, offset: u64, len: u64) -> Result<PendingCheck, DiskError> {
        let mut role = self.lock_role();
        let Role::Receiving(r) = &mut *role else {
            return Ok(PendingCheck::Go);
        };
        let bs = r.block_size;
        let mut superseded = Vec::new();
        for b in Self::blocks_of(bs, offset, len) {
            let whole = offset <= b * bs && offset + len >= (b + 1) * bs;
            if r.landing.contains(&b) || (r.pending.contains(&b) && !whole) {
                if r.pending.contains(&b) && r.requested.insert(b) {
                    let _ = r.fetch.send(b);
                }
                return Ok(PendingCheck::Wait);
            }
            if r.pending.contains(&b) {
                superseded.push(b);
            }
        }
        if !superseded.is_empty() {
            // journaled before the write: durable with its FUA or the next FLUSH
            if let Some(j) = self
                .journal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                j.append(&superseded)?;
            }
        }
        for b in superseded {
            r.pending.remove(&b);
        }
        Ok(PendingCheck::Go)
    }

    /// Makes the journal durable (after the image, so an entry never
    /// outlives the data it stands for).
    fn sync_journal(journal: &Mutex<Option<Journal>>) -> Result<(), ImageError> {
        if let Some(j) = journal.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            j.sync()?;
        }
        Ok(())
    }

    /// The receiver has written blocks `b` (not yet visible to writes):
    /// make the image and the journal entry durable. Blocking: call it off
    /// the async threads, before [`Disk::end_landing`].
    pub fn record_landed(&self, blocks: &[u64]) -> Result<(), DiskError> {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = j.as_mut() else { return Ok(()) };
        self.image.sync()?;
        j.append(blocks)?;
        j.sync()?;
        Ok(())
    }

    fn tracking_engine(&self) -> Option<Arc<Mutex<Engine>>> {
        match &*self.lock_role() {
            Role::Tracking(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Common path of every modifying command: permit, role checks, the I/O, dirty
    /// marking (or the delta), then the throttle delay (after releasing the permit).
    async fn modify(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        change: Delta,
        punch: bool,
    ) -> Result<(), DiskError> {
        self.check_range(offset, len)?;
        self.wait_open().await;
        let permit = self.gate.read().await;
        if let Role::Moved { to } = &*self.lock_role() {
            return Err(DiskError::Moved { to: to.clone() });
        }
        while let PendingCheck::Wait = self.check_pending_for_write(offset, len)? {
            self.wait_arrived(offset, len).await;
        }
        let engine = self.tracking_engine();
        let deltas = engine.as_ref().is_some_and(|e| {
            e.lock().unwrap_or_else(|p| p.into_inner()).config().mode == Mode::Deltas
        });
        let _order = if deltas {
            Some(self.order.lock().await)
        } else {
            None
        };
        let op = change.clone();
        let journal = self.journal.clone();
        self.blocking(move |img| {
            match &op {
                Delta::Data { offset, data } => img.write_at(data, *offset)?,
                Delta::Zero { offset, len } => img.zero(*offset, *len, punch)?,
            }
            if fua {
                img.sync()?;
                Self::sync_journal(&journal)?;
            }
            Ok(())
        })
        .await?;
        let delay = match engine {
            Some(e) => {
                let mut e = e.lock().unwrap_or_else(|p| p.into_inner());
                if deltas {
                    e.handle_delta(change, Instant::now())
                } else {
                    e.handle_write(offset, len, Instant::now())
                }
            }
            None => Duration::ZERO,
        };
        drop(_order);
        drop(permit);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DiskError> {
        let len = data.len() as u64;
        self.modify(
            offset,
            len,
            fua,
            Delta::Data {
                offset,
                data: Arc::new(data),
            },
            false,
        )
        .await
    }

    /// WRITE_ZEROES (`punch` unless NO_HOLE) and TRIM: the range reads as zeros after.
    pub async fn zero(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.modify(offset, len, fua, Delta::Zero { offset, len }, punch)
            .await
    }

    pub async fn flush(&self) -> Result<(), DiskError> {
        let journal = self.journal.clone();
        self.blocking(move |img| {
            img.sync()?;
            Self::sync_journal(&journal)
        })
        .await
    }

    /// Allocation map of a range. Blocks still in flight at the destination are
    /// reported as data: their holes on disk are not their content.
    pub async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.check_range(offset, len)?;
        let in_flight = match &*self.lock_role() {
            Role::Receiving(r) => Self::blocks_of(r.block_size, offset, len)
                .any(|b| r.pending.contains(&b) || r.landing.contains(&b)),
            _ => false,
        };
        if in_flight {
            return Ok(vec![Extent {
                offset,
                len,
                hole: false,
            }]);
        }
        self.blocking(move |img| img.extents(offset, len)).await
    }

    // ---- source side of a migration ----

    /// Start tracking writes into the engine `make` builds from the image (it
    /// scans extents). Runs with the write gate held exclusively, so every write
    /// either finished before the scan (the bulk pass sees its data) or runs
    /// entirely under tracking (it is marked or forwarded). Fails if the disk has
    /// moved or is already being migrated.
    pub async fn start_tracking<F>(&self, make: F) -> Result<Arc<Mutex<Engine>>, String>
    where
        F: FnOnce(&Image) -> Result<Engine, String> + Send + 'static,
    {
        let _quiesce = self.gate.write().await;
        match &*self.lock_role() {
            Role::Serving => {}
            Role::Tracking(_) => {
                return Err(format!("disk {} is already being migrated", self.name))
            }
            Role::Moved { to } => {
                return Err(format!("disk {} has already moved to {to}", self.name))
            }
            Role::Receiving(_) | Role::Incoming => {
                return Err(format!("disk {} is still receiving blocks", self.name))
            }
        }
        let img = self.image.clone();
        let engine = tokio::task::spawn_blocking(move || make(&img))
            .await
            .map_err(|e| e.to_string())??;
        let engine = Arc::new(Mutex::new(engine));
        *self.lock_role() = Role::Tracking(engine.clone());
        Ok(engine)
    }

    /// The pre-copy engine while the disk is being migrated.
    pub fn engine(&self) -> Option<Arc<Mutex<Engine>>> {
        match &*self.lock_role() {
            Role::Tracking(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Rollback: stop tracking and release held writes. The image was never
    /// modified by the migration, so nothing else needs undoing.
    pub fn stop_tracking(&self) {
        let mut role = self.lock_role();
        if let Role::Tracking(_) = &*role {
            *role = Role::Serving;
        }
        drop(role);
        self.unfreeze();
    }

    /// Hold new writes and wait for the ones in flight to finish.
    pub async fn freeze(&self) {
        let guard = self.gate.clone().write_owned().await;
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }

    pub fn unfreeze(&self) {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The commit point at the source: from now on it refuses writes; held writes
    /// are released and fail.
    pub fn commit_moved(&self, to: String) {
        *self.lock_role() = Role::Moved { to };
        self.unfreeze();
    }

    // ---- destination side ----

    /// Claim block `b` for writing by the receiver. False when it is no longer
    /// pending (a guest write superseded it, or it already landed).
    pub fn begin_landing(&self, b: u64) -> bool {
        let mut role = self.lock_role();
        let Role::Receiving(r) = &mut *role else {
            return false;
        };
        if r.pending.remove(&b) {
            r.landing.insert(b);
            true
        } else {
            false
        }
    }

    /// Landing `b` failed: it is pending again.
    pub fn abort_landing(&self, b: u64) {
        if let Role::Receiving(r) = &mut *self.lock_role() {
            r.landing.remove(&b);
            r.pending.insert(b);
        }
        self.arrived.notify_waiters();
    }

    pub fn end_landing(&self, b: u64) {
        if let Role::Receiving(r) = &mut *self.lock_role() {
            r.landing.remove(&b);
        }
        self.arrived.notify_waiters();
    }

    /// The blocks still to arrive, sorted (destination): what a resumed
    /// link must bring.
    pub fn pending_list(&self) -> Vec<u64> {
        match &*self.lock_role() {
            Role::Receiving(r) => {
                let mut v: Vec<u64> = r.pending.iter().chain(&r.landing).copied().collect();
                v.sort_unstable();
                v
            }
            _ => Vec::new(),
        }
    }

    /// A new link carries the final blocks: fetch requests go to `fetch`
    /// from now on. Returns the blocks already asked for that have not
    /// arrived, to ask for again on the new link.
    pub fn reattach_fetch(&self, fetch: mpsc::UnboundedSender<u64>) -> Vec<u64> {
        match &mut *self.lock_role() {
            Role::Receiving(r) => {
                r.fetch = fetch;
                let mut v: Vec<u64> = r
                    .requested
                    .iter()
                    .filter(|b| r.pending.contains(b))
                    .copied()
                    .collect();
                v.sort_unstable();
                v
            }
            _ => Vec::new(),
        }
    }

    /// Blocks still pending (destination).
    pub fn pending_blocks(&self) -> usize {
        match &*self.lock_role() {
            Role::Receiving(r) => r.pending.len() + r.landing.len(),
            _ => 0,
        }
    }

    /// All blocks have landed: serve plainly.
    pub fn finish_receiving(&self) {
        let mut role = self.lock_role();
        if let Role::Receiving(r) = &*role {
            if r.pending.is_empty() && r.landing.is_empty() {
                *role = Role::Serving;
                self.journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
            }
        }
        drop(role);
        self.arrived.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 65536;

    fn receiving(pending: &[u64]) -> (tempfile::TempDir, Arc<Disk>, mpsc::UnboundedReceiver<u64>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::create(&dir.path().join("d.img"), 8 * BS).expect("image");
        let (tx, rx) = mpsc::unbounded_channel();
        let d = Disk::receiving(img, "d", BS as u32, pending.iter().copied().collect(), tx);
        (dir, Arc::new(d), rx)
    }

    #[tokio::test]
    async fn read_of_a_pending_block_waits_and_asks_for_it() {
        let (_dir, disk, mut fetch) = receiving(&[2]);
        // A read of another block does not wait.
        assert_eq!(disk.read(0, 512).await.expect("read"), vec![0u8; 512]);
        let d = disk.clone();
        let reader = tokio::spawn(async move { d.read(2 * BS + 100, 10).await });
        assert_eq!(
            fetch.recv().await,
            Some(2),
            "the read asks the source for block 2"
        );
        assert!(!reader.is_finished());
        // The block lands.
        assert!(disk.begin_landing(2));
        disk.image()
            .write_at(&[7u8; BS as usize], 2 * BS)
            .expect("write");
        disk.end_landing(2);
        let got = reader.await.expect("join").expect("read");
        assert_eq!(got, vec![7u8; 10]);
        assert_eq!(disk.pending_blocks(), 0);
    }

    #[tokio::test]
    async fn whole_block_write_replaces_a_pending_block() {
        let (_dir, disk, _fetch) = receiving(&[3]);
        disk.write(3 * BS, vec![9u8; BS as usize], false)
            .await
            .expect("write");
        // The late arrival of the old content is dropped.
        assert!(!disk.begin_landing(3));
        assert_eq!(disk.read(3 * BS, 4).await.expect("read"), vec![9u8; 4]);
    }

    /// What a restarted destination still waits for, after `steps` ran on
    /// a receiving disk with a journal: the commit's set less the journal.
    async fn pending_after_restart(steps: impl AsyncFnOnce(&Disk)) -> HashSet<u64> {
        let dir = tempfile::tempdir().expect("tmp");
        let img = Image::create(&dir.path().join("d.img"), 8 * BS).expect("img");
        let jpath = dir.path().join("d.landed");
        let disk = Disk::new(img, "d");
        let (tx, _rx) = mpsc::unbounded_channel();
        let committed: HashSet<u64> = [1, 3, 5].into();
        let j = Journal::create(&jpath).expect("journal");
        disk.open_receiving(BS as u32, committed.clone(), tx, Some(j));
        steps(&disk).await;
        // the restart sees only what reached the journal's file
        let (_j, done) = Journal::open(&jpath).expect("reopen");
        committed.difference(&done).copied().collect()
    }

    /// (What a restart reads is the journal's file; that its fsync comes with
    /// the write's FUA or the next FLUSH, after the image's, only a machine
    /// crash would show.)
    #[tokio::test]
    async fn a_guest_write_that_replaced_a_pending_block_is_journaled_for_a_restart() {
        // replaced whole: a late copy must never overwrite it, even after a restart
        let left = pending_after_restart(async |d: &Disk| {
            d.write(3 * BS, vec![9u8; BS as usize], false)
                .await
                .expect("write");
            d.flush().await.expect("flush");
        })
        .await;
        assert_eq!(left, [1, 5].into());
        let left = pending_after_restart(async |d: &Disk| {
            d.write(5 * BS, vec![9u8; BS as usize], true)
                .await
                .expect("write");
        })
        .await;
        assert_eq!(left, [1, 3].into());
    }

    #[tokio::test]
    async fn a_landed_block_is_journaled_before_writes_may_touch_it() {
        let left = pending_after_restart(async |d: &Disk| {
            assert!(d.begin_landing(1));
            d.image()
                .write_at(&vec![7u8; BS as usize], BS)
                .expect("land");
            d.record_landed(&[1]).expect("journal");
            d.end_landing(1);
        })
        .await;
        assert_eq!(left, [3, 5].into());
    }

    #[test]
    fn a_torn_journal_entry_is_not_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("j");
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3]); // a crash mid-append
        std::fs::write(&p, &b).expect("write");
        let (_j, done) = Journal::open(&p).expect("open");
        assert_eq!(done, [4].into());
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 8);
    }

    #[tokio::test]
    async fn partial_write_waits_for_the_block() {
        let (_dir, disk, mut fetch) = receiving(&[1]);
        let d = disk.clone();
        let writer = tokio::spawn(async move { d.write(BS + 10, vec![5u8; 10], false).await });
        assert_eq!(fetch.recv().await, Some(1));
        assert!(!writer.is_finished());
        assert!(disk.begin_landing(1));
        disk.image()
            .write_at(&[1u8; BS as usize], BS)
            .expect("write");
        disk.end_landing(1);
        writer.await.expect("join").expect("write");
        let got = disk.read(BS, 30).await.expect("read");
        assert_eq!(&got[..10], &[1u8; 10]);
        assert_eq!(&got[10..20], &[5u8; 10]);
        assert_eq!(&got[20..], &[1u8; 10]);
    }

    #[tokio::test]
    async fn freeze_holds_writes_and_commit_refuses_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::create(&dir.path().join("s.img"), 4 * BS).expect("image");
        let disk = Arc::new(Disk::new(img, "s"));
        disk.freeze().await;
        let d = disk.clone();
        let held = tokio::spawn(async move { d.write(0, vec![1u8; 512], false).await });
        // Long enough for an unheld write to reach the image and return.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!held.is_finished(), "write must be held while frozen");
        disk.commit_moved("b:7800".into());
        let r = held.await.expect("join");
        assert!(matches!(r, Err(DiskError::Moved { .. })), "{r:?}");
        // The held write never reached the image.
        assert_eq!(disk.read(0, 512).await.expect("read"), vec![0u8; 512]);
        assert!(disk.is_read_only());
    }

    #[tokio::test]
    async fn out_of_range_requests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::create(&dir.path().join("s.img"), BS).expect("image");
        let disk = Disk::new(img, "s");
        assert!(matches!(
            disk.read(BS - 1, 2).await,
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write(u64::MAX, vec![0; 2], false).await,
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[tokio::test]
    async fn an_incoming_disk_holds_writes_until_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::create(&dir.path().join("d.img"), 4 * BS).expect("image");
        let disk = Arc::new(Disk::incoming(img, "d"));
        disk.image().write_at(&[9u8; 4], 0).expect("land");
        assert_eq!(disk.read(0, 4).await.expect("read"), vec![9u8; 4]);
        let d = disk.clone();
        let write = tokio::spawn(async move { d.write(BS, vec![3u8; 8], false).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !write.is_finished(),
            "a write before the commit point waits"
        );
        assert_eq!(disk.read(BS, 8).await.expect("read"), vec![0u8; 8]);
        let (tx, _rx) = mpsc::unbounded_channel();
        disk.open_receiving(BS as u32, HashSet::new(), tx, None);
        write.await.expect("join").expect("write");
        assert_eq!(disk.read(BS, 8).await.expect("read"), vec![3u8; 8]);
    }
}
