//! Building a [`RedisBackend`]: settings, connections, and the server settings check.

use std::{error::Error as StdError, fmt, sync::Arc, time::Duration};

use fred::{
    clients::{Client, SubscriberClient},
    error::{Error as FredError, ErrorKind},
    interfaces::{ClientLike, ConfigInterface, KeysInterface},
    types::{
        config::{Config, ReconnectPolicy, UnresponsiveConfig},
        Builder, ConnectHandle, Expiration, Value,
    },
};

use super::{
    health::Health,
    local::LocalWindow,
    nodes,
    scripts::Scripts,
    waiter::{self, CommandConnection, Dispatch, Streams, Waiters},
    Inner, Nonces, RedisBackend,
};
use crate::{BoxError, FailurePolicy, LeaseSettings};

/// The keyspace-notification classes the backend needs: `K` (keyspace channel), `g` (`del`), `$`
/// (`set`) and `x` (`expired`).
const NEEDED_FLAGS: [char; 4] = ['K', 'g', '$', 'x'];

/// Classes the backend turns on too when it may, but does without: `e` (`evicted`), so that a
/// lock evicted under `maxmemory` wakes its waiters at once rather than at their next re-check.
const WANTED_FLAGS: [char; 1] = ['e'];

/// What the `A` flag of `notify-keyspace-events` stands for.
const ALIAS_ALL: &str = "g$lshzxetd";

/// The notify-keyspace-events setting.
const SETTING: &str = "notify-keyspace-events";

/// Characters a prefix may not hold: they would break the keyspace pattern (a glob) or the cluster
/// hash tag (the first `{...}` of a key name).
const FORBIDDEN_IN_PREFIX: &[char] = &['{', '}', '*', '?', '[', ']', '\\'];

/// How many keyspace notifications may queue between the subscriber connection and the
/// dispatcher before the dispatcher wakes every waiter to re-check instead.
const NOTIFICATION_BACKLOG: usize = 16 * 1024;

/// How many `MOVED` or `ASK` redirections a command follows (fred's default).
const MAX_REDIRECTIONS: u32 = 5;

/// Builds a [`RedisBackend`].
///
/// | setting | default |
/// |---|---|
/// | [`prefix`](RedisBackendBuilder::prefix) | `"parking:"` |
/// | [`lease`](RedisBackendBuilder::lease) | 10 seconds |
/// | [`renew_every`](RedisBackendBuilder::renew_every) | a third of the lease |
/// | [`command_timeout`](RedisBackendBuilder::command_timeout) | 1 second |
/// | [`failure_policy`](RedisBackendBuilder::failure_policy) | [`FailurePolicy::FailOpen`] |
/// | [`enable_keyspace_events`](RedisBackendBuilder::enable_keyspace_events) | `false` |
/// | [`local_window_bytes`](RedisBackendBuilder::local_window_bytes) | 64 MiB |
/// | [`local_window_staleness`](RedisBackendBuilder::local_window_staleness) | 1 second |
/// | [`start_when_down`](RedisBackendBuilder::start_when_down) | `true` (fail-open only) |
#[derive(Debug, Clone)]
pub struct RedisBackendBuilder {
    url: String,
    prefix: String,
    lease: Duration,
    renew_every: Option<Duration>,
    command_timeout: Duration,
    failure_policy: FailurePolicy,
    enable_keyspace_events: bool,
    local_window_bytes: usize,
    local_window_staleness: Duration,
    start_when_down: bool,
}

impl RedisBackendBuilder {
    pub(super) fn new(url: String) -> Self {
        Self {
            url,
            prefix: "parking:".into(),
            lease: Duration::from_secs(10),
            renew_every: None,
            command_timeout: Duration::from_secs(1),
            failure_policy: FailurePolicy::FailOpen,
            enable_keyspace_events: false,
            local_window_bytes: 64 * 1024 * 1024,
            local_window_staleness: Duration::from_secs(1),
            start_when_down: true,
        }
    }

