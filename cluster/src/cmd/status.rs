//! `lmskv status`: the cluster summary (nodes up, ranges, under-replicated
//! ranges, the meta leader) and the nodes and ranges as the meta range's
//! leader reports them.
//!
//! The node report ([`StatusResponse`]) is turned into a [`StatusView`], whose
//! JSON shape is stable (fields are only added); the table form adds the key
//! span of each range.

use clap::Args;
use lmskv_proto::v1::StatusResponse;
use serde::Serialize;

use crate::cmd::{CmdError, Context};
use crate::output::{self, bytes_text, OutputFormat, Table};

/// Arguments of `lmskv status` (it takes none beyond the global flags).
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {}

/// The cluster status as printed, in a stable JSON shape:
/// `{"nodes":[…],"ranges":[…],"cluster":{…},"store_recovery":"…"}`
/// (`cluster` only when the answering node could read the meta range,
/// `store_recovery` only when it rebuilt its store from its peers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// Every node of the cluster, by id.
    pub nodes: Vec<NodeView>,
    /// The ranges the answering node hosts, by id.
    pub ranges: Vec<RangeView>,
    /// The cluster-wide summary from the meta range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
    /// Set when the answering node found its store damaged or missing at
    /// start-up and rebuilt it from its peers: when, why, and where the
    /// damaged store was kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_recovery: Option<String>,
    /// The node that answered, `(node_id, address)`; shown in the table only.
    #[serde(skip)]
    pub reporter: (u64, String),
}

/// The cluster-wide summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// Nodes that are up.
    pub nodes_up: u64,
    /// Nodes the cluster knows.
    pub nodes_total: u64,
    /// Ranges, the meta range included.
    pub ranges: u64,
    /// Ranges with fewer live voters than the replication factor.
    pub under_replicated: u64,
    /// The node leading the meta range; 0 when unknown.
    pub meta_leader: u64,
    /// The cluster version in force (what every node must run at least);
    /// 0 when unknown.
    pub cluster_version: u32,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// The node's id.
    pub node_id: u64,
    /// The node's `HOST:PORT`.
    pub address: String,
    /// `up` or `down`.
    pub state: String,
}

/// One range and the state of its Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeView {
    /// The range's id.
    pub range_id: u64,
    /// The node id of the range's leader; 0 when no leader is known.
    pub leader: u64,
    /// The leader's Raft term.
    pub term: u64,
    /// Node ids of the range's replicas (voters and learners).
    pub replicas: Vec<u64>,
    /// The highest log index known to be committed.
    pub commit_index: u64,
    /// The highest log index applied to the state machine.
    pub applied_index: u64,
    /// Client writes the answering node proposed for this range as its
    /// leader since it started.
    pub writes_proposed: u64,
    /// The log entries those writes went in (many writes share one entry
    /// under load).
    pub entries_proposed: u64,
    /// Inclusive start key, escaped; shown in the table only.
    #[serde(skip)]
    pub start_key: String,
    /// Exclusive end key, escaped (empty: the end of the key space); shown in the table only.
    #[serde(skip)]
    pub end_key: String,
}

