//! The keyspace-notification waiter: one subscriber client per backend wakes every follower of the
//! process whose key changed.
//!
//! The subscriber `PSUBSCRIBE`s to every key under the prefix, on every primary of a cluster
//! (keyspace notifications are per node), and again on each new one after a failover or a
//! resharding. A dispatcher task turns each
//! notification that can end a wait (`set` on a `:resp` key, `del`, `expired` or `evicted` on a
//! `:lock` key) into a wake-up of the waiters registered for that key's hash. Anything that may
//! have lost notifications (the subscriber reconnected, the event stream lagged) or may end every
//! wait (the command connection dropped) wakes every waiter instead, and each one re-checks Redis:
//! a spurious wake-up costs one round trip, a lost one would cost a whole lease.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{health::Health, local::LocalWindow};
use dashmap::{mapref::entry::Entry, DashMap};
use fred::{
    clients::{Client, SubscriberClient},
    interfaces::{ClientLike, ClusterInterface, EventInterface, HeartbeatInterface, KeysInterface},
    types::{
        config::{Config, Server},
        ClusterStateChange, Expiration, KeyspaceEvent,
    },
};
use futures_util::future::join_all;
use tokio::sync::{
    broadcast::{
        error::{RecvError, TryRecvError},
        Receiver,
    },
    Notify,
};

/// The waiters of this process, by key hash, and the signal that wakes all of them.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_hash: DashMap<Box<str>, Slot>,
    everyone: Notify,
}

#[derive(Debug)]
struct Slot {
    changed: Arc<Notify>,
    /// How many [`Registration`]s use this slot: the slot leaves the map with the last one.
    registrations: usize,
}

impl Waiters {
    /// Registers interest in the key with this hash until the returned registration is dropped.
    pub(super) fn register(&self, hash: &str) -> Registration<'_> {
        let changed = {
            let mut slot = self.by_hash.entry(hash.into()).or_insert_with(|| Slot {
                changed: Arc::new(Notify::new()),
                registrations: 0,
            });
            slot.registrations += 1;
            Arc::clone(&slot.changed)
        };
        Registration {
            waiters: self,
            hash: hash.into(),
            changed,
        }
    }

    /// Wakes every waiter of the key with this hash.
    pub(super) fn wake(&self, hash: &str) {
        if let Some(slot) = self.by_hash.get(hash) {
            slot.changed.notify_waiters();
        }
    }

    /// Wakes every waiter of every key, to re-check after notifications may have been lost.
    pub(super) fn wake_everyone(&self) {
        self.everyone.notify_waiters();
    }

    /// How many keys have at least one waiter.
    pub(super) fn keys_waited_on(&self) -> usize {
        self.by_hash.len()
    }
}

/// One waiter's interest in one key. Dropping it unregisters.
#[derive(Debug)]
pub(super) struct Registration<'a> {
    waiters: &'a Waiters,
    hash: Box<str>,
    changed: Arc<Notify>,
}

impl Registration<'_> {
    /// Completes at the next wake-up of this key (or of everyone) after the call, even if the
    /// wake-up happens before the future is first polled: arm it before re-checking Redis, then
    /// await it, and no change in between is lost.
    pub(super) fn armed(&self) -> impl std::future::Future<Output = ()> + '_ {
        let mut key_changed = Box::pin(self.changed.notified());
        let mut everyone = Box::pin(self.waiters.everyone.notified());
        key_changed.as_mut().enable();
        everyone.as_mut().enable();
        async move {
            tokio::select! {
                () = key_changed => {}
                () = everyone => {}
            }
        }
    }
}

impl Registration<'_> {
    /// Completes at the next notification about this key itself after the call, and at nothing
    /// else (not at a wake-up of everyone): for the setup's probe, which must tell a notification
    /// that arrived from a reconnect.
    pub(super) fn heard(&self) -> impl std::future::Future<Output = ()> + '_ {
        let mut key_changed = Box::pin(self.changed.notified());
        key_changed.as_mut().enable();
        key_changed
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // Counted under the map's shard lock, so a concurrent `register` either sees the slot
        // still there or creates a new one: never a slot without registrations, never a leak.
        if let Entry::Occupied(mut slot) = self.waiters.by_hash.entry(self.hash.clone()) {
            slot.get_mut().registrations -= 1;
            if slot.get().registrations == 0 {
                slot.remove();
            }
        }
    }
}