    /// The prefix of every Redis key the backend uses (default `"parking:"`). Backends with the
    /// same prefix on the same Redis act as one; give unrelated applications different prefixes.
    ///
    /// It may not be empty, nor hold whitespace or any of `{ } * ? [ ] \`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a leader's lock lives without renewal (default 10 seconds): the longest the
    /// followers of a leader that died wait before one of them takes over.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often a running leader renews its lease (default: a third of the lease). Must be
    /// shorter than the lease.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Whether [`build`](RedisBackendBuilder::build) succeeds when Redis does not answer (default
    /// `true`, and only with [`FailurePolicy::FailOpen`]): the backend then serves with
    /// in-process coalescing alone, and joins the fleet, with the setup checks `build` would
    /// have made (their failures logged), as soon as Redis answers. With `false`, or with
    /// [`FailurePolicy::FailClosed`], `build` fails with [`RedisSetupError::Connect`].
    pub fn start_when_down(mut self, enabled: bool) -> Self {
        self.start_when_down = enabled;
        self
    }

    /// How long any Redis command may take before it counts as failed (default 1 second). A
    /// failed command applies the [failure policy](RedisBackendBuilder::failure_policy).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// What requests do when Redis is down or slow (default: [`FailurePolicy::FailOpen`], served
    /// with in-process coalescing only).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Whether [`build`](RedisBackendBuilder::build) may turn on the keyspace notifications the
    /// backend needs with `CONFIG SET` when they are off (default `false`: it fails with
    /// [`RedisSetupError::KeyspaceEventsDisabled`], which says what to set). Flags already set are
    /// kept. The setting is not persisted to `redis.conf`, so a restarted Redis needs it again
    /// (the next build does it), and on a replicated setup only the current primary gets it.
    pub fn enable_keyspace_events(mut self, enable: bool) -> Self {
        self.enable_keyspace_events = enable;
        self
    }

    /// How many bytes of values read from Redis this process keeps to serve hits without a round
    /// trip (default 64 MiB; 0 turns the local window off). A copy is served only until its value
    /// expires in Redis, and is dropped as soon as a keyspace notification says the value changed
    /// (stored again, invalidated), so it can outlive a change made elsewhere by that
    /// notification's latency, never by more. Values larger than a quarter of it are not kept.
    pub fn local_window_bytes(mut self, bytes: usize) -> Self {
        self.local_window_bytes = bytes;
        self
    }

    /// The most a copy in the local window may lag behind Redis, whatever happens to keyspace
    /// notifications (default 1 second). A copy read from Redis longer ago than this is read
    /// again before it is served (so a `FLUSHALL`, which sends no notification per key, is seen
    /// within it), and nothing is served from the window while the backend's canary, a key it
    /// writes every quarter of this, is not heard back through the notifications.
    pub fn local_window_staleness(mut self, bound: Duration) -> Self {
        self.local_window_staleness = bound.max(Duration::from_millis(40));
        self
    }

    /// Connects (one command connection, one subscriber connection), subscribes to the keyspace
    /// notifications under the prefix, and checks the server's `notify-keyspace-events` setting.
    /// When Redis does not answer, see [`start_when_down`](RedisBackendBuilder::start_when_down).
    pub async fn build(self) -> Result<RedisBackend, RedisSetupError> {
        validate_prefix(&self.prefix)?;
        let renew_every = self.renewal_interval();
        if self.lease < Duration::from_millis(1)
            || renew_every.is_zero()
            || renew_every >= self.lease
        {
            return Err(RedisSetupError::InvalidLease {
                lease: self.lease,
                renew_every,
            });
        }
        let config = parse_url(&self.url)?;
        // A cluster has database 0 only.
        let db = config.database.unwrap_or(0);
        let (client, subscriber) = self.clients(config.clone())?;
        let connected = async {
            let client_task = client.init().await?;
            Ok::<_, FredError>((client_task, subscriber.init().await?))
        };
        match connected.await {
            Ok(tasks) => {
                self.assemble(config, db, client, subscriber, tasks, Joined::AtBuild)
                    .await
            }
            Err(error)
                if self.start_when_down
                    && self.failure_policy == FailurePolicy::FailOpen
                    && is_connection_error(&error) =>
            {
                let _ = tokio::join!(client.quit(), subscriber.quit());
                tracing::warn!(%error, "Redis does not answer: starting with in-process coalescing only, joining the fleet when it does");
                // Clients that keep trying to connect, in the background.
                let mut config = config;
                config.fail_fast = false;
                let (client, subscriber) = self.clients(config.clone())?;
                let tasks = (client.connect(), subscriber.connect());
                self.assemble(config, db, client, subscriber, tasks, Joined::Later)
                    .await
            }
            Err(error) => {
                let _ = tokio::join!(client.quit(), subscriber.quit());
                Err(connect_error(error))
            }
        }
    }

