//! The `audience` command line: `serve` runs the server; every other subcommand is a client of
//! a running server (`--addr`), printing plain, scriptable lines or `--json`.

mod bench;
mod client;
pub mod connect;
mod health;
mod serve;
mod settings;
mod token;

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

pub use client::ClientError;

/// Audience segmentation over gRPC.
#[derive(Debug, Parser)]
#[command(name = "audience", version, about)]
pub struct Cli {
    /// The server to talk to.
    #[arg(
        long,
        global = true,
        env = "AUDIENCE_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// Print JSON instead of plain lines.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub connect: connect::ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
    /// The client-only flags given on the command line, each with what the server uses
    /// instead: `serve` refuses them rather than accept and ignore them.
    #[arg(skip)]
    pub client_flags: Vec<(&'static str, &'static str)>,
}

/// Global flags that only client commands read: (argument id, flag, what `serve` has instead).
const CLIENT_ONLY_FLAGS: [(&str, &str, &str); 2] = [
    ("addr", "--addr", ": the server listens on --listen"),
    (
        "json",
        "--json",
        ": the server logs JSON with --log-format json",
    ),
];

impl Cli {
    /// Parses the process's arguments as [`Parser::parse`] does (usage errors exit), noting
    /// which client-only flags were given on the command line.
    pub fn from_command_line() -> Self {
        Self::from_matches(&Self::command().get_matches()).unwrap_or_else(|e| e.exit())
    }

    fn from_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut cli = Self::from_arg_matches(matches)?;
        cli.client_flags = CLIENT_ONLY_FLAGS
            .iter()
            .filter(|(id, _, _)| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|&(_, flag, instead)| (flag, instead))
            .collect();
        Ok(cli)
    }
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<serve::ServeArgs>),
    /// Import a .parquet or .arrow file of users, or of events (`user_id`, `event`, `ts`,
    /// optional `value`), into a dataset.
    Import {
        kind: ImportKind,
        file: PathBuf,
        #[arg(long, default_value = "default")]
        dataset: String,
        /// The column holding user ids (users imports only).
        #[arg(long, default_value = "user_id")]
        id_column: String,
        /// Let the server read FILE from its own file system instead of streaming it.
        #[arg(long)]
        server_side: bool,
    },
    /// Print the number of users matching an expression.
    Count {
        expr: String,
        #[arg(long, default_value = "default")]
        dataset: String,
        /// RFC 3339 time that anchors NOW (default: the server clock).
        #[arg(long)]
        as_of: Option<String>,
        /// Break the count down by this attribute's values.
        #[arg(long)]
        by: Option<String>,
        /// Values in the breakdown.
        #[arg(long, default_value_t = 20)]
        top: u32,
    },
    /// Print matching external user ids, one per line.
    Members {
        expr: String,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long, default_value = "default")]
        dataset: String,
        #[arg(long)]
        as_of: Option<String>,
    },
    /// Manage saved segments.
    #[command(subcommand)]
    Segment(SegmentCommand),
    /// Print the saved segments containing a user.
    SegmentsFor {
        user_id: String,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// Describe a dataset's attributes.
    Schema {
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// Print users entering and leaving saved segments as it happens, one line per change
    /// (`entered|left<TAB>segment<TAB>user_id`); reconnects by itself when it falls behind.
    Watch {
        #[arg(required = true, value_name = "SEGMENT_ID")]
        segment_ids: Vec<String>,
        #[arg(long, default_value = "default")]
        dataset: String,
        /// Continue after the change that printed this token (`--json` prints them).
        #[arg(long)]
        resume: Option<String>,
    },
    /// Load a running server and print throughput, errors by gRPC code and latency
    /// percentiles (p50 to p99.9 and max), per operation.
    ///
    /// Closed loop by default (--concurrency workers back to back); open loop with --rate
    /// (a fixed schedule, latency counted from each scheduled send). Runs for --duration
    /// (default 10s) or --requests; --json prints one object.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make a bearer token for the server's token file (--auth-file), or hash one.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Ask the server's `grpc.health.v1` whether it is SERVING (for probes and container
    /// health checks): prints the status and exits 0 only when SERVING, 1 otherwise
    /// (NOT_SERVING while loading, unreachable, or no answer within --timeout-secs).
    Health {
        /// The service to ask about; empty is the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the connection and the answer.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_secs: u64,
    },
    /// Write a snapshot of the server's data now (showing progress) and free the log it
    /// covers; the server must run with --data-dir or --redis-url.
    Snapshot {
        /// Write only this dataset afresh, carrying the others over (frees no log).
        #[arg(long)]
        dataset: Option<String>,
    },
}

/// What an import file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportKind {
    Users,
    Events,
}

/// Saved-segment subcommands.
#[derive(Debug, Subcommand)]
pub enum SegmentCommand {
    /// Create a segment from an expression.
    Create {
        id: String,
        expr: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A label as key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// Show one segment.
    Get {
        id: String,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// List segments, optionally only those with a label.
    List {
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// Change a segment's expression, name, description or labels.
    Update {
        id: String,
        #[arg(long)]
        expr: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
    /// Delete a segment.
    Delete {
        id: String,
        #[arg(long, default_value = "default")]
        dataset: String,
    },
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever stopped the command, to be printed by `main`.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    match cli.command {
        Command::Serve(args) => serve::run(*args, cli.connect, &cli.client_flags)
            .await
            .map_err(ClientError::Serve),
        Command::Bench(command) => bench::run(&cli.addr, &cli.connect, cli.json, command).await,
        Command::Token(command) => token::run(command, cli.json),
        Command::Health {
            service,
            timeout_secs,
        } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            health::run(&cli.addr, &cli.connect, cli.json, service, timeout).await
        }
        command => client::run(&cli.addr, &cli.connect, cli.json, command).await,
    }
}
