//! The Redis backend: windows and locks shared by every process on one Redis.
//!
//! For a parking key with URI part hash `U` and variant part hash `V` (the first 128 bits of
//! SHA-256 of each, in hex, see [`Key::uri_digest_hex`]) and the prefix `P` (default `parking:`)
//! it uses four Redis keys, whose braces are a cluster hash tag that keeps every variant of one
//! URI in one slot:
//!
//! | key | holds | lives |
//! |---|---|---|
//! | `P{U}:V:resp` | `<generation> <entry>`: the stored entry | `PX keep` |
//! | `P{U}:V:lock` | `<fence>:<nonce>:<generation>`, the leader's token | `PX lease`, renewed |
//! | `P{U}:V:fence` | `<fence>:<nonce>`: a counter that orders acquisitions, and who took it | a few leases |
//! | `P{U}:gen` | the URI's generation, moved on by every invalidation | a day |
//!
//! Every operation is one Lua script (one round trip). Followers wait on keyspace notifications
//! through one subscriber connection per backend. Entries read from Redis are kept in a local
//! window, so a warm key is served without a round trip; the same notifications drop a copy as
//! soon as its entry (or its URI's generation) changes in Redis.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use fred::{
    clients::{Client, SubscriberClient},
    error::ErrorKind,
    interfaces::ClientLike,
    types::{ClientState, Value},
};
use tokio::{task::JoinHandle, time::Instant};

use super::{
    Acquire, Backend, BackendError, BackendFuture, FailurePolicy, Lease, LeaseSettings, Lookup,
    Wake,
};
use crate::Key;

mod builder;
mod health;
mod local;
mod nodes;
mod scripts;
mod waiter;

pub use builder::{NodeKeyspaceEvents, RedisBackendBuilder, RedisSetupError};

use local::LocalWindow;
use scripts::{Script, Scripts};
use waiter::{CommandConnection, Waiters};

/// How long past a lock's `PTTL` a waiter sleeps before it looks again, when no notification
/// came: Redis fires `expired` when it notices the expiry, which can be a little late.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// Windows and locks in Redis, shared by every process that uses the same Redis and prefix: the
/// work runs once per key per TTL window across all of them.
///
/// Each backend holds two connections, however many requests and keys it serves: one for
/// commands, one subscribed to keyspace notifications that wake parked callers the moment the
/// leader stores its value or lets go of its lock. Clones share both.
///
/// Redis must send keyspace notifications for the `K`, `g`, `$` and `x` classes
/// (`notify-keyspace-events`): [`build`](RedisBackendBuilder::build) checks, and turns them on
/// only if asked to with [`enable_keyspace_events`](RedisBackendBuilder::enable_keyspace_events).
///
/// When Redis is down or slower than the [command
/// timeout](RedisBackendBuilder::command_timeout), every operation fails within that timeout and
/// the [failure policy](RedisBackendBuilder::failure_policy) applies; the connections come back by
/// themselves when Redis does.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_parking::{ParkingLayer, RedisBackend};
///
/// # async fn example() -> Result<(), tower_parking::RedisSetupError> {
/// let backend = RedisBackend::builder("redis://127.0.0.1:6379")
///     .prefix("myapp:parking:")
///     .lease(Duration::from_secs(10))
///     .enable_keyspace_events(true)
///     .build()
///     .await?;
/// let layer = ParkingLayer::new()
///     .ttl(Duration::from_secs(30))
///     .backend(backend);
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    subscriber: SubscriberClient,
    scripts: Scripts,
    waiters: Arc<Waiters>,
    local: Arc<LocalWindow>,
    command_connection: Arc<CommandConnection>,
    dispatcher: JoinHandle<()>,
    prefix: String,
    lease: LeaseSettings,
    command_timeout: Duration,
    failure_policy: FailurePolicy,
    nonces: Nonces,
    health: Arc<health::Health>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dispatcher.abort();
        let (client, subscriber) = (self.client.clone(), self.subscriber.clone());
        // Closing the connections needs the runtime; without one they close with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::join!(client.quit(), subscriber.quit());
            });
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix)
            .field("lease", &self.inner.lease)
            .field("command_timeout", &self.inner.command_timeout)
            .field("failure_policy", &self.inner.failure_policy)
            .field("state", &self.inner.client.state())
            .finish_non_exhaustive()
    }
}

