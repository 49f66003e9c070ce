//! Which saved segments each user is in, one bit per (user, segment), laid out user-major so
//! that "every segment of this user" reads a few words instead of probing every segment's
//! bitmap (a probe per segment is several dependent cache misses: ~360 ns each at 10M users).
//!
//! Segments get slots; 64 slots form a group, and each group is a column of one `u64` word per
//! user, chunked so that a write copies only the chunks whose bits it changes, and the chunks
//! paged so that a new version copies a pointer per 65,536 users, not per 1,024. A chunk stays a
//! sorted list of its non-zero words while few of its users have one, so memory follows
//! memberships, not users × segments. The segments' roaring bitmaps stay the source of truth;
//! this index mirrors their changes.

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

/// The most users with a bit that a chunk keeps as a sorted list before it becomes a dense
/// array of words: 256 entries of 10 bytes, against 8 KiB for the array.
const SPARSE_MAX: usize = CHUNK_LEN / 4;

/// One chunk's words, one per user. Sparse while few of its users are in any of the group's
/// segments: the members of small segments are scattered, so as dense arrays every member
/// would cost a chunk of its own (8 KiB), and 10,000 small segments over 10M users tens of GB.
#[derive(Debug, Clone)]
enum Chunk {
    /// The users with a non-zero word: their offsets in the chunk (ascending) and words.
    Sparse {
        offsets: Vec<u16>,
        words: Vec<u64>,
    },
    Dense(Box<[u64; CHUNK_LEN]>),
}

impl Chunk {
    fn empty() -> Self {
        Chunk::Sparse {
            offsets: Vec::new(),
            words: Vec::new(),
        }
    }

    fn word(&self, offset: usize) -> u64 {
        match self {
            Chunk::Dense(words) => words[offset],
            Chunk::Sparse { offsets, words } => offsets
                .binary_search(&(offset as u16))
                .map_or(0, |i| words[i]),
        }
    }

    /// Sets or clears `mask` in the words of `run` (offsets, ascending).
    fn update(&mut self, run: &[u16], mask: u64, on: bool) {
        if let Chunk::Sparse { offsets, .. } = self {
            if on && offsets.len() + run.len() > SPARSE_MAX {
                self.make_dense();
            }
        }
        match self {
            Chunk::Dense(words) => {
                for &offset in run {
                    let word = &mut words[usize::from(offset)];
                    *word = if on { *word | mask } else { *word & !mask };
                }
            }
            Chunk::Sparse { offsets, words } if on => {
                let (merged_offsets, merged_words) = merge_on(offsets, words, run, mask);
                *offsets = merged_offsets;
                *words = merged_words;
            }
            Chunk::Sparse { offsets, words } => {
                for &offset in run {
                    if let Ok(i) = offsets.binary_search(&offset) {
                        words[i] &= !mask;
                    }
                }
                let mut kept = words.iter().map(|&w| w != 0);
                offsets.retain(|_| kept.next().unwrap_or(false));
                words.retain(|&w| w != 0);
            }
        }
    }

    fn make_dense(&mut self) {
        if let Chunk::Sparse { offsets, words } = self {
            let mut dense = Box::new([0u64; CHUNK_LEN]);
            for (&offset, &word) in offsets.iter().zip(words.iter()) {
                dense[usize::from(offset)] = word;
            }
            *self = Chunk::Dense(dense);
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Chunk::Dense(_) => CHUNK_LEN * 8,
            Chunk::Sparse { offsets, words } => offsets.capacity() * 2 + words.capacity() * 8,
        }
    }
}

