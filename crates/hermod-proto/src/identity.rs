//! Agent identities as the protocol carries them: the rules an identity
//! holds, the spec `hermod agent add` sends, and token issuing. Checking
//! callers against them is the daemon's business (`hermod_core::auth`).

use base64::Engine as _;
use hermod_events::Pattern;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::model::{check_len, AgentName, Channel};

/// An agent identity: a name whose token proves it, and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub name: AgentName,
    /// The one channel it may use; `None` = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    /// Agent-name globs (`*` any run, `?` one character) it may send to; a
    /// broadcast needs `*`.
    pub may_send: Vec<String>,
    /// Topic patterns it may publish to.
    pub may_publish: Vec<String>,
    /// Topic patterns it may subscribe within.
    pub may_subscribe: Vec<String>,
    /// May manage identities and read `/metrics`.
    pub admin: bool,
    pub created: f64,
    /// Hex SHA-256 of the token; never serialized to clients.
    #[serde(skip)]
    pub token_hash: String,
}

/// What `hermod agent add` asks for; `None` rules mean "everything".
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentitySpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_send: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_publish: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_subscribe: Option<Vec<String>>,
    #[serde(default)]
    pub admin: bool,
}

impl IdentitySpec {
    /// Validates every rule and issues a fresh token: `(identity, token)`.
    pub fn issue(self) -> Result<(Identity, String)> {
        let name = AgentName::parse(self.name)?;
        if name.is_reserved() {
            return Err(Error::Forbidden {
                rule: "reserved",
                detail: format!("{name} is the daemon's own name: no identity may hold it"),
            });
        }
        let channel = match self.channel {
            Some(c) if !c.is_empty() => Some(Channel::parse(c)?),
            _ => None,
        };
        let may_send = self.may_send.unwrap_or_else(|| vec!["*".into()]);
        for g in &may_send {
            check_len("may_send", g)?;
            check_name_glob(g)?;
        }
        let topics = |field: &str, rules: Option<Vec<String>>| -> Result<Vec<String>> {
            let rules = rules.unwrap_or_else(|| vec!["**".into()]);
            for r in &rules {
                check_len(field, r)?;
                Pattern::parse(r)?;
            }
            Ok(rules)
        };
        let (token, token_hash) = new_token();
        let identity = Identity {
            name,
            channel,
            may_send,
            may_publish: topics("may_publish", self.may_publish)?,
            may_subscribe: topics("may_subscribe", self.may_subscribe)?,
            admin: self.admin,
            created: crate::model::now(),
            token_hash,
        };
        Ok((identity, token))
    }
}

/// A fresh token and its stored hash.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    let token = format!(
        "hmd_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hex(&digest(&token));
    (token, hash)
}

/// SHA-256 of a token: what is stored and compared.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two secrets in constant time (through their hashes, so the
/// lengths leak nothing either).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    digest(a).ct_eq(&digest(b)).into()
}

fn check_name_glob(g: &str) -> Result<()> {
    let plain: String = g.chars().filter(|c| !matches!(c, '*' | '?')).collect();
    if plain.is_empty() {
        return if g.is_empty() {
            Err(Error::InvalidRequest("an empty may-send glob".into()))
        } else {
            Ok(())
        };
    }
    AgentName::parse(plain).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> IdentitySpec {
        IdentitySpec {
            name: name.into(),
            ..IdentitySpec::default()
        }
    }

    #[test]
    fn over_long_rules_are_refused_naming_the_rule() {
        let long = format!("{}*", "a".repeat(crate::model::MAX_FIELD_LEN));
        let refused = |s: IdentitySpec, field: &str| {
            let e = s.issue().unwrap_err();
            assert_eq!(e.code(), "invalid_request", "{e}");
            assert!(e.to_string().contains(&format!("\"{field}\"")), "{e}");
        };
        refused(
            IdentitySpec {
                may_send: Some(vec![long.clone()]),
                ..spec("w")
            },
            "may_send",
        );
        let topic = vec!["seg"; 100].join(".");
        refused(
            IdentitySpec {
                may_publish: Some(vec![topic.clone()]),
                ..spec("w")
            },
            "may_publish",
        );
        refused(
            IdentitySpec {
                may_subscribe: Some(vec![topic]),
                ..spec("w")
            },
            "may_subscribe",
        );
        assert!(spec("w").issue().is_ok());
    }

    #[test]
    fn the_daemons_own_names_cannot_be_issued() {
        for name in crate::model::RESERVED_NAMES {
            let e = spec(name).issue().unwrap_err();
            assert_eq!(e.code(), "forbidden", "{e}");
        }
    }
}