    /// The backend on these clients: connected already and checked now, or to be checked and
    /// subscribed once they connect.
    async fn assemble(
        self,
        config: Config,
        db: u8,
        client: Client,
        subscriber: SubscriberClient,
        (client_task, subscriber_task): (ConnectHandle, ConnectHandle),
        joined: Joined,
    ) -> Result<RedisBackend, RedisSetupError> {
        // The streams exist before the subscription is acknowledged: nothing after it is lost.
        let streams = Streams::of(&client, &subscriber);
        let mut patterns = waiter::keyspace_patterns(db, &self.prefix);
        let nonces = Nonces::new();
        let health = Arc::new(Health::new(
            &self.prefix,
            db,
            &nonces.next(),
            self.local_window_staleness,
        ));
        patterns.push(health.canary_pattern.clone());
        if joined == Joined::AtBuild {
            if let Err(error) = nodes::psubscribe_everywhere(&subscriber, &patterns).await {
                let _ = tokio::join!(client.quit(), subscriber.quit());
                return Err(setup_error(error));
            }
        }
        let waiters = Arc::new(Waiters::default());
        let local = Arc::new(LocalWindow::new(
            self.local_window_bytes,
            Arc::clone(&health),
        ));
        let command_connection = Arc::new(CommandConnection::new());
        let dispatch = Dispatch {
            waiters: Arc::clone(&waiters),
            local: Arc::clone(&local),
            command_connection: Arc::clone(&command_connection),
            health: Arc::clone(&health),
            client: client.clone(),
            subscriber: subscriber.clone(),
            patterns,
            prefix: self.prefix.clone(),
            enable_keyspace_events: self.enable_keyspace_events,
            dead_after: (self.command_timeout * 2).max(Duration::from_secs(2)),
            config: config.clone(),
            command_timeout: self.command_timeout,
        };
        let connections = futures_util::future::join(
            keep_connected(client.clone(), client_task),
            keep_connected(subscriber.clone(), subscriber_task),
        );
        let dispatcher = match joined {
            Joined::AtBuild => tokio::spawn(async move {
                tokio::join!(waiter::dispatch(dispatch, streams), connections);
            }),
            Joined::Later => tokio::spawn(async move {
                tokio::join!(join_then_dispatch(dispatch, streams), connections);
            }),
        };
        let renew_every = self.renewal_interval();
        // From here on, dropping the backend closes the connections and stops the dispatcher.
        let backend = RedisBackend {
            inner: Arc::new(Inner {
                client,
                subscriber,
                scripts: Scripts::new(),
                waiters,
                local,
                command_connection,
                dispatcher,
                prefix: self.prefix,
                lease: LeaseSettings {
                    lease: self.lease,
                    renew_every,
                },
                command_timeout: self.command_timeout,
                failure_policy: self.failure_policy,
                nonces,
                health,
            }),
        };
        if joined == Joined::AtBuild {
            check_keyspace_events(&backend, &config, self.enable_keyspace_events).await?;
        }
        Ok(backend)
    }

    /// How often the lease is renewed: as set, or a third of the lease.
    fn renewal_interval(&self) -> Duration {
        self.renew_every.unwrap_or(self.lease / 3)
    }

    /// The command client and the subscriber client, not connected yet.
    fn clients(&self, config: Config) -> Result<(Client, SubscriberClient), RedisSetupError> {
        let mut builder = Builder::from_config(config);
        let mut reconnect = ReconnectPolicy::new_exponential(0, 50, 1_000, 2);
        reconnect.set_jitter(50);
        builder
            .set_policy(reconnect)
            .with_connection_config(|connection| {
                connection.connection_timeout = self.command_timeout.max(Duration::from_secs(2));
                connection.internal_command_timeout = connection.connection_timeout;
                // fred 10.1 follows an `ASK` redirection (a slot being migrated) by sending
                // `ASKING` to the new node, then the command to the old one again, which answers
                // `ASK` again, until the command runs out of redirections (its caller gets an
                // error, and `Script::run` tries again later) or of attempts (fred stops the whole
                // client). So a command has an attempt more than it has redirections. The
                // attempts also resend a command cut off by a dropped connection: every script is
                // safe to run twice (an acquisition finds the lock its nonce took), and one whose
                // caller gave up is abandoned by its nonce.
                connection.max_redirections = MAX_REDIRECTIONS;
                connection.max_command_attempts = MAX_REDIRECTIONS + 2;
                connection.tcp.nodelay = Some(true);
                // A half-open connection (dropped silently by a proxy or NAT) is noticed when a
                // command or PING on it goes unanswered this long, and made again.
                connection.unresponsive = UnresponsiveConfig {
                    max_timeout: Some((self.command_timeout * 2).max(Duration::from_secs(2))),
                    interval: Duration::from_millis(250),
                };
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = self.command_timeout;
            });
        let client = builder.build().map_err(connect_error)?;
        builder.with_performance_config(|performance| {
            performance.broadcast_channel_capacity = NOTIFICATION_BACKLOG;
        });
        let subscriber = builder.build_subscriber_client().map_err(connect_error)?;
        Ok((client, subscriber))
    }
}