/// A sparse chunk's entries with `mask` set for the users of `run` too: one merge of the two
/// ascending lists.
fn merge_on(offsets: &[u16], words: &[u64], run: &[u16], mask: u64) -> (Vec<u16>, Vec<u64>) {
    let mut merged_offsets = Vec::with_capacity(offsets.len() + run.len());
    let mut merged_words = Vec::with_capacity(offsets.len() + run.len());
    let (mut i, mut j) = (0, 0);
    while i < offsets.len() || j < run.len() {
        let next_old = offsets.get(i).copied().unwrap_or(u16::MAX);
        let next_new = run.get(j).copied().unwrap_or(u16::MAX);
        let (offset, word) = if i < offsets.len() && (j == run.len() || next_old < next_new) {
            i += 1;
            (next_old, words[i - 1])
        } else if i < offsets.len() && next_old == next_new {
            i += 1;
            j += 1;
            (next_old, words[i - 1] | mask)
        } else {
            j += 1;
            (next_new, mask)
        };
        merged_offsets.push(offset);
        merged_words.push(word);
    }
    (merged_offsets, merged_words)
}

/// `PAGE_LEN` chunks; `None` for a chunk none of whose users has an entry.
#[derive(Debug, Clone)]
struct Page<C> {
    chunks: [Option<Arc<C>>; PAGE_LEN],
}

impl<C> Default for Page<C> {
    fn default() -> Self {
        Self {
            chunks: std::array::from_fn(|_| None),
        }
    }
}

/// Chunks of 1,024 users in pages of 64: `pages[id >> 16]`, then the chunk.
#[derive(Debug, Clone)]
struct Paged<C> {
    pages: Vec<Option<Arc<Page<C>>>>,
}

impl<C> Default for Paged<C> {
    fn default() -> Self {
        Self { pages: Vec::new() }
    }
}

impl<C: Clone> Paged<C> {
    fn chunk(&self, id: DenseId) -> Option<&C> {
        let (page, chunk, _) = locate(id);
        self.pages.get(page)?.as_ref()?.chunks[chunk].as_deref()
    }

    /// The chunk of `(page, chunk)` for writing, made if `create`; `None` if absent and not.
    fn chunk_mut(
        &mut self,
        (page, chunk): (usize, usize),
        create: impl FnOnce() -> C,
        make: bool,
    ) -> Option<&mut C> {
        let held = self.pages.get(page).and_then(Option::as_ref);
        if !make && held.is_none_or(|p| p.chunks[chunk].is_none()) {
            return None;
        }
        if self.pages.len() <= page {
            self.pages.resize(page + 1, None);
        }
        let page = Arc::make_mut(self.pages[page].get_or_insert_with(Arc::default));
        Some(Arc::make_mut(
            page.chunks[chunk].get_or_insert_with(|| Arc::new(create())),
        ))
    }

    fn heap_bytes(&self, chunk_bytes: impl Fn(&C) -> usize) -> usize {
        let pages = self.pages.iter().flatten();
        let chunks: usize = pages
            .clone()
            .flat_map(|page| page.chunks.iter().flatten())
            .map(|chunk| chunk_bytes(chunk) + std::mem::size_of::<C>() + 16)
            .sum();
        self.pages.capacity() * 8 + pages.count() * std::mem::size_of::<Page<C>>() + chunks
    }
}

/// Runs of `ids` (ascending) by chunk: the chunk's `(page, chunk)` and the offsets in it.
fn for_each_run(ids: &Bitmap, mut apply: impl FnMut((usize, usize), &[u16])) {
    let mut ids = ids.iter().peekable();
    let mut run: Vec<u16> = Vec::with_capacity(CHUNK_LEN);
    while let Some(&first) = ids.peek() {
        let (page, chunk, _) = locate(first);
        run.clear();
        while let Some(&id) = ids.peek() {
            let (p, c, offset) = locate(id);
            if (p, c) != (page, chunk) {
                break;
            }
            run.push(offset as u16);
            ids.next();
        }
        apply((page, chunk), &run);
    }
}

