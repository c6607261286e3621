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
//!   which is what every legacy client does today;
//! - the names the daemon itself sends as ([`RESERVED_NAMES`]: `hermod`
//!   for receipts, bounces and notices, `relay`, `interop`) are nobody
//!   else's, in every mode: only a [`Caller::daemon`] claims them, so a
//!   receipt from `hermod` cannot be forged.
//!
//! Tokens are 256 random bits (`hmd_` + base64url). Only their SHA-256 is
//! stored; a presented token is hashed and looked up by that hash, then the
//! hashes are compared in constant time. (The lookup itself leaks nothing
//! useful: an attacker controls the token, not its hash.)

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashlink::LruCache;
use hermod_events::Pattern;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::{AgentName, Auth, Channel, InboxKey, RESERVED_NAMES, SYSTEM_SENDER};
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

/// Where a request came from, as its transport proved it (not what the
/// request says): the peer's uid (Unix socket credentials, or the owner
/// of a loopback TCP socket) or, failing that, its address. What an
/// unverified sender is charged to, so changing `from` resets nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    Uid(u32),
    Addr(std::net::IpAddr),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Uid(uid) => write!(f, "uid {uid}"),
            Origin::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

fn revoked() -> Error {
    Error::Unauthorized("this token was revoked or rotated".into())
}

/// Who is on the other end of a request, as far as it proved.
///
/// A caller that proved a token stays valid only while that token does:
/// revoking or rotating the identity cancels [`Caller::revoked`], which
/// every long-lived connection, stream and long-poll selects on (so it
/// ends within the moment the change is applied, on every node), and every
/// check in [`Trust`] refuses the caller from then on (so a frame already
/// in flight on an open connection is refused too).
#[derive(Debug, Clone)]
pub struct Caller {
    auth: Auth,
    identity: Option<Arc<Identity>>,
    /// The token's generation: cancelled when its identity changes. Never
    /// cancelled for a trusted caller.
    revoked: CancellationToken,
    /// Where the request came from (`None`: inside the daemon).
    origin: Option<Origin>,
    /// The daemon itself: the only caller that may claim a reserved name.
    daemon: bool,
}

impl Caller {
    /// A caller the bus trusts without a token: `Owner` (proved by peer
    /// credentials) or `Open` (`--auth open`).
    pub fn trusted(auth: Auth) -> Self {
        debug_assert!(auth != Auth::Token);
        Self {
            auth,
            identity: None,
            revoked: CancellationToken::new(),
            origin: None,
            daemon: false,
        }
    }

    /// The daemon sending on its own account: under one of its
    /// [`RESERVED_NAMES`] (loop guard notices as `hermod`, relayed events
    /// as `relay`), or a notice about an agent the caller was checked to
    /// act as (presence). Its sender is whatever the daemon's code names,
    /// never a name taken from a client's request; its messages are marked
    /// `auth`.
    pub fn daemon(auth: Auth) -> Self {
        Self {
            daemon: true,
            ..Self::trusted(auth)
        }
    }

    /// This caller, as having come from `origin` (what its transport
    /// proved about the peer; `None` if it could not tell).
    pub fn from_origin(mut self, origin: Option<Origin>) -> Self {
        self.origin = origin;
        self
    }

    /// Cancelled once the token this caller proved is revoked or rotated.
    pub fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }

    /// `Err(unauthorized)` once the caller's token was revoked or rotated.
    pub fn check(&self) -> Result<()> {
        match self.revoked.is_cancelled() {
            true => Err(revoked()),
            false => Ok(()),
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
/// up to `burst`. A rate of 0 turns the limit off. An unverified sender is
/// also charged to its [`Origin`], whose budget is [`ORIGIN_SHARE`] agents'
/// worth: one local user may run many agents, but no name it makes up
/// buys it more.
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

/// How many agents' budgets one origin's unverified senders share.
pub const ORIGIN_SHARE: f64 = 16.0;

/// Senders tracked at once; past it, the least recently active sender's
/// bucket is forgotten (never all of them: a flood of new names cannot
/// reset a busy sender's budget).
const MAX_BUCKETS: usize = 65_536;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills to `now`; true if a message may go (not yet taken).
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        self.tokens >= 1.0
    }

    fn refused(&self, who: String, rate: f64) -> Error {
        Error::RateLimited {
            sender: who,
            rate,
            retry_after: Duration::from_secs_f64((1.0 - self.tokens) / rate).as_secs_f64(),
        }
    }
}

/// Least recently active first out: at the cap the insert of a new key
/// drops the quietest one (after `burst / rate` seconds of quiet, a full
/// bucket anyway), never all of them.
struct Buckets {
    agents: LruCache<AgentName, Bucket>,
    origins: LruCache<Origin, Bucket>,
}

