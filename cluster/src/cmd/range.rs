//! `lmskv range list|split|transfer-leader|move`: the cluster's ranges as
//! the meta range records them, manual splits, leader and replica moves.
//!
//! The JSON shape of `range list` is an interface:
//! `[{"range_id":2,"start_key":"user/","end_key":"zzz","epoch":{"conf_ver":1,"version":3},"leader":1,"replicas":[1,2,3],"size_bytes":123,"keys":10,"qps":0.0}, …]`,
//! keys escaped as `lmskv_proto::keys::escape` prints them.

use clap::{Args, Subcommand};
use lmskv_client::{RangeDescriptor, RangeInfo};
use serde::Serialize;

use crate::cmd::{parse_user_key, CmdError, Context, Escaped};
use crate::output::{self, bytes_text, Table};

/// Range operations.
#[derive(Debug, Clone, Subcommand)]
pub enum RangeCommand {
    /// List every range: span, epoch, leader, replicas, size and load.
    List,
    /// Split the range holding KEY at KEY (KEY starts the new range).
    Split(SplitArgs),
    /// Move the leadership of RANGE to NODE.
    TransferLeader(TransferLeaderArgs),
    /// Move RANGE's replica from node FROM to node TO (learner, catch-up,
    /// joint membership change, removal of the old replica).
    Move(MoveArgs),
}

/// Arguments of `lmskv range move`.
#[derive(Debug, Clone, Args)]
pub struct MoveArgs {
    /// The range id.
    pub range: u64,
    /// The node whose replica moves.
    pub from: u64,
    /// The node that gets it.
    pub to: u64,
}

/// Arguments of `lmskv range split`.
#[derive(Debug, Clone, Args)]
pub struct SplitArgs {
    /// The split key; `\xNN` and `\\` escapes give any byte.
    #[arg(value_parser = parse_user_key)]
    pub key: Escaped,
}

/// Arguments of `lmskv range transfer-leader`.
#[derive(Debug, Clone, Args)]
pub struct TransferLeaderArgs {
    /// The range id.
    pub range: u64,
    /// The node id that should lead it.
    pub node: u64,
}

/// A range's epoch as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EpochView {
    /// Grows on replica changes.
    pub conf_ver: u64,
    /// Grows on splits and merges.
    pub version: u64,
}

/// One range as `range list` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RangeView {
    pub range_id: u64,
    /// Inclusive start key, escaped.
    pub start_key: String,
    /// Exclusive end key, escaped; empty: the end of the key space.
    pub end_key: String,
    pub epoch: EpochView,
    /// The leader's node id; 0 when unknown.
    pub leader: u64,
    /// Node ids of the replicas.
    pub replicas: Vec<u64>,
    pub size_bytes: u64,
    pub keys: u64,
    /// Requests per second, recent average.
    pub qps: f64,
}

/// A range descriptor as printed by `range split`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DescriptorView {
    pub range_id: u64,
    pub start_key: String,
    pub end_key: String,
    pub epoch: EpochView,
    pub replicas: Vec<u64>,
}

/// What `range split` prints: `{"left":{…},"right":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitView {
    pub left: DescriptorView,
    pub right: DescriptorView,
}

/// What `range transfer-leader` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferView {
    pub range_id: u64,
    pub leader: u64,
}

fn epoch_view(d: &RangeDescriptor) -> EpochView {
    let e = d.epoch.unwrap_or_default();
    EpochView {
        conf_ver: e.conf_ver,
        version: e.version,
    }
}

impl From<&RangeDescriptor> for DescriptorView {
    fn from(d: &RangeDescriptor) -> Self {
        DescriptorView {
            range_id: d.range_id,
            start_key: bytes_text(&d.start_key),
            end_key: bytes_text(&d.end_key),
            epoch: epoch_view(d),
            replicas: d.replicas.iter().map(|r| r.node_id).collect(),
        }
    }
}

impl From<&RangeInfo> for RangeView {
    fn from(r: &RangeInfo) -> Self {
        let d = r.descriptor.clone().unwrap_or_default();
        RangeView {
            range_id: d.range_id,
            start_key: bytes_text(&d.start_key),
            end_key: bytes_text(&d.end_key),
            epoch: epoch_view(&d),
            leader: r.leader_id,
            replicas: d.replicas.iter().map(|p| p.node_id).collect(),
            size_bytes: r.size_bytes,
            keys: r.keys,
            qps: r.qps,
        }
    }
}

