//! The in-memory index of one dataset: keys, attribute columns and bitmaps.
//!
//! Everything here is a value type that clones shallowly (chunks and bitmaps behind `Arc`), so
//! the engine can publish immutable snapshots and let a writer copy only what it changes.

pub mod attribute;
pub mod bitmap;
pub mod chunked;
pub mod dictionary;
pub mod events;
pub mod keys;
pub mod layered;
pub mod membership;
pub mod numeric;

pub use attribute::{Attribute, AttributeKind};
pub use bitmap::Bitmap;
pub use keys::{DenseId, KeyDictionary};