/// What a keyspace notification under the prefix is about.
#[derive(Debug, PartialEq, Eq)]
enum About<'e> {
    /// One parking key's Redis key: its `U:V` hash and the key's suffix (`resp`, `lock`, ...).
    Variant(String, &'e str),
    /// The generation of the URI with this hash.
    Generation(&'e str),
}

fn parse_event<'e>(prefix: &str, event: &'e KeyspaceEvent) -> Option<About<'e>> {
    let name = event.key.as_str()?.strip_prefix(prefix)?;
    let (uri, rest) = name.strip_prefix('{')?.split_once('}')?;
    let rest = rest.strip_prefix(':')?;
    if rest == "gen" {
        return Some(About::Generation(uri));
    }
    let (variant, suffix) = rest.split_once(':')?;
    Some(About::Variant(format!("{uri}:{variant}"), suffix))
}

/// What a notification changes for this process: the local copies to drop (`Some(hash)` of one
/// variant, or `Err(uri)` for every variant of a URI) and the waiters to wake.
#[derive(Debug, PartialEq, Eq)]
struct Effect<'e> {
    forget: Option<Result<String, &'e str>>,
    wake: Option<String>,
}

fn effect<'e>(prefix: &str, event: &'e KeyspaceEvent) -> Effect<'e> {
    match parse_event(prefix, event) {
        Some(About::Generation(uri)) => Effect {
            forget: Some(Err(uri)),
            wake: None,
        },
        Some(About::Variant(hash, suffix)) => {
            let ends_a_wait = match suffix {
                "resp" => event.operation == "set",
                "lock" => matches!(event.operation.as_str(), "del" | "expired" | "evicted"),
                _ => false,
            };
            Effect {
                forget: (suffix == "resp").then(|| Ok(hash.clone())),
                wake: ends_a_wait.then_some(hash),
            }
        }
        None => Effect {
            forget: None,
            wake: None,
        },
    }
}

/// The keyspace channel patterns of the entry, lock and generation keys under `prefix` in
/// database `db` (the fence keys' events are not needed, so not sent).
///
/// The prefix was validated to hold no glob or hash-tag characters, so it needs no escaping.
pub(super) fn keyspace_patterns(db: u8, prefix: &str) -> Vec<String> {
    [":*:resp", ":*:lock", ":gen"]
        .map(|suffix| format!("__keyspace@{db}__:{prefix}{{*}}{suffix}"))
        .into()
}

/// Event streams of both clients, taken before the subscriber subscribes so nothing after the
/// acknowledgement is missed.
pub(super) struct Streams {
    keyspace: Receiver<KeyspaceEvent>,
    subscriber_reconnects: Receiver<Server>,
    subscriber_topology: Receiver<Vec<ClusterStateChange>>,
    command_errors: Receiver<(fred::error::Error, Option<Server>)>,
    command_reconnects: Receiver<Server>,
    command_topology: Receiver<Vec<ClusterStateChange>>,
}

impl Streams {
    pub(super) fn of(client: &Client, subscriber: &SubscriberClient) -> Self {
        Self {
            keyspace: subscriber.keyspace_event_rx(),
            subscriber_reconnects: subscriber.reconnect_rx(),
            subscriber_topology: subscriber.cluster_change_rx(),
            command_errors: client.error_rx(),
            command_reconnects: client.reconnect_rx(),
            command_topology: client.cluster_change_rx(),
        }
    }
}

/// Whether the command connection is up, as its own events tell.
///
/// fred reports a dropped connection as `Connected` until its first reconnection attempt (up to
/// the longest reconnect delay later), and commands sent meanwhile wait for the full command
/// timeout. A connection error marks the connection down for a while; a reconnect marks it up.
/// The mark expires by itself, so events seen out of order can never leave it down for good:
/// past the first reconnection attempt, fred's own state is accurate.
#[derive(Debug)]
pub(super) struct CommandConnection {
    since: Instant,
    /// Milliseconds after `since` until which the connection counts as down.
    down_until: AtomicU64,
    /// Milliseconds after `since` when it last went down.
    went_down_at: AtomicU64,
    back: Notify,
}