impl From<&StatusResponse> for StatusView {
    fn from(s: &StatusResponse) -> Self {
        let mut nodes: Vec<NodeView> = s
            .nodes
            .iter()
            .map(|n| NodeView {
                node_id: n.node_id,
                address: n.address.clone(),
                state: n.state.clone(),
            })
            .collect();
        nodes.sort_by_key(|n| n.node_id);
        let mut ranges: Vec<RangeView> = s
            .ranges
            .iter()
            .map(|r| {
                let d = r.descriptor.clone().unwrap_or_default();
                RangeView {
                    range_id: d.range_id,
                    leader: r.leader_id,
                    term: r.term,
                    replicas: d.replicas.iter().map(|rep| rep.node_id).collect(),
                    commit_index: r.commit_index,
                    applied_index: r.applied_index,
                    writes_proposed: r.writes_proposed,
                    entries_proposed: r.entries_proposed,
                    start_key: bytes_text(&d.start_key),
                    end_key: bytes_text(&d.end_key),
                }
            })
            .collect();
        ranges.sort_by_key(|r| r.range_id);
        let cluster = s.cluster.as_ref().map(|c| ClusterView {
            nodes_up: c.nodes_up,
            nodes_total: c.nodes_total,
            ranges: c.ranges,
            under_replicated: c.under_replicated,
            meta_leader: c.meta_leader,
            cluster_version: c.cluster_version,
        });
        StatusView {
            nodes,
            ranges,
            cluster,
            store_recovery: (!s.store_recovery.is_empty()).then(|| s.store_recovery.clone()),
            reporter: (s.node_id, s.address.clone()),
        }
    }
}

impl StatusView {
    /// Renders the nodes table and the ranges table, separated by a blank line.
    pub fn render_table(&self) -> String {
        let mut nodes = Table::new(&["NODE", "ADDRESS", "STATE"]);
        for n in &self.nodes {
            nodes.push(vec![
                n.node_id.to_string(),
                n.address.clone(),
                n.state.clone(),
            ]);
        }
        let mut ranges = Table::new(&[
            "RANGE",
            "START",
            "END",
            "LEADER",
            "TERM",
            "REPLICAS",
            "COMMIT",
            "APPLIED",
            "WRITES/ENTRIES",
        ]);
        for r in &self.ranges {
            let replicas: Vec<String> = r.replicas.iter().map(u64::to_string).collect();
            ranges.push(vec![
                r.range_id.to_string(),
                if r.start_key.is_empty() {
                    "(min)".into()
                } else {
                    r.start_key.clone()
                },
                if r.end_key.is_empty() {
                    "(max)".into()
                } else {
                    r.end_key.clone()
                },
                if r.leader == 0 {
                    "-".into()
                } else {
                    r.leader.to_string()
                },
                r.term.to_string(),
                replicas.join(","),
                r.commit_index.to_string(),
                r.applied_index.to_string(),
                if r.entries_proposed == 0 {
                    "-".into()
                } else {
                    format!("{}/{}", r.writes_proposed, r.entries_proposed)
                },
            ]);
        }
        let (id, addr) = &self.reporter;
        let summary = match &self.cluster {
            Some(c) => format!(
                "cluster: {}/{} nodes up, {} ranges, {} under-replicated, meta leader {}, version {}\n\n",
                c.nodes_up,
                c.nodes_total,
                c.ranges,
                c.under_replicated,
                if c.meta_leader == 0 {
                    "unknown".to_string()
                } else {
                    c.meta_leader.to_string()
                },
                if c.cluster_version == 0 {
                    "unknown".to_string()
                } else {
                    c.cluster_version.to_string()
                }
            ),
            None => String::new(),
        };
        let recovery = match &self.store_recovery {
            Some(note) => format!("store recovered from peers: {note}\n"),
            None => String::new(),
        };
        format!(
            "{summary}{}\n{}\nreported by node {id} at {addr}\n{recovery}",
            nodes.render(),
            ranges.render()
        )
    }
}

/// Runs `lmskv status`.
pub async fn run(ctx: &Context, _args: StatusArgs) -> Result<(), CmdError> {
    let client = ctx.client()?;
    let status = client.status().await?;
    let view = StatusView::from(&status);
    match ctx.format {
        OutputFormat::Json => output::print(&output::json(&view)?),
        OutputFormat::Table => output::print(&view.render_table()),
    }
}

#[cfg(test)]
mod tests {
    use lmskv_proto::v1::{NodeInfo, RangeDescriptor, RangeStatus, Replica};

    use super::*;