/// Keeps a client's connection task running for as long as the backend lives (dropping the
/// backend stops this with the dispatcher).
///
/// The task only ends on its own on an error fred does not reconnect from (fred 10.1: an `ASK`
/// redirection for a command without an attempt left), and with it every later command of the
/// client would time out: a process would serve without the fleet until restarted. Starting it
/// again costs the commands that were in flight, nothing more.
async fn keep_connected<C: ClientLike>(client: C, mut task: ConnectHandle) {
    loop {
        let error = match task.await {
            Ok(Ok(())) => return,
            Ok(Err(error)) if error.is_canceled() => return,
            Ok(Err(error)) => error.to_string(),
            Err(join_error) => join_error.to_string(),
        };
        tracing::warn!(client = client.id(), %error, "a Redis connection task stopped: starting it again");
        tokio::time::sleep(RESTART_PAUSE).await;
        task = client.connect();
    }
}

/// How long a stopped connection task waits before it starts again: not a busy loop should it
/// stop again at once.
const RESTART_PAUSE: Duration = Duration::from_millis(50);

/// Whether the backend connected while it was built, or starts without Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joined {
    AtBuild,
    Later,
}

/// A backend that started while Redis was down: once both connections are up, subscribes and
/// checks the server's settings as `build` would have (an error is logged, not returned: the
/// process is serving already), then dispatches as usual.
async fn join_then_dispatch(dispatch: Dispatch, streams: Streams) {
    let (client, subscriber) = (&dispatch.client, &dispatch.subscriber);
    let _ = tokio::join!(client.wait_for_connect(), subscriber.wait_for_connect());
    waiter::subscribe(subscriber, &dispatch.patterns).await;
    let checked = if dispatch.enable_keyspace_events {
        turn_on_keyspace_events(client, &dispatch.config, dispatch.command_timeout)
            .await
            .map_err(|e| e.to_string())
    } else {
        let mut lacking = Vec::new();
        for node in nodes::primaries(client) {
            // Managed Redis may refuse CONFIG: the canary tells whether notifications flow.
            if let Ok(current) = nodes::config_get_on(client, node.as_ref(), SETTING).await {
                let missing = missing_flags(&current);
                if !missing.is_empty() {
                    lacking.push(format!(
                        "{} lacks {missing} (set it to {current}{missing})",
                        nodes::name(node.as_ref())
                    ));
                }
            }
        }
        if lacking.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{SETTING}: {} (parked requests poll Redis until then)",
                lacking.join("; ")
            ))
        }
    };
    match checked {
        Ok(()) => tracing::info!("Redis answers: joined the fleet"),
        Err(error) => {
            tracing::error!(%error, "joined Redis, but its keyspace notifications are not as needed")
        }
    }
    waiter::dispatch(dispatch, streams).await;
}

/// Reads the URL as fred does, after accepting `unix:///path` for `redis+unix:///path` and
/// refusing schemes that are not Redis's (fred would read `http://host` as a Redis server).
fn parse_url(url: &str) -> Result<Config, RedisSetupError> {
    let url = match url.strip_prefix("unix://") {
        Some(path) => format!("redis+unix://{path}"),
        None => url.to_owned(),
    };
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    let transport = ["-cluster", "-sentinel", "+unix"]
        .into_iter()
        .find_map(|suffix| scheme.strip_suffix(suffix))
        .unwrap_or(scheme);
    if !matches!(transport, "redis" | "rediss" | "valkey" | "valkeys") {
        return Err(RedisSetupError::InvalidUrl(
            format!("unsupported scheme {scheme:?}").into(),
        ));
    }
    Config::from_url(&url).map_err(|error| RedisSetupError::InvalidUrl(Box::new(error)))
}

