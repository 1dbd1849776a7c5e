//! Which chunks of a filling drive are in the local file: one bit each.

/// A fixed chunk size: large enough that the background copy moves data
/// in useful pieces, small enough that an on-demand fetch is quick.
pub const CHUNK_SIZE: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    bits: Vec<u64>,
    /// Chunks (the last may be partial).
    total: u64,
    present: u64,
    /// No chunk below this is missing: where the background copy resumes.
    cursor: u64,
}

impl ChunkMap {
    /// All missing, for a disk of `size` bytes.
    pub fn new(size: u64) -> ChunkMap {
        let total = size.div_ceil(CHUNK_SIZE);
        ChunkMap {
            bits: vec![0; total.div_ceil(64) as usize],
            total,
            present: 0,
            cursor: 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn present(&self) -> u64 {
        self.present
    }

    pub fn is_complete(&self) -> bool {
        self.present == self.total
    }

    pub fn has(&self, chunk: u64) -> bool {
        self.bits[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    pub fn set(&mut self, chunk: u64) {
        let w = &mut self.bits[(chunk / 64) as usize];
        let b = 1 << (chunk % 64);
        if *w & b == 0 {
            *w |= b;
            self.present += 1;
        }
    }

    /// The chunks `len` bytes at `offset` touch.
    pub fn span(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / CHUNK_SIZE..(offset + len).div_ceil(CHUNK_SIZE)
    }

    /// Whether every chunk of the byte range is local.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        self.is_complete() || ChunkMap::span(offset, len).all(|c| self.has(c))
    }

    /// The next run of missing chunks from the cursor, at most `max` long.
    pub fn next_missing(&mut self, max: u64) -> Option<std::ops::Range<u64>> {
        while self.cursor < self.total && self.has(self.cursor) {
            self.cursor += 1;
        }
        if self.cursor == self.total {
            return None;
        }
        let start = self.cursor;
        let mut end = start + 1;
        while end < self.total && end - start < max && !self.has(end) {
            end += 1;
        }
        Some(start..end)
    }

    /// The present chunks as runs `[first, count]` (compact in a snapshot:
    /// the background copy makes few, long runs).
    pub fn runs(&self) -> Vec<[u64; 2]> {
        let mut runs: Vec<[u64; 2]> = Vec::new();
        for c in 0..self.total {
            if !self.has(c) {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r[0] + r[1] == c => r[1] += 1,
                _ => runs.push([c, 1]),
            }
        }
        runs
    }

    /// A map for `size` bytes with `runs` present; `None` if a run lies
    /// outside it.
    pub fn from_runs(size: u64, runs: &[[u64; 2]]) -> Option<ChunkMap> {
        let mut m = ChunkMap::new(size);
        for &[first, count] in runs {
            if first.checked_add(count)? > m.total {
                return None;
            }
            (first..first + count).for_each(|c| m.set(c));
        }
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_runs_and_the_background_cursor() {
        let size = 10 * CHUNK_SIZE + 100;
        let mut m = ChunkMap::new(size);
        assert_eq!(m.total(), 11);
        assert_eq!(ChunkMap::span(CHUNK_SIZE - 1, 2), 0..2);
        assert_eq!(ChunkMap::span(CHUNK_SIZE, CHUNK_SIZE), 1..2);
        assert_eq!(ChunkMap::span(5, 0), 0..0);
        m.set(1);
        m.set(2);
        m.set(2);
        m.set(10);
        assert_eq!(m.present(), 3);
        assert!(m.covers(CHUNK_SIZE, 2 * CHUNK_SIZE));
        assert!(!m.covers(CHUNK_SIZE - 1, 2));
        assert_eq!(m.next_missing(4), Some(0..1));
        m.set(0);
        assert_eq!(m.next_missing(4), Some(3..7));
        assert_eq!(m.runs(), vec![[0, 3], [10, 1]]);
        let back = ChunkMap::from_runs(size, &m.runs()).unwrap();
        assert_eq!((back.runs(), back.present()), (m.runs(), m.present()));
        assert_eq!(ChunkMap::from_runs(size, &[[10, 2]]), None);
        assert_eq!(ChunkMap::from_runs(size, &[[u64::MAX, 2]]), None);
        (3..10).for_each(|c| m.set(c));
        assert!(m.is_complete());
        assert_eq!(m.next_missing(4), None);
    }
}
