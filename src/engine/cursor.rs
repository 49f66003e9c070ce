//! Member listings that page through one snapshot: the first page computes the members once,
//! later pages read the same set, so a listing neither skips nor repeats users while writes go on.
//!
//! A page token names the listing and how many members were already returned (a rank, not an
//! internal id), and carries an HMAC-SHA256 tag under a key drawn at random when the process
//! starts, over the dataset too: a token cannot be forged, altered or used on another dataset,
//! and tokens of a previous process are refused.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;

use super::error::{EngineError, Result};
use super::query::Audience;
use super::state::DatasetState;
use crate::index::keys::DenseId;
use crate::index::Bitmap;

/// One page of external ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub user_ids: Vec<String>,
    /// Empty when the listing is complete.
    pub next_token: String,
    pub total: u64,
}

/// An open listing.
pub struct Listing {
    /// The dataset's checked name: a token is good for this dataset only.
    dataset: String,
    /// What is listed: a later page that names an audience must name this one.
    audience: Audience,
    state: Arc<DatasetState>,
    members: Arc<Bitmap>,
    last_used: Instant,
}

impl Listing {
    pub fn new(
        dataset: &str,
        audience: &Audience,
        state: Arc<DatasetState>,
        members: Arc<Bitmap>,
    ) -> Self {
        Self {
            dataset: dataset.to_owned(),
            audience: audience.clone(),
            state,
            members,
            last_used: Instant::now(),
        }
    }
}

/// Open listings by id, bounded in number and age.
pub struct CursorCache {
    listings: Mutex<HashMap<u64, Listing>>,
    max_open: usize,
    ttl: Duration,
    /// Makes listing ids unguessable across restarts.
    ids: std::collections::hash_map::RandomState,
    counter: std::sync::atomic::AtomicU64,
    /// Signs page tokens; drawn per process, so tokens do not outlive it.
    key: hmac::Key,
}

