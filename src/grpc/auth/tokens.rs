//! The token file (`auth_file`): named bearer tokens, stored as SHA-256 hashes only, each with
//! its scopes and the datasets it may touch.
//!
//! ```toml
//! [[token]]
//! name = "bidder"                      # shown in logs, never the token
//! sha256 = "<hex sha256 of the token>"
//! scopes = ["read"]                    # read | write | admin | exact
//! datasets = ["ads-*"]                 # glob patterns; "*" is every dataset
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::grpc::reload::Source;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Queries, schema, watch.
    Read,
    /// Ingest and segment changes.
    Write,
    /// Retention, declarations, snapshots, server-side file imports.
    Admin,
    /// Figures below the privacy floor. The floor is not built yet, so every count is exact
    /// today and this scope gates nothing; tokens may carry it ahead of the floor.
    Exact,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
            Scope::Exact => "exact",
        }
    }
}

/// One `[[token]]` of the file, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it: the name logs and request spans show.
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    pub scopes: Vec<Scope>,
    /// Glob patterns of dataset names (`ads-*`); `*` alone is every dataset.
    pub datasets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFileText {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A token the file accepts: what its holder may do.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    sha256: [u8; 32],
    scopes: Vec<Scope>,
    datasets: Vec<glob::Pattern>,
}

impl Grant {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether one of the token's patterns matches the dataset's name.
    pub fn covers(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|pattern| pattern.matches(dataset))
    }

    /// Whether the token may touch every dataset, present and future (a `*` pattern): what a
    /// call about all datasets at once needs.
    pub fn covers_every_dataset(&self) -> bool {
        self.datasets.iter().any(|pattern| pattern.as_str() == "*")
    }
}

/// The accepted tokens.
#[derive(Debug, Default)]
pub struct Tokens {
    grants: Vec<Arc<Grant>>,
}

