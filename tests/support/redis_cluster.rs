//! A private Redis Cluster (6 `redis-server --cluster-enabled yes` nodes: 3 primaries with a
//! replica each, made by `redis-cli --cluster create`) and a private Sentinel set (a primary, a
//! replica and 3 `redis-sentinel`s), on free loopback ports in temporary directories.

use std::{
    collections::BTreeMap,
    io,
    net::TcpListener,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{RedisServer, Resp, TempDir};

/// How long a cluster or a Sentinel set may take to form, or to fail over.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// The cluster's `cluster-node-timeout`: how long a primary may be unreachable before its
/// replica takes over (plus an election, about a second).
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2000);

fn missing(binary: &str, package: &str) -> String {
    format!(
        "{binary} not found: the cluster and Sentinel tests need it. Run scripts/test, which \
         installs it (Debian package {package}), or apt-get install {package}"
    )
}

/// Polls `check` every 20 ms until it answers, panicking with `what` after `within`: for server
/// states that no event announces (a cluster's agreement, a failover's end).
fn until<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    pub slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of 6 nodes owned by a test. Drop kills every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts 6 nodes with the keyspace notifications the backend needs, and makes them a cluster
    /// of 3 primaries, each with a replica.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments on every node (e.g.
    /// `["--notify-keyspace-events", ""]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let timeout = NODE_TIMEOUT.as_millis().to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            // A replica whose primary died takes over whatever its replication offset.
            "--cluster-replica-validity-factor",
            "0",
            // Replicas sync at once, not after the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay",
            "0",
        ];
        args.extend_from_slice(extra);
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                // The bus port defaults to the port + 10000, past 65535 for many free ports.
                let bus = free_port().to_string();
                let mut args = args.clone();
                args.extend(["--cluster-port", &bus]);
                RedisServer::start_with(&args)
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| match error.kind() {
                io::ErrorKind::NotFound => panic!("{}", missing("redis-cli", "redis-tools")),
                _ => panic!("cannot run redis-cli: {error}"),
            });
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until_settled();
        cluster
    }

    /// Waits until every running node agrees on 3 live primaries covering every slot, each with a
    /// replica that is in sync.
    pub fn wait_until_settled(&self) {
        until(CONVERGE, "the cluster to settle", || {
            let mut views = Vec::new();
            for node in self.nodes.iter().filter(|node| node.is_running()) {
                let info = node.cmd(&["CLUSTER", "INFO"]).text();
                if !info.contains("cluster_state:ok") {
                    return None;
                }
                let replication = node.cmd(&["INFO", "replication"]).text();
                if replication.contains("role:slave")
                    && !replication.contains("master_link_status:up")
                {
                    return None;
                }
                let nodes = self.nodes_seen_by(node);
                let mut live_primaries: Vec<_> = nodes
                    .iter()
                    .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
                    .map(|n| (n.port, n.slots.clone()))
                    .collect();
                let covered: u32 = live_primaries
                    .iter()
                    .flat_map(|(_, slots)| slots)
                    .map(|(start, end)| u32::from(end - start) + 1)
                    .sum();
                live_primaries.sort();
                if live_primaries.len() != 3 || covered != 16384 {
                    return None;
                }
                views.push(live_primaries);
            }
            views.windows(2).all(|w| w[0] == w[1]).then_some(())
        });
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&...` with every node as a seed.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|node| node.port());
        let first = nodes.next().expect("6 nodes");
        let rest: Vec<String> = nodes.map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// Every node, running or not, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node on this port.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    fn any_live(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| node.is_running())
            .expect("a running node")
    }

    fn nodes_seen_by(&self, node: &RedisServer) -> Vec<ClusterNode> {
        parse_cluster_nodes(&node.cmd(&["CLUSTER", "NODES"]).text())
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub fn cluster_nodes(&self) -> Vec<ClusterNode> {
        self.nodes_seen_by(self.any_live())
    }

    /// The slot of a Redis key.
    pub fn keyslot(&self, key: &str) -> u16 {
        self.any_live().cmd(&["CLUSTER", "KEYSLOT", key]).integer() as u16
    }

    /// The port of the live primary that owns the slot.
    pub fn owner(&self, slot: u16) -> u16 {
        self.cluster_nodes()
            .into_iter()
            .find(|node| {
                node.primary
                    && !node.failed
                    && node.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .map(|node| node.port)
            .unwrap_or_else(|| panic!("no live primary owns slot {slot}"))
    }

    /// The ports of the live primaries.
    pub fn primaries(&self) -> Vec<u16> {
        self.cluster_nodes()
            .into_iter()
            .filter(|node| node.primary && !node.failed && !node.slots.is_empty())
            .map(|node| node.port)
            .collect()
    }

    /// A primary other than the one on `port`.
    pub fn other_primary(&self, port: u16) -> u16 {
        self.primaries()
            .into_iter()
            .find(|&primary| primary != port)
            .expect("another primary")
    }

    /// Kills a node (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .expect("a node on that port")
            .kill();
    }

    /// Waits until a live primary other than `old` owns `slot` (the replica took over).
    pub fn wait_for_failover(&self, slot: u16, old: u16) -> u16 {
        until(CONVERGE, "the replica to take over", || {
            let owner = self.cluster_nodes().into_iter().find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })?;
            (owner.port != old).then_some(owner.port)
        })
    }

    /// Waits until the replica of the primary on `port` has applied every write the primary had
    /// made when called (replication is asynchronous: a failover loses what the replica lacks).
    pub fn wait_for_replica(&self, port: u16) {
        let info = self.node(port).cmd(&["INFO", "replication"]).text();
        let written = info_field(&info, "master_repl_offset");
        let replica: u16 = info
            .lines()
            .find_map(|line| line.strip_prefix("slave0:"))
            .and_then(|slave| slave.split(',').find_map(|kv| kv.strip_prefix("port=")))
            .and_then(|replica| replica.parse().ok())
            .unwrap_or_else(|| panic!("no replica of {port}: {info}"));
        until(CONVERGE, "the replica to catch up", || {
            let info = self.node(replica).cmd(&["INFO", "replication"]).text();
            (info_field(&info, "slave_repl_offset") >= written).then_some(())
        });
    }

    /// Moves `slot`, with its keys, from the primary on `from` to the one on `to`, as
    /// `redis-cli --cluster reshard` does: `IMPORTING`/`MIGRATING`, `MIGRATE` of every key, then
    /// `SETSLOT ... NODE` on both and on every other primary.
    pub fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        self.begin_migration(slot, from, to);
        self.finish_migration(slot, from, to);
    }

    fn node_id(&self, port: u16) -> String {
        self.node(port).cmd(&["CLUSTER", "MYID"]).text()
    }

    /// The first half of [`migrate_slot`](Self::migrate_slot): `slot` is `MIGRATING` on `from`
    /// and `IMPORTING` on `to`, and its keys are on `to`. A reshard that stopped here (its tool
    /// crashed) leaves the slot so until an operator runs `redis-cli --cluster fix`.
    pub fn begin_migration(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let slot_text = slot.to_string();
        ok(
            self.node(to)
                .cmd(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id]),
            "importing",
        );
        ok(
            self.node(from)
                .cmd(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id]),
            "migrating",
        );
        loop {
            let keys = match self
                .node(from)
                .cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "1000"])
            {
                Resp::Array(Some(keys)) => keys.iter().map(Resp::text).collect::<Vec<_>>(),
                other => panic!("GETKEYSINSLOT: {other:?}"),
            };
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.iter().map(String::as_str));
            ok(self.node(from).cmd(&migrate), "migrate");
        }
    }

    /// The second half of [`migrate_slot`](Self::migrate_slot): `to` owns `slot`, for every
    /// primary.
    pub fn finish_migration(&self, slot: u16, from: u16, to: u16) {
        let to_id = self.node_id(to);
        let slot_text = slot.to_string();
        for port in [to, from] {
            ok(
                self.node(port)
                    .cmd(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]),
                "setslot node",
            );
        }
        for port in self.primaries() {
            if port != to && port != from {
                let _ = self
                    .node(port)
                    .cmd(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            }
        }
    }
}

/// The number `name:` holds in an `INFO` section.
fn info_field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

/// Asserts a node answered `OK` to `what`.
fn ok(reply: Resp, what: &str) {
    assert_eq!(reply, Resp::Simple("OK".into()), "{what}");
}

fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields[2];
            let slots = fields[8..]
                .iter()
                .filter(|slot| !slot.starts_with('['))
                .filter_map(|slot| match slot.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => slot.parse().ok().map(|s| (s, s)),
                })
                .collect();
            Some(ClusterNode {
                id: fields[0].to_owned(),
                port,
                primary: flags.contains("master"),
                failed: flags.contains("fail") || flags.contains("noaddr"),
                slots,
            })
        })
        .collect()
}

/// A primary, its replica and 3 sentinels watching them as `primary`, owned by a test.
#[derive(Debug)]
pub struct SentinelSet {
    servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

/// The name the sentinels know the primary by.
pub const SERVICE: &str = "primary";

impl SentinelSet {
    /// Starts the primary, a replica of it, and 3 sentinels (quorum 2, a primary is down after
    /// 1 s without answers), and waits until every sentinel knows the replica and the others.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments on both data nodes.
    pub fn start_with(extra: &[&str]) -> Self {
        let mut primary_args = vec!["--repl-diskless-sync-delay", "0"];
        primary_args.extend_from_slice(extra);
        let primary = RedisServer::start_with(&primary_args);
        let replica_of = primary.port().to_string();
        let mut args = vec![
            "--replicaof",
            "127.0.0.1",
            &replica_of,
            "--repl-diskless-sync-delay",
            "0",
        ];
        args.extend_from_slice(extra);
        let replica = RedisServer::start_with(&args);
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(primary.port()))
            .collect();
        let set = Self {
            servers: vec![primary, replica],
            sentinels,
        };
        until(CONVERGE, "the sentinels to know each other", || {
            set.sentinels
                .iter()
                .all(|sentinel| {
                    let info = sentinel.cmd(&["INFO", "sentinel"]).text();
                    info.contains("slaves=1") && info.contains("sentinels=3")
                })
                .then_some(())
        });
        until(CONVERGE, "the replica to sync", || {
            set.servers[1]
                .cmd(&["INFO", "replication"])
                .text()
                .contains("master_link_status:up")
                .then_some(())
        });
        set
    }

    /// `redis-sentinel://127.0.0.1:S1?node=...&sentinelServiceName=primary`.
    pub fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|s| s.port);
        let first = ports.next().expect("3 sentinels");
        let rest: Vec<String> = ports
            .map(|port| format!("node=127.0.0.1:{port}&"))
            .collect();
        format!(
            "redis-sentinel://127.0.0.1:{first}?{}sentinelServiceName={SERVICE}",
            rest.concat()
        )
    }

    /// The port of the primary the sentinels name now.
    pub fn primary_port(&self) -> u16 {
        match self.sentinels[0].cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]) {
            Resp::Array(Some(address)) if address.len() == 2 => {
                address[1].text().parse().expect("a port")
            }
            other => panic!("SENTINEL GET-MASTER-ADDR-BY-NAME: {other:?}"),
        }
    }

    /// The data node on this port.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers
            .iter()
            .find(|server| server.port() == port)
            .expect("a server on that port")
    }

    /// Both data nodes.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// Asks a sentinel for a failover (`SENTINEL FAILOVER`).
    pub fn failover(&self) {
        assert_eq!(
            self.sentinels[0].cmd(&["SENTINEL", "FAILOVER", SERVICE]),
            Resp::Simple("OK".into())
        );
    }

    /// Kills the data node on this port (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        self.servers
            .iter_mut()
            .find(|server| server.port() == port)
            .expect("a server on that port")
            .kill();
    }

    /// Waits until the sentinels name another primary than `old` and it answers as a primary.
    pub fn wait_for_failover(&self, old: u16) -> u16 {
        until(CONVERGE, "the sentinels to promote the replica", || {
            let port = self.primary_port();
            (port != old
                && self
                    .server(port)
                    .cmd(&["INFO", "replication"])
                    .text()
                    .contains("role:master"))
            .then_some(port)
        })
    }
}

