//! `audience token`: new random bearer tokens and their entries for the token file, and the
//! hash of a token, so that nobody writes a token (only its hash) into the file by hand.

use std::io::{BufRead, Write};

use serde::Serialize;
use serde_json::json;

use super::client::ClientError;
use crate::grpc::auth::tokens::check_entry;
use crate::grpc::auth::{sha256_hex, to_hex, Scope, TokenEntry};

/// Random bytes of a new token (256 bits, as hex).
const TOKEN_BYTES: usize = 32;

/// `token` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a new random token on the first line, then, after a blank line, its `[[token]]`
    /// entry for the token file (which holds only its hash): `| tail -n +3 >> tokens.toml`.
    New {
        /// The name logs show for calls with this token.
        #[arg(long)]
        name: String,
        /// What it may do, comma-separated: read, write, admin, exact.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<Scope>,
        /// Dataset patterns it may touch, comma-separated ("*" is every dataset).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        datasets: Vec<String>,
    },
    /// Print the hex SHA-256 of a token, as the token file's `sha256` holds it. The token is
    /// read from standard input when not given (so that it stays out of the shell history).
    Hash { token: Option<String> },
}

#[derive(Serialize)]
struct TokenFileEntry<'a> {
    token: [&'a TokenEntry; 1],
}

/// Runs a `token` subcommand, printing to standard output.
///
/// # Errors
/// An entry the server would refuse (bad pattern, empty name), or no token to hash.
pub fn run(command: TokenCommand, json: bool) -> Result<(), ClientError> {
    let out = &mut std::io::stdout().lock();
    match command {
        TokenCommand::New {
            name,
            scopes,
            datasets,
        } => {
            let token = random_token()?;
            let entry = TokenEntry {
                name,
                sha256: sha256_hex(&token),
                scopes,
                datasets,
            };
            let text = entry_text(&entry)?;
            if json {
                writeln!(out, "{}", json!({ "token": token, "entry": entry }))?;
            } else {
                writeln!(out, "{token}\n\n{text}")?;
            }
        }
        TokenCommand::Hash { token } => {
            let token = match token {
                Some(token) => token,
                None => read_token()?,
            };
            // As the server reads it from the header and the client sends it: trimmed.
            let token = token.trim();
            if json {
                writeln!(out, "{}", json!({ "sha256": sha256_hex(token) }))?;
            } else {
                writeln!(out, "{}", sha256_hex(token))?;
            }
        }
    }
    Ok(())
}

/// The entry as TOML, checked as the server checks it.
fn entry_text(entry: &TokenEntry) -> Result<String, ClientError> {
    check_entry(entry).map_err(ClientError::Input)?;
    toml::to_string(&TokenFileEntry { token: [entry] })
        .map_err(|e| ClientError::Input(format!("cannot write the entry: {e}")))
}

fn random_token() -> Result<String, ClientError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ClientError::Input("the system's random source failed".into()))?;
    Ok(to_hex(&bytes))
}

/// The first line of standard input, without its line end.
fn read_token() -> Result<String, ClientError> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let token = line.trim_end_matches(['\r', '\n']);
    if token.is_empty() {
        return Err(ClientError::Input(
            "no token: give it as an argument or on standard input".into(),
        ));
    }
    Ok(token.to_owned())
}
