//! A growable column split into shared pieces, so that a writer copies only what it touches.
//!
//! Readers hold an immutable snapshot; a writer works on a shallow clone and `Arc::make_mut`
//! copies a piece only while an older snapshot still shares it. Two levels keep both costs
//! small: a write copies one leaf of 4 Ki values (32 KiB of `f64`) and one node of 16 leaf
//! pointers, never a whole 64 Ki-value chunk, while a shallow clone of the column copies one
//! pointer per 64 Ki ids (about 150 at 10,000,000 users), not one per leaf.

use std::sync::Arc;

/// Values per leaf.
const LEAF_BITS: u32 = 12;
const LEAF_LEN: usize = 1 << LEAF_BITS;
/// Leaves per node: a node spans 64 Ki ids, as a roaring container does.
const NODE_BITS: u32 = 4;
const NODE_LEN: usize = 1 << NODE_BITS;

/// A column of `T` indexed by dense user id, with a fill value for ids never written.
#[derive(Debug, Clone)]
pub struct ChunkedVec<T: Copy> {
    /// `nodes[id >> 16][(id >> 12) & 15][id & 4095]`; every leaf holds `LEAF_LEN` values.
    nodes: Vec<Arc<Vec<Arc<Vec<T>>>>>,
    /// Number of addressable values.
    len: usize,
    /// What ids beyond the written ones read as (the column's null).
    fill: T,
}

impl<T: Copy> ChunkedVec<T> {
    /// An empty column whose unwritten slots read as `fill`.
    pub fn new(fill: T) -> Self {
        Self {
            nodes: Vec::new(),
            len: 0,
            fill,
        }
    }

    /// The value at `id`, or the fill value past the end.
    #[inline]
    pub fn get(&self, id: u32) -> T {
        let index = id as usize;
        self.nodes
            .get(index >> (LEAF_BITS + NODE_BITS))
            .and_then(|node| node.get((index >> LEAF_BITS) & (NODE_LEN - 1)))
            .and_then(|leaf| leaf.get(index & (LEAF_LEN - 1)))
            .copied()
            .unwrap_or(self.fill)
    }

    /// A reader for ids in ascending order: it finds each id's leaf once and then reads within
    /// it, where [`ChunkedVec::get`] walks both levels per id (range scans read millions).
    pub fn reader(&self) -> Reader<'_, T> {
        Reader {
            column: self,
            leaf_index: usize::MAX,
            leaf: &[],
        }
    }

    /// Sets the value at `id`, growing the column with fill values as needed.
    pub fn set(&mut self, id: u32, value: T) {
        self.set_many(&[(id, value)]);
    }

    /// Sets many values, taking each leaf for writing once per run of ids in it (a bulk load
    /// would otherwise pay an atomic uniqueness check per value).
    pub fn set_many(&mut self, items: &[(u32, T)]) {
        if let Some(max) = items.iter().map(|(id, _)| *id as usize).max() {
            if max >= self.len {
                self.grow_to(max + 1);
            }
        }
        let mut items = items.iter().peekable();
        while let Some(&(id, value)) = items.next() {
            let leaf_index = id as usize >> LEAF_BITS;
            let node = Arc::make_mut(&mut self.nodes[leaf_index >> NODE_BITS]);
            let leaf = Arc::make_mut(&mut node[leaf_index & (NODE_LEN - 1)]);
            leaf[id as usize & (LEAF_LEN - 1)] = value;
            while let Some(&&(next, value)) = items.peek() {
                if next as usize >> LEAF_BITS != leaf_index {
                    break;
                }
                leaf[next as usize & (LEAF_LEN - 1)] = value;
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

    /// Heap bytes held by the values (shared leaves are counted in full).
    pub fn heap_bytes(&self) -> usize {
        let leaves: usize = self.nodes.iter().map(|node| node.len()).sum();
        leaves * LEAF_LEN * std::mem::size_of::<T>()
    }

    /// Adds fill-valued leaves until `new_len` ids are addressable.
    fn grow_to(&mut self, new_len: usize) {
        let mut leaves: usize = self.nodes.iter().map(|node| node.len()).sum();
        while leaves * LEAF_LEN < new_len {
            if leaves.is_multiple_of(NODE_LEN) {
                self.nodes.push(Arc::new(Vec::with_capacity(NODE_LEN)));
            }
            if let Some(node) = self.nodes.last_mut() {
                Arc::make_mut(node).push(Arc::new(vec![self.fill; LEAF_LEN]));
            }
            leaves += 1;
        }
        self.len = self.len.max(new_len);
    }
}

/// Reads a [`ChunkedVec`] leaf by leaf (see [`ChunkedVec::reader`]).
pub struct Reader<'a, T: Copy> {
    column: &'a ChunkedVec<T>,
    leaf_index: usize,
    leaf: &'a [T],
}

impl<T: Copy> Reader<'_, T> {
    /// The value at `id`, as [`ChunkedVec::get`] reads it.
    #[inline]
    pub fn get(&mut self, id: u32) -> T {
        let index = id as usize;
        let leaf_index = index >> LEAF_BITS;
        if leaf_index != self.leaf_index {
            self.leaf_index = leaf_index;
            self.leaf = self
                .column
                .nodes
                .get(leaf_index >> NODE_BITS)
                .and_then(|node| node.get(leaf_index & (NODE_LEN - 1)))
                .map_or(&[], |leaf| leaf.as_slice());
        }
        self.leaf
            .get(index & (LEAF_LEN - 1))
            .copied()
            .unwrap_or(self.column.fill)
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
    fn a_reader_reads_what_get_reads_in_any_order() {
        let mut column = ChunkedVec::new(u16::MAX);
        let written: Vec<(u32, u16)> = (0..5_000u32)
            .map(|i| (i * 97 % 300_000, i as u16))
            .collect();
        let mut sorted = written.clone();
        sorted.sort_unstable();
        sorted.dedup_by_key(|(id, _)| *id);
        column.set_many(&sorted);
        let mut reader = column.reader();
        // Ascending, then jumping back, then past the end.
        let probes = (0..400_000u32)
            .step_by(37)
            .chain([5, 4_096, 4_095, 70_000, 1 << 30]);
        for id in probes {
            assert_eq!(reader.get(id), column.get(id), "id {id}");
        }
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

    #[test]
    fn a_write_copies_one_leaf_and_one_node() {
        let mut column = ChunkedVec::new(0.0f64);
        column.set(300_000, 1.0);
        let snapshot = column.clone();
        column.set(70_000, 2.0);
        let shared_leaves = |a: &ChunkedVec<f64>, b: &ChunkedVec<f64>| {
            a.nodes
                .iter()
                .zip(&b.nodes)
                .flat_map(|(x, y)| x.iter().zip(y.iter()))
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        let leaves: usize = column.nodes.iter().map(|n| n.len()).sum();
        assert_eq!(shared_leaves(&column, &snapshot), leaves - 1);
        let shared_nodes = column
            .nodes
            .iter()
            .zip(&snapshot.nodes)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared_nodes, column.nodes.len() - 1);
        assert_eq!((snapshot.get(70_000), column.get(70_000)), (0.0, 2.0));
    }
}