/// One group's words.
type Group = Paged<Chunk>;

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
        self.chunk(id)
            .map_or(0, |chunk| chunk.word(id as usize & (CHUNK_LEN - 1)))
    }

    /// Sets or clears `bit` for every id in `ids` (ascending), one chunk take per run.
    fn update(&mut self, ids: &Bitmap, bit: u32, on: bool) {
        let mask = 1u64 << bit;
        for_each_run(ids, |at, run| {
            if let Some(chunk) = self.chunk_mut(at, Chunk::empty, on) {
                chunk.update(run, mask, on);
            }
        });
    }
}

/// The members of small segments, as `(offset, slot)` entries of each chunk of users, sorted:
/// one lookup finds every small segment of a user, where a bit per segment would visit a group
/// per 64 segments (a cache miss each: 10,000 small segments would cost ~35 µs a lookup).
#[derive(Debug, Clone, Default)]
struct SlotChunk {
    entries: Vec<(u16, u32)>,
}

impl SlotChunk {
    fn slots_of(&self, offset: u16) -> impl Iterator<Item = usize> + '_ {
        let start = self.entries.partition_point(|&(o, _)| o < offset);
        self.entries[start..]
            .iter()
            .take_while(move |&&(o, _)| o == offset)
            .map(|&(_, slot)| slot as usize)
    }

    fn update(&mut self, run: &[u16], slot: u32, on: bool) {
        if on {
            // One merge of the two ascending lists (a write copies the chunk anyway).
            let mut merged = Vec::with_capacity(self.entries.len() + run.len());
            let mut adding = run.iter().map(|&offset| (offset, slot)).peekable();
            for &entry in &self.entries {
                while let Some(&new) = adding.peek() {
                    if new > entry {
                        break;
                    }
                    if new < entry {
                        merged.push(new);
                    }
                    adding.next();
                }
                merged.push(entry);
            }
            merged.extend(adding);
            self.entries = merged;
        } else {
            self.entries
                .retain(|&(offset, s)| s != slot || run.binary_search(&offset).is_err());
        }
    }
}

/// A slot's representation, chosen when it first gets members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Unfilled,
    /// A bit of its group.
    Bits,
    /// Entries of [`SlotChunk`]s.
    Entries,
}

/// A segment holding at most one user in this many (of the ids up to its largest) is small.
const SMALL_SHARE: u64 = 64;

