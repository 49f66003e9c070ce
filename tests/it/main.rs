//! The integration test binary: the real server on port 0, driven over gRPC and through the CLI,
//! and property tests of the engine against an independent row-by-row model.

mod cache;
mod cli;
mod coalesce;
mod crash;
mod durability;
mod graceful;
mod grpc_errors;
mod grpc_events;
mod grpc_ingest;
mod grpc_queries;
mod grpc_segments;
mod grpc_watch;
mod harness;
mod metrics;
mod model;
mod process;
mod properties;
mod properties_events;
mod replicas;
mod security;
mod settings;
mod wrong_answers;
