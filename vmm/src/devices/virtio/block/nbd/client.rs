//! A synchronous client over the engine: one operation at a time, each
//! waited for. For callers that have no event loop (benchmarks, tools);
//! the device uses the engine directly.

use std::io;
use std::time::Duration;

use super::engine::{Durability, NbdEngine, Op};
use super::uri::NbdUri;
use super::{ExportInfo, NbdError, TFLAG_READ_ONLY, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES};

pub struct NbdClient {
    engine: NbdEngine,
    next_id: u64,
}

impl NbdClient {
    /// Connects once; errors here (bad server, refused export) are final.
    pub fn connect(
        uri: NbdUri,
        timeout: Duration,
        durability: Durability,
    ) -> Result<NbdClient, NbdError> {
        Ok(NbdClient {
            engine: NbdEngine::connect(uri, timeout, durability)?,
            next_id: 0,
        })
    }

    pub fn engine(&self) -> &NbdEngine {
        &self.engine
    }

    pub fn size(&self) -> u64 {
        self.info().size
    }

    pub fn read_only(&self) -> bool {
        self.info().has(TFLAG_READ_ONLY)
    }

    pub fn info(&self) -> ExportInfo {
        self.engine.info()
    }

    pub fn can_trim(&self) -> bool {
        self.info().has(TFLAG_SEND_TRIM)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.info().has(TFLAG_SEND_WRITE_ZEROES)
    }

    fn call(&mut self, op: Op, offset: u64) -> io::Result<Vec<u8>> {
        self.next_id += 1;
        self.engine.submit(self.next_id, op, offset);
        self.engine.wait_for(self.next_id)
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.call(Op::Read(buf.len()), offset)?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.call(Op::Write(buf.to_vec()), offset).map(|_| ())
    }

    /// Discards `len` bytes at `offset` (a hint: contents become unspecified).
    pub fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.call(Op::Trim(len), offset).map(|_| ())
    }

    /// Writes `len` zero bytes at `offset` without sending them.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_write_zeroes() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.call(Op::WriteZeroes(len), offset).map(|_| ())
    }

    /// Makes every acknowledged write durable on the server.
    pub fn flush(&mut self) -> io::Result<()> {
        self.call(Op::Flush, 0).map(|_| ())
    }
}