fn validate_prefix(prefix: &str) -> Result<(), RedisSetupError> {
    let valid = !prefix.is_empty()
        && !prefix
            .chars()
            .any(|c| c.is_whitespace() || FORBIDDEN_IN_PREFIX.contains(&c));
    if valid {
        Ok(())
    } else {
        Err(RedisSetupError::InvalidPrefix(prefix.to_owned()))
    }
}

/// Whether the error means "could not reach Redis" rather than "Redis said no".
fn is_connection_error(error: &FredError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Timeout | ErrorKind::Tls | ErrorKind::Auth
    )
}

fn connect_error(error: FredError) -> RedisSetupError {
    RedisSetupError::Connect(Box::new(error))
}

fn setup_error(error: FredError) -> RedisSetupError {
    if is_connection_error(&error) {
        connect_error(error)
    } else {
        RedisSetupError::Refused(Box::new(error))
    }
}

/// The flags of `needed` that `current` lacks.
fn missing_flags(current: &str) -> String {
    let has =
        |flag: char| current.contains(flag) || (current.contains('A') && ALIAS_ALL.contains(flag));
    NEEDED_FLAGS
        .into_iter()
        .filter(|&flag| !has(flag))
        .collect()
}

/// The flags of [`WANTED_FLAGS`] that `current` lacks.
fn missing_wanted(current: &str) -> String {
    WANTED_FLAGS
        .into_iter()
        .filter(|&flag| !current.contains(flag) && !current.contains('A'))
        .collect()
}

/// Turns on the notification classes the backend needs (and wants) that the node lacks; says
/// whether it had to.
async fn turn_on_here<C: ConfigInterface + Sync>(client: &C) -> Result<bool, FredError> {
    let current = setting_value(client.config_get::<Value, _>(SETTING).await?);
    let missing = format!("{}{}", missing_flags(&current), missing_wanted(&current));
    if missing.is_empty() {
        return Ok(false);
    }
    let now = format!("{current}{missing}");
    client.config_set::<_, _>(SETTING, now.as_str()).await?;
    Ok(true)
}

