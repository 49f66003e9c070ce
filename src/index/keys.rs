//! External user ids ↔ dense `u32` ids, with no heap allocation per user.
//!
//! Keys live back to back in arena chunks (id → key); the reverse map is a set of hash tables
//! that store only the 4-byte dense id and compare against the arena. Both are split into
//! shared chunks so that a writer copies only what it touches (see [`super::chunked`]).

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

/// A dense, per-dataset user id. Never leaves the service.
pub type DenseId = u32;

/// Keys per arena chunk.
const KEYS_PER_CHUNK: usize = 1 << 16;
/// Reverse-map shards: a write batch copies only the shards it touches.
const SHARD_BITS: u32 = 8;

/// The longest external id accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("user id is empty")]
    Empty,
    #[error("user id is {0} bytes long, more than {MAX_KEY_BYTES}")]
    TooLong(usize),
    #[error("the dataset is full: {0} user ids have been assigned")]
    Exhausted(u64),
    #[error("user id '{0}' is stored twice")]
    Duplicate(String),
}

/// Checks an external id before it is used anywhere.
///
/// # Errors
/// Empty or over-long ids.
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(key.len()));
    }
    Ok(())
}

/// Keys `KEYS_PER_CHUNK * n .. KEYS_PER_CHUNK * (n + 1)` stored back to back.
#[derive(Debug, Clone, Default)]
struct KeyChunk {
    /// The concatenated key bytes.
    bytes: Vec<u8>,
    /// End offset of each key in `bytes`.
    ends: Vec<u32>,
}

impl KeyChunk {
    fn bytes_of(&self, index: usize) -> Option<&[u8]> {
        let end = *self.ends.get(index)? as usize;
        let start = if index == 0 {
            0
        } else {
            self.ends[index - 1] as usize
        };
        self.bytes.get(start..end)
    }

    fn key(&self, index: usize) -> Option<&str> {
        // Keys enter only as `&str`, so every stored range is valid UTF-8.
        std::str::from_utf8(self.bytes_of(index)?).ok()
    }
}

/// The two-way map of one dataset.
#[derive(Debug, Clone)]
pub struct KeyDictionary {
    /// id → key, in assignment order. Deleted ids keep their bytes until compaction.
    chunks: Vec<Arc<KeyChunk>>,
    /// key → id, sharded by the hash's top bits.
    shards: Vec<Arc<HashTable<DenseId>>>,
    /// One hasher for every shard, fixed for the dictionary's life.
    hasher: DefaultHashBuilder,
    /// Ids assigned so far (live or deleted); the next id to assign.
    assigned: u64,
    /// Keys currently mapped.
    mapped: usize,
}

impl Default for KeyDictionary {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            shards: (0..1 << SHARD_BITS)
                .map(|_| Arc::new(HashTable::new()))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            assigned: 0,
            mapped: 0,
        }
    }
}

impl KeyDictionary {
    /// The dense id of a live key.
    pub fn lookup(&self, key: &str) -> Option<DenseId> {
        let hash = self.hasher.hash_one(key.as_bytes());
        self.shards[Self::shard(hash)]
            .find(hash, |&id| self.key_bytes(id) == Some(key.as_bytes()))
            .copied()
    }

    /// The key an id was assigned to (also for deleted ids: check liveness first).
    pub fn key(&self, id: DenseId) -> Option<&str> {
        let index = id as usize;
        self.chunks
            .get(index / KEYS_PER_CHUNK)?
            .key(index % KEYS_PER_CHUNK)
    }

    /// The id of `key`, assigning the next one when it is new. Returns `(id, created)`.
    ///
    /// # Errors
    /// An invalid key, or every `u32` already assigned.
    pub fn get_or_insert(&mut self, key: &str) -> Result<(DenseId, bool), KeyError> {
        validate_key(key)?;
        let hash = self.hasher.hash_one(key.as_bytes());
        let shard = Self::shard(hash);
        if let Some(&id) =
            self.shards[shard].find(hash, |&id| self.key_bytes(id) == Some(key.as_bytes()))
        {
            return Ok((id, false));
        }
        let id =
            DenseId::try_from(self.assigned).map_err(|_| KeyError::Exhausted(self.assigned))?;
        self.append(key);
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        Arc::make_mut(&mut self.shards[shard]).insert_unique(hash, id, |&other| {
            hasher.hash_one(chunk_bytes(chunks, other).unwrap_or_default())
        });
        self.mapped += 1;
        Ok((id, true))
    }

