//! The nodes behind one URL: the one server, the primary Sentinel names, or every primary of a
//! cluster (keyspace notifications are per node, so the backend subscribes, flies a canary and
//! checks the flags on each), and the replicas that may become primaries.

use std::time::Duration;

use fred::{
    clients::{Client, SubscriberClient},
    error::Error as FredError,
    interfaces::{ClientLike, ClusterInterface, ConfigInterface, PubsubInterface},
    types::{
        config::{Config, Options, Server, ServerConfig},
        Builder, Value,
    },
};

use super::health::Health;

/// The primaries to address one by one: every primary of a cluster as the client last saw the
/// cluster's slots, or `None` for "the server" (a single one, or the primary Sentinel names).
pub(super) fn primaries<C: ClusterInterface>(client: &C) -> Vec<Option<Server>> {
    if !client.is_clustered() {
        return vec![None];
    }
    client
        .cached_cluster_state()
        .map(|state| state.unique_primary_nodes())
        .unwrap_or_default()
        .into_iter()
        .map(Some)
        .collect()
}

/// Options that send a command to this node (`None`: where the client sends it anyway).
pub(super) fn on(node: Option<&Server>) -> Options {
    Options {
        cluster_node: node.cloned(),
        ..Options::default()
    }
}

/// A node's name for messages: `host:port`, or "the server".
pub(super) fn name(node: Option<&Server>) -> String {
    node.map_or_else(|| "the server".to_owned(), Server::to_string)
}

/// The canary keys to fly: one per primary, each on a slot that primary owns.
pub(super) fn canary_keys(client: &Client, health: &Health) -> Vec<String> {
    let Some(state) = client
        .is_clustered()
        .then(|| client.cached_cluster_state())
        .flatten()
    else {
        return vec![health.canary_key(0)];
    };
    state
        .unique_primary_nodes()
        .iter()
        .filter_map(|primary| {
            // About a third of the numbers land on each of three primaries: a few tries each.
            (0..100_000u32).find_map(|n| {
                let key = health.canary_key(n);
                let slot = fred::util::redis_keyslot(key.as_bytes());
                (state.get_server(slot) == Some(primary)).then_some(key)
            })
        })
        .collect()
}

/// `PSUBSCRIBE`s to the patterns on every primary (acknowledged by each), or on the server.
pub(super) async fn psubscribe_everywhere(
    subscriber: &SubscriberClient,
    patterns: &[String],
) -> Result<(), FredError> {
    let primaries = primaries(subscriber);
    if primaries.is_empty() {
        return Err(FredError::new(
            fred::error::ErrorKind::Cluster,
            "the cluster's primaries are not known yet",
        ));
    }
    for node in &primaries {
        subscriber
            .with_options(&on(node.as_ref()))
            .psubscribe(patterns.to_vec())
            .await?;
    }
    Ok(())
}

/// The replicas of the primary (from its `INFO replication`): `host:port` of each.
pub(super) async fn replicas_of(
    client: &Client,
    primary: Option<&Server>,
) -> Result<Vec<(String, u16)>, FredError> {
    let info: String = client
        .with_options(&on(primary))
        .info(Some(fred::types::InfoKind::Replication))
        .await?;
    Ok(parse_replicas(&info))
}

/// `slave0:ip=127.0.0.1,port=7004,state=online,...` lines of `INFO replication`.
fn parse_replicas(info: &str) -> Vec<(String, u16)> {
    info.lines()
        .filter(|line| line.starts_with("slave") && line.contains(":ip="))
        .filter_map(|line| {
            let fields = line.split_once(':')?.1;
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
            };
            Some((field("ip")?.to_owned(), field("port")?.parse().ok()?))
        })
        .collect()
}

/// A connection of its own to one replica (the command client talks to primaries only), with the
/// URL's credentials and TLS settings. Quit it when done.
pub(super) async fn replica_client(
    config: &Config,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Client, FredError> {
    let mut config = config.clone();
    config.server = ServerConfig::new_centralized(host, port);
    config.fail_fast = true;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|connection| {
            connection.connection_timeout = timeout;
            connection.internal_command_timeout = timeout;
        })
        .with_performance_config(|performance| performance.default_command_timeout = timeout);
    let client = builder.build()?;
    match tokio::time::timeout(timeout, client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(error)) => {
            let _ = client.quit().await;
            Err(error)
        }
        Err(_) => {
            let _ = client.quit().await;
            Err(FredError::new(
                fred::error::ErrorKind::Timeout,
                format!("{host}:{port} did not answer within {timeout:?}"),
            ))
        }
    }
}

/// `CONFIG GET name` on one primary (or the server): the value.
pub(super) async fn config_get_on(
    client: &Client,
    node: Option<&Server>,
    name: &str,
) -> Result<String, FredError> {
    let reply: Value = client.with_options(&on(node)).config_get(name).await?;
    Ok(super::builder::setting_value(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_read_from_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=127.0.0.1,port=7004,state=online,offset=42,lag=0\r\n\
                    slave1:ip=10.0.0.2,port=6380,state=wait_bgsave,offset=0,lag=0\r\n\
                    master_failover_state:no-failover\r\n";
        assert_eq!(
            parse_replicas(info),
            [
                ("127.0.0.1".to_owned(), 7004),
                ("10.0.0.2".to_owned(), 6380)
            ]
        );
        assert!(parse_replicas("role:slave\r\nslave_read_only:1\r\n").is_empty());
    }
}
