//! Listing the services: the children of the root node.
//!
//! One `getChildren` of the root, bounded by the request timeout. A child is a service
//! when its name is a [`ServiceName`]; foreign nodes with other names are skipped and
//! logged. Service nodes are containers: one whose last instance left stays until the
//! server reaps it, and is listed meanwhile (the contract allows a listed service with no
//! instances). When `config_prefix` or `coord_prefix` is configured below the root, the
//! root's child that holds it is this client's own configuration or lock tree, not a
//! service, and is skipped too.

use tokio::time::Instant;
use waypost_core::ServiceName;
use zookeeper_client::{Client, Error as ZkErr};

use crate::client::{Ctx, Failed};
use crate::config::ZkConfig;

/// The services below the root, sorted; no root node is no service.
pub(crate) async fn list(
    ctx: &Ctx,
    client: &Client,
    deadline: Instant,
) -> std::result::Result<Vec<ServiceName>, Failed> {
    let root = ctx.config.root.as_str();
    let list = client.list_children(root);
    match ctx.call(deadline, "zookeeper list", root, list).await {
        Ok(names) => Ok(services(&ctx.config, names)),
        Err(f) if f.code() == Some(&ZkErr::NoNode) => Ok(Vec::new()),
        Err(f) => Err(f),
    }
}

/// The root's children `names` that are services, sorted.
fn services(config: &ZkConfig, names: Vec<String>) -> Vec<ServiceName> {
    let own = own_prefixes(config);
    let mut services: Vec<ServiceName> = names
        .into_iter()
        .filter_map(|name| {
            if own.contains(&name.as_str()) {
                tracing::debug!(
                    root = %config.root,
                    node = name,
                    "zookeeper: not listing the node that holds configuration keys or locks as a service"
                );
                return None;
            }
            match ServiceName::new(&name) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(root = %config.root, node = name.escape_debug().to_string(), "zookeeper: skipping a node below the root that is not a service: {e}");
                    None
                }
            }
        })
        .collect();
    services.sort();
    services
}

/// The root's children that hold `config_prefix` or `coord_prefix`, for those configured
/// below the root (`/services/config` → `config`).
fn own_prefixes(config: &ZkConfig) -> Vec<&str> {
    [&config.config_prefix, &config.coord_prefix]
        .into_iter()
        .filter_map(|prefix| {
            let below = if config.root == "/" {
                prefix.strip_prefix('/')?
            } else {
                prefix
                    .strip_prefix(config.root.as_str())?
                    .strip_prefix('/')?
            };
            below.split('/').next()
        })
        // At the root of the tree, ZooKeeper's own `/zookeeper` node is no service.
        .chain((config.root == "/").then_some("zookeeper"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn strings(services: Vec<ServiceName>) -> Vec<String> {
        services.into_iter().map(String::from).collect()
    }

    #[test]
    fn valid_names_sorted_others_skipped() {
        let long = "x".repeat(129);
        let listed = services(
            &ZkConfig::default(),
            names(&["zulu", "bad name", "alpha", "a:b", "ünï", &long, "Beta.v2"]),
        );
        assert_eq!(strings(listed), ["Beta.v2", "alpha", "zulu"]);
    }

    #[test]
    fn own_prefixes_below_the_root_are_not_services() {
        let config = ZkConfig::default()
            .with_config_prefix("/services/cfg")
            .with_coord_prefix("/services/locks/app");
        let listed = services(&config, names(&["cfg", "locks", "greeter"]));
        assert_eq!(strings(listed), ["greeter"]);
    }

    #[test]
    fn prefixes_elsewhere_skip_nothing() {
        // The defaults (`/config`, `/coord`), a sibling sharing the root's name as a
        // prefix, and the root itself are not below the root.
        for prefix in ["/config", "/services-cfg", "/services", "/other/services/x"] {
            let config = ZkConfig::default()
                .with_config_prefix(prefix)
                .with_coord_prefix(prefix);
            let listed = services(&config, names(&["config", "coord", "services-cfg", "x"]));
            assert_eq!(
                strings(listed),
                ["config", "coord", "services-cfg", "x"],
                "{prefix}"
            );
        }
    }

    #[test]
    fn at_the_tree_root_zookeepers_node_and_own_prefixes_are_not_services() {
        let config = ZkConfig::default().with_root("/");
        let listed = services(&config, names(&["zookeeper", "config", "coord", "greeter"]));
        assert_eq!(strings(listed), ["greeter"]);
    }
}