/// The Redis key names of one parking key.
struct RedisKeys {
    /// The parking key: its local copy goes under it.
    key: Key,
    /// `U:V`, the digests of the key's parts: the name its waiters and local copy go under.
    hash: String,
    /// `U`, the digest of the key's URI part.
    uri: String,
    resp: String,
    lock: String,
    fence: String,
    gen: String,
}

/// The name a write waits under for its own generation's notification.
fn generation_waiter(uri: &str) -> String {
    format!("gen:{uri}")
}

/// How long a URI's generation lives after its last invalidation. Safety does not depend on it:
/// a generation that expired reads as `0`, which no entry stored since its first invalidation
/// carries, and one created again starts above every earlier number.
const GEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Unique lock tokens: a random per-backend part and a counter.
#[derive(Debug)]
struct Nonces {
    instance: u64,
    next: AtomicU64,
}

impl Nonces {
    fn new() -> Self {
        Self {
            instance: crate::random::u64(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:x}", self.instance)
    }
}

impl RedisBackend {
    /// Connects with the default settings of [`RedisBackendBuilder`]: the same as
    /// `RedisBackend::builder(url).build().await`.
    pub async fn connect(url: &str) -> Result<Self, RedisSetupError> {
        Self::builder(url).build().await
    }

    /// Starts building a backend on the Redis at `url`: `redis://`, `rediss://` (TLS),
    /// `redis+unix:///path/to/redis.sock`, or `redis-sentinel://` with a `sentinelServiceName`, as
    /// [fred](https://docs.rs/fred) reads them. A database in the path (`redis://host/2`) is
    /// honoured.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder::new(url.into())
    }

    /// The prefix of every Redis key this backend uses.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// How many keys callers of this backend are waiting on now (0 once every wait ended).
    pub fn waiting_keys(&self) -> usize {
        self.inner.waiters.keys_waited_on()
    }

    fn keys(&self, key: &Key) -> RedisKeys {
        let prefix = &self.inner.prefix;
        let (uri, variant) = (key.uri_digest_hex(), key.variant_digest_hex());
        RedisKeys {
            resp: format!("{prefix}{{{uri}}}:{variant}:resp"),
            lock: format!("{prefix}{{{uri}}}:{variant}:lock"),
            fence: format!("{prefix}{{{uri}}}:{variant}:fence"),
            gen: format!("{prefix}{{{uri}}}:gen"),
            hash: format!("{uri}:{variant}"),
            uri,
            key: key.clone(),
        }
    }

    /// How long a fence counter outlives the last acquisition or renewal of its key. Safety does
    /// not depend on it (a counter created again starts above every earlier number); it only
    /// bounds how late a leader that lost its lease, with nobody taking over, may still store.
    fn fence_ttl(lease: Duration) -> Duration {
        lease * 2 + Duration::from_secs(1)
    }