/// The bucket of `key`, made full if new. Looked up before inserting: no
/// key allocation per message.
fn bucket<'a, K: std::hash::Hash + Eq + Clone>(
    map: &'a mut LruCache<K, Bucket>,
    key: &K,
    burst: f64,
    now: Instant,
) -> &'a mut Bucket {
    if !map.contains_key(key) {
        map.insert(
            key.clone(),
            Bucket {
                tokens: burst,
                at: now,
            },
        );
    }
    map.get_mut(key).expect("just inserted")
}

/// An identity as trust holds it: with the generation its callers share.
struct Held {
    identity: Arc<Identity>,
    /// Cancelled when this identity is replaced or removed: ends every
    /// caller that proved its token.
    revoked: CancellationToken,
}

/// The identities, by name and by token hash.
#[derive(Default)]
struct Identities {
    by_name: HashMap<AgentName, Held>,
    by_hash: HashMap<[u8; 32], AgentName>,
}

/// The trust policy of one daemon: mode, identities and rate limits.
pub struct Trust {
    mode: AuthMode,
    identities: Mutex<Identities>,
    /// Bumped after every identity change: what a held request re-checks
    /// its access on (see [`Trust::until_refused`]).
    changed: tokio::sync::watch::Sender<u64>,
    limit: RateLimit,
    buckets: Mutex<Buckets>,
}

