//! `lmskv node list|decommission`: the cluster's nodes as the meta range
//! records them, and draining a node.
//!
//! The JSON shape of `node list` is an interface:
//! `[{"node_id":1,"address":"…","state":"up|down|decommissioning|decommissioned","replicas":12,"leaders":4,"cluster_version_max":2}, …]`
//! (`cluster_version_max`: the highest cluster version the node runs, 0 when
//! not heard from; during an upgrade the nodes that hold the cluster back).

use clap::{Args, Subcommand};
use lmskv_client::NodeInfo;
use serde::Serialize;

use crate::cmd::{CmdError, Context};
use crate::output::{self, Table};

/// Node operations.
#[derive(Debug, Clone, Subcommand)]
pub enum NodeCommand {
    /// List every node: address, state, replicas and leaders it hosts, and
    /// the highest cluster version it runs.
    List,
    /// Drain a node: move all its replicas to other nodes.
    Decommission(DecommissionArgs),
}

/// Arguments of `lmskv node decommission`.
#[derive(Debug, Clone, Args)]
pub struct DecommissionArgs {
    /// The node id.
    pub id: u64,
}

/// One node as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub node_id: u64,
    /// `HOST:PORT`.
    pub address: String,
    /// `up`, `down`, `decommissioning` or `decommissioned`.
    pub state: String,
    /// Replicas the node hosts.
    pub replicas: u64,
    /// Ranges the node leads.
    pub leaders: u64,
    /// The highest cluster version the node runs (0: not heard from).
    pub cluster_version_max: u32,
}

impl From<&NodeInfo> for NodeView {
    fn from(n: &NodeInfo) -> Self {
        NodeView {
            node_id: n.node_id,
            address: n.address.clone(),
            state: n.state.clone(),
            replicas: n.replicas,
            leaders: n.leaders,
            cluster_version_max: n.cluster_version_max,
        }
    }
}

/// Renders nodes as a table.
pub fn render_nodes(views: &[NodeView]) -> String {
    let mut t = Table::new(&["NODE", "ADDRESS", "STATE", "REPLICAS", "LEADERS", "RUNS"]);
    for n in views {
        t.push(vec![
            n.node_id.to_string(),
            n.address.clone(),
            n.state.clone(),
            n.replicas.to_string(),
            n.leaders.to_string(),
            if n.cluster_version_max == 0 {
                "-".to_string()
            } else {
                format!("v{}", n.cluster_version_max)
            },
        ]);
    }
    t.render()
}

/// Runs one `lmskv node` subcommand.
pub async fn run(ctx: &Context, command: NodeCommand) -> Result<(), CmdError> {
    let client = ctx.client()?;
    match command {
        NodeCommand::List => {
            let nodes = client.node_list().await?;
            let views: Vec<NodeView> = nodes.iter().map(NodeView::from).collect();
            output::emit(ctx.format, &views, |v| render_nodes(v))
        }
        NodeCommand::Decommission(a) => {
            let node = client.decommission(a.id).await?;
            let view = NodeView::from(&node);
            output::emit(ctx.format, &view, |v| {
                format!("OK node {} is {}", v.node_id, v.state)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_list_json_has_the_stable_shape() {
        let n = NodeInfo {
            node_id: 1,
            address: "127.0.0.1:7001".into(),
            state: "up".into(),
            replicas: 12,
            leaders: 4,
            last_heartbeat_ms_ago: 30,
            cluster_version_max: 2,
        };
        assert_eq!(
            output::json(&vec![NodeView::from(&n)]).unwrap(),
            r#"[{"node_id":1,"address":"127.0.0.1:7001","state":"up","replicas":12,"leaders":4,"cluster_version_max":2}]"#
        );
        let table = render_nodes(&[NodeView::from(&n)]);
        assert_eq!(
            table.lines().nth(1),
            Some("1     127.0.0.1:7001  up     12        4        v2")
        );
    }
}