/// Turns on the notification classes the backend needs (and wants) on every primary and every
/// replica (a replica becomes a primary on failover) that lacks them, as `build` does with
/// `enable_keyspace_events(true)`: after a restart, a failover or a `CONFIG SET` lost them. Every
/// node is tried; the first failure is returned.
pub(super) async fn turn_on_keyspace_events(
    client: &Client,
    config: &Config,
    timeout: Duration,
) -> Result<(), FredError> {
    let mut first_error = None;
    let mut note = |result: Result<bool, FredError>, node: &str| {
        match result {
        Ok(true) => tracing::warn!(node, "the Redis keyspace notifications tower-parking needs were off (restart, failover, CONFIG SET?): turned them on"),
        Ok(false) => {}
        Err(error) => {
            tracing::debug!(node, %error, "could not turn the keyspace notifications on");
            first_error.get_or_insert(error);
        }
    }
    };
    for primary in nodes::primaries(client) {
        let name = nodes::name(primary.as_ref());
        let on_primary = client.with_options(&nodes::on(primary.as_ref()));
        note(turn_on_here(&on_primary).await, &name);
        match nodes::replicas_of(client, primary.as_ref()).await {
            Ok(replicas) => {
                for (host, port) in replicas {
                    let name = format!("{host}:{port}");
                    let result = match nodes::replica_client(config, &host, port, timeout).await {
                        Ok(replica) => {
                            let result = turn_on_here(&replica).await;
                            let _ = replica.quit().await;
                            result
                        }
                        Err(error) => Err(error),
                    };
                    note(result, &name);
                }
            }
            Err(error) => note(Err(error), &name),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Checks `notify-keyspace-events` on every primary (the one server, the primary Sentinel names,
/// every primary of a cluster), and turns on what is missing if `enable`, on the replicas too.
async fn check_keyspace_events(
    backend: &RedisBackend,
    config: &Config,
    enable: bool,
) -> Result<(), RedisSetupError> {
    let client = &backend.inner.client;
    let primaries = nodes::primaries(client);
    let mut lacking = Vec::new();
    for node in &primaries {
        let current = match nodes::config_get_on(client, node.as_ref(), SETTING).await {
            Ok(current) => current,
            Err(error) if is_connection_error(&error) => return Err(connect_error(error)),
            Err(refused) => {
                // Managed Redis often refuses `CONFIG`; the setting may still be right (set in
                // the provider's parameter group), which only a live notification can tell.
                return match notifications_arrive(backend).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(RedisSetupError::ConfigNotAllowed {
                        needed: NEEDED_FLAGS.iter().collect(),
                        reason: refused.details().to_owned(),
                    }),
                    Err(error) => Err(setup_error(error)),
                };
            }
        };
        let missing = missing_flags(&current);
        if !missing.is_empty() || (enable && !missing_wanted(&current).is_empty()) {
            let needed = format!("{current}{missing}");
            lacking.push((node.clone(), current, needed));
        }
    }
    if !enable {
        return match lacking.len() {
            0 => Ok(()),
            1 if !client.is_clustered() => {
                let (_, current, needed) = lacking.remove(0);
                Err(RedisSetupError::KeyspaceEventsDisabled { current, needed })
            }
            _ => Err(RedisSetupError::NodesLackKeyspaceEvents {
                nodes: lacking
                    .into_iter()
                    .map(|(node, current, needed)| NodeKeyspaceEvents {
                        node: nodes::name(node.as_ref()),
                        current,
                        needed,
                    })
                    .collect(),
            }),
        };
    }
    for (node, current, needed) in lacking {
        let needed = format!("{needed}{}", missing_wanted(&current));
        let on_node = client.with_options(&nodes::on(node.as_ref()));
        match on_node.config_set::<_, _>(SETTING, needed.as_str()).await {
            Ok(()) => {
                tracing::info!(node = %nodes::name(node.as_ref()), previous = %current, now = %needed, "turned on the Redis keyspace notifications tower-parking needs")
            }
            Err(error) if is_connection_error(&error) => return Err(connect_error(error)),
            Err(refused) => {
                return Err(RedisSetupError::ConfigNotAllowed {
                    needed,
                    reason: refused.details().to_owned(),
                })
            }
        }
    }
    // The replicas, which become primaries on failover: failures there are only logged, as the
    // backend sets the flags on a new primary when it connects to it anyway.
    let timeout = backend.inner.command_timeout;
    if let Err(error) = turn_on_keyspace_events(client, config, timeout).await {
        tracing::warn!(%error, "could not turn the keyspace notifications on on every replica: a replica promoted by a failover gets them when the backend connects to it");
    }
    Ok(())
}

/// The value in a `CONFIG GET notify-keyspace-events` reply (a map in RESP3, pairs in RESP2).
pub(super) fn setting_value(reply: Value) -> String {
    reply
        .into_map()
        .ok()
        .and_then(|map| {
            map.inner()
                .into_iter()
                .find(|(name, _)| name.as_str() == Some(SETTING))
                .and_then(|(_, value)| value.into_string())
        })
        .unwrap_or_default()
}

/// Makes Redis emit each needed notification once (`set` on a value, `del` and `expired` on a
/// lock) and says whether all of them reached the subscriber.
async fn notifications_arrive(backend: &RedisBackend) -> Result<bool, FredError> {
    let inner = &*backend.inner;
    let (client, prefix) = (&inner.client, &inner.prefix);
    // Not hex: no parking key's hash can look like these.
    let nonce = inner.nonces.next();
    let [stored, deleted, expired] =
        ["set", "del", "expired"].map(|event| format!("probe-{event}-{nonce}"));
    // Waiters register under `<uri hash>:<variant hash>`; the probes' variant part is `p`.
    let registrations =
        [&stored, &deleted, &expired].map(|uri| inner.waiters.register(&format!("{uri}:p")));
    let [stored_seen, deleted_seen, expired_seen] = [0, 1, 2].map(|i| registrations[i].heard());

    let _: () = client
        .set(
            format!("{prefix}{{{stored}}}:p:resp"),
            "probe",
            Some(Expiration::PX(1_000)),
            None,
            false,
        )
        .await?;
    let deleted_lock = format!("{prefix}{{{deleted}}}:p:lock");
    let _: () = client
        .set(
            &deleted_lock,
            "probe",
            Some(Expiration::PX(1_000)),
            None,
            false,
        )
        .await?;
    let _: i64 = client.del(&deleted_lock).await?;
    let expired_lock = format!("{prefix}{{{expired}}}:p:lock");
    let _: () = client
        .set(&expired_lock, "probe", Some(Expiration::PX(1)), None, false)
        .await?;
    // Touching a key past its expiry makes Redis expire it (and notify) at once.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _: i64 = client.exists(&expired_lock).await?;

    let all_seen = async {
        tokio::join!(stored_seen, deleted_seen, expired_seen);
    };
    // Generous: a build that waits a few seconds more on a loaded machine beats one that fails
    // a correctly configured managed Redis.
    let window = inner.command_timeout.max(Duration::from_secs(5));
    Ok(tokio::time::timeout(window, all_seen).await.is_ok())
}

/// One node's `notify-keyspace-events`, in [`RedisSetupError::NodesLackKeyspaceEvents`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeKeyspaceEvents {
    /// The node, `host:port`.
    pub node: String,
    /// Its current `notify-keyspace-events`.
    pub current: String,
    /// The value to set: the current flags plus the missing ones.
    pub needed: String,
}

/// Why a [`RedisBackend`] could not be built. Its message says what to do about it.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisSetupError {
    /// The URL could not be read.
    InvalidUrl(BoxError),
    /// The key prefix is empty or holds a character that would break the keyspace pattern or the
    /// cluster hash tag.
    InvalidPrefix(String),
    /// The lease is zero, or it would not be renewed before it expires.
    InvalidLease {
        /// The lease asked for.
        lease: Duration,
        /// How often it would be renewed.
        renew_every: Duration,
    },
    /// Redis could not be reached (refused, timed out, TLS or authentication failed).
    Connect(BoxError),
    /// Keyspace notifications are off, or lack flags the backend needs.
    KeyspaceEventsDisabled {
        /// The current value of `notify-keyspace-events`.
        current: String,
        /// The value to set: the current flags plus the missing ones.
        needed: String,
    },
    /// Keyspace notifications are off, or lack flags the backend needs, on some primaries of a
    /// cluster (or on the primary Sentinel names).
    NodesLackKeyspaceEvents {
        /// Each primary that lacks flags, with its setting and the value to set.
        nodes: Vec<NodeKeyspaceEvents>,
    },
    /// Redis does not allow `CONFIG` (renamed, or a managed service), and keyspace notifications
    /// did not arrive when tried.
    ConfigNotAllowed {
        /// The flags `notify-keyspace-events` must hold (or a value to set it to).
        needed: String,
        /// What Redis answered to `CONFIG`.
        reason: String,
    },
    /// Redis refused a command the backend needs at setup (`PSUBSCRIBE`, `SCRIPT LOAD`, ...),
    /// for example because an ACL forbids it.
    Refused(BoxError),
}

impl fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl(error) => write!(
                f,
                "invalid Redis URL ({error}): use redis://host:port/db, rediss://... for TLS, \
                 redis+unix:///path/to/redis.sock, redis-cluster://host:port?node=host2:port2 for \
                 a cluster, or redis-sentinel://host:port?sentinelServiceName=name"
            ),
            Self::InvalidPrefix(prefix) => write!(
                f,
                "invalid Redis key prefix {prefix:?}: it must not be empty, nor hold whitespace or \
                 any of {{ }} * ? [ ] \\ (they would break the keyspace subscription pattern or the \
                 cluster hash tag); for example \"myapp:parking:\""
            ),
            Self::InvalidLease { lease, renew_every } => write!(
                f,
                "invalid lease: a lease of {lease:?} renewed every {renew_every:?} would expire \
                 while its leader is alive; the lease must be at least 1 ms and renew_every \
                 shorter than it (by default it is a third of it)"
            ),
            Self::Connect(error) => write!(
                f,
                "could not connect to Redis ({error}): check the URL, that Redis is running and \
                 reachable, and the credentials"
            ),
            Self::KeyspaceEventsDisabled { current, needed } => write!(
                f,
                "Redis keyspace notifications are off or incomplete: `{SETTING}` is \"{current}\", \
                 and tower-parking needs the flags K, g, $ and x to wake waiting requests. \
                 Run `CONFIG SET {SETTING} '{needed}'` (e.g. with redis-cli), or put \
                 `{SETTING} {needed}` in redis.conf, or build the backend with \
                 `.enable_keyspace_events(true)` to let it set them"
            ),
            Self::NodesLackKeyspaceEvents { nodes } => {
                write!(
                    f,
                    "Redis keyspace notifications are off or incomplete on {} node(s), and \
                     tower-parking needs the flags K, g, $ and x on every primary (and every \
                     replica, which a failover makes a primary) to wake waiting requests:",
                    nodes.len()
                )?;
                for node in nodes {
                    write!(
                        f,
                        " on {}, `{SETTING}` is \"{}\": run `redis-cli -h HOST -p PORT CONFIG SET \
                         {SETTING} '{}'` there;",
                        node.node, node.current, node.needed
                    )?;
                }
                write!(
                    f,
                    " or put `{SETTING} Kg$xe` in every node's redis.conf, or build the backend \
                     with `.enable_keyspace_events(true)` to let it set them on every node"
                )
            }
            Self::ConfigNotAllowed { needed, reason } => write!(
                f,
                "Redis does not allow the CONFIG command here ({reason}), so tower-parking cannot \
                 check or turn on keyspace notifications, and none arrived when it tried. Set \
                 `{SETTING}` to a value with the flags K, g, $ and x (for example \"{needed}\") in \
                 your provider's parameter group (ElastiCache, Memorystore, Azure Cache for Redis) \
                 or in redis.conf, and restart Redis if the provider requires it"
            ),
            Self::Refused(error) => write!(
                f,
                "Redis refused a command the parking backend needs ({error}): the user needs \
                 EVALSHA, SCRIPT LOAD, PSUBSCRIBE on __keyspace@*, GET, SET, DEL, EXISTS and CONFIG \
                 GET"
            ),
        }
    }
}