impl Trust {
    pub fn new(mode: AuthMode, limit: RateLimit) -> Self {
        Self {
            mode,
            identities: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
            limit,
            buckets: Mutex::new(Buckets {
                agents: LruCache::new(MAX_BUCKETS),
                origins: LruCache::new(MAX_BUCKETS),
            }),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Replaces (or with `None` removes) the identity of `name` in memory;
    /// the broker persists it first. Every caller that proved the old
    /// token is revoked, under the same lock, so no check passes after.
    pub(crate) fn set(&self, name: &AgentName, identity: Option<Identity>) {
        let mut ids = self.identities.lock().unwrap();
        if let Some(old) = ids.by_name.remove(name) {
            old.revoked.cancel();
            if let Some(h) = parse_hash(&old.identity.token_hash) {
                ids.by_hash.remove(&h);
            }
        }
        if let Some(identity) = identity {
            if let Some(h) = parse_hash(&identity.token_hash) {
                ids.by_hash.insert(h, identity.name.clone());
            }
            let held = Held {
                identity: Arc::new(identity),
                revoked: CancellationToken::new(),
            };
            ids.by_name.insert(name.clone(), held);
        }
        drop(ids);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Resolves with the refusal once `check` fails: at once if it fails
    /// now, else after the identity change that makes it fail (a token
    /// revoked or rotated, a name claimed by a new identity). A held
    /// request (long-poll, receipt wait) selects on it, so it never
    /// outlives the access it started with.
    pub async fn until_refused(&self, check: impl Fn(&Self) -> Result<()>) -> Error {
        let mut changed = self.changed.subscribe();
        loop {
            if let Err(e) = check(self) {
                return e;
            }
            // The sender lives as long as `self`.
            let _ = changed.changed().await;
        }
    }

    /// Every identity, by name.
    pub fn identities(&self) -> Vec<Identity> {
        let ids = self.identities.lock().unwrap();
        let mut all: Vec<Identity> = ids
            .by_name
            .values()
            .map(|h| (*h.identity).clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn identity(&self, name: &AgentName) -> Option<Identity> {
        let ids = self.identities.lock().unwrap();
        ids.by_name.get(name).map(|h| (*h.identity).clone())
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
        let held = ids
            .by_hash
            .get(&presented)
            .and_then(|name| ids.by_name.get(name))
            .filter(|h| {
                parse_hash(&h.identity.token_hash).is_some_and(|h| bool::from(h.ct_eq(&presented)))
            });
        match held {
            Some(held) => Ok(Caller {
                auth: Auth::Token,
                identity: Some(held.identity.clone()),
                revoked: held.revoked.clone(),
                origin: None,
                daemon: false,
            }),
            None => Err(Error::Unauthorized("unknown or revoked token".into())),
        }
    }

    fn has_identity(&self, name: &AgentName) -> bool {
        self.identities.lock().unwrap().by_name.contains_key(name)
    }

    /// The sender of a message `caller` sends, claiming `claimed`.
    pub fn sender(&self, caller: &Caller, claimed: Option<AgentName>) -> Result<AgentName> {
        caller.check()?;
        if caller.daemon {
            // The daemon names its own sender (never from a client's frame).
            return Ok(
                claimed.unwrap_or_else(|| AgentName::parse(SYSTEM_SENDER).expect("a valid name"))
            );
        }
        // A token's own name too: an identity made before the name was
        // reserved proves nothing about the daemon.
        if let Some(name) = claimed.as_ref().or(caller.agent()) {
            if name.is_reserved() {
                return Err(Error::ForbiddenSender(format!(
                    "{name} is the daemon's own name ({}): no client may send as it",
                    RESERVED_NAMES.join(", ")
                )));
            }
        }
        match caller.agent() {
            Some(me) => match claimed {
                Some(other) if &other != me => Err(Error::ForbiddenSender(format!(
                    "this token is {me}'s; it cannot send as {other}"
                ))),
                _ => Ok(me.clone()),
            },
            None => {
                let name = claimed.unwrap_or_else(AgentName::anonymous);
                if self.has_identity(&name) {
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
        caller.check()?;
        if key.agent.is_reserved() && !caller.daemon {
            return Err(Error::Forbidden {
                rule: "reserved",
                detail: format!(
                    "{} is the daemon's own name: no client may register, read or act as it",
                    key.agent
                ),
            });
        }
        match caller.agent() {
            Some(me) if me != &key.agent => Err(Error::Forbidden {
                rule: "identity",
                detail: format!("this token is {me}'s; it cannot act as {}", key.agent),
            }),
            Some(_) => self.may_use_channel(caller, &key.channel),
            None if self.has_identity(&key.agent) => Err(Error::Forbidden {
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
        caller.check()?;
        match caller.bound_channel() {
            Some(allowed) if !caller.sees(channel) => Err(Error::Forbidden {
                rule: "channel",
                detail: format!(
                    "{} may only use channel {allowed}, not {channel}",
                    caller.agent().map_or("this token", |a| a.as_str())
                ),
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
        // Nobody reads the daemon's own inboxes: a message there would
        // only wait for retention.
        if let Some(to) = to.filter(|to| to.is_reserved()) {
            return Err(Error::Forbidden {
                rule: "reserved",
                detail: format!("{to} is the daemon's own name: nobody reads its mail"),
            });
        }
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
        caller.check()?;
        match caller.identity() {
            Some(i) if !i.admin => Err(Error::Forbidden {
                rule: "admin",
                detail: format!("{} is not an admin identity", i.name),
            }),
            _ => Ok(()),
        }
    }

    /// Takes one message `caller` sends as `sender` from the budgets it is
    /// charged to: the sender's, and for an unverified caller its origin's
    /// too. Taken from both or neither.
    pub fn take_send(&self, caller: &Caller, sender: &AgentName) -> Result<()> {
        let RateLimit { rate, burst } = self.limit;
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        let Buckets { agents, origins } = &mut *buckets;
        let agent = bucket(agents, sender, burst, now);
        if !agent.refill(now, rate, burst) {
            return Err(agent.refused(sender.to_string(), rate));
        }
        // A token caller is its agent: the name cannot change.
        if let Some(origin) = caller.origin.filter(|_| caller.identity.is_none()) {
            let (rate, burst) = (rate * ORIGIN_SHARE, burst * ORIGIN_SHARE);
            let shared = bucket(origins, &origin, burst, now);
            if !shared.refill(now, rate, burst) {
                return Err(shared.refused(format!("{sender} (from {origin})"), rate));
            }
            shared.tokens -= 1.0;
        }
        agent.tokens -= 1.0;
        Ok(())
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
    fn revoking_or_rotating_ends_every_caller_of_the_old_token() {
        let trust = Trust::new(AuthMode::Owner, RateLimit::default());
        let (alice, token) = spec("alice").issue().unwrap();
        trust.set(&name("alice"), Some(alice.clone()));
        let c = trust.authenticate(false, Some(&token)).unwrap();
        let key = InboxKey::new(Channel::default(), name("alice"));
        assert!(trust.may_act_as(&c, &key).is_ok());
        // Rotation: a new token; the caller of the old one is cut off at
        // once, even though it was authenticated before.
        let rotated = IdentitySpec {
            name: "alice".into(),
            ..IdentitySpec::default()
        }
        .issue()
        .unwrap()
        .0;
        trust.set(&name("alice"), Some(rotated));
        assert!(c.revoked().is_cancelled());
        assert_eq!(trust.sender(&c, None).unwrap_err().code(), "unauthorized");
        assert_eq!(
            trust.may_act_as(&c, &key).unwrap_err().code(),
            "unauthorized"
        );
        // Trusted callers are never revoked.
        let owner = trust.authenticate(true, None).unwrap();
        trust.set(&name("alice"), None);
        assert!(!owner.revoked().is_cancelled());
        assert!(owner.check().is_ok());
    }

    #[test]
    fn the_daemons_own_names_are_nobody_elses_in_every_mode() {
        let key = |n: &str| InboxKey::new(Channel::default(), name(n));
        for mode in [AuthMode::Open, AuthMode::Owner, AuthMode::Tokens] {
            let trust = Trust::new(mode, RateLimit::default());
            let (alice, token) = spec("alice").issue().unwrap();
            trust.set(&alice.name.clone(), Some(alice));
            let mut callers = vec![trust.authenticate(false, Some(&token)).unwrap()];
            callers.extend(trust.authenticate(true, None));
            for caller in &callers {
                for reserved in RESERVED_NAMES {
                    let e = trust.sender(caller, Some(name(reserved))).unwrap_err();
                    assert_eq!(e.code(), "forbidden_sender", "{mode:?} {reserved}: {e}");
                    let e = trust.may_act_as(caller, &key(reserved)).unwrap_err();
                    assert_eq!(e.code(), "forbidden", "{mode:?} {reserved}: {e}");
                }
            }
            // The daemon's own sends still go through, in every mode, even
            // past an identity a store made before the names were reserved.
            trust.set(
                &name("hermod"),
                Some(identity_made_before_the_reservation().0),
            );
            let daemon = Caller::daemon(Auth::Owner);
            assert_eq!(trust.sender(&daemon, None).unwrap(), name("hermod"));
            for reserved in RESERVED_NAMES {
                assert_eq!(
                    trust.sender(&daemon, Some(name(reserved))).unwrap(),
                    name(reserved)
                );
            }
        }
        // A token whose identity predates the reservation proves nothing.
        let trust = Trust::new(AuthMode::Owner, RateLimit::default());
        let (old, token) = identity_made_before_the_reservation();
        trust.set(&name("hermod"), Some(old));
        let c = trust.authenticate(false, Some(&token)).unwrap();
        assert_eq!(
            trust.sender(&c, None).unwrap_err().code(),
            "forbidden_sender"
        );
    }

    /// An identity named `hermod` (issuing one is refused now) and its token.
    fn identity_made_before_the_reservation() -> (Identity, String) {
        let (token, token_hash) = new_token();
        let identity = Identity {
            name: name("hermod"),
            channel: None,
            may_send: vec!["*".into()],
            may_publish: vec![],
            may_subscribe: vec![],
            admin: false,
            created: 0.0,
            token_hash,
        };
        (identity, token)
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
        let open = Caller::trusted(Auth::Open);
        let trust = Trust::new(
            AuthMode::Open,
            RateLimit {
                rate: 10.0,
                burst: 5.0,
            },
        );
        let ok = (0..20)
            .filter(|_| trust.take_send(&open, &name("a")).is_ok())
            .count();
        assert!((5..=6).contains(&ok), "{ok}");
        let e = trust.take_send(&open, &name("a")).unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert!(
            trust.take_send(&open, &name("b")).is_ok(),
            "another sender is unaffected"
        );
        // A flood of new names past the cap forgets the least recently
        // active senders, never the one that keeps sending.
        let slow = RateLimit {
            rate: 0.001,
            burst: 1.0,
        };
        let trust = Trust::new(AuthMode::Open, slow);
        assert!(trust.take_send(&open, &name("a")).is_ok());
        for i in 0..MAX_BUCKETS + 10 {
            if i % 1000 == 0 {
                assert!(
                    trust.take_send(&open, &name("a")).is_err(),
                    "a's budget reset"
                );
            }
            let _ = trust.take_send(&open, &name(&format!("n{i}")));
        }
        assert_eq!(trust.buckets.lock().unwrap().agents.len(), MAX_BUCKETS);
        // An unverified sender that makes up a new name per message still
        // runs out: its origin is charged too (ORIGIN_SHARE agents' worth);
        // another origin, and a token's agent, are not.
        let trust = Trust::new(AuthMode::Open, slow);
        let local = |uid| Caller::trusted(Auth::Open).from_origin(Some(Origin::Uid(uid)));
        let sent = (0..100)
            .filter(|i| trust.take_send(&local(7), &name(&format!("r{i}"))).is_ok())
            .count();
        assert_eq!(sent, ORIGIN_SHARE as usize);
        let e = trust.take_send(&local(7), &name("fresh")).unwrap_err();
        assert!(e.to_string().contains("uid 7"), "{e}");
        assert!(trust.take_send(&local(8), &name("fresh")).is_ok());
        let (w, token) = spec("w").issue().unwrap();
        trust.set(&name("w"), Some(w));
        let w = trust.authenticate(false, Some(&token)).unwrap();
        assert!(trust
            .take_send(&w.from_origin(Some(Origin::Uid(7))), &name("w"))
            .is_ok());
        let off = Trust::new(
            AuthMode::Open,
            RateLimit {
                rate: 0.0,
                burst: 0.0,
            },
        );
        assert!((0..1000).all(|_| off.take_send(&open, &name("a")).is_ok()));
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
