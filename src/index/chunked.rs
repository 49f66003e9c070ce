//! A growable column split into shared chunks, so that a writer copies only the chunks it touches.
//!
//! Readers hold an immutable snapshot; a writer works on a shallow clone and `Arc::make_mut`
//! copies a chunk (64 Ki values) only while an older snapshot still shares it.

use std::sync::Arc;

/// Values per chunk: the same span as a roaring container, so both grow together.
const CHUNK_BITS: u32 = 16;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;

/// A column of `T` indexed by dense user id, with a fill value for ids never written.
#[derive(Debug, Clone)]
pub struct ChunkedVec<T: Copy> {
    /// Full chunks of `CHUNK_LEN` values each; the last may be shorter.
    chunks: Vec<Arc<Vec<T>>>,
    /// Number of addressable values.
    len: usize,
    /// What ids beyond the written ones read as (the column's null).
    fill: T,
}

impl<T: Copy> ChunkedVec<T> {
    /// An empty column whose unwritten slots read as `fill`.
    pub fn new(fill: T) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            fill,
        }
    }

    /// The value at `id`, or the fill value past the end.
    #[inline]
    pub fn get(&self, id: u32) -> T {
        let chunk = (id >> CHUNK_BITS) as usize;
        let offset = (id as usize) & (CHUNK_LEN - 1);
        self.chunks
            .get(chunk)
            .and_then(|values| values.get(offset))
            .copied()
            .unwrap_or(self.fill)
    }

    /// Sets the value at `id`, growing the column with fill values as needed.
    pub fn set(&mut self, id: u32, value: T) {
        let index = id as usize;
        if index >= self.len {
            self.grow_to(index + 1);
        }
        let chunk = index >> CHUNK_BITS;
        let offset = index & (CHUNK_LEN - 1);
        Arc::make_mut(&mut self.chunks[chunk])[offset] = value;
    }

    /// Sets many values, taking each chunk for writing once per run of ids in it (a bulk load
    /// would otherwise pay an atomic uniqueness check per value).
    pub fn set_many(&mut self, items: &[(u32, T)]) {
        if let Some(max) = items.iter().map(|(id, _)| *id as usize).max() {
            if max >= self.len {
                self.grow_to(max + 1);
            }
        }
        let mut items = items.iter().peekable();
        while let Some(&(id, value)) = items.next() {
            let index = id as usize;
            let chunk_index = index >> CHUNK_BITS;
            let chunk = Arc::make_mut(&mut self.chunks[chunk_index]);
            chunk[index & (CHUNK_LEN - 1)] = value;
            while let Some(&&(next, value)) = items.peek() {
                let next = next as usize;
                if next >> CHUNK_BITS != chunk_index {
                    break;
                }
                chunk[next & (CHUNK_LEN - 1)] = value;
                items.next();
            }
        }
    }

    /// Number of addressable slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no slot was ever written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held by the values (shared chunks are counted in full).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity()).sum::<usize>() * std::mem::size_of::<T>()
    }

    fn grow_to(&mut self, new_len: usize) {
        while self.len < new_len {
            let chunk = self.len >> CHUNK_BITS;
            if chunk == self.chunks.len() {
                self.chunks.push(Arc::new(Vec::new()));
            }
            let values = Arc::make_mut(&mut self.chunks[chunk]);
            let wanted = (new_len - chunk * CHUNK_LEN).min(CHUNK_LEN);
            if values.capacity() < wanted {
                // Grow chunks geometrically but never past one chunk, so a column of n ids
                // holds at most one partly used chunk.
                let target = wanted.max(values.capacity() * 2).min(CHUNK_LEN);
                values.reserve_exact(target - values.len());
            }
            values.resize(wanted, self.fill);
            self.len = chunk * CHUNK_LEN + wanted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fill_past_end_and_grows_across_chunks() {
        let mut column = ChunkedVec::new(u32::MAX);
        assert_eq!(column.get(5), u32::MAX);
        column.set(3, 7);
        column.set(200_000, 9);
        assert_eq!(column.get(3), 7);
        assert_eq!(column.get(4), u32::MAX);
        assert_eq!(column.get(70_000), u32::MAX);
        assert_eq!(column.get(200_000), 9);
        assert_eq!(column.len(), 200_001);
        column.set_many(&[
            (1, 1),
            (2, 2),
            (70_000, 3),
            (70_001, 4),
            (300_000, 5),
            (0, 6),
        ]);
        let read: Vec<u32> = [0, 1, 2, 3, 70_000, 70_001, 300_000, 299_999]
            .iter()
            .map(|&id| column.get(id))
            .collect();
        assert_eq!(read, vec![6, 1, 2, 7, 3, 4, 5, u32::MAX]);
    }

    #[test]
    fn clones_share_until_written() {
        let mut column = ChunkedVec::new(0u8);
        column.set(10, 1);
        let snapshot = column.clone();
        column.set(10, 2);
        assert_eq!(snapshot.get(10), 1);
        assert_eq!(column.get(10), 2);
    }
}