impl std::fmt::Debug for CursorCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorCache")
            .field("max_open", &self.max_open)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CursorCache {
    pub fn new(max_open: usize, ttl_secs: u64) -> Self {
        Self {
            listings: Mutex::new(HashMap::new()),
            max_open: max_open.max(1),
            ttl: Duration::from_secs(ttl_secs),
            ids: std::collections::hash_map::RandomState::new(),
            counter: std::sync::atomic::AtomicU64::new(0),
            key: random_key(),
        }
    }

    /// Listings kept for their next page (expired ones until the next sweep).
    pub fn open(&self) -> usize {
        self.listings.lock().map_or(0, |listings| listings.len())
    }

    /// The first page; keeps the listing open when there is more.
    pub fn first_page(&self, listing: Listing, size: usize) -> Page {
        let (user_ids, next) = page_from(&listing.state, &listing.members, 0, size);
        let total = listing.members.len();
        let next_token = match next {
            Some(next) => {
                let id = self.ids.hash_one(
                    self.counter
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                );
                let token = self.encode(&listing.dataset, id, next);
                self.store(id, listing);
                token
            }
            None => String::new(),
        };
        Page {
            user_ids,
            next_token,
            total,
        }
    }

    /// The page after a token of `dataset` (and of `audience`, when the caller names it).
    ///
    /// # Errors
    /// A forged or altered token, or one of another dataset or audience
    /// ([`EngineError::InvalidArgument`]); an unknown or expired listing
    /// ([`EngineError::InvalidPageToken`]).
    pub fn next_page(
        &self,
        dataset: &str,
        audience: Option<&Audience>,
        token: &str,
        size: usize,
    ) -> Result<Page> {
        let (id, offset) = self.decode(dataset, token)?;
        let (state, members) = {
            let mut listings = self
                .listings
                .lock()
                .map_err(|_| EngineError::Internal("cursor lock poisoned".into()))?;
            let listing = listings.get_mut(&id).ok_or(EngineError::InvalidPageToken)?;
            if listing.last_used.elapsed() > self.ttl {
                listings.remove(&id);
                return Err(EngineError::InvalidPageToken);
            }
            if listing.dataset != dataset || audience.is_some_and(|a| *a != listing.audience) {
                return Err(mismatch("the token is of a listing of another audience"));
            }
            listing.last_used = Instant::now();
            (listing.state.clone(), listing.members.clone())
        };
        let (user_ids, next) = page_from(&state, &members, offset, size);
        let next_token = match next {
            Some(next) => self.encode(dataset, id, next),
            None => {
                if let Ok(mut listings) = self.listings.lock() {
                    listings.remove(&id);
                }
                String::new()
            }
        };
        Ok(Page {
            user_ids,
            next_token,
            total: members.len(),
        })
    }

    /// `listing id | offset | tag`, in hex; the tag covers the dataset as well.
    fn encode(&self, dataset: &str, id: u64, offset: u64) -> String {
        let tag = hmac::sign(&self.key, &signed(dataset, id, offset));
        let tag = &tag.as_ref()[..TAG_BYTES];
        let mut token = format!("{id:016x}{offset:016x}");
        token.extend(tag.iter().map(|b| format!("{b:02x}")));
        token
    }

    /// The listing id and offset of a token this process signed for `dataset`.
    fn decode(&self, dataset: &str, token: &str) -> Result<(u64, u64)> {
        let malformed = || mismatch("not a page token of this server");
        if token.len() != 32 + 2 * TAG_BYTES || !token.is_ascii() {
            return Err(malformed());
        }
        let id = u64::from_str_radix(&token[..16], 16).map_err(|_| malformed())?;
        let offset = u64::from_str_radix(&token[16..32], 16).map_err(|_| malformed())?;
        // The whole token compared in constant time with the one this process would issue.
        let expected = self.encode(dataset, id, offset);
        let same: bool =
            subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), token.as_bytes()).into();
        if !same {
            return Err(mismatch(
                "the token was altered, or is of another dataset or server process",
            ));
        }
        Ok((id, offset))
    }

    fn store(&self, id: u64, listing: Listing) {
        let Ok(mut listings) = self.listings.lock() else {
            return;
        };
        let ttl = self.ttl;
        listings.retain(|_, l| l.last_used.elapsed() <= ttl);
        if listings.len() >= self.max_open {
            if let Some(oldest) = listings
                .iter()
                .min_by_key(|(_, l)| l.last_used)
                .map(|(id, _)| *id)
            {
                listings.remove(&oldest);
            }
        }
        listings.insert(id, listing);
    }
}

/// Bytes of the HMAC-SHA256 tag kept in a token: 128 bits cannot be guessed.
const TAG_BYTES: usize = 16;

/// What a token's tag covers.
fn signed(dataset: &str, id: u64, offset: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(dataset.len() + 24);
    bytes.extend_from_slice(&(dataset.len() as u64).to_be_bytes());
    bytes.extend_from_slice(dataset.as_bytes());
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes
}

fn mismatch(reason: &str) -> EngineError {
    EngineError::InvalidArgument {
        field: "page_token",
        reason: reason.to_owned(),
    }
}

/// A random signing key from the system's generator. Should that ever fail, the key comes
/// from the standard library's per-process random hash keys, seeded by the system too.
fn random_key() -> hmac::Key {
    let rng = ring::rand::SystemRandom::new();
    hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
        let bytes: Vec<u8> = (0..4u64)
            .flat_map(|i| {
                std::collections::hash_map::RandomState::new()
                    .hash_one(i)
                    .to_le_bytes()
            })
            .collect();
        hmac::Key::new(hmac::HMAC_SHA256, &bytes)
    })
}

/// Up to `size` members from rank `offset` on, and the rank of the next page when more remain.
fn page_from(
    state: &DatasetState,
    members: &Bitmap,
    offset: u64,
    size: usize,
) -> (Vec<String>, Option<u64>) {
    let first = u32::try_from(offset)
        .ok()
        .and_then(|rank| members.select(rank));
    let Some(first) = first else {
        return (Vec::new(), None);
    };
    let mut iter = members.iter();
    iter.advance_to(first);
    let ids: Vec<DenseId> = iter.by_ref().take(size).collect();
    let more = iter.next().is_some();
    let next = more.then(|| offset + ids.len() as u64);
    (state.external_ids(ids), next)
}
