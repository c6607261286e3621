//! Who is calling, and what they may do: the `--auth` mode, agent
//! identities and their tokens, the ACL rules and the per-agent send rate.
//!
//! A transport turns what it *proved* about its peer (the daemon's own uid,
//! from peer credentials) and the token it was shown into a [`Caller`]
//! with [`Trust::authenticate`], once per connection or request, and hands
//! it to the broker. The rules are applied here, once, for every transport:
//!
//! - a token-authenticated caller *is* its identity's agent: it sends,
//!   registers and reads only as that name, within its ACL globs;
//! - a name that has an identity is reserved: without its token nobody —
//!   not even the owner's own processes — sends, registers or reads as it,
//!   so nobody can kick a verified agent or read its mail;
//! - the owner (or, under `--auth open`, anyone) may use any other name,
//!   which is what every legacy client does today.
//!
//! Tokens are 256 random bits (`hmd_` + base64url). Only their SHA-256 is
//! stored; a presented token is hashed and looked up by that hash, then the
//! hashes are compared in constant time. (The lookup itself leaks nothing
//! useful: an attacker controls the token, not its hash.)

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermod_events::Pattern;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::model::{AgentName, Auth, Channel, InboxKey};
use hermod_proto::identity::digest;
pub use hermod_proto::identity::{new_token, secrets_equal, Identity, IdentitySpec};

/// What the bus requires of a caller (`hermod serve --auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Trust whoever connects (single-user sandboxes).
    Open,
    /// The owner's processes are trusted; everyone else needs a token.
    #[default]
    Owner,
    /// Every request needs a token.
    Tokens,
}

impl FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "open" => Ok(AuthMode::Open),
            "owner" => Ok(AuthMode::Owner),
            "tokens" => Ok(AuthMode::Tokens),
            other => Err(format!("unknown auth mode {other:?} (open, owner, tokens)")),
        }
    }
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Open => "open",
            AuthMode::Owner => "owner",
            AuthMode::Tokens => "tokens",
        }
    }
}

/// `*` matches any run of characters, `?` exactly one.
fn name_glob_matches(glob: &str, name: &str) -> bool {
    let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    // Classic two-pointer wildcard match with one backtrack point: linear
    // enough for names of at most 128 characters.
    let (mut gi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ni;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

/// True when every topic `requested` matches also matches `allowed`
/// (conservative: an unusual pair that would be covered may be refused,
/// never the other way round).
fn pattern_covers(allowed: &str, requested: &str) -> bool {
    fn covers(a: &[&str], p: &[&str]) -> bool {
        match (a.first(), p.first()) {
            (None, None) => true,
            (Some(&"**"), _) => covers(&a[1..], p) || (!p.is_empty() && covers(a, &p[1..])),
            (None, Some(_)) | (Some(_), None) => false,
            (Some(&x), Some(&y)) => {
                let segment = match (x, y) {
                    (_, "**") => false,
                    ("*", _) => true,
                    (_, "*") => false,
                    (x, y) => x == y,
                };
                segment && covers(&a[1..], &p[1..])
            }
        }
    }
    let a: Vec<&str> = allowed.split('.').collect();
    let p: Vec<&str> = requested.split('.').collect();
    covers(&a, &p)
}

/// Who is on the other end of a request, as far as it proved.
#[derive(Debug, Clone)]
pub struct Caller {
    auth: Auth,
    identity: Option<Arc<Identity>>,
}

impl Caller {
    /// A caller the bus trusts without a token: `Owner` (proved by peer
    /// credentials) or `Open` (`--auth open`).
    pub fn trusted(auth: Auth) -> Self {
        debug_assert!(auth != Auth::Token);
        Self {
            auth,
            identity: None,
        }
    }

    /// How this caller's messages are marked.
    pub fn auth(&self) -> Auth {
        self.auth
    }

    /// The identity a token proved, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_deref()
    }

    /// The agent a token proved, if any.
    pub fn agent(&self) -> Option<&AgentName> {
        self.identity.as_ref().map(|i| &i.name)
    }

    /// The one channel this caller's token is bound to, if any.
    pub fn bound_channel(&self) -> Option<&Channel> {
        self.identity().and_then(|i| i.channel.as_ref())
    }

    /// May this caller see what happens on `channel`? A token bound to a
    /// channel sees that one only; everyone else sees every channel. Every
    /// listing of agents, endpoints or messages filters by this.
    pub fn sees(&self, channel: &Channel) -> bool {
        self.bound_channel().is_none_or(|bound| bound == channel)
    }
}

/// A per-agent send rate: `rate` messages per second on average, bursts of
/// up to `burst`. A rate of 0 turns the limit off.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub rate: f64,
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        // Far above any agent conversation (topic events, which carry
        // streaming deltas, are not limited), low enough that one runaway
        // or injected agent cannot flood every inbox.
        Self {
            rate: 1000.0,
            burst: 5000.0,
        }
    }
}

