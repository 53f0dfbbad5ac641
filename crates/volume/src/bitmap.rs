//! Region bitmaps: which regions of a volume a peer has missed (dirty
//! bitmaps) or had writes in flight (activity log), in memory and persisted.
//!
//! A persisted bitmap is a plain file of little-endian 64-bit words. Bits
//! that protect data are made durable *before* the data is written; the file
//! is updated in place page by page. This module must never clear a bit on
//! its own: only callers that know the region is in sync may.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A fixed-size set of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// An empty bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// A bitmap with every bit set.
    pub fn full(len: u64) -> Self {
        let mut b = Self::new(len);
        b.set_range(0, len);
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set (false beyond the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns true if it was clear. Ignores bits beyond the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Sets bits `[start, end)`; returns the word indexes that changed.
    pub fn set_range(&mut self, start: u64, end: u64) -> Vec<usize> {
        let mut changed = Vec::new();
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            let wi = (i / 64) as usize;
            let lo = i % 64;
            let hi = ((end - (i - lo)).min(64)) as u32;
            let mask = if hi == 64 {
                u64::MAX << lo
            } else {
                ((1u64 << hi) - 1) & (u64::MAX << lo)
            };
            if self.words[wi] & mask != mask {
                self.words[wi] |= mask;
                changed.push(wi);
            }
            i = i - lo + 64;
        }
        changed
    }

    /// ORs `other` into this bitmap (bits beyond our length are ignored).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The set bits in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u64 * 64 + u64::from(b))
            })
        })
    }

    /// Serialises as little-endian words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Deserialises `len` bits from little-endian words; short input is
    /// padded with zero bits, extra input ignored.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Self {
        let mut b = Self::new(len);
        for (w, chunk) in b.words.iter_mut().zip(bytes.chunks(8)) {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
        b.mask_tail();
        b
    }

    /// The word at index `i` (for persistence).
    fn word(&self, i: usize) -> u64 {
        self.words.get(i).copied().unwrap_or(0)
    }

    fn word_count(&self) -> usize {
        self.words.len()
    }
}

/// Words per persisted page (4 KiB).
const PAGE_WORDS: usize = 512;

/// A bitmap mirrored in a file.
#[derive(Debug)]
pub struct PersistentBitmap {
    bits: Bitmap,
    file: std::sync::Arc<File>,
    path: PathBuf,
    dirty_pages: std::collections::BTreeSet<usize>,
}

impl PersistentBitmap {
    /// Opens (or creates, all clear) the bitmap file at `path` with `len` bits.
    pub fn open(path: &Path, len: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let bytes_len = len.div_ceil(64) * 8;
        let mut buf = vec![0u8; bytes_len as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        if file.metadata()?.len() != bytes_len {
            file.set_len(bytes_len)?;
        }
        Ok(Self {
            bits: Bitmap::from_bytes(len, &buf),
            file: std::sync::Arc::new(file),
            path: path.to_owned(),
            dirty_pages: Default::default(),
        })
    }

    /// The in-memory bits.
    pub fn bits(&self) -> &Bitmap {
        &self.bits
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets bits `[start, end)`; returns true if any bit changed (then
    /// [`PersistentBitmap::persist`] must run before relying on them).
    pub fn set_range(&mut self, start: u64, end: u64) -> bool {
        let changed = self.bits.set_range(start, end);
        for w in &changed {
            self.dirty_pages.insert(w / PAGE_WORDS);
        }
        !changed.is_empty()
    }

    /// ORs in another bitmap.
    pub fn union_with(&mut self, other: &Bitmap) {
        let before = self.bits.clone();
        self.bits.union_with(other);
        for i in 0..self.bits.word_count() {
            if before.word(i) != self.bits.word(i) {
                self.dirty_pages.insert(i / PAGE_WORDS);
            }
        }
    }

    /// Clears bit `i` (persisted lazily: a clear bit that is not yet on
    /// disk only makes a later resync copy more than needed).
    pub fn clear(&mut self, i: u64) {
        if self.bits.get(i) {
            self.bits.clear(i);
            self.dirty_pages.insert(i as usize / 64 / PAGE_WORDS);
        }
    }

    /// Whether changes are waiting to be written.
    pub fn needs_persist(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Takes the changed pages as (file offset, bytes) for [`PendingPages::write`],
    /// so the caller can do the I/O off the async threads.
    pub fn take_dirty_pages(&mut self) -> PendingPages {
        let pages = std::mem::take(&mut self.dirty_pages)
            .into_iter()
            .map(|page| {
                let first = page * PAGE_WORDS;
                let last = ((page + 1) * PAGE_WORDS).min(self.bits.word_count());
                let bytes: Vec<u8> = (first..last)
                    .flat_map(|i| self.bits.word(i).to_le_bytes())
                    .collect();
                ((first * 8) as u64, bytes)
            })
            .collect();
        PendingPages {
            file: self.file.clone(),
            pages,
        }
    }

    /// Writes the changed pages and, with `sync`, makes them durable.
    pub fn persist(&mut self, sync: bool) -> std::io::Result<()> {
        self.take_dirty_pages().write(sync)
    }
}

/// Changed pages of a bitmap file, to be written.
#[derive(Debug)]
pub struct PendingPages {
    file: std::sync::Arc<File>,
    pages: Vec<(u64, Vec<u8>)>,
}

impl PendingPages {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Writes the pages and, with `sync`, makes them durable.
    pub fn write(self, sync: bool) -> std::io::Result<()> {
        if self.pages.is_empty() {
            return Ok(());
        }
        for (off, bytes) in &self.pages {
            self.file.write_all_at(bytes, *off)?;
        }
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn set_range_matches_naive(len in 1u64..700, ranges in proptest::collection::vec((0u64..700, 0u64..200), 0..10)) {
            let mut b = Bitmap::new(len);
            let mut naive = vec![false; len as usize];
            for (s, l) in ranges {
                b.set_range(s, s + l);
                for i in s..(s + l).min(len) { naive[i as usize] = true; }
            }
            for i in 0..len { prop_assert_eq!(b.get(i), naive[i as usize]); }
            prop_assert_eq!(b.count(), naive.iter().filter(|x| **x).count() as u64);
            let set: Vec<u64> = b.iter_set().collect();
            let expect: Vec<u64> = (0..len).filter(|i| naive[*i as usize]).collect();
            prop_assert_eq!(set, expect);
            prop_assert_eq!(Bitmap::from_bytes(len, &b.to_bytes()), b);
        }
    }

    #[test]
    fn persistent_bitmap_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b.bitmap");
        let mut b = PersistentBitmap::open(&p, 100_000).expect("open");
        assert!(b.set_range(5, 9));
        assert!(b.set_range(70_000, 70_001));
        assert!(!b.set_range(6, 8), "already set");
        b.persist(true).expect("persist");
        b.clear(5);
        b.persist(false).expect("persist");
        drop(b);
        let b = PersistentBitmap::open(&p, 100_000).expect("reopen");
        let set: Vec<u64> = b.bits().iter_set().collect();
        assert_eq!(set, vec![6, 7, 8, 70_000]);
    }

    #[test]
    fn full_and_union() {
        let mut a = Bitmap::new(70);
        let f = Bitmap::full(70);
        assert_eq!(f.count(), 70);
        a.union_with(&f);
        assert_eq!(a, f);
    }
}