/// Renders `range list` as a table.
pub fn render_ranges(views: &[RangeView]) -> String {
    let mut t = Table::new(&[
        "RANGE", "START", "END", "EPOCH", "LEADER", "REPLICAS", "SIZE", "KEYS", "QPS",
    ]);
    for r in views {
        let replicas: Vec<String> = r.replicas.iter().map(u64::to_string).collect();
        t.push(vec![
            r.range_id.to_string(),
            span_text(&r.start_key, "(min)"),
            span_text(&r.end_key, "(max)"),
            format!("{}/{}", r.epoch.conf_ver, r.epoch.version),
            if r.leader == 0 {
                "-".into()
            } else {
                r.leader.to_string()
            },
            replicas.join(","),
            r.size_bytes.to_string(),
            r.keys.to_string(),
            format!("{:.1}", r.qps),
        ]);
    }
    t.render()
}

fn span_text(key: &str, empty: &str) -> String {
    if key.is_empty() {
        empty.into()
    } else {
        key.into()
    }
}

/// Runs one `lmskv range` subcommand.
pub async fn run(ctx: &Context, command: RangeCommand) -> Result<(), CmdError> {
    let client = ctx.client()?;
    match command {
        RangeCommand::List => {
            let ranges = client.range_list().await?;
            let views: Vec<RangeView> = ranges.iter().map(RangeView::from).collect();
            output::emit(ctx.format, &views, |v| render_ranges(v))
        }
        RangeCommand::Split(a) => {
            let (left, right) = client.split(a.key.0).await?;
            let view = SplitView {
                left: (&left).into(),
                right: (&right).into(),
            };
            output::emit(ctx.format, &view, |v| {
                format!(
                    "OK range {} [{}, {}) and range {} [{}, {})",
                    v.left.range_id,
                    span_text(&v.left.start_key, "(min)"),
                    span_text(&v.left.end_key, "(max)"),
                    v.right.range_id,
                    span_text(&v.right.start_key, "(min)"),
                    span_text(&v.right.end_key, "(max)"),
                )
            })
        }
        RangeCommand::TransferLeader(a) => {
            client.transfer_leader(a.range, a.node).await?;
            let view = TransferView {
                range_id: a.range,
                leader: a.node,
            };
            output::emit(ctx.format, &view, |v| {
                format!("OK range {} is led by node {}", v.range_id, v.leader)
            })
        }
        RangeCommand::Move(a) => {
            let d = client.move_replica(a.range, a.from, a.to).await?;
            let view = DescriptorView::from(&d);
            output::emit(ctx.format, &view, |v| {
                format!(
                    "OK range {} has replicas on nodes {:?} (conf_ver {})",
                    v.range_id, v.replicas, v.epoch.conf_ver
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use lmskv_client::RangeEpoch;
    use lmskv_proto::v1::Replica;

    use super::*;

    fn info() -> RangeInfo {
        RangeInfo {
            descriptor: Some(RangeDescriptor {
                range_id: 2,
                start_key: "user/".into(),
                end_key: "zzz".into(),
                epoch: Some(RangeEpoch {
                    conf_ver: 1,
                    version: 3,
                }),
                replicas: (1..=3)
                    .map(|n| Replica {
                        node_id: n,
                        role: 0,
                    })
                    .collect(),
            }),
            leader_id: 1,
            size_bytes: 123,
            keys: 10,
            qps: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn range_list_json_has_the_stable_shape() {
        let views = vec![RangeView::from(&info())];
        assert_eq!(
            output::json(&views).unwrap(),
            r#"[{"range_id":2,"start_key":"user/","end_key":"zzz","epoch":{"conf_ver":1,"version":3},"leader":1,"replicas":[1,2,3],"size_bytes":123,"keys":10,"qps":0.0}]"#
        );
    }

    #[test]
    fn range_keys_are_escaped_and_tables_name_open_ends() {
        let mut i = info();
        let d = i.descriptor.as_mut().unwrap();
        d.start_key = b"\x01".to_vec().into();
        d.end_key = Default::default();
        let v = RangeView::from(&i);
        assert_eq!(v.start_key, "\\x01");
        let table = render_ranges(&[v]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("RANGE  START  END"), "{table}");
        assert!(
            lines[1].contains("\\x01") && lines[1].contains("(max)"),
            "{table}"
        );
        assert!(
            lines[1].contains("1/3") && lines[1].contains("1,2,3"),
            "{table}"
        );
    }
}
