//! The one place that names the bitmap library, so that it can change (roaring ↔ croaring).
//!
//! `roaring` was chosen for its pure-Rust build, its fast `contains` and cardinality (the bid-time
//! lookups) and `MultiOps`, which orders n-ary operations smallest-first and stops on empty.

use roaring::MultiOps;

/// A set of dense user ids.
pub type Bitmap = roaring::RoaringBitmap;

/// The union of many sets in one n-ary pass.
pub fn union_all<'a>(sets: impl IntoIterator<Item = &'a Bitmap>) -> Bitmap {
    sets.into_iter().union()
}

/// The intersection of many sets, smallest first; empty input gives the empty set.
pub fn intersect_all<'a>(sets: impl IntoIterator<Item = &'a Bitmap>) -> Bitmap {
    sets.into_iter().intersection()
}

/// A bitmap holding `0..len`.
pub fn full_range(len: u32) -> Bitmap {
    let mut set = Bitmap::new();
    set.insert_range(0..len);
    set
}

/// Ids per roaring container.
const CONTAINER_WORDS: usize = 1024;
/// The most ids an array container holds; more are stored as a bitmap container.
const ARRAY_LIMIT: u64 = 4096;
/// The portable format's cookie for a bitmap without run containers.
const COOKIE_NO_RUNS: u32 = 12346;

/// The set whose members are the set bits of `words` (bit `i % 64` of word `i / 64` is id `i`).
///
/// Roaring's element-by-element constructors cost ~7 ns an id; writing the portable
/// serialization (sorted `u16`s or the container's words, per 65,536 ids) and reading it back
/// costs about one, which is what turns a bitset built in cache into a bitmap cheaply.
pub fn from_words(words: &[u64]) -> Bitmap {
    let blocks: Vec<(usize, u64)> = words
        .chunks(CONTAINER_WORDS)
        .enumerate()
        .map(|(key, chunk)| (key, chunk.iter().map(|w| u64::from(w.count_ones())).sum()))
        .filter(|&(_, card)| card > 0)
        .collect();
    let size = |card: u64| {
        if card <= ARRAY_LIMIT {
            2 * card as usize
        } else {
            8 * CONTAINER_WORDS
        }
    };
    let header = 8 + 8 * blocks.len();
    let total = header + blocks.iter().map(|&(_, c)| size(c)).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&COOKIE_NO_RUNS.to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for &(key, card) in &blocks {
        out.extend_from_slice(&(key as u16).to_le_bytes());
        out.extend_from_slice(&((card - 1) as u16).to_le_bytes());
    }
    let mut offset = header;
    for &(_, card) in &blocks {
        out.extend_from_slice(&(offset as u32).to_le_bytes());
        offset += size(card);
    }
    for &(key, card) in &blocks {
        let start = key * CONTAINER_WORDS;
        let chunk = &words[start..(start + CONTAINER_WORDS).min(words.len())];
        if card <= ARRAY_LIMIT {
            for (index, &word) in chunk.iter().enumerate() {
                let mut rest = word;
                while rest != 0 {
                    let low = (index as u32) * 64 + rest.trailing_zeros();
                    out.extend_from_slice(&(low as u16).to_le_bytes());
                    rest &= rest - 1;
                }
            }
        } else {
            for index in 0..CONTAINER_WORDS {
                let word = chunk.get(index).copied().unwrap_or(0);
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }
    Bitmap::deserialize_unchecked_from(&out[..]).unwrap_or_else(|_| {
        // Unreachable for the format written above; the slow path gives the same set.
        let ids = words.iter().enumerate().flat_map(|(index, &word)| {
            (0..64u32)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| (index as u32) * 64 + bit)
        });
        Bitmap::from_sorted_iter(ids).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn words_give_the_set_of_their_bits(
            ids in proptest::collection::btree_set(0u32..300_000, 0..6000),
            dense in 0u32..4,
        ) {
            // Some runs dense enough for bitmap containers.
            let mut ids = ids;
            ids.extend((0..5000 * dense).map(|i| 70_000 + i));
            let bound = ids.iter().max().map_or(0, |&m| m as usize + 1);
            let mut words = vec![0u64; bound.div_ceil(64)];
            for &id in &ids {
                words[(id / 64) as usize] |= 1 << (id % 64);
            }
            let expected: Bitmap = ids.iter().copied().collect();
            proptest::prop_assert_eq!(from_words(&words), expected);
        }
    }
}