    /// Runs a script with the command timeout, failing at once while Redis is disconnected.
    async fn run(
        &self,
        operation: &'static str,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, Failure> {
        let inner = &*self.inner;
        if !inner
            .command_connection
            .up_within(inner.command_timeout)
            .await
            || inner.client.state() != ClientState::Connected
        {
            return Err(Failure {
                error: BackendError::new(format_args!(
                    "{operation}: not connected to Redis (reconnecting)"
                )),
                may_still_run: false,
            });
        }
        let failure = match tokio::time::timeout(
            inner.command_timeout,
            script.run(&inner.client, keys, args),
        )
        .await
        {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(error)) => Failure {
                may_still_run: *error.kind() == ErrorKind::Timeout,
                error: BackendError::new(format_args!("{operation}: {error}")),
            },
            Err(_) => Failure {
                error: BackendError::new(format_args!(
                    "{operation}: Redis did not answer within {:?}",
                    inner.command_timeout
                )),
                may_still_run: true,
            },
        };
        if failure.may_still_run {
            // Unanswered: the connection may be half-open. Later commands fail at once until
            // the canary gets an answer again, instead of each waiting the command timeout.
            inner.command_connection.unanswered();
        }
        Err(failure)
    }

    /// Looks at the stored entry and the lock without taking anything.
    async fn peek_remote(
        &self,
        keys: &RedisKeys,
        lookup: Lookup,
        awaited: &str,
    ) -> Result<Peeked, BackendError> {
        let generation = self.inner.local.generation();
        let peek = || {
            self.run(
                "wait",
                &self.inner.scripts.peek,
                vec![keys.resp.clone(), keys.lock.clone(), keys.gen.clone()],
                vec![
                    lookup_arg(lookup),
                    crate::clock::now().to_string().into(),
                    awaited.into(),
                ],
            )
        };
        // Cut off by a connection that dropped: a look changes nothing, so it is asked again
        // while the connection is being made again (within the command timeout), rather than
        // failing a parked request over a blip.
        let give_up = Instant::now() + self.inner.command_timeout;
        let mut pause = Duration::from_millis(10);
        let reply = loop {
            match peek().await {
                Err(failure) if !failure.may_still_run && Instant::now() + pause < give_up => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    let connection = &self.inner.command_connection;
                    if !connection.up_within(self.inner.command_timeout).await {
                        return Err(failure.error);
                    }
                }
                reply => break reply?,
            }
        };
        let mut items = reply.into_array().into_iter();
        let tag = items.next().and_then(|tag| tag.as_string());
        let peeked = match tag.as_deref() {
            Some("stored") => items
                .next()
                .and_then(Value::into_bytes)
                .and_then(entry_of)
                .map(|entry| Peeked::Stored(self.keep(keys, entry, None, generation))),
            Some("held") => {
                let pttl = items.next().and_then(|pttl| pttl.as_i64());
                let awaited = items.next().and_then(|fence| fence.into_string());
                pttl.zip(awaited)
                    .map(|(pttl, awaited)| Peeked::Held(self.remaining(pttl), awaited))
            }
            Some("free") => Some(Peeked::Free),
            _ => None,
        };
        peeked.ok_or_else(|| unexpected("wait", "a malformed reply"))
    }

    /// Releases the lock an acquire that timed out may still take when a slow Redis gets to it, so
    /// nobody waits a whole lease for a leader that does not know it leads. Sent on the same
    /// connection, after the acquire: Redis runs it after the acquire, if it runs that at all.
    fn abandon(&self, lock: String, nonce: String) {
        let backend = self.clone();
        tokio::spawn(async move {
            let suffix = format!(":{nonce}:");
            let scripts = &backend.inner.scripts;
            if let Err(failure) = backend
                .run("abandon", &scripts.abandon, vec![lock], vec![suffix.into()])
                .await
            {
                tracing::debug!(error = %failure.error, "could not abandon a timed-out acquisition: its lock lives until its lease ends");
            }
        });
    }

    /// Keeps a copy of an entry just read from Redis in the local window, until it is no longer
    /// kept there (its `PTTL`, or the end of its keep time when that is not known).
    fn keep(&self, keys: &RedisKeys, entry: Bytes, pttl: Option<i64>, generation: u64) -> Bytes {
        let keep_for = match pttl {
            Some(pttl) => u64::try_from(pttl).ok().map(Duration::from_millis),
            None => crate::backend::Stamp::open(&entry)
                .map(|(stamp, _)| crate::clock::between(crate::clock::now(), stamp.keep_until)),
        };
        if let Some(keep_for) = keep_for {
            self.inner.local.keep(
                &keys.key,
                &keys.hash,
                entry.clone(),
                Instant::now() + keep_for,
                generation,
            );
        }
        entry
    }

    /// A lock's remaining life from its `PTTL` (-1, no expiry, which only a foreign writer could
    /// cause, counts as a full lease).
    fn remaining(&self, pttl: i64) -> Duration {
        u64::try_from(pttl).map_or(self.inner.lease.lease, Duration::from_millis)
    }
}

/// A script call that failed.
struct Failure {
    error: BackendError,
    /// The command timed out after it was sent: a slow Redis may still run it.
    may_still_run: bool,
}

