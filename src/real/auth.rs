//! Who may do what over HTTP: bearer tokens, each with a scope.
//!
//! A single `--token` may do everything (as before). A credentials file
//! (`--credentials FILE`, JSON) gives each token only what it needs: publish,
//! subscribe (and unsubscribe) as given `ClientID`s, read and redrive the dead
//! letters of given `ClientID`s. So a participant holding its own token
//! cannot re-subscribe another client with its own URL and drain that
//! client's queue.
//!
//! **Invariants:** with no credential configured every route is open (only
//! allowed on loopback, see [`super::server`]); with any, a mutating route
//! (and the dead-letter listing) needs a token that matches one in constant
//! time, and its scope is checked before the request reaches the core.

use super::callbacks::constant_time_eq;
use crate::types::ClientId;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// Shortest token accepted from a credentials file (guessing must be hopeless).
pub const TOKEN_LEN_MIN: usize = 16;
/// Credentials in one file.
pub const CREDENTIALS_MAX: usize = 10_000;

/// A set of ClientIDs, or every one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clients {
    All,
    Only(BTreeSet<ClientId>),
}

impl Clients {
    pub fn allows(&self, c: &ClientId) -> bool {
        match self {
            Clients::All => true,
            Clients::Only(set) => set.contains(c),
        }
    }
}

/// What one token may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Shown in refusals and logs (never the token).
    pub name: String,
    pub publish: bool,
    /// Subscribe and unsubscribe as these ClientIDs.
    pub subscribe: Clients,
    /// List and redrive these ClientIDs' dead letters.
    pub dead_letters: Clients,
}

impl Scope {
    pub fn everything(name: &str) -> Scope {
        Scope {
            name: name.to_string(),
            publish: true,
            subscribe: Clients::All,
            dead_letters: Clients::All,
        }
    }
}

#[derive(Clone)]
pub struct Credential {
    pub token: String,
    pub scope: Scope,
}

/// Never prints the token.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("token", &"<redacted>")
            .field("scope", &self.scope)
            .finish()
    }
}

/// The configured credentials; empty means no authentication.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    credentials: Vec<Credential>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCredential {
    name: String,
    token: String,
    #[serde(default)]
    publish: bool,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    dead_letters: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    tokens: Vec<FileCredential>,
}

fn clients(list: &[String], name: &str, field: &str) -> Result<Clients, String> {
    if list.iter().any(|c| c == "*") {
        return Ok(Clients::All);
    }
    let mut set = BTreeSet::new();
    for c in list {
        set.insert(ClientId::new(c.clone()).map_err(|e| format!("token {name:?}: {field} entry {c:?}: {e}"))?);
    }
    Ok(Clients::Only(set))
}

impl Auth {
    pub fn new(credentials: Vec<Credential>) -> Auth {
        Auth { credentials }
    }

    /// `--token` alone: one credential that may do everything.
    pub fn single(token: Option<&str>) -> Auth {
        Auth {
            credentials: token
                .map(|t| Credential {
                    token: t.to_string(),
                    scope: Scope::everything("--token"),
                })
                .into_iter()
                .collect(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.credentials.is_empty()
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.credentials.iter().map(|c| c.token.as_str())
    }

    /// Adds a credential (the `--token` next to a file).
    pub fn with(mut self, c: Credential) -> Auth {
        self.credentials.push(c);
        self
    }

    /// The scope of `presented`, comparing with every credential in constant
    /// time (no early exit: the time taken says nothing about which matched).
    pub fn scope_of(&self, presented: &str) -> Option<&Scope> {
        let mut found = None;
        for c in &self.credentials {
            if constant_time_eq(c.token.as_bytes(), presented.as_bytes()) && found.is_none() {
                found = Some(&c.scope);
            }
        }
        found
    }

    /// Parses a credentials file:
    /// `{"tokens":[{"name","token","publish":bool,"subscribe":[ClientID|"*"],"dead_letters":[..]}]}`.
    pub fn parse_file(text: &str) -> Result<Auth, String> {
        let file: CredentialsFile = serde_json::from_str(text).map_err(|e| format!("invalid credentials file: {e}"))?;
        if file.tokens.is_empty() {
            return Err("the credentials file lists no tokens".into());
        }
        if file.tokens.len() > CREDENTIALS_MAX {
            return Err(format!("more than {CREDENTIALS_MAX} tokens"));
        }
        let mut names = BTreeSet::new();
        let mut tokens = BTreeSet::new();
        let mut credentials = Vec::new();
        for f in file.tokens {
            if f.name.is_empty() || !names.insert(f.name.clone()) {
                return Err(format!("token names must be unique and not empty: {:?}", f.name));
            }
            if f.token.len() < TOKEN_LEN_MIN || f.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "token {:?}: a token is at least {TOKEN_LEN_MIN} characters without spaces",
                    f.name
                ));
            }
            if !tokens.insert(f.token.clone()) {
                return Err(format!("token {:?} repeats another entry's token", f.name));
            }
            let scope = Scope {
                publish: f.publish,
                subscribe: clients(&f.subscribe, &f.name, "subscribe")?,
                dead_letters: clients(&f.dead_letters, &f.name, "dead_letters")?,
                name: f.name,
            };
            credentials.push(Credential { token: f.token, scope });
        }
        Ok(Auth { credentials })
    }

    pub fn load_file(path: &Path) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        Auth::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{"tokens":[
        {"name":"order","token":"order-token-0123456789","publish":true,"subscribe":["order-service"]},
        {"name":"ops","token":"ops-token-0123456789ab","dead_letters":["*"]}
    ]}"#;

    #[test]
    fn a_file_scopes_each_token() {
        let auth = Auth::parse_file(FILE).unwrap();
        let order = auth.scope_of("order-token-0123456789").unwrap();
        assert!(order.publish);
        assert!(order.subscribe.allows(&ClientId::lit("order-service")));
        assert!(!order.subscribe.allows(&ClientId::lit("stock-service")));
        assert!(!order.dead_letters.allows(&ClientId::lit("order-service")));
        let ops = auth.scope_of("ops-token-0123456789ab").unwrap();
        assert!(!ops.publish);
        assert!(ops.dead_letters.allows(&ClientId::lit("anyone")));
        assert!(auth.scope_of("order-token-012345678").is_none());
        assert!(auth.scope_of("").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, why) in [
            ("not json", "invalid credentials file"),
            (r#"{"tokens":[]}"#, "no tokens"),
            (r#"{"tokens":[{"name":"a","token":"short"}]}"#, "at least 16"),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef"},{"name":"a","token":"0123456789abcdeg"}]}"#,
                "unique",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef"},{"name":"b","token":"0123456789abcdef"}]}"#,
                "repeats",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef","subscribe":[""]}]}"#,
                "subscribe entry",
            ),
            (
                r#"{"tokens":[{"name":"a","token":"0123456789abcdef","admin":true}]}"#,
                "unknown field",
            ),
        ] {
            let err = Auth::parse_file(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn a_single_token_may_do_everything_and_none_means_open() {
        let auth = Auth::single(Some("t"));
        assert_eq!(auth.scope_of("t"), Some(&Scope::everything("--token")));
        assert!(auth.scope_of("u").is_none());
        assert!(Auth::single(None).is_open());
    }
}
