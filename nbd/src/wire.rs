//! Big-endian fields on a stream and in a buffer, and bounded reads.

use std::io::{self, Read};

use crate::error::{proto, Error};

pub(crate) fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    read_array(r).map(u32::from_be_bytes)
}

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    read_array(r).map(u64::from_be_bytes)
}

/// Reads `len` bytes a peer announced, refusing more than `max` before
/// anything is allocated.
pub(crate) fn read_bounded(
    r: &mut impl Read,
    len: u32,
    max: u32,
    what: &str,
) -> Result<Vec<u8>, Error> {
    if len > max {
        return Err(proto(format!(
            "{len}-byte {what} is too long (at most {max})"
        )));
    }
    let mut v = vec![0; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Big-endian fields taken from the front of a byte slice.
pub(crate) struct Fields<'a>(pub(crate) &'a [u8]);

impl<'a> Fields<'a> {
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// A message being built: big-endian fields appended.
#[derive(Default)]
pub(crate) struct Out(pub(crate) Vec<u8>);

impl Out {
    pub(crate) fn with_capacity(n: usize) -> Out {
        Out(Vec::with_capacity(n))
    }
    pub(crate) fn u16(mut self, v: u16) -> Out {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Out {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Out {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn bytes(mut self, v: &[u8]) -> Out {
        self.0.extend_from_slice(v);
        self
    }
}

/// `Out` into a fixed-size array (the caller's layout has exactly `N`
/// bytes).
pub(crate) fn fixed<const N: usize>(out: Out) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&out.0);
    b
}
