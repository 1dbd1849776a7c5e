//! Live copies of volume ranges, for move, split and combine: the ranges
//! are copied while their volumes stay attached and written, with a dirty
//! log per source (see [`Registry::track`]). A first pass copies what is
//! allocated; later rounds copy what was written meanwhile, until a round
//! is small; the caller then stops the writes (a fence, or the exclusive
//! I/O gate) and runs the final pass, after which the copy equals the
//! sources at that instant. Every pass reads the image after taking its
//! dirty ranges, and every write is logged after it was applied, so a
//! write is either seen by a pass or logged for the next one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use crate::image;
use crate::nbd::client::Client;
use crate::registry::{Registry, Tracker};
use ember_nbd::CMD_WRITE_ZEROES;

/// Bytes per read and write of a copy.
pub const CHUNK: u64 = 1 << 20;
/// Rounds after the first pass, at most, before the final pass anyway.
pub const MAX_ROUNDS: u32 = 8;
/// A round this small is the last before the final pass.
pub const CONVERGED: u64 = 4 << 20;

/// Where a copy goes.
pub trait Sink: Send {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Durable: everything written so far survives a crash of the sink.
    fn sync(&mut self) -> io::Result<()>;
}

/// A new image file on this service.
pub struct FileSink(pub File);

impl Sink for FileSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        image::write_zeroes(&self.0, offset, len, true)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

/// A volume of another service, through its NBD server.
pub struct NbdSink(pub Client);

impl NbdSink {
    fn check(
        r: Result<crate::nbd::client::Reply, crate::nbd::client::ClientError>,
        what: &str,
    ) -> io::Result<()> {
        match r {
            Ok(r) if r.error == 0 => Ok(()),
            Ok(r) => Err(io::Error::other(format!(
                "the target refused a {what} (NBD error {})",
                r.error
            ))),
            Err(e) => Err(io::Error::other(format!("the target's NBD server: {e}"))),
        }
    }
}

impl Sink for NbdSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        Self::check(self.0.write(offset, data), "write")
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            Self::check(
                self.0
                    .call(CMD_WRITE_ZEROES, 0, offset + done, n as u32, &[]),
                "write-zeroes",
            )?;
            done += n;
        }
        Ok(())
    }
    /// NBD_CMD_FLUSH: the server answers once the writes are durable.
    fn sync(&mut self) -> io::Result<()> {
        Self::check(self.0.flush(), "flush")
    }
}

/// One source range: `len` bytes of volume `name` from `src`, copied to
/// `dst` in the sink.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub src: u64,
    pub len: u64,
    pub dst: u64,
}

pub struct LiveCopy {
    parts: Vec<(Part, File, Tracker)>,
    pub rounds: u32,
    pub bytes: u64,
}

impl LiveCopy {
    /// Starts the dirty logs (before anything is read).
    pub fn start(reg: &Arc<Registry>, parts: Vec<Part>) -> io::Result<LiveCopy> {
        let mut v = Vec::with_capacity(parts.len());
        for p in parts {
            let t = reg.track(&p.name);
            let f = image::open(reg, &p.name)
                .map_err(|e| io::Error::new(e.kind(), format!("volume {}: {e}", p.name)))?;
            v.push((p, f, t));
        }
        Ok(LiveCopy {
            parts: v,
            rounds: 0,
            bytes: 0,
        })
    }

    /// The first pass and the rounds after it, while the sources are written.
    pub fn converge(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        for i in 0..self.parts.len() {
            let (p, f, _) = &self.parts[i];
            let extents = data_extents(f, p.src, p.src + p.len)?;
            for (off, len) in extents {
                self.copy_range(i, off, len, sink, true)?;
            }
        }
        while self.rounds < MAX_ROUNDS {
            self.rounds += 1;
            if self.pass(sink)? <= CONVERGED {
                break;
            }
        }
        Ok(())
    }

    /// The last dirty ranges; the caller made sure nothing writes now.
    pub fn final_pass(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        self.pass(sink).map(|_| ())
    }

    /// Copies what was written since the last pass; the bytes copied.
    fn pass(&mut self, sink: &mut dyn Sink) -> io::Result<u64> {
        let mut total = 0;
        for i in 0..self.parts.len() {
            let (p, _, t) = &self.parts[i];
            let (start, end) = (p.src, p.src + p.len);
            for (off, len) in t.take() {
                // Only what falls inside this part's range.
                let (a, b) = (off.max(start), (off + len).min(end));
                if a < b {
                    self.copy_range(i, a, b - a, sink, false)?;
                    total += b - a;
                }
            }
        }
        Ok(total)
    }

    /// Copies [off, off+len) of part `i` (source offsets). All-zero chunks
    /// are skipped on a first pass (the sink starts sparse) and zeroed on
    /// later ones (they may have been copied with data before).
    fn copy_range(
        &mut self,
        i: usize,
        off: u64,
        len: u64,
        sink: &mut dyn Sink,
        first: bool,
    ) -> io::Result<()> {
        let (p, f, _) = &self.parts[i];
        let mut buf = vec![0u8; CHUNK.min(len) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(CHUNK) as usize;
            let b = &mut buf[..n];
            f.read_exact_at(b, at)?;
            let dst = p.dst + (at - p.src);
            if b.iter().all(|&x| x == 0) {
                if !first {
                    sink.zero(dst, n as u64)?;
                }
            } else {
                sink.write(dst, b)?;
            }
            self.bytes += n as u64;
            at += n as u64;
        }
        Ok(())
    }
}

/// The allocated extents of `f` within [start, end) (SEEK_DATA/SEEK_HOLE),
/// so a sparse volume copies only what it holds.
fn data_extents(f: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let seek = |off: u64, whence: i32| -> io::Result<Option<u64>> {
        let Ok(o) = i64::try_from(off) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: lseek on an fd we own; the copy reads with pread, so the
        // file position it moves is not used.
        let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            }
        }
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KvStore;

    #[test]
    fn a_write_during_the_copy_reaches_the_final_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&[], &dir.path().join("store"), "/k").unwrap();
        let reg = Registry::open(dir.path(), Box::new(store)).unwrap();
        reg.create("a", 8 << 20, None).unwrap();
        let f = image::open(&reg, "a").unwrap();
        f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        let out = dir.path().join("out");
        let o = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&out)
            .unwrap();
        o.set_len(4 << 20).unwrap();
        let mut sink = FileSink(o.try_clone().unwrap());
        let part = Part {
            name: "a".into(),
            src: 2 << 20,
            len: 4 << 20,
            dst: 0,
        };
        let mut c = LiveCopy::start(&reg, vec![part]).unwrap();
        c.converge(&mut sink).unwrap();
        // Written after the rounds (logged as a server would), and one
        // outside the range: only the first is copied.
        f.write_all_at(&[9u8; 512], (2 << 20) + 100 * 512).unwrap();
        reg.mark_dirty("a", (2 << 20) + 100 * 512, 512);
        reg.mark_dirty("a", 7 << 20, 512);
        c.final_pass(&mut sink).unwrap();
        let mut got = vec![0u8; 4 << 20];
        o.read_exact_at(&mut got, 0).unwrap();
        assert!(got[(1 << 20)..(1 << 20) + 4096].iter().all(|&b| b == 7));
        assert!(got[100 * 512..101 * 512].iter().all(|&b| b == 9));
        assert_eq!(got.iter().filter(|&&b| b != 0).count(), 4096 + 512);
        // The sparse first pass skipped the unallocated megabytes.
        assert!(c.bytes < 3 << 20, "{}", c.bytes);
    }
}
