//! [`ByteStrings`]: the elements of a `BYTES` tensor, stored end to end in one buffer.
//!
//! One allocation for the contents and one for the offsets, whatever the number of strings: a tensor of many short
//! strings costs about its bytes plus 8 per string (a vector per string cost 24 bytes plus an allocation each), and
//! when it is freed on another thread than the one that made it (an inference worker's output, freed by the
//! request's thread) the memory goes back whole instead of as thousands of small blocks cached in the worker's heap.

use std::ops::{Index, Range};

/// Byte strings stored end to end: string `i` is `data[ends[i - 1]..ends[i]]`.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ByteStrings {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl ByteStrings {
    /// No strings.
    pub fn new() -> ByteStrings {
        ByteStrings::default()
    }

    /// No strings, with room for `strings` of `bytes` in total.
    pub fn with_capacity(strings: usize, bytes: usize) -> ByteStrings {
        ByteStrings {
            data: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(strings),
        }
    }

    /// The number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Room for strings before the offsets grow.
    pub fn capacity(&self) -> usize {
        self.ends.capacity()
    }

    /// Makes room for exactly `additional` more strings (their offsets).
    pub fn reserve_exact(&mut self, additional: usize) {
        self.ends.reserve_exact(additional);
    }

    /// The strings' bytes in total.
    pub fn content_len(&self) -> usize {
        self.data.len()
    }

    /// Room for content before the buffer grows.
    pub fn content_capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Makes room for exactly `additional` more bytes of content.
    pub fn reserve_content_exact(&mut self, additional: usize) {
        self.data.reserve_exact(additional);
    }

    /// Appends a string.
    pub fn push(&mut self, s: &[u8]) {
        self.data.extend_from_slice(s);
        self.ends.push(self.data.len());
    }

    /// String `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.data[start..end])
    }

    /// The strings in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| &self[i])
    }

    /// Appends every string of `other`.
    pub fn extend_from(&mut self, other: &ByteStrings) {
        let base = self.data.len();
        self.data.extend_from_slice(&other.data);
        self.ends.extend(other.ends.iter().map(|e| base + e));
    }

    /// The strings in `range` (string indices), as a new value.
    pub fn slice(&self, range: Range<usize>) -> ByteStrings {
        let ends = &self.ends[range.clone()];
        let start = if range.start == 0 {
            0
        } else {
            self.ends[range.start - 1]
        };
        let end = ends.last().copied().unwrap_or(start);
        ByteStrings {
            data: self.data[start..end].to_vec(),
            ends: ends.iter().map(|e| e - start).collect(),
        }
    }

    /// `n` copies of string `i`.
    pub fn repeat(&self, i: usize, n: usize) -> ByteStrings {
        let s = &self[i];
        let mut out = ByteStrings::with_capacity(n, s.len().saturating_mul(n));
        for _ in 0..n {
            out.push(s);
        }
        out
    }
}

impl Index<usize> for ByteStrings {
    type Output = [u8];
    fn index(&self, i: usize) -> &[u8] {
        self.get(i).unwrap_or_else(|| {
            panic!("string {i} of {}", self.len());
        })
    }
}

impl<B: AsRef<[u8]>> FromIterator<B> for ByteStrings {
    fn from_iter<I: IntoIterator<Item = B>>(iter: I) -> ByteStrings {
        let mut out = ByteStrings::new();
        for s in iter {
            out.push(s.as_ref());
        }
        out
    }
}

impl From<Vec<Vec<u8>>> for ByteStrings {
    fn from(strings: Vec<Vec<u8>>) -> ByteStrings {
        let bytes = strings.iter().map(Vec::len).sum();
        let mut out = ByteStrings::with_capacity(strings.len(), bytes);
        for s in &strings {
            out.push(s);
        }
        out
    }
}

impl std::fmt::Debug for ByteStrings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(String::from_utf8_lossy))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_keep_their_bounds() {
        let s: ByteStrings = ["ab", "", "c", "def"].into_iter().collect();
        assert_eq!(s.len(), 4);
        assert_eq!(s.content_len(), 6);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [&b"ab"[..], b"", b"c", b"def"]
        );
        assert_eq!(s.get(4), None);
        assert_eq!(s.slice(1..3), ["", "c"].into_iter().collect());
        assert_eq!(s.slice(2..2), ByteStrings::new());
        assert_eq!(s.slice(0..4), s);
        let mut joined = s.slice(0..2);
        joined.extend_from(&s.slice(2..4));
        assert_eq!(joined, s);
        assert_eq!(s.repeat(3, 2), ["def", "def"].into_iter().collect());
        assert_eq!(
            ByteStrings::from(vec![b"ab".to_vec(), vec![]]),
            ["ab", ""].into_iter().collect()
        );
        assert_eq!(format!("{s:?}"), r#"["ab", "", "c", "def"]"#);
    }
}