/// One `redis-sentinel` process.
#[derive(Debug)]
struct SentinelProcess {
    port: u16,
    child: Child,
    server: RedisServerPort,
    _dir: TempDir,
}

/// Talks RESP to a port through [`RedisServer::cmd_on_port`].
#[derive(Debug)]
struct RedisServerPort(u16);

impl SentinelProcess {
    /// Starts a sentinel on a free port, again on another one if that port was taken meanwhile.
    fn start(primary: u16) -> Self {
        for _ in 0..5 {
            if let Some(sentinel) = Self::try_start(primary) {
                return sentinel;
            }
        }
        panic!("could not start redis-sentinel");
    }

    fn try_start(primary: u16) -> Option<Self> {
        let dir = TempDir::new("tower-parking-sentinel");
        let port = free_port();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 10000\n\
                 sentinel parallel-syncs {SERVICE} 1\n",
                dir = dir.path().display()
            ),
        )
        .expect("cannot write sentinel.conf");
        let child = Command::new("redis-sentinel")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| match error.kind() {
                io::ErrorKind::NotFound => {
                    panic!("{}", missing("redis-sentinel", "redis-sentinel"))
                }
                _ => panic!("cannot run redis-sentinel: {error}"),
            });
        let mut sentinel = Self {
            port,
            child,
            server: RedisServerPort(port),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Exited: the port was taken by someone else before it bound it.
            if let Ok(Some(_)) = sentinel.child.try_wait() {
                return None;
            }
            if answers_ping(port) {
                return Some(sentinel);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn cmd(&self, args: &[&str]) -> Resp {
        RedisServer::cmd_on_port(self.server.0, args)
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis-speaking process answers `PING` on the port (without panicking).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// How many keys of `keys` each primary of the cluster owns (by port).
pub fn spread(cluster: &RedisCluster, keys: &[String]) -> BTreeMap<u16, usize> {
    let mut owners = BTreeMap::new();
    for key in keys {
        *owners
            .entry(cluster.owner(cluster.keyslot(key)))
            .or_default() += 1;
    }
    owners
}
