//! Member listings that page through one snapshot: the first page computes the members once,
//! later pages read the same set, so a listing neither skips nor repeats users while writes go on.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{EngineError, Result};
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
struct Listing {
    state: Arc<DatasetState>,
    members: Arc<Bitmap>,
    last_used: Instant,
}

/// Open listings by id, bounded in number and age.
pub struct CursorCache {
    listings: Mutex<HashMap<u64, Listing>>,
    max_open: usize,
    ttl: Duration,
    /// Makes listing ids unguessable across restarts.
    ids: std::collections::hash_map::RandomState,
    counter: std::sync::atomic::AtomicU64,
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
        }
    }

    /// Listings kept for their next page (expired ones until the next sweep).
    pub fn open(&self) -> usize {
        self.listings.lock().map_or(0, |listings| listings.len())
    }

    /// The first page; keeps the listing open when there is more.
    pub fn first_page(&self, state: Arc<DatasetState>, members: Arc<Bitmap>, size: usize) -> Page {
        let (user_ids, last) = page_from(&state, &members, None, size);
        let total = members.len();
        let next_token = match last {
            Some(last) => {
                let id = self.ids.hash_one(
                    self.counter
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                );
                self.store(
                    id,
                    Listing {
                        state,
                        members,
                        last_used: Instant::now(),
                    },
                );
                encode(id, last)
            }
            None => String::new(),
        };
        Page {
            user_ids,
            next_token,
            total,
        }
    }

    /// The page after a token.
    ///
    /// # Errors
    /// A malformed, unknown or expired token.
    pub fn next_page(&self, token: &str, size: usize) -> Result<Page> {
        let (id, after) = decode(token).ok_or(EngineError::InvalidPageToken)?;
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
            listing.last_used = Instant::now();
            (listing.state.clone(), listing.members.clone())
        };
        let (user_ids, last) = page_from(&state, &members, Some(after), size);
        let next_token = match last {
            Some(last) => encode(id, last),
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

/// Up to `size` members after `after`, and the last one when more remain.
fn page_from(
    state: &DatasetState,
    members: &Bitmap,
    after: Option<DenseId>,
    size: usize,
) -> (Vec<String>, Option<DenseId>) {
    let mut iter = members.iter();
    if let Some(after) = after {
        match after.checked_add(1) {
            Some(next) => iter.advance_to(next),
            None => return (Vec::new(), None),
        }
    }
    let ids: Vec<DenseId> = iter.by_ref().take(size).collect();
    let more = iter.next().is_some();
    let last = ids.last().copied().filter(|_| more);
    (state.external_ids(ids), last)
}

/// The listing's own mask for the position in a token: internal ids never leave the service.
fn mask(id: u64) -> u32 {
    (crate::rng::SplitMix64::new(id).next_u64() >> 32) as u32
}

fn encode(id: u64, last: DenseId) -> String {
    format!("{id:016x}{:08x}", last ^ mask(id))
}

fn decode(token: &str) -> Option<(u64, DenseId)> {
    if token.len() != 24 || !token.is_ascii() {
        return None;
    }
    let id = u64::from_str_radix(&token[..16], 16).ok()?;
    let last = u32::from_str_radix(&token[16..], 16).ok()?;
    Some((id, last ^ mask(id)))
}