impl CommandConnection {
    /// Longer than fred's first reconnection delay (at most 1 s plus jitter).
    const DOWN_FOR: Duration = Duration::from_secs(2);

    pub(super) fn new() -> Self {
        Self {
            since: Instant::now(),
            down_until: AtomicU64::new(0),
            went_down_at: AtomicU64::new(0),
            back: Notify::new(),
        }
    }

    /// Whether the connection is up, waiting for it to come back when it went down less than
    /// `blip` ago: a connection being made again is a blip, not an outage, and a command that
    /// waits for it does not fail open (nor run the work in every process at once).
    pub(super) async fn up_within(&self, blip: Duration) -> bool {
        if self.is_up() {
            return true;
        }
        let blip_ends = self.went_down_at.load(Ordering::Acquire) + blip.as_millis() as u64;
        let left = blip_ends.saturating_sub(self.now());
        if left == 0 {
            return false;
        }
        let back = self.back.notified();
        tokio::pin!(back);
        back.as_mut().enable();
        if self.is_up() {
            return true;
        }
        let _ = tokio::time::timeout(Duration::from_millis(left), back).await;
        self.is_up()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn is_up(&self) -> bool {
        self.now() >= self.down_until.load(Ordering::Acquire)
    }

    fn went_down(&self) {
        let now = self.now();
        if self.is_up() {
            self.went_down_at.store(now, Ordering::Release);
        }
        let until = now.saturating_add(Self::DOWN_FOR.as_millis() as u64);
        self.down_until.store(until, Ordering::Release);
    }

    fn came_back(&self) {
        self.down_until.store(0, Ordering::Release);
        self.back.notify_waiters();
    }

    /// A command went unanswered: the connection counts as down until something is answered
    /// on it again (the canary, every quarter of the staleness bound) or a reconnect.
    pub(super) fn unanswered(&self) {
        self.went_down();
    }

    /// Something was answered on the connection.
    fn answered(&self) {
        if !self.is_up() {
            self.came_back();
        }
    }
}

/// What the dispatcher needs besides the connections' events.
pub(super) struct Dispatch {
    pub(super) waiters: Arc<Waiters>,
    pub(super) local: Arc<LocalWindow>,
    pub(super) command_connection: Arc<CommandConnection>,
    pub(super) health: Arc<Health>,
    pub(super) client: Client,
    pub(super) subscriber: SubscriberClient,
    pub(super) patterns: Vec<String>,
    pub(super) prefix: String,
    /// Whether the backend may turn the keyspace notifications back on when they are lost.
    pub(super) enable_keyspace_events: bool,
    /// How long a connection may leave the canary unanswered (or unheard) before it is made
    /// again: it is half-open.
    pub(super) dead_after: Duration,
    /// The URL's settings, for connections to replicas.
    pub(super) config: Config,
    pub(super) command_timeout: Duration,
}

/// Turns the connections' events into wake-ups, and keeps the canary flying, until the clients
/// quit.
pub(super) async fn dispatch(dispatch: Dispatch, streams: Streams) {
    // Separate loops, so that re-subscribing never delays hearing that the command connection
    // dropped, nor the canary.
    tokio::join!(
        wake_on_notifications(
            &dispatch,
            streams.keyspace,
            streams.subscriber_reconnects,
            streams.subscriber_topology,
            streams.command_topology,
        ),
        track_command_connection(
            &dispatch,
            streams.command_errors,
            streams.command_reconnects
        ),
        fly_canary(&dispatch),
        async {
            // PINGs on the subscriber connection let fred notice it is unresponsive (half-open).
            let _ = dispatch.subscriber.enable_heartbeat(HEARTBEAT, false).await;
        },
    );
}

/// How often the subscriber connection is pinged.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Subscribes (acknowledged) to the keyspace patterns, the canaries' among them, on every primary,
/// trying again with backoff until it succeeds or the client quits.
pub(super) async fn subscribe(subscriber: &SubscriberClient, patterns: &[String]) {
    let mut pause = Duration::from_millis(50);
    loop {
        match super::nodes::psubscribe_everywhere(subscriber, patterns).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause, "could not subscribe to keyspace notifications: parked requests poll Redis until it works");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn wake_on_notifications(
    dispatch: &Dispatch,
    mut keyspace: Receiver<KeyspaceEvent>,
    mut reconnects: Receiver<Server>,
    mut topology: Receiver<Vec<ClusterStateChange>>,
    mut command_topology: Receiver<Vec<ClusterStateChange>>,
) {
    let Dispatch {
        waiters,
        local,
        health,
        prefix,
        ..
    } = dispatch;
    loop {
        tokio::select! {
            event = keyspace.recv() => match event {
                Ok(event) => {
                    if let Some(key) = event.key.as_str().filter(|key| health.is_canary(key)) {
                        health.heard_canary(key);
                        continue;
                    }
                    let effect = effect(prefix, &event);
                    match &effect.forget {
                        Some(Ok(hash)) => local.forget(hash),
                        Some(Err(uri)) => {
                            local.forget_uri(uri);
                            waiters.wake(&super::generation_waiter(uri));
                        }
                        None => {}
                    }
                    if let Some(hash) = &effect.wake {
                        waiters.wake(hash);
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "keyspace notifications lagged: every waiter re-checks");
                    local.clear();
                    waiters.wake_everyone();
                }
                Err(RecvError::Closed) => break,
            },
            reconnected = reconnects.recv() => match reconnected {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    health.lost();
                    local.clear();
                    // A new connection has no subscription: subscribe (acknowledged) before the
                    // waiters re-check, so whatever changes after their re-check is notified.
                    subscribe(&dispatch.subscriber, &dispatch.patterns).await;
                    local.clear();
                    waiters.wake_everyone();
                }
                Err(RecvError::Closed) => break,
            },
            // A cluster's slots moved (a failover, a resharding), as either client found out: the
            // subscriber learns the new primaries (the command client may have found out first,
            // from a `MOVED`), subscribes on each of them, and every waiter re-checks, since a
            // moved key's notifications come from another node from now on.
            // A failover reports many changes within milliseconds (every `MOVED` the clients
            // meet): the ones already queued are followed with this one.
            changed = topology.recv() => match changed {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    let from_commands = drain(&mut command_topology);
                    drain(&mut topology);
                    follow_topology(dispatch, from_commands).await
                }
                Err(RecvError::Closed) => break,
            },
            changed = command_topology.recv() => match changed {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    drain(&mut command_topology);
                    drain(&mut topology);
                    follow_topology(dispatch, true).await
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
}

/// Empties a channel of the events queued on it; whether there were any.
fn drain<T: Clone>(events: &mut Receiver<T>) -> bool {
    let mut any = false;
    while matches!(events.try_recv(), Ok(_) | Err(TryRecvError::Lagged(_))) {
        any = true;
    }
    any
}

/// After a change of the cluster's topology: subscribed on every primary there is now, then every
/// waiter re-checks and the local window starts again.
async fn follow_topology(dispatch: &Dispatch, sync_subscriber: bool) {
    let Dispatch {
        waiters,
        local,
        health,
        subscriber,
        ..
    } = dispatch;
    tracing::debug!("the Redis cluster's topology changed: subscribing on every primary again");
    health.lost();
    local.clear();
    if sync_subscriber {
        let synced = tokio::time::timeout(dispatch.dead_after, subscriber.sync_cluster()).await;
        if let Ok(Err(error)) = synced {
            tracing::debug!(%error, "the subscriber could not read the cluster's slots");
        }
    }
    subscribe(subscriber, &dispatch.patterns).await;
    local.clear();
    waiters.wake_everyone();
}

/// Writes the canary every quarter of the bound; when it has not been heard for a bound, drops
/// the local window, wakes the waiters (they poll from then on), says why, and turns the
/// notifications back on when it may.
async fn fly_canary(dispatch: &Dispatch) {
    let Dispatch {
        health,
        client,
        local,
        waiters,
        ..
    } = dispatch;
    let every = (health.bound / 4).max(Duration::from_millis(10));
    let mut was_alive = false;
    let mut last_repair: Option<Instant> = None;
    let mut beat: u64 = 0;
    // When the canary was last answered on the command connection, and last heard on the
    // subscriber connection (or either connection was last made again).
    let (mut answered, mut heard) = (Instant::now(), Instant::now());
    loop {
        beat += 1;
        let expiry =
            Expiration::PX(i64::try_from(health.bound.as_millis() * 4).unwrap_or(i64::MAX));
        // One canary per primary, on a slot it owns: as the command client sees the cluster now.
        let keys = super::nodes::canary_keys(client, health);
        health.fly(keys.clone());
        let writes = keys.iter().map(|key| {
            let write = client.set::<(), _, _>(key, beat, Some(expiry.clone()), None, false);
            tokio::time::timeout(health.bound, write)
        });
        let written = join_all(writes).await;
        if written.iter().any(|write| matches!(write, Ok(Ok(())))) {
            dispatch.command_connection.answered();
            answered = Instant::now();
        }
        tokio::time::sleep(every).await;
        let alive = health.alive();
        if alive {
            heard = Instant::now();
        }
        // A connection that answers nothing is half-open (a NAT or proxy dropped it without a
        // word): it is made again rather than waited on until TCP gives up, minutes later.
        if answered.elapsed() > dispatch.dead_after {
            tracing::warn!("the Redis command connection answers nothing: making it again");
            let _ = tokio::time::timeout(dispatch.dead_after, client.force_reconnection()).await;
            answered = Instant::now();
        } else if heard.elapsed() > dispatch.dead_after {
            tracing::warn!("the Redis subscriber connection delivers nothing: making it again");
            let subscriber = &dispatch.subscriber;
            let _ =
                tokio::time::timeout(dispatch.dead_after, subscriber.force_reconnection()).await;
            heard = Instant::now();
        }
        if was_alive && !alive {
            local.clear();
            waiters.wake_everyone();
            tracing::warn!(
                bound = ?health.bound,
                "keyspace notifications stopped arriving (flags turned off, a failover, a half-open connection?): \
                 the local window is off and parked requests poll Redis until they arrive again"
            );
        }
        if !alive
            && dispatch.enable_keyspace_events
            && last_repair.is_none_or(|last| last.elapsed() >= REPAIR_EVERY)
        {
            last_repair = Some(Instant::now());
            if let Err(error) = super::builder::turn_on_keyspace_events(
                client,
                &dispatch.config,
                dispatch.command_timeout,
            )
            .await
            {
                tracing::debug!(%error, "could not turn the keyspace notifications back on");
            }
        }
        was_alive = alive;
    }
}

/// How often a backend allowed to may try to turn lost keyspace notifications back on.
const REPAIR_EVERY: Duration = Duration::from_secs(2);

async fn track_command_connection(
    dispatch: &Dispatch,
    mut errors: Receiver<(fred::error::Error, Option<Server>)>,
    mut reconnects: Receiver<Server>,
) {
    let Dispatch {
        waiters,
        command_connection,
        ..
    } = dispatch;
    loop {
        tokio::select! {
            error = errors.recv() => match error {
                // Redis may be gone: marked down first, so the waiters' re-checks fail at once
                // and their callers' failure policy applies now, not when a lease runs out.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    command_connection.went_down();
                    waiters.wake_everyone();
                }
                Err(RecvError::Closed) => break,
            },
            reconnected = reconnects.recv() => match reconnected {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    command_connection.came_back();
                    // A restarted Redis (or a new primary: a failover, a Sentinel's switch)
                    // may have lost the settings `CONFIG SET` made: they are not persisted.
                    // Checked from a task of its own: a slow node must not delay hearing that
                    // the connection dropped again.
                    if dispatch.enable_keyspace_events {
                        let (client, config) = (dispatch.client.clone(), dispatch.config.clone());
                        let timeout = dispatch.command_timeout;
                        tokio::spawn(async move {
                            if let Err(error) =
                                super::builder::turn_on_keyspace_events(&client, &config, timeout)
                                    .await
                            {
                                tracing::warn!(%error, "could not check the keyspace notifications after a reconnect");
                            }
                        });
                    }
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str, operation: &str) -> KeyspaceEvent {
        KeyspaceEvent {
            db: 0,
            operation: operation.into(),
            key: key.into(),
        }
    }

    #[test]
    fn wakes_on_stored_entry_and_released_lock_only_and_forgets_on_changes() {
        let (uri, variant) = (
            "0123456789abcdef0123456789abcdef",
            "fedcba9876543210fedcba9876543210",
        );
        let hash = format!("{uri}:{variant}");
        let resp = format!("parking:{{{uri}}}:{variant}:resp");
        let lock = format!("parking:{{{uri}}}:{variant}:lock");
        let fence = format!("parking:{{{uri}}}:{variant}:fence");
        let gen = format!("parking:{{{uri}}}:gen");
        let wake = |key: &str, op: &str| effect("parking:", &event(key, op)).wake;
        assert_eq!(wake(&resp, "set"), Some(hash.clone()));
        assert_eq!(wake(&lock, "del"), Some(hash.clone()));
        assert_eq!(wake(&lock, "expired"), Some(hash.clone()));
        assert_eq!(wake(&lock, "evicted"), Some(hash.clone()));
        assert_eq!(wake(&lock, "set"), None);
        assert_eq!(wake(&lock, "expire"), None);
        assert_eq!(wake(&resp, "del"), None);
        assert_eq!(wake(&fence, "incrby"), None);
        assert_eq!(effect("other:", &event(&resp, "set")).wake, None);
        let forget = |key: &str, op: &str| {
            effect("parking:", &event(key, op))
                .forget
                .map(|forget| forget.map_err(str::to_owned))
        };
        assert_eq!(forget(&resp, "del"), Some(Ok(hash.clone())));
        assert_eq!(forget(&resp, "expired"), Some(Ok(hash)));
        assert_eq!(forget(&gen, "incrby"), Some(Err(uri.to_owned())));
        assert_eq!(forget(&lock, "del"), None);
    }

    #[test]
    fn patterns_cover_entries_locks_and_generations_under_the_prefix_in_the_database() {
        assert_eq!(
            keyspace_patterns(3, "app:"),
            [
                "__keyspace@3__:app:{*}:*:resp",
                "__keyspace@3__:app:{*}:*:lock",
                "__keyspace@3__:app:{*}:gen"
            ]
        );
    }

    #[test]
    fn a_connection_error_counts_for_a_while_and_a_reconnect_ends_it() {
        let connection = CommandConnection::new();
        assert!(connection.is_up());
        connection.went_down();
        assert!(!connection.is_up());
        connection.came_back();
        assert!(connection.is_up());
        connection.went_down();
        connection
            .down_until
            .store(connection.now().saturating_sub(1), Ordering::Release);
        assert!(connection.is_up(), "the mark must expire by itself");
    }

    #[tokio::test]
    async fn slots_leave_with_their_last_registration() {
        let waiters = Waiters::default();
        let first = waiters.register("a");
        let second = waiters.register("a");
        let other = waiters.register("b");
        assert_eq!(waiters.keys_waited_on(), 2);
        drop(first);
        assert_eq!(waiters.keys_waited_on(), 2);
        drop((second, other));
        assert_eq!(waiters.keys_waited_on(), 0);
    }

    #[tokio::test]
    async fn a_wake_up_between_arming_and_awaiting_is_not_lost() {
        let waiters = Waiters::default();
        let registration = waiters.register("a");
        let armed = registration.armed();
        waiters.wake("a");
        tokio::time::timeout(Duration::from_secs(1), armed)
            .await
            .expect("the wake-up before the await ends it");

        let armed = registration.armed();
        waiters.wake_everyone();
        tokio::time::timeout(Duration::from_secs(1), armed)
            .await
            .expect("waking everyone ends it");

        let armed = registration.armed();
        waiters.wake("b");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), armed)
                .await
                .is_err(),
            "another key's wake-up must not end it"
        );
    }
}