    fn sample() -> StatusResponse {
        StatusResponse {
            node_id: 1,
            address: "127.0.0.1:7001".into(),
            initialized: true,
            cluster: None,
            store_recovery: String::new(),
            nodes: vec![
                NodeInfo {
                    node_id: 2,
                    address: "127.0.0.1:7002".into(),
                    state: "down".into(),
                    ..Default::default()
                },
                NodeInfo {
                    node_id: 1,
                    address: "127.0.0.1:7001".into(),
                    state: "up".into(),
                    ..Default::default()
                },
            ],
            ranges: vec![RangeStatus {
                descriptor: Some(RangeDescriptor {
                    range_id: 1,
                    start_key: vec![0u8].into(),
                    end_key: Default::default(),
                    epoch: None,
                    replicas: vec![
                        Replica {
                            node_id: 1,
                            role: 0,
                        },
                        Replica {
                            node_id: 2,
                            role: 0,
                        },
                        Replica {
                            node_id: 3,
                            role: 1,
                        },
                    ],
                }),
                leader_id: 1,
                term: 3,
                commit_index: 10,
                applied_index: 9,
                local_role: "leader".into(),
                writes_proposed: 40,
                entries_proposed: 8,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn status_json_has_the_stable_shape() {
        let view = StatusView::from(&sample());
        let text = output::json(&view).expect("json");
        assert_eq!(
            text,
            r#"{"nodes":[{"node_id":1,"address":"127.0.0.1:7001","state":"up"},{"node_id":2,"address":"127.0.0.1:7002","state":"down"}],"ranges":[{"range_id":1,"leader":1,"term":3,"replicas":[1,2,3],"commit_index":10,"applied_index":9,"writes_proposed":40,"entries_proposed":8}]}"#
        );
    }

    #[test]
    fn status_table_lists_nodes_and_ranges() {
        let table = StatusView::from(&sample()).render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "NODE  ADDRESS         STATE");
        assert_eq!(lines[1], "1     127.0.0.1:7001  up");
        assert!(lines[4].starts_with("RANGE  START  END"), "{table}");
        assert!(lines[5].contains("\\x00"), "{table}");
        assert!(lines[5].contains("(max)"), "{table}");
        assert!(lines[5].contains("1,2,3"), "{table}");
        assert!(lines[4].ends_with("WRITES/ENTRIES"), "{table}");
        assert!(lines[5].ends_with("40/8"), "{table}");
        assert!(!table.contains("store recovered"), "{table}");
    }

    #[test]
    fn a_store_rebuilt_from_peers_is_reported() {
        let mut s = sample();
        s.store_recovery = "at 2026-11-30T10:00:00Z: WAL damaged; kept in /data/damaged-1".into();
        let view = StatusView::from(&s);
        let text = output::json(&view).expect("json");
        assert!(
            text.contains(r#""store_recovery":"at 2026-11-30T10:00:00Z: WAL damaged; kept in /data/damaged-1""#),
            "{text}"
        );
        let table = view.render_table();
        assert!(
            table.ends_with("store recovered from peers: at 2026-11-30T10:00:00Z: WAL damaged; kept in /data/damaged-1\n"),
            "{table}"
        );
    }

    #[test]
    fn the_cluster_summary_is_shown_when_known() {
        let mut s = sample();
        s.cluster = Some(lmskv_proto::v1::ClusterSummary {
            nodes_up: 2,
            nodes_total: 3,
            ranges: 7,
            under_replicated: 1,
            meta_leader: 1,
            cluster_version: 2,
        });
        let view = StatusView::from(&s);
        let text = output::json(&view).expect("json");
        assert!(
            text.ends_with(r#""cluster":{"nodes_up":2,"nodes_total":3,"ranges":7,"under_replicated":1,"meta_leader":1,"cluster_version":2}}"#),
            "{text}"
        );
        let table = view.render_table();
        assert!(
            table.starts_with(
                "cluster: 2/3 nodes up, 7 ranges, 1 under-replicated, meta leader 1, version 2\n"
            ),
            "{table}"
        );
    }
}
