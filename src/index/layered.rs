//! A large set that changes a few members at a time: a base shared between versions plus small
//! sets of the ids added and removed since, folded into a new base once they grow.
//!
//! A saved segment holds millions of users and a single-user write changes a handful of its
//! members. Copying the whole roaring bitmap for that (the published version shares it) costs
//! 8 KiB per container, over a megabyte per segment at 10M users, and a write changes hundreds
//! of segments. Here a write copies only the two small deltas; the base is copied when the
//! deltas pass [`fold_limit`] of it, so that the copy is amortized over many writes. Reads that
//! need one bitmap (a plan's operand, an export) get it built once per version and cached.

use std::sync::{Arc, OnceLock};

use super::bitmap::Bitmap;
use super::keys::DenseId;

/// Up to this many ids are handled one by one rather than as sets.
const FEW: u64 = 64;

/// The deltas are folded into the base once they hold more ids than this.
fn fold_limit(base: u64) -> u64 {
    4096 + base / 128
}

/// A set as a shared base, ids added to it and ids removed from it.
///
/// Invariants: `added` and `base` are disjoint, `removed` is a subset of `base`.
#[derive(Debug, Clone, Default)]
pub struct LayeredBitmap {
    base: Arc<Bitmap>,
    added: Arc<Bitmap>,
    removed: Arc<Bitmap>,
    /// `(base - removed) | added`, built at the first read that needs it.
    whole: OnceLock<Arc<Bitmap>>,
}

impl LayeredBitmap {
    /// The set `members`, with no deltas.
    pub fn new(members: Arc<Bitmap>) -> Self {
        Self {
            base: members,
            ..Self::default()
        }
    }

    /// Members.
    pub fn len(&self) -> u64 {
        self.base.len() + self.added.len() - self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: DenseId) -> bool {
        self.added.contains(id) || (self.base.contains(id) && !self.removed.contains(id))
    }

    /// The members among `ids`, without building the whole set when `ids` are few.
    pub fn intersect(&self, ids: &Bitmap) -> Bitmap {
        if let Some(whole) = self.whole.get() {
            return &**whole & ids;
        }
        if ids.len() <= FEW {
            return ids.iter().filter(|&id| self.contains(id)).collect();
        }
        let mut members = &*self.base & ids;
        members -= &*self.removed;
        members |= &*self.added & ids;
        members
    }

    /// The whole set as one bitmap: the base itself when nothing changed since it, otherwise
    /// built once and kept while this version lives.
    pub fn whole(&self) -> Arc<Bitmap> {
        if self.added.is_empty() && self.removed.is_empty() {
            return self.base.clone();
        }
        self.whole
            .get_or_init(|| {
                let mut whole = (*self.base).clone();
                whole -= &*self.removed;
                whole |= &*self.added;
                Arc::new(whole)
            })
            .clone()
    }

    /// Adds `entered` (none of them members) and removes `left` (all of them members).
    pub fn update(&mut self, entered: &Bitmap, left: &Bitmap) {
        if entered.is_empty() && left.is_empty() {
            return;
        }
        self.whole = OnceLock::new();
        let added = Arc::make_mut(&mut self.added);
        let removed = Arc::make_mut(&mut self.removed);
        if entered.len() + left.len() <= FEW {
            // Entering users that were removed from the base are simply not removed any more,
            // and leaving users that were added not added any more.
            for id in entered {
                if !removed.remove(id) {
                    added.insert(id);
                }
            }
            for id in left {
                if !added.remove(id) {
                    removed.insert(id);
                }
            }
        } else {
            let back = entered & &*removed;
            *removed -= &back;
            *added |= entered - &back;
            let undone = left & &*added;
            *added -= &undone;
            *removed |= left - &undone;
        }
        if added.len() + removed.len() > fold_limit(self.base.len()) {
            self.fold();
        }
    }

    /// Makes the deltas part of a new base.
    fn fold(&mut self) {
        let mut base = (*self.base).clone();
        base -= &*self.removed;
        base |= &*self.added;
        *self = Self::new(Arc::new(base));
    }

    /// The ids in the deltas, for tests and memory figures.
    pub fn delta_len(&self) -> u64 {
        self.added.len() + self.removed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Random entries and exits against a plain bitmap, with folds, and versions that must
    /// not see later changes.
    #[test]
    fn follows_a_plain_set_through_updates_and_folds() {
        let mut rng = SplitMix64::new(7);
        let start: Bitmap = (0..50_000u32).filter(|i| i % 3 == 0).collect();
        let mut model = start.clone();
        let mut layered = LayeredBitmap::new(Arc::new(start));
        let mut versions = Vec::new();
        let mut folded = 0;
        for round in 0..400 {
            let touched: Bitmap = (0..1 + rng.below(200))
                .map(|_| rng.below(60_000) as u32)
                .collect();
            let now: Bitmap = touched.iter().filter(|_| rng.below(2) == 0).collect();
            let was = &model & &touched;
            let (entered, left) = (&now - &was, &was - &now);
            let before = layered.delta_len();
            layered.update(&entered, &left);
            if layered.delta_len() < before {
                folded += 1;
            }
            model -= &left;
            model |= &entered;
            assert_eq!(layered.len(), model.len(), "round {round}");
            assert_eq!(*layered.whole(), model, "round {round}");
            assert_eq!(layered.intersect(&touched), &model & &touched);
            for id in touched.iter().take(20) {
                assert_eq!(layered.contains(id), model.contains(id));
            }
            if round % 50 == 0 {
                versions.push((layered.clone(), model.clone()));
            }
        }
        assert!(folded > 0, "the deltas were folded into the base");
        for (version, model) in versions {
            assert_eq!(*version.whole(), model, "an older version is unchanged");
        }
    }

    #[test]
    fn an_unchanged_set_is_its_base() {
        let base = Arc::new(Bitmap::from_iter([1u32, 5, 9]));
        let layered = LayeredBitmap::new(base.clone());
        assert!(Arc::ptr_eq(&layered.whole(), &base));
        assert!(!layered.is_empty());
    }
}