/// The membership bits of every segment of one dataset.
#[derive(Debug, Clone, Default)]
pub struct MembershipIndex {
    /// Slot → segment id; `None` for a free slot.
    slots: Vec<Option<Arc<str>>>,
    kinds: Vec<SlotKind>,
    /// Slot `s` of kind `Bits` is bit `s % 64` of group `s / 64`.
    groups: Vec<Group>,
    /// The members of slots of kind `Entries`.
    small: Paged<SlotChunk>,
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
        self.kinds.resize(self.slots.len(), SlotKind::Unfilled);
        self.kinds[slot] = SlotKind::Unfilled;
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
            kinds: vec![SlotKind::Unfilled; slots.len()],
            groups: (0..slots.len().div_ceil(64))
                .map(|_| Group::default())
                .collect(),
            small: Paged::default(),
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
            self.kinds[slot] = SlotKind::Unfilled;
        }
    }

    /// Records users entering and leaving the segment in `slot`.
    ///
    /// A slot's first members choose its representation: entries when they are small next to
    /// the ids they span, bits otherwise (a segment that grows later keeps its choice, which
    /// costs memory or time, never answers).
    pub fn update(&mut self, slot: usize, entered: &Bitmap, left: &Bitmap) {
        if self.kinds[slot] == SlotKind::Unfilled && !entered.is_empty() {
            let span = entered.max().map_or(0, |max| u64::from(max) + 1);
            let small = entered.len().saturating_mul(SMALL_SHARE) <= span;
            self.kinds[slot] = if small {
                SlotKind::Entries
            } else {
                SlotKind::Bits
            };
        }
        match self.kinds[slot] {
            SlotKind::Unfilled => {}
            SlotKind::Bits => {
                let group = &mut self.groups[slot / 64];
                let bit = (slot % 64) as u32;
                group.update(left, bit, false);
                group.update(entered, bit, true);
            }
            SlotKind::Entries => {
                for (ids, on) in [(left, false), (entered, true)] {
                    for_each_run(ids, |at, run| {
                        if let Some(chunk) = self.small.chunk_mut(at, SlotChunk::default, on) {
                            chunk.update(run, slot as u32, on);
                        }
                    });
                }
            }
        }
    }

    /// Heap bytes of the index (chunks an older version shares are counted in full).
    pub fn heap_bytes(&self) -> usize {
        let bits: usize = self
            .groups
            .iter()
            .map(|group| group.heap_bytes(Chunk::heap_bytes))
            .sum();
        bits + self.small.heap_bytes(|chunk| chunk.entries.capacity() * 8)
    }

    /// The ids of the segments containing `id`, unsorted.
    pub fn segments_of(&self, id: DenseId) -> impl Iterator<Item = &str> {
        let in_bits = self.groups.iter().enumerate().flat_map(move |(g, group)| {
            let mut word = group.word(id);
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                Some(g * 64 + bit)
            })
        });
        let offset = (id as usize & (CHUNK_LEN - 1)) as u16;
        let in_entries = self
            .small
            .chunk(id)
            .into_iter()
            .flat_map(move |chunk| chunk.slots_of(offset));
        in_bits
            .chain(in_entries)
            .filter_map(|slot| self.slots.get(slot).and_then(|s| s.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Entries and exits in any order, dense runs and scattered users, match a plain set
        /// of (user, slot) pairs, across sparse chunks becoming dense, and old versions keep
        /// what they saw.
        #[test]
        fn sparse_and_dense_chunks_match_a_set_of_pairs(
            steps in proptest::collection::vec(
                (0usize..70, any::<bool>(), 0u32..3_000, 1u32..40, 1usize..400), 1..40),
        ) {
            let mut index = MembershipIndex::default();
            for i in 0..70 {
                index.add_segment(&format!("s{i}"));
            }
            let mut model: BTreeSet<(u32, usize)> = BTreeSet::new();
            let mut versions = Vec::new();
            for (slot, on, start, stride, count) in steps {
                let ids: Bitmap = (0..count as u32).map(|k| start + k * stride).collect();
                let none = Bitmap::new();
                if on {
                    index.update(slot, &ids, &none);
                    model.extend(ids.iter().map(|id| (id, slot)));
                } else {
                    index.update(slot, &none, &ids);
                    ids.iter().for_each(|id| { model.remove(&(id, slot)); });
                }
                versions.push((index.clone(), model.clone()));
            }
            for (version, expected) in &versions {
                for id in (0..20_000u32).step_by(7) {
                    let mut got: Vec<&str> = version.segments_of(id).collect();
                    got.sort_unstable();
                    let mut want: Vec<String> = expected
                        .range((id, 0)..(id + 1, 0))
                        .map(|(_, slot)| format!("s{slot}"))
                        .collect();
                    want.sort_unstable();
                    prop_assert_eq!(got, want, "user {}", id);
                }
            }
        }
    }

    #[test]
    fn scattered_members_cost_their_entries_not_whole_chunks() {
        let mut index = MembershipIndex::default();
        for i in 0..64 {
            index.add_segment(&format!("s{i}"));
        }
        // 64 segments of 1,000 users each, one user per chunk.
        for slot in 0..64 {
            let ids: Bitmap = (0..1_000u32).map(|k| k * 4_099 + slot as u32).collect();
            index.update(slot, &ids, &Bitmap::new());
        }
        // Dense chunks would take 64,000 × 8 KiB = 500 MiB.
        assert!(
            index.heap_bytes() < 20 << 20,
            "{} bytes",
            index.heap_bytes()
        );
        assert_eq!(
            index.segments_of(4_099 * 3 + 5).collect::<Vec<_>>(),
            vec!["s5"]
        );
    }

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