/// Senders tracked at once; past it, full (idle) buckets are forgotten.
const MAX_BUCKETS: usize = 65_536;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The identities, by name and by token hash.
#[derive(Default)]
struct Identities {
    by_name: HashMap<AgentName, Arc<Identity>>,
    by_hash: HashMap<[u8; 32], AgentName>,
}

/// The trust policy of one daemon: mode, identities and rate limits.
pub struct Trust {
    mode: AuthMode,
    identities: Mutex<Identities>,
    limit: RateLimit,
    buckets: Mutex<HashMap<AgentName, Bucket>>,
}

impl Trust {
    pub fn new(mode: AuthMode, limit: RateLimit) -> Self {
        Self {
            mode,
            identities: Mutex::default(),
            limit,
            buckets: Mutex::default(),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Replaces (or with `None` removes) the identity of `name` in memory;
    /// the broker persists it first.
    pub(crate) fn set(&self, name: &AgentName, identity: Option<Identity>) {
        let mut ids = self.identities.lock().unwrap();
        if let Some(old) = ids.by_name.remove(name) {
            if let Some(h) = parse_hash(&old.token_hash) {
                ids.by_hash.remove(&h);
            }
        }
        if let Some(identity) = identity {
            if let Some(h) = parse_hash(&identity.token_hash) {
                ids.by_hash.insert(h, identity.name.clone());
            }
            ids.by_name.insert(name.clone(), Arc::new(identity));
        }
    }

    /// Every identity, by name.
    pub fn identities(&self) -> Vec<Identity> {
        let ids = self.identities.lock().unwrap();
        let mut all: Vec<Identity> = ids.by_name.values().map(|i| (**i).clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn identity(&self, name: &AgentName) -> Option<Identity> {
        let ids = self.identities.lock().unwrap();
        ids.by_name.get(name).map(|i| (**i).clone())
    }

    /// The caller behind a request: `owner` says whether the transport
    /// proved the peer runs as the daemon's user (or an allowed uid).
    pub fn authenticate(&self, owner: bool, token: Option<&str>) -> Result<Caller> {
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            return self.verify(token);
        }
        match (self.mode, owner) {
            (AuthMode::Open, _) => Ok(Caller::trusted(Auth::Open)),
            (AuthMode::Owner, true) => Ok(Caller::trusted(Auth::Owner)),
            (AuthMode::Owner, false) => Err(Error::Unauthorized(
                "this bus serves other users only with a token (Authorization: Bearer, \
                 /a/TOKEN/..., a `token` frame field or HERMOD_TOKEN)"
                    .into(),
            )),
            (AuthMode::Tokens, _) => Err(Error::Unauthorized(
                "this bus requires a token on every request (--auth tokens)".into(),
            )),
        }
    }

    /// The caller of an identity-management request, given the caller the
    /// request would otherwise have: the owner's processes in every mode,
    /// even `tokens` (they own the database file anyway, and the first token
    /// has to be made somehow), else an admin identity.
    pub fn manager(&self, owner: bool, caller: Result<Caller>) -> Result<Caller> {
        if owner {
            return Ok(caller.unwrap_or_else(|_| Caller::trusted(Auth::Owner)));
        }
        let caller = caller?;
        self.may_admin(&caller)?;
        Ok(caller)
    }

    fn verify(&self, token: &str) -> Result<Caller> {
        let presented = digest(token);
        let ids = self.identities.lock().unwrap();
        let identity = ids
            .by_hash
            .get(&presented)
            .and_then(|name| ids.by_name.get(name))
            .filter(|i| parse_hash(&i.token_hash).is_some_and(|h| bool::from(h.ct_eq(&presented))))
            .cloned();
        match identity {
            Some(identity) => Ok(Caller {
                auth: Auth::Token,
                identity: Some(identity),
            }),
            None => Err(Error::Unauthorized("unknown or revoked token".into())),
        }
    }

    fn reserved(&self, name: &AgentName) -> bool {
        self.identities.lock().unwrap().by_name.contains_key(name)
    }

    /// The sender of a message `caller` sends, claiming `claimed`.
    pub fn sender(&self, caller: &Caller, claimed: Option<AgentName>) -> Result<AgentName> {
        match caller.agent() {
            Some(me) => match claimed {
                Some(other) if &other != me => Err(Error::ForbiddenSender(format!(
                    "this token is {me}'s; it cannot send as {other}"
                ))),
                _ => Ok(me.clone()),
            },
            None => {
                let name = claimed.unwrap_or_else(AgentName::anonymous);
                if self.reserved(&name) {
                    return Err(Error::ForbiddenSender(format!(
                        "{name} has an identity: only its token may send as it"
                    )));
                }
                Ok(name)
            }
        }
    }

    /// May `caller` register, receive, read or acknowledge as `key`?
    pub fn may_act_as(&self, caller: &Caller, key: &InboxKey) -> Result<()> {
        match caller.agent() {
            Some(me) if me != &key.agent => Err(Error::Forbidden {
                rule: "identity",
                detail: format!("this token is {me}'s; it cannot act as {}", key.agent),
            }),
            Some(_) => self.may_use_channel(caller, &key.channel),
            None if self.reserved(&key.agent) => Err(Error::Forbidden {
                rule: "identity",
                detail: format!(
                    "{} has an identity: only its token may act as it",
                    key.agent
                ),
            }),
            None => Ok(()),
        }
    }

    /// May `caller` read `agent`'s mail on every channel (`channel=*`)?
    pub fn may_act_as_agent(&self, caller: &Caller, agent: &AgentName) -> Result<()> {
        if let Some(allowed) = caller.bound_channel() {
            return Err(Error::Forbidden {
                rule: "channel",
                detail: format!("{agent} may only use channel {allowed}"),
            });
        }
        self.may_act_as(caller, &InboxKey::new(Channel::default(), agent.clone()))
    }

    /// May `caller` use `channel` at all?
    pub fn may_use_channel(&self, caller: &Caller, channel: &Channel) -> Result<()> {
        match caller
            .identity()
            .and_then(|i| i.channel.as_ref().map(|c| (i, c)))
        {
            Some((i, allowed)) if allowed != channel => Err(Error::Forbidden {
                rule: "channel",
                detail: format!("{} may only use channel {allowed}, not {channel}", i.name),
            }),
            _ => Ok(()),
        }
    }

    /// May `caller` send on `channel` to `to` (`None`: a broadcast)?
    pub fn may_send(
        &self,
        caller: &Caller,
        channel: &Channel,
        to: Option<&AgentName>,
    ) -> Result<()> {
        self.may_use_channel(caller, channel)?;
        let Some(i) = caller.identity() else {
            return Ok(());
        };
        let allowed = match to {
            Some(to) => i.may_send.iter().any(|g| name_glob_matches(g, to)),
            None => i.may_send.iter().any(|g| g == "*"),
        };
        if allowed {
            return Ok(());
        }
        Err(Error::Forbidden {
            rule: "may_send",
            detail: format!(
                "{} may not send to {} (may_send: {})",
                i.name,
                to.map_or("everyone (a broadcast needs \"*\")".to_owned(), |t| t
                    .to_string()),
                i.may_send.join(",")
            ),
        })
    }

    /// May `caller` publish `topic` on `channel`?
    pub fn may_publish(&self, caller: &Caller, channel: &Channel, topic: &str) -> Result<()> {
        self.may_use_channel(caller, channel)?;
        let Some(i) = caller.identity() else {
            return Ok(());
        };
        let allowed = i
            .may_publish
            .iter()
            .any(|p| Pattern::parse(p).is_ok_and(|p| p.matches(topic)));
        if allowed {
            return Ok(());
        }
        Err(Error::Forbidden {
            rule: "may_publish",
            detail: format!(
                "{} may not publish {topic} (may_publish: {})",
                i.name,
                i.may_publish.join(",")
            ),
        })
    }

    /// May `caller` subscribe to `pattern` on `channel`?
    pub fn may_subscribe(&self, caller: &Caller, channel: &Channel, pattern: &str) -> Result<()> {
        self.may_use_channel(caller, channel)?;
        let Some(i) = caller.identity() else {
            return Ok(());
        };
        if i.may_subscribe.iter().any(|a| pattern_covers(a, pattern)) {
            return Ok(());
        }
        Err(Error::Forbidden {
            rule: "may_subscribe",
            detail: format!(
                "{} may not subscribe to {pattern} (may_subscribe: {})",
                i.name,
                i.may_subscribe.join(",")
            ),
        })
    }

    /// May `caller` follow `pattern` on every channel at once? Only a
    /// caller bound to no channel may.
    pub fn may_subscribe_everywhere(&self, caller: &Caller, pattern: &str) -> Result<()> {
        if let Some(bound) = caller.bound_channel() {
            return Err(Error::Forbidden {
                rule: "channel",
                detail: format!("bound to channel {bound}: cannot follow every channel"),
            });
        }
        self.may_subscribe(caller, &Channel::default(), pattern)
    }

    /// May `caller` manage identities and read metrics?
    pub fn may_admin(&self, caller: &Caller) -> Result<()> {
        match caller.identity() {
            Some(i) if !i.admin => Err(Error::Forbidden {
                rule: "admin",
                detail: format!("{} is not an admin identity", i.name),
            }),
            _ => Ok(()),
        }
    }

    /// Takes one message from `sender`'s send budget.
    pub fn take_send(&self, sender: &AgentName) -> Result<()> {
        let RateLimit { rate, burst } = self.limit;
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let level =
            |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(sender) {
            // A full bucket is the same as no bucket: forget those.
            buckets.retain(|_, b| level(b) < burst);
            if buckets.len() >= MAX_BUCKETS {
                tracing::warn!(
                    "{MAX_BUCKETS} senders over their rate at once; resetting rate limits"
                );
                buckets.clear();
            }
        }
        // Looked up before inserting: no name allocation per message.
        if !buckets.contains_key(sender) {
            buckets.insert(
                sender.clone(),
                Bucket {
                    tokens: burst,
                    at: now,
                },
            );
        }
        let bucket = buckets.get_mut(sender).expect("just inserted");
        bucket.tokens = level(bucket);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Error::RateLimited {
            sender: sender.to_string(),
            rate,
            retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / rate).as_secs_f64(),
        })
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::parse(s).unwrap()
    }

    fn spec(n: &str) -> IdentitySpec {
        IdentitySpec {
            name: n.into(),
            ..IdentitySpec::default()
        }
    }

    #[test]
    fn globs() {
        assert!(name_glob_matches("*", "anything"));
        assert!(name_glob_matches("worker-*", "worker-alpha"));
        assert!(!name_glob_matches("worker-*", "boss"));
        assert!(name_glob_matches("w?r*a", "worker-alpha"));
        assert!(!name_glob_matches("a", "ab"));
        assert!(pattern_covers("tui.**", "tui.tool.*"));
        assert!(pattern_covers("tui.**", "tui.**"));
        assert!(pattern_covers("**", "a.**.b"));
        assert!(pattern_covers("a.*", "a.b"));
        assert!(!pattern_covers("a.*", "a.**"));
        assert!(!pattern_covers("a.*", "a.*.c"));
        assert!(!pattern_covers("tui.**", "**"));
        assert!(!pattern_covers("tui.*", "*.x"));
    }

    #[test]
    fn tokens_prove_names_and_reserve_them() {
        let trust = Trust::new(AuthMode::Owner, RateLimit::default());
        let (alice, token) = spec("alice").issue().unwrap();
        trust.set(&alice.name.clone(), Some(alice));
        let c = trust.authenticate(false, Some(&token)).unwrap();
        assert_eq!(c.auth(), Auth::Token);
        assert_eq!(trust.sender(&c, None).unwrap(), name("alice"));
        let spoof = trust.sender(&c, Some(name("bob"))).unwrap_err();
        assert_eq!(spoof.code(), "forbidden_sender");
        let key = |n: &str| InboxKey::new(Channel::default(), name(n));
        assert_eq!(
            trust.may_act_as(&c, &key("bob")).unwrap_err().code(),
            "forbidden"
        );
        // Reserved even for the owner's processes.
        let owner = trust.authenticate(true, None).unwrap();
        assert_eq!(
            trust
                .sender(&owner, Some(name("alice")))
                .unwrap_err()
                .code(),
            "forbidden_sender"
        );
        assert!(trust.may_act_as(&owner, &key("alice")).is_err());
        assert!(trust.may_act_as(&owner, &key("bob")).is_ok());
        // Strangers need a token; bad tokens are refused.
        assert_eq!(
            trust.authenticate(false, None).unwrap_err().code(),
            "unauthorized"
        );
        assert!(trust.authenticate(true, Some("hmd_nope")).is_err());
        trust.set(&name("alice"), None);
        assert!(trust.authenticate(false, Some(&token)).is_err(), "revoked");
    }

    #[test]
    fn acl_rules_name_the_rule() {
        let trust = Trust::new(AuthMode::Tokens, RateLimit::default());
        let (w, token) = IdentitySpec {
            channel: Some("ops".into()),
            may_send: Some(vec!["boss".into()]),
            may_publish: Some(vec!["ci.*".into()]),
            may_subscribe: Some(vec!["ci.**".into()]),
            ..spec("worker")
        }
        .issue()
        .unwrap();
        trust.set(&w.name.clone(), Some(w));
        let c = trust.authenticate(false, Some(&token)).unwrap();
        let ops = Channel::parse("ops").unwrap();
        assert!(trust.may_send(&c, &ops, Some(&name("boss"))).is_ok());
        let deny = |e: Error| match e {
            Error::Forbidden { rule, .. } => rule,
            other => panic!("{other}"),
        };
        assert_eq!(
            deny(trust.may_send(&c, &ops, Some(&name("x"))).unwrap_err()),
            "may_send"
        );
        assert_eq!(
            deny(trust.may_send(&c, &ops, None).unwrap_err()),
            "may_send"
        );
        assert_eq!(
            deny(
                trust
                    .may_send(&c, &Channel::default(), Some(&name("boss")))
                    .unwrap_err()
            ),
            "channel"
        );
        assert!(trust.may_publish(&c, &ops, "ci.done").is_ok());
        assert_eq!(
            deny(trust.may_publish(&c, &ops, "tui.x").unwrap_err()),
            "may_publish"
        );
        assert!(trust.may_subscribe(&c, &ops, "ci.build.*").is_ok());
        assert_eq!(
            deny(trust.may_subscribe(&c, &ops, "**").unwrap_err()),
            "may_subscribe"
        );
        assert_eq!(deny(trust.may_admin(&c).unwrap_err()), "admin");
        assert!(trust.authenticate(true, None).is_err(), "tokens mode");
        assert!(
            trust.manager(true, trust.authenticate(true, None)).is_ok(),
            "the owner manages"
        );
        let worker = trust.authenticate(false, Some(&token));
        assert!(
            trust.manager(false, worker).is_err(),
            "a non-admin token does not"
        );
    }

    #[test]
    fn rate_limit_refuses_the_excess_per_sender() {
        let trust = Trust::new(
            AuthMode::Open,
            RateLimit {
                rate: 10.0,
                burst: 5.0,
            },
        );
        let ok = (0..20)
            .filter(|_| trust.take_send(&name("a")).is_ok())
            .count();
        assert!((5..=6).contains(&ok), "{ok}");
        let e = trust.take_send(&name("a")).unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert!(
            trust.take_send(&name("b")).is_ok(),
            "another sender is unaffected"
        );
        let off = Trust::new(
            AuthMode::Open,
            RateLimit {
                rate: 0.0,
                burst: 0.0,
            },
        );
        assert!((0..1000).all(|_| off.take_send(&name("a")).is_ok()));
    }

    #[test]
    fn secrets_compare() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        let (t, h) = new_token();
        assert!(t.starts_with("hmd_") && t.len() > 40);
        assert_eq!(parse_hash(&h), Some(digest(&t)));
    }
}