impl From<Failure> for BackendError {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

enum Peeked {
    Stored(Bytes),
    /// The lock's remaining life, and the fence of the leader whose entry the wait is for.
    Held(Duration, String),
    Free,
}

/// The tagged reply of the acquire and peek scripts.
enum Reply {
    /// The value and its remaining time to live in milliseconds.
    Fresh(Bytes, i64),
    Acquired {
        fence: u64,
        token: String,
        stale: Option<Bytes>,
    },
    /// The lock's `PTTL`, its holder's fence (`0`: unknown), and the stale entry, if any.
    Held(i64, String, Option<Bytes>),
}

impl Reply {
    fn parse(operation: &str, reply: Value) -> Result<Self, BackendError> {
        let mut items = reply.into_array().into_iter();
        let tag = items.next().and_then(|tag| tag.as_string());
        let parsed = match tag.as_deref() {
            Some("fresh") => {
                let value = items.next().and_then(Value::into_bytes).and_then(entry_of);
                let pttl = items.next().and_then(|pttl| pttl.as_i64());
                value
                    .zip(pttl)
                    .map(|(value, pttl)| Reply::Fresh(value, pttl))
            }
            Some("held") => {
                let pttl = items.next().and_then(|pttl| pttl.as_i64());
                let fence = items.next().and_then(Value::into_string);
                let stale = items.next().and_then(Value::into_bytes).and_then(entry_of);
                pttl.zip(fence)
                    .map(|(pttl, fence)| Reply::Held(pttl, fence, stale))
            }
            Some("acquired") => {
                let fence = items.next().and_then(|fence| fence.as_u64());
                let token = items.next().and_then(|token| token.into_string());
                let stale = items.next().and_then(Value::into_bytes).and_then(entry_of);
                fence.zip(token).map(|(fence, token)| Reply::Acquired {
                    fence,
                    token,
                    stale,
                })
            }
            _ => None,
        };
        parsed.ok_or_else(|| unexpected(operation, "a malformed reply"))
    }
}

/// The entry in a stored value, `<generation> <entry>`, as the scripts return it whole.
fn entry_of(stored: Bytes) -> Option<Bytes> {
    let space = stored.iter().take(24).position(|&byte| byte == b' ')?;
    Some(stored.slice(space + 1..))
}

fn unexpected(operation: &str, what: &str) -> BackendError {
    BackendError::new(format_args!(
        "{operation}: unexpected script reply ({what}); is another program writing under this prefix?"
    ))
}

fn lookup_arg(lookup: Lookup) -> Value {
    Value::from_static_str(match lookup {
        Lookup::Check => "1",
        Lookup::Skip => "0",
    })
}

fn millis(duration: Duration) -> Value {
    // Redis refuses a zero `PX`; a sub-millisecond duration rounds up to 1 ms.
    Value::Integer(i64::try_from(duration.as_millis().max(1)).unwrap_or(i64::MAX))
}

fn is_one(reply: &Value) -> bool {
    reply.as_i64() == Some(1)
}

impl Backend for RedisBackend {
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        lease: Duration,
        lookup: Lookup,
    ) -> BackendFuture<'a, Acquire> {
        Box::pin(async move {
            let keys = self.keys(key);
            let nonce = self.inner.nonces.next();
            let generation = self.inner.local.generation();
            let reply = self
                .run(
                    "acquire",
                    &self.inner.scripts.acquire,
                    vec![
                        keys.resp.clone(),
                        keys.lock.clone(),
                        keys.fence.clone(),
                        keys.gen.clone(),
                    ],
                    vec![
                        lookup_arg(lookup),
                        millis(lease),
                        nonce.as_str().into(),
                        millis(Self::fence_ttl(lease)),
                        crate::clock::now().to_string().into(),
                    ],
                )
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(failure) => {
                    if failure.may_still_run {
                        self.abandon(keys.lock.clone(), nonce);
                    }
                    return Err(failure.error);
                }
            };
            Ok(match Reply::parse("acquire", reply)? {
                Reply::Fresh(value, pttl) => {
                    Acquire::Fresh(self.keep(&keys, value, Some(pttl), generation))
                }
                Reply::Acquired {
                    fence,
                    token,
                    stale,
                } => Acquire::Acquired(Lease::new(key.clone(), fence, token, lease), stale),
                Reply::Held(pttl, fence, stale) => Acquire::Held {
                    expires_in: self.remaining(pttl),
                    leader: fence.parse().ok().filter(|fence| *fence > 0),
                    stored: stale,
                },
            })
        })
    }

    fn renew<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, bool> {
        Box::pin(async move {
            let keys = self.keys(lease.key());
            let reply = self
                .run(
                    "renew",
                    &self.inner.scripts.renew,
                    vec![keys.lock, keys.fence],
                    vec![
                        lease.token().into(),
                        millis(lease.duration()),
                        millis(Self::fence_ttl(lease.duration())),
                    ],
                )
                .await?;
            Ok(is_one(&reply))
        })
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        entry: Bytes,
        keep: Duration,
    ) -> BackendFuture<'a, bool> {
        Box::pin(async move {
            let keys = self.keys(lease.key());
            // The token is `<fence>:<nonce>:<generation>`: the fence counter's value when the
            // lease was taken, then the URI's generation.
            let (owner, generation) = lease.token().rsplit_once(':').unwrap_or(("", "0"));
            let reply = self
                .run(
                    "complete",
                    &self.inner.scripts.complete,
                    vec![keys.resp, keys.lock, keys.fence, keys.gen],
                    vec![
                        lease.token().into(),
                        owner.into(),
                        Value::Bytes(entry),
                        millis(keep),
                        generation.into(),
                    ],
                )
                .await?;
            Ok(is_one(&reply))
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let keys = self.keys(lease.key());
            self.run(
                "release",
                &self.inner.scripts.release,
                vec![keys.lock],
                vec![lease.token().into()],
            )
            .await?;
            Ok(())
        })
    }

    fn wait_for<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
        leader: Option<u64>,
    ) -> BackendFuture<'a, Wake> {
        Box::pin(async move {
            let keys = self.keys(key);
            let registration = self.inner.waiters.register(&keys.hash);
            // The fence of the leader this wait is for: as `acquire` saw it, or learnt from its
            // lock at the first look.
            let mut awaited = leader.map_or_else(|| String::from("0"), |fence| fence.to_string());
            loop {
                // Armed before the re-check: a change after it wakes us even if it lands before
                // we start waiting.
                let changed = registration.armed();
                let expires_in = match self.peek_remote(&keys, lookup, &awaited).await? {
                    Peeked::Stored(entry) => return Ok(Wake::Stored(entry)),
                    Peeked::Free => return Ok(Wake::Released),
                    Peeked::Held(expires_in, fence) => {
                        awaited = fence;
                        expires_in
                    }
                };
                let now = Instant::now();
                if deadline.is_some_and(|deadline| deadline <= now) {
                    return Ok(Wake::TimedOut);
                }
                // Notifications are fire-and-forget: a dead leader's lock is looked at again
                // once it should have expired, notified or not, and every lock again after a
                // while anyway (one removed without a notification, by `FLUSHALL` or eviction,
                // costs no more; while notifications are known to be down, tens of ms).
                let look_again =
                    now + (expires_in + EXPIRY_MARGIN).min(self.inner.health.recheck_after());
                match deadline {
                    Some(deadline) if deadline <= look_again => {
                        tokio::select! {
                            () = changed => {}
                            () = tokio::time::sleep_until(deadline) => return Ok(Wake::TimedOut),
                        }
                    }
                    _ => {
                        tokio::select! {
                            () = changed => {}
                            () = tokio::time::sleep_until(look_again) => {}
                        }
                    }
                }
            }
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Key) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let keys = self.keys(key);
            // Redis hands the generation's notification to every subscriber as it runs the
            // script; waiting until this process's own subscriber has it means the others'
            // have it on the wire too, so a request sent after the write's answer finds their
            // copies dropped (unless their link to Redis is slower than the round trip).
            let heard = self.inner.waiters.register(&generation_waiter(&keys.uri));
            let armed = heard.armed();
            self.run(
                "invalidate",
                &self.inner.scripts.invalidate,
                vec![keys.gen],
                vec![millis(GEN_TTL)],
            )
            .await?;
            self.inner.local.forget_uri(&keys.uri);
            if self.inner.health.alive() {
                let _ = tokio::time::timeout(self.inner.command_timeout, armed).await;
            }
            Ok(())
        })
    }

    fn lease_settings(&self) -> LeaseSettings {
        self.inner.lease
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.inner.failure_policy
    }

    fn peek(&self, key: &Key) -> Option<Bytes> {
        self.inner.local.get(key).map(|(entry, ..)| entry)
    }

    fn peek_opened(&self, key: &Key) -> Option<(crate::backend::Stamp, Bytes)> {
        self.inner
            .local
            .get(key)
            .map(|(_, stamp, payload)| (stamp, payload))
    }
}
