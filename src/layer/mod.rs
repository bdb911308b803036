//! Per-layer index: one streaming pass over a layer tar turns its headers into [`Entry`]s,
//! whiteouts and opaque markers, and records where each file's bytes lie. No file data is kept.

pub mod index;
pub mod path;
pub mod sparse;
pub mod tar;

pub use index::{Entry, Kind, LayerIndex, Meta, index_layer};
pub use sparse::Segment;
