//! Raw disk images on the host's filesystem: positional I/O, sparse extents
//! (SEEK_DATA / SEEK_HOLE), hole punching and durable flushes.
//!
//! All calls are blocking; async callers go through `tokio::task::spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source} ({hint})")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("image {path} I/O failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open raw image of fixed size.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
}

/// A byte range `[offset, offset + len)` that is either data or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

impl Image {
    pub fn open(path: &Path, writable: bool) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        let size = file.metadata().map_err(|e| open_err(path, e))?.len();
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// Open or create `path` with exactly `size` bytes (a new file is all hole).
    pub fn create(path: &Path, size: u64) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        file.set_len(size).map_err(|e| open_err(path, e))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> ImageError {
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.file.read_exact_at(buf, offset).map_err(|e| self.io(e))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.file.write_all_at(buf, offset).map_err(|e| self.io(e))
    }

    /// Durable flush of data (fdatasync).
    pub fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Make `[offset, offset+len)` read as zeros. With `punch` the range is
    /// deallocated (a hole); otherwise it stays allocated (FALLOC_FL_ZERO_RANGE).
    /// Falls back to writing zeros where the filesystem supports neither.
    pub fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), ImageError> {
        if len == 0 {
            return Ok(());
        }
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a valid fd with in-range arguments; no memory is shared.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(self.io(err));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(zeros.len());
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>, ImageError> {
        // SAFETY: lseek on a valid fd; it only moves the file offset.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(self.io(err));
        }
        Ok(Some(r as u64))
    }

    /// Data and hole extents covering `[offset, offset+len)`, in order, using
    /// SEEK_DATA/SEEK_HOLE (never reads data). Filesystems without sparse support
    /// report one data extent.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ImageError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self
                .seek(pos, libc::SEEK_DATA)?
                .unwrap_or(self.size)
                .min(end);
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    len: data - pos,
                    hole: true,
                });
                pos = data;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)?
                .unwrap_or(self.size)
                .min(end);
            let hole = hole.max(pos + 1).min(end);
            out.push(Extent {
                offset: pos,
                len: hole - pos,
                hole: false,
            });
            pos = hole;
        }
        Ok(out)
    }
}

fn open_err(path: &Path, source: io::Error) -> ImageError {
    let hint = match source.kind() {
        io::ErrorKind::NotFound => "check the path, or create it with `qemu-img create -f raw`",
        io::ErrorKind::PermissionDenied => "run as root or fix the file's owner",
        _ => "check that the path is a regular file on a local filesystem",
    };
    ImageError::Open {
        path: path.to_owned(),
        source,
        hint,
    }
}

/// True when every byte is zero (used to send zero extents instead of bytes).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        // OR-folding a fixed-size chunk vectorises; the early exit is per chunk.
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.img");
        let img = Image::create(&p, 8 << 20).expect("create");
        img.write_at(&[1u8; 4096], 2 << 20).expect("write");
        let ex = img.extents(0, 8 << 20).expect("extents");
        let data: Vec<_> = ex.iter().filter(|e| !e.hole).collect();
        assert!(!data.is_empty());
        assert!(data
            .iter()
            .any(|e| e.offset <= 2 << 20 && e.offset + e.len >= (2 << 20) + 4096));
        let total: u64 = ex.iter().map(|e| e.len).sum();
        assert_eq!(total, 8 << 20);
        img.zero(2 << 20, 4096, true).expect("punch");
        let mut b = [9u8; 4096];
        img.read_at(&mut b, 2 << 20).expect("read");
        assert!(is_zero(&b));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65537]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        v[65536] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