    /// A dictionary with one slot per dense id, in id order: `Some(key)` for a live user,
    /// `None` for a deleted id (whose bytes are not kept), so that every id stays what it was.
    ///
    /// # Errors
    /// An invalid or repeated key.
    pub fn restore<'a>(
        slots: impl IntoIterator<Item = Option<&'a str>>,
        live: usize,
    ) -> Result<Self, KeyError> {
        let mut keys = Self::default();
        keys.reserve(live);
        for slot in slots {
            match slot {
                Some(key) => {
                    if !keys.get_or_insert(key)?.1 {
                        return Err(KeyError::Duplicate(key.to_owned()));
                    }
                }
                None => keys.append(""),
            }
        }
        Ok(keys)
    }

    /// Forgets a key so that it can come back later as a new user. Returns its old id.
    pub fn remove(&mut self, key: &str) -> Option<DenseId> {
        let hash = self.hasher.hash_one(key.as_bytes());
        let shard = Self::shard(hash);
        let id = self.lookup(key)?;
        let table = Arc::make_mut(&mut self.shards[shard]);
        if let Ok(entry) = table.find_entry(hash, |&other| other == id) {
            entry.remove();
            self.mapped -= 1;
        }
        Some(id)
    }

    /// Makes room for `additional` new keys, so a bulk load of known size never rehashes.
    pub fn reserve(&mut self, additional: usize) {
        let per_shard = additional / self.shards.len() + additional / self.shards.len() / 8 + 1;
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        for shard in &mut self.shards {
            Arc::make_mut(shard).reserve(per_shard, |&other| {
                hasher.hash_one(chunk_bytes(chunks, other).unwrap_or_default())
            });
        }
    }

    /// Ids assigned so far; every dense id is below this.
    pub fn id_bound(&self) -> u64 {
        self.assigned
    }

    /// Keys currently mapped (live users).
    pub fn len(&self) -> usize {
        self.mapped
    }

    /// True when no key is mapped.
    pub fn is_empty(&self) -> bool {
        self.mapped == 0
    }

    /// Heap bytes held by the arena and the tables.
    pub fn heap_bytes(&self) -> usize {
        let arena: usize = self
            .chunks
            .iter()
            .map(|c| c.bytes.capacity() + c.ends.capacity() * 4)
            .sum();
        // A hashbrown slot is the value plus one control byte.
        let tables: usize = self.shards.iter().map(|t| t.capacity() * 5).sum();
        arena + tables
    }

    fn append(&mut self, key: &str) {
        let index = self.assigned as usize;
        if index.is_multiple_of(KEYS_PER_CHUNK) {
            self.chunks.push(Arc::new(KeyChunk::default()));
        }
        let chunk = Arc::make_mut(self.chunks.last_mut().expect("a chunk was just ensured"));
        chunk.bytes.extend_from_slice(key.as_bytes());
        // Chunk byte offsets fit u32: 64 Ki keys of at most MAX_KEY_BYTES each.
        chunk.ends.push(chunk.bytes.len() as u32);
        self.assigned += 1;
    }

    /// The stored bytes of an id, compared while probing without re-validating UTF-8.
    fn key_bytes(&self, id: DenseId) -> Option<&[u8]> {
        chunk_bytes(&self.chunks, id)
    }

    /// The shard of a hash, from middle bits: hashbrown takes a slot from the low bits and its
    /// 7-bit tag from the top bits, and a shard whose keys all shared either would probe badly.
    fn shard(hash: u64) -> usize {
        ((hash >> 40) & ((1 << SHARD_BITS) - 1)) as usize
    }
}

fn chunk_bytes(chunks: &[Arc<KeyChunk>], id: DenseId) -> Option<&[u8]> {
    let index = id as usize;
    chunks
        .get(index / KEYS_PER_CHUNK)?
        .bytes_of(index % KEYS_PER_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_dense_ids_and_maps_both_ways() {
        let mut keys = KeyDictionary::default();
        for i in 0..200_000u32 {
            let (id, created) = keys.get_or_insert(&format!("user-{i}")).unwrap();
            assert_eq!((id, created), (i, true));
        }
        assert_eq!(keys.get_or_insert("user-7").unwrap(), (7, false));
        assert_eq!(keys.lookup("user-199999"), Some(199_999));
        assert_eq!(keys.key(70_000), Some("user-70000"));
        assert_eq!(keys.lookup("nobody"), None);
        assert_eq!(keys.len(), 200_000);
    }

    #[test]
    fn removed_key_comes_back_as_new_id() {
        let mut keys = KeyDictionary::default();
        keys.get_or_insert("a").unwrap();
        keys.get_or_insert("b").unwrap();
        let snapshot = keys.clone();
        assert_eq!(keys.remove("a"), Some(0));
        assert_eq!(keys.lookup("a"), None);
        assert_eq!(snapshot.lookup("a"), Some(0));
        assert_eq!(keys.get_or_insert("a").unwrap(), (2, true));
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn rejects_bad_keys() {
        let mut keys = KeyDictionary::default();
        assert_eq!(keys.get_or_insert(""), Err(KeyError::Empty));
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(keys.get_or_insert(&long), Err(KeyError::TooLong(513)));
        assert_eq!(keys.get_or_insert("é✓").unwrap(), (0, true));
    }
}