impl Tokens {
    /// The grant of `token`, if the file holds its hash. Every hash is compared, in constant
    /// time, so that timing tells nothing about which bytes matched.
    pub fn find(&self, token: &str) -> Option<Arc<Grant>> {
        let presented = sha256(token.as_bytes());
        let mut found = None;
        for grant in &self.grants {
            if bool::from(grant.sha256.ct_eq(&presented)) {
                found = Some(grant.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

/// Why a token file is refused; names the file and the entry.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("auth_file {path}: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("auth_file {path}: token {index} ('{name}'): {reason}")]
    Entry {
        path: PathBuf,
        index: usize,
        name: String,
        reason: String,
    },
}

/// The token file at a path, for [`crate::grpc::reload::Reloading`].
#[derive(Debug, Clone)]
pub struct TokenFile(pub PathBuf);

impl Source for TokenFile {
    type Output = Tokens;
    type Error = TokenFileError;

    fn what(&self) -> &'static str {
        "token file"
    }

    fn paths(&self) -> Vec<&Path> {
        vec![&self.0]
    }

    fn parse(&self, contents: &[Vec<u8>]) -> Result<Tokens, TokenFileError> {
        let text = String::from_utf8_lossy(&contents[0]);
        let file: TokenFileText =
            toml::from_str(&text).map_err(|source| TokenFileError::Syntax {
                path: self.0.clone(),
                source,
            })?;
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut grants = Vec::with_capacity(file.token.len());
        for (index, entry) in file.token.into_iter().enumerate() {
            let refused = |reason: String| TokenFileError::Entry {
                path: self.0.clone(),
                index,
                name: entry.name.clone(),
                reason,
            };
            let grant = grant(&entry).map_err(refused)?;
            if !names.insert(grant.name.clone()) {
                return Err(refused("another token has the same name".into()));
            }
            if !hashes.insert(grant.sha256) {
                return Err(refused("another token has the same sha256".into()));
            }
            grants.push(Arc::new(grant));
        }
        Ok(Tokens { grants })
    }
}

/// Why the server would refuse `entry`, if it would.
///
/// # Errors
/// The reason, naming the field.
pub fn check_entry(entry: &TokenEntry) -> Result<(), String> {
    grant(entry).map(drop)
}

fn grant(entry: &TokenEntry) -> Result<Grant, String> {
    if entry.name.trim().is_empty() {
        return Err("name must not be empty".into());
    }
    let sha256 = parse_hex_sha256(&entry.sha256)
        .ok_or("sha256 must be the 64 hex digits of the token's SHA-256")?;
    if entry.scopes.is_empty() {
        return Err("scopes must name at least one of read, write, admin, exact".into());
    }
    if entry.datasets.is_empty() {
        return Err("datasets must hold at least one pattern (\"*\" is every dataset)".into());
    }
    let datasets = entry
        .datasets
        .iter()
        .map(|text| glob::Pattern::new(text).map_err(|e| format!("dataset pattern '{text}': {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Grant {
        name: entry.name.clone(),
        sha256,
        scopes: entry.scopes.clone(),
        datasets,
    })
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The lowercase hex SHA-256 of a token: what the token file stores.
pub fn sha256_hex(token: &str) -> String {
    to_hex(&sha256(token.as_bytes()))
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn parse_hex_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        TokenFile(PathBuf::from("tokens.toml")).parse(&[text.as_bytes().to_vec()])
    }

    fn entry(name: &str, token: &str, scopes: &str, datasets: &str) -> String {
        format!(
            "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = {scopes}\ndatasets = {datasets}\n",
            sha256_hex(token)
        )
    }

    #[test]
    fn tokens_are_found_by_hash_with_their_scopes_and_patterns() {
        let text = entry("bidder", "s3cret", r#"["read"]"#, r#"["ads-*", "default"]"#)
            + &entry("ops", "0ps", r#"["admin", "write"]"#, r#"["*"]"#);
        let tokens = parse(&text).unwrap();
        assert_eq!(tokens.len(), 2);
        let bidder = tokens.find("s3cret").unwrap();
        assert_eq!(bidder.name, "bidder");
        assert!(bidder.has(Scope::Read) && !bidder.has(Scope::Write));
        assert!(bidder.covers("ads-1") && bidder.covers("default"));
        assert!(!bidder.covers("crm") && !bidder.covers("xads-1"));
        assert!(!bidder.covers_every_dataset());
        let ops = tokens.find("0ps").unwrap();
        assert!(ops.has(Scope::Admin) && ops.covers("anything") && ops.covers_every_dataset());
        assert!(tokens.find("S3cret").is_none());
        assert!(tokens.find("").is_none());
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_entry() {
        let cases = [
            ("[[token]]\nname = \"x\"\n", "auth_file tokens.toml"),
            (
                &entry("a", "t", r#"["read"]"#, r#"["*"]"#).replace("sha256 = \"", "sha256 = \"0"),
                "token 0 ('a'): sha256",
            ),
            (&entry("a", "t", "[]", r#"["*"]"#), "scopes"),
            (&entry("a", "t", r#"["read"]"#, "[]"), "datasets"),
            (&entry("a", "t", r#"["read"]"#, r#"["[x"]"#), "pattern '[x'"),
            (&entry("a", "t", r#"["root"]"#, r#"["*"]"#), "root"),
            (
                &(entry("a", "t", r#"["read"]"#, r#"["*"]"#)
                    + &entry("a", "u", r#"["read"]"#, r#"["*"]"#)),
                "token 1 ('a'): another token has the same name",
            ),
            (
                &(entry("a", "t", r#"["read"]"#, r#"["*"]"#)
                    + &entry("b", "t", r#"["read"]"#, r#"["*"]"#)),
                "same sha256",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(expected), "{text}\n→ {error:?}");
        }
        assert!(
            parse("").unwrap().is_empty(),
            "a file without tokens admits nobody"
        );
    }

    #[test]
    fn the_hash_is_the_standard_sha256() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
