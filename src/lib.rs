//! `audience`: audience segmentation for performance marketing, over roaring bitmaps and
//! Arrow-layout columns, served over gRPC.
//!
//! Ad-tech systems ask "how many users match this definition?", "who are they?" and, at bid
//! time, "which of my segments is this user in?". This crate answers from an in-memory index:
//! a bitmap per attribute value, value-bucketed bitmaps for numeric ranges, and materialized
//! saved segments kept current on every write.
//!
//! # Layout
//! Each layer knows only the one below it.
//! - [`grpc`]: the tonic services, conversion from and to protobuf, the server builder with
//!   its TLS and bearer-token authentication.
//! - [`engine`]: datasets, versions, the write path, expression binding and evaluation, queries.
//! - [`index`]: bitmaps, chunked columns, the key and value dictionaries.
//! - [`persist`]: the write-ahead log and snapshots, in a local directory or in Redis.
//! - [`expr`]: the expression syntax tree, its text parser and printer.
//! - [`metrics`]: Prometheus metrics on their own port, read from the engine at scrape time.
//! - [`config`], [`cli`], [`demo`]: start-up configuration, the command line, the demo data.

pub mod cli;
pub mod config;
pub mod demo;
pub mod engine;
pub mod expr;
pub mod grpc;
pub mod index;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod rng;
pub mod time;
