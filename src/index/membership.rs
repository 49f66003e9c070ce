//! Which saved segments each user is in, one bit per (user, segment), laid out user-major so
//! that "every segment of this user" reads a few words instead of probing every segment's
//! bitmap (a probe per segment is several dependent cache misses: ~360 ns each at 10M users).
//!
//! Segments get slots; 64 slots form a group, and each group is a column of one `u64` word per
//! user, chunked so that a write copies only the 8 KiB chunks whose bits it changes, and the
//! chunks paged so that a new version copies a pointer per 65,536 users, not per 1,024. The
//! segments' roaring bitmaps stay the source of truth; this index mirrors their changes.

use std::sync::Arc;

use super::bitmap::Bitmap;
use super::keys::DenseId;

/// Users per chunk: small, because a change to one user's membership copies its chunk while an
/// older snapshot shares it.
const CHUNK_BITS: u32 = 10;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;
/// Chunks per page: a version's clone copies one `Arc` per page, not per chunk, so that
/// cloning the index costs ~150 pointer copies per group at 10M users instead of ~10,000
/// (each a cache miss on its chunk's count, and as many again when the version is dropped).
const PAGE_BITS: u32 = 6;
const PAGE_LEN: usize = 1 << PAGE_BITS;

type Chunk = [u64; CHUNK_LEN];

/// `PAGE_LEN` chunks; `None` for a chunk whose words are all zero.
#[derive(Debug, Clone)]
struct Page {
    chunks: [Option<Arc<Chunk>>; PAGE_LEN],
}

impl Default for Page {
    fn default() -> Self {
        Self {
            chunks: std::array::from_fn(|_| None),
        }
    }
}

/// One group's words: `pages[id >> (CHUNK_BITS + PAGE_BITS)]`, then the chunk, then the word.
#[derive(Debug, Clone, Default)]
struct Group {
    pages: Vec<Option<Arc<Page>>>,
}

/// Where `id`'s word is: page, chunk within the page, word within the chunk.
fn locate(id: DenseId) -> (usize, usize, usize) {
    let index = id as usize;
    (
        index >> (CHUNK_BITS + PAGE_BITS),
        (index >> CHUNK_BITS) & (PAGE_LEN - 1),
        index & (CHUNK_LEN - 1),
    )
}

impl Group {
    fn word(&self, id: DenseId) -> u64 {
        let (page, chunk, word) = locate(id);
        match self.pages.get(page) {
            Some(Some(page)) => page.chunks[chunk].as_ref().map_or(0, |c| c[word]),
            _ => 0,
        }
    }

    /// Sets or clears `bit` for every id in `ids` (ascending), one chunk take per run.
    fn update(&mut self, ids: &Bitmap, bit: u32, on: bool) {
        let mask = 1u64 << bit;
        let mut ids = ids.iter().peekable();
        while let Some(&first) = ids.peek() {
            let (page_index, chunk_index, _) = locate(first);
            if self.pages.len() <= page_index {
                self.pages.resize(page_index + 1, None);
            }
            let page = Arc::make_mut(self.pages[page_index].get_or_insert_with(Arc::default));
            let chunk = Arc::make_mut(
                page.chunks[chunk_index].get_or_insert_with(|| Arc::new([0; CHUNK_LEN])),
            );
            while let Some(&id) = ids.peek() {
                let (p, c, word) = locate(id);
                if (p, c) != (page_index, chunk_index) {
                    break;
                }
                if on {
                    chunk[word] |= mask;
                } else {
                    chunk[word] &= !mask;
                }
                ids.next();
            }
        }
    }
}

/// The membership bits of every segment of one dataset.
#[derive(Debug, Clone, Default)]
pub struct MembershipIndex {
    /// Slot → segment id; `None` for a free slot.
    slots: Vec<Option<Arc<str>>>,
    /// Slot `s` is bit `s % 64` of group `s / 64`.
    groups: Vec<Group>,
}

impl MembershipIndex {
    /// Gives a new segment a slot (its bits must be all clear, as freed slots are).
    pub fn add_segment(&mut self, segment: &str) -> usize {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(segment.into());
        if self.groups.len() <= slot / 64 {
            self.groups.push(Group::default());
        }
        slot
    }

    /// An index with these slots taken (`None`: free), as [`MembershipIndex::slots`] gave
    /// them, and no members yet: a snapshot restores slots exactly, then each segment's members.
    pub fn with_slots(slots: &[Option<&str>]) -> Self {
        Self {
            slots: slots.iter().map(|s| s.map(Arc::from)).collect(),
            groups: (0..slots.len().div_ceil(64))
                .map(|_| Group::default())
                .collect(),
        }
    }

    /// Slot → segment id, `None` for a free slot.
    pub fn slots(&self) -> impl Iterator<Item = Option<&str>> {
        self.slots.iter().map(|s| s.as_deref())
    }

    /// Frees a segment's slot, clearing the bits of its `members`.
    pub fn remove_segment(&mut self, slot: usize, members: &Bitmap) {
        if self.slots.get(slot).is_some_and(Option::is_some) {
            self.update(slot, &Bitmap::new(), members);
            self.slots[slot] = None;
        }
    }

    /// Records users entering and leaving the segment in `slot`.
    pub fn update(&mut self, slot: usize, entered: &Bitmap, left: &Bitmap) {
        let group = &mut self.groups[slot / 64];
        let bit = (slot % 64) as u32;
        group.update(left, bit, false);
        group.update(entered, bit, true);
    }

    /// The ids of the segments containing `id`, unsorted.
    pub fn segments_of(&self, id: DenseId) -> impl Iterator<Item = &str> {
        self.groups.iter().enumerate().flat_map(move |(g, group)| {
            let mut word = group.word(id);
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                Some(g * 64 + bit)
            })
            .filter_map(|slot| self.slots.get(slot).and_then(|s| s.as_deref()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_entries_and_exits_and_reuses_slots() {
        let mut index = MembershipIndex::default();
        let slots: Vec<usize> = (0..70)
            .map(|i| index.add_segment(&format!("s{i}")))
            .collect();
        assert_eq!(slots, (0..70).collect::<Vec<_>>());
        let members = Bitmap::from_iter([1u32, 5, 2_000, 70_000]);
        index.update(65, &members, &Bitmap::new());
        index.update(3, &Bitmap::from_iter([5u32]), &Bitmap::new());
        let mut of_5: Vec<&str> = index.segments_of(5).collect();
        of_5.sort();
        assert_eq!(of_5, vec!["s3", "s65"]);
        assert_eq!(index.segments_of(70_000).collect::<Vec<_>>(), vec!["s65"]);
        let snapshot = index.clone();
        index.update(65, &Bitmap::new(), &Bitmap::from_iter([70_000u32]));
        assert!(index.segments_of(70_000).next().is_none());
        assert_eq!(snapshot.segments_of(70_000).count(), 1);
        index.remove_segment(65, &Bitmap::from_iter([1u32, 5, 2_000]));
        assert_eq!(index.segments_of(5).collect::<Vec<_>>(), vec!["s3"]);
        assert_eq!(index.add_segment("new"), 65);
        assert!(index.segments_of(1).next().is_none());
    }
}