impl StdError for RedisSetupError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::InvalidUrl(error) | Self::Connect(error) | Self::Refused(error) => {
                Some(&**error as &(dyn StdError + 'static))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_as_fred_does_with_unix_and_without_foreign_schemes() {
        for url in [
            "redis://127.0.0.1:6379/2",
            "rediss://user:pass@example.com:6380",
            "redis+unix:///run/redis.sock",
            "unix:///run/redis.sock",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=primary",
            "valkey://127.0.0.1",
        ] {
            assert!(parse_url(url).is_ok(), "{url}");
        }
        assert!(parse_url("unix:///run/redis.sock")
            .unwrap()
            .server
            .is_unix_socket());
        assert_eq!(parse_url("redis://h/2").unwrap().database, Some(2));
        for url in ["http://127.0.0.1:6379", "127.0.0.1:6379", "", "redis://"] {
            assert!(
                matches!(parse_url(url), Err(RedisSetupError::InvalidUrl(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn missing_flags_understand_the_alias() {
        assert_eq!(missing_flags(""), "Kg$x");
        assert_eq!(missing_flags("xE"), "Kg$");
        assert_eq!(missing_flags("AK"), "");
        assert_eq!(missing_flags("AE"), "K");
        assert_eq!(missing_flags("g$xK"), "");
    }

    #[test]
    fn prefixes_that_break_patterns_or_hash_tags_are_refused() {
        for prefix in [
            "", "a{b", "a}", "a*", "a?", "a[", "a]", "a\\", "a b", "a\tb",
        ] {
            assert!(
                matches!(
                    validate_prefix(prefix),
                    Err(RedisSetupError::InvalidPrefix(_))
                ),
                "{prefix:?}"
            );
        }
        for prefix in ["parking:", "my-app:parking:", "a.b/c:"] {
            assert!(validate_prefix(prefix).is_ok(), "{prefix:?}");
        }
    }

    #[test]
    fn the_disabled_error_says_what_to_run() {
        let error = RedisSetupError::KeyspaceEventsDisabled {
            current: "xE".into(),
            needed: "xEKg$".into(),
        };
        let message = error.to_string();
        assert!(message.contains("notify-keyspace-events"), "{message}");
        assert!(message.contains("\"xE\""), "{message}");
        assert!(
            message.contains("CONFIG SET notify-keyspace-events 'xEKg$'"),
            "{message}"
        );
        assert!(
            message.contains(".enable_keyspace_events(true)"),
            "{message}"
        );
    }
}
