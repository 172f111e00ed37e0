//! Node configuration: every limit and timing the node uses, with units last
//! in the names, loaded from an optional TOML file and the command line, and
//! validated at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::raft::RaftTuning;
use crate::storage::EngineOptions;

/// Most `applied_flush_after_ms` may be (5 minutes): it bounds how much a
/// restart after a crash applies again from the log, and with it how long
/// that restart takes.
pub const APPLIED_FLUSH_AFTER_MS_MAX: u64 = 5 * 60 * 1000;

/// Settings read from `--config FILE`. Every field is optional; absent fields
/// take the defaults below.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    pub heartbeat_interval_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub snapshot_logs_to_keep: u64,
    pub write_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub dedup_window_s: u64,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Bytes of recent Raft log entries all ranges keep in memory together
    /// (0: none; reads then go to RocksDB).
    pub log_cache_bytes: usize,
    /// How long applied writes (which skip the WAL) may stay only in memory
    /// before the node flushes them: bounds what a restart after a crash
    /// applies again from the log.
    pub applied_flush_after_ms: u64,
    pub inflight_requests_max: usize,
    /// Proposals (single writes or groups of writes that queued meanwhile)
    /// a range's leader keeps in flight at once.
    pub proposals_in_flight_max: usize,
    /// A node silent for longer than this has its replicas re-created elsewhere.
    pub dead_node_timeout_s: u64,
    /// Voters per range.
    pub replication_factor: usize,
    /// A range larger than this is split.
    pub split_size_bytes: u64,
    /// A range serving more than this many requests per second ... (0: no
    /// splits by load, e.g. when every node shares one host, where a split
    /// spreads no load and only shrinks each range's write groups)
    pub split_qps: f64,
    /// ... for this long is split.
    pub split_qps_duration_s: u64,
    /// Keys the cluster splits at when it is formed (escaped as `\xNN` for
    /// non-printable bytes), e.g. one range per LMS table prefix.
    pub pre_split_keys: Vec<String>,
    /// Key prefixes whose rows automatic splits must not cut (see
    /// [`SplitRow`]), e.g. `[{ prefix = "course/", id_len = 8 }]`. Every node
    /// of a cluster should have the same list: the range leader picks the key.
    pub split_rows: Vec<SplitRow>,
    /// How often a node reports to the meta leader.
    pub node_heartbeat_ms: u64,
    /// How often the placement driver (the meta leader) plans.
    pub placement_interval_ms: u64,
    /// Balance when a node holds more than this fraction above the mean.
    pub balance_tolerance: f64,
    /// Whether the placement driver moves range leaderships to even out the
    /// leaders per node (replica balance and repair are not affected).
    pub balance_leaders: bool,
    /// What a node does when its store fails the checks at start-up
    /// (damaged WAL, MANIFEST or SST, or durable writes lost): with `true`
    /// it moves the store to `quarantine/` in the data dir once its peers
    /// can spare its replicas, and rejoins empty to be rebuilt from them;
    /// with `false` it exits and leaves the store as it is. Either way the
    /// damaged store is never served.
    pub recover_from_peers: bool,
    /// Whether the appends (and heartbeats) of every range to a peer share
    /// one long-lived gRPC stream; with `false` each is its own call.
    pub raft_append_stream: bool,
    /// Appends of one range a leader keeps in flight to a peer on that
    /// stream: the next reaches the follower while it syncs the last
    /// (1: one at a time, each sent when the last is answered).
    pub raft_append_pipeline: usize,
    /// A range with no requests for this long hibernates: its leader stops
    /// sending heartbeats and its followers their election timers.
    pub range_hibernate_after_ms: u64,
    /// A range asleep (hibernating, or dormant on a follower) and unused for
    /// this long parks: its Raft group shuts down until a message or a
    /// request needs it.
    pub range_park_after_ms: u64,
    /// The highest cluster version this node lets the cluster go to (see
    /// `lmskv_node::version`); unset: the binary's own. Set it to the old
    /// binary's version on upgraded nodes while an upgrade may still be
    /// rolled back.
    pub cluster_version_max: Option<u32>,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            // A follower calls an election after hearing nothing for the
            // leader's lease (election_timeout_ms_max) plus a random election
            // timeout: 600-800 ms of silence, a dozen missed heartbeats.
            election_timeout_ms_min: 200,
            election_timeout_ms_max: 400,
            heartbeat_interval_ms: 50,
            snapshot_logs_since_last: 20_000,
            snapshot_logs_to_keep: 5_000,
            write_timeout_ms: 10_000,
            read_timeout_ms: 5_000,
            dedup_window_s: 600,
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 8 << 20,
            log_cache_bytes: 256 << 20,
            applied_flush_after_ms: crate::storage::APPLIED_FLUSH_AFTER.as_millis() as u64,
            inflight_requests_max: 10_000,
            proposals_in_flight_max: crate::raft::proposals::PROPOSALS_IN_FLIGHT_MAX,
            dead_node_timeout_s: 60,
            replication_factor: 3,
            split_size_bytes: 64 << 20,
            split_qps: 2_500.0,
            split_qps_duration_s: 10,
            pre_split_keys: Vec::new(),
            split_rows: Vec::new(),
            node_heartbeat_ms: 1_000,
            placement_interval_ms: 1_000,
            balance_tolerance: 0.2,
            balance_leaders: true,
            recover_from_peers: true,
            raft_append_stream: true,
            raft_append_pipeline: RAFT_APPEND_PIPELINE_DEFAULT,
            range_hibernate_after_ms: 10_000,
            range_park_after_ms: 10_000,
            cluster_version_max: None,
        }
    }
}

/// See [`FileConfig::raft_append_pipeline`]. One at a time: on one host
/// (loopback round trips far shorter than an fsync) a deeper pipeline cost
/// CPU per put at 64 clients for no throughput (bench/findings.md); it is
/// for links where the round trip matters.
pub const RAFT_APPEND_PIPELINE_DEFAULT: usize = 1;

/// Longest `id_len` of a [`SplitRow`].
pub const SPLIT_ROW_ID_BYTES_MAX: usize = 256;

/// A family of rows that automatic splits keep whole: a key starting with
/// `prefix` belongs to the row `prefix` + its next `id_len` bytes (a key
/// shorter than that is a row of its own). The placement driver moves an
/// automatic split key back to the start of its row, so everything an
/// application changes atomically under one row (e.g. `course/<cid>/…`)
/// stays in one range. Splits an operator asks for are not adjusted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRow {
    /// The row family's prefix, escaped like `pre_split_keys`.
    pub prefix: String,
    /// Bytes of the row id after the prefix (8 for a big-endian u64).
    pub id_len: usize,
}

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: u64,
    pub listen: SocketAddr,
    /// The address announced to peers and clients; `listen` when `None`.
    pub advertise: Option<String>,
    /// The local address connections to other nodes are made from.
    pub source_ip: Option<std::net::IpAddr>,
    pub data_dir: PathBuf,
    /// Addresses of other nodes to form or join a cluster with.
    pub join: Vec<String>,
    pub file: FileConfig,
}

impl NodeConfig {
    /// Reads the TOML file at `path`.
    pub fn load_file(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Checks every value, returning a message that names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.file;
        if self.node_id == 0 {
            return Err("--node-id must be at least 1".into());
        }
        if self.listen.port() == 0 {
            return Err("--listen needs an explicit port".into());
        }
        if let Some(a) = &self.advertise {
            let port = a
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then(|| port.parse::<u16>().ok())?);
            if !matches!(port, Some(p) if p != 0) {
                return Err(format!(
                    "--advertise {a:?} must be HOST:PORT with a non-zero port"
                ));
            }
        }
        if f.heartbeat_interval_ms == 0 || f.heartbeat_interval_ms * 3 > f.election_timeout_ms_min {
            return Err(format!(
                "heartbeat_interval_ms ({}) must be positive and at most a third of election_timeout_ms_min ({})",
                f.heartbeat_interval_ms, f.election_timeout_ms_min
            ));
        }
        if f.election_timeout_ms_min >= f.election_timeout_ms_max {
            return Err("election_timeout_ms_min must be below election_timeout_ms_max".into());
        }
        if f.snapshot_logs_since_last < 10 {
            return Err("snapshot_logs_since_last must be at least 10".into());
        }
        if f.proposals_in_flight_max == 0
            || f.proposals_in_flight_max > crate::raft::proposals::PROPOSALS_IN_FLIGHT_LIMIT
        {
            return Err(format!(
                "proposals_in_flight_max must be 1 to {}",
                crate::raft::proposals::PROPOSALS_IN_FLIGHT_LIMIT
            ));
        }
        if f.raft_append_pipeline == 0 || f.raft_append_pipeline > crate::raft::APPEND_PIPELINE_MAX
        {
            return Err(format!(
                "raft_append_pipeline must be 1 to {}",
                crate::raft::APPEND_PIPELINE_MAX
            ));
        }
        if f.write_timeout_ms < 100 || f.read_timeout_ms < 100 {
            return Err("write_timeout_ms and read_timeout_ms must be at least 100".into());
        }
        if f.range_hibernate_after_ms < 1_000 || f.range_park_after_ms < 1_000 {
            return Err(format!(
                "range_hibernate_after_ms ({}) and range_park_after_ms ({}) must be at least 1000",
                f.range_hibernate_after_ms, f.range_park_after_ms
            ));
        }
        if let Some(v) = f.cluster_version_max {
            let top = crate::version::CLUSTER_VERSION;
            if !(crate::version::CLUSTER_VERSION_BASE..=top).contains(&v) {
                return Err(format!(
                    "cluster_version_max ({v}) must be between {} and {top}, the highest this binary runs",
                    crate::version::CLUSTER_VERSION_BASE
                ));
            }
        }
        if f.dedup_window_s < 10 {
            return Err("dedup_window_s must be at least 10 so retries stay deduplicated".into());
        }
        if f.block_cache_bytes < (1 << 20) || f.write_buffer_bytes < (1 << 20) {
            return Err("block_cache_bytes and write_buffer_bytes must be at least 1 MiB".into());
        }
        if f.inflight_requests_max == 0 {
            return Err("inflight_requests_max must be positive".into());
        }
        if !(100..=APPLIED_FLUSH_AFTER_MS_MAX).contains(&f.applied_flush_after_ms) {
            return Err(format!(
                "applied_flush_after_ms must be in [100, {APPLIED_FLUSH_AFTER_MS_MAX}]: it bounds what a restart after a crash applies again"
            ));
        }
        if f.replication_factor == 0 || f.replication_factor > 7 {
            return Err("replication_factor must be between 1 and 7".into());
        }
        if f.dead_node_timeout_s == 0 {
            return Err("dead_node_timeout_s must be positive".into());
        }
        if f.split_size_bytes < (64 << 10) {
            return Err("split_size_bytes must be at least 64 KiB".into());
        }
        if !f.split_qps.is_finite() || f.split_qps < 0.0 {
            return Err("split_qps must be a number of requests per second, at least 0 (0: no splits by load)".into());
        }
        if f.split_qps_duration_s == 0 {
            return Err("split_qps_duration_s must be positive".into());
        }
        if f.node_heartbeat_ms < 50 || f.placement_interval_ms < 50 {
            return Err("node_heartbeat_ms and placement_interval_ms must be at least 50".into());
        }
        if !(0.0..=10.0).contains(&f.balance_tolerance) {
            return Err("balance_tolerance must be between 0 and 10".into());
        }
        for k in &f.pre_split_keys {
            let key = lmskv_proto::keys::parse_escaped(k)
                .map_err(|e| format!("pre_split_keys: {k:?}: {e}"))?;
            lmskv_proto::keys::validate_user_key("pre_split_keys", &key)
                .map_err(|e| format!("pre_split_keys: {k:?}: {e}"))?;
        }
        let mut prefixes: Vec<Vec<u8>> = Vec::new();
        for (i, r) in f.split_rows.iter().enumerate() {
            let at = format!("split_rows[{i}] (prefix {:?})", r.prefix);
            let prefix = lmskv_proto::keys::parse_escaped(&r.prefix)
                .map_err(|e| format!("{at}: prefix: {e}"))?;
            lmskv_proto::keys::validate_user_key("prefix", &prefix)
                .map_err(|e| format!("{at}: prefix: {e}"))?;
            if r.id_len == 0 || r.id_len > SPLIT_ROW_ID_BYTES_MAX {
                return Err(format!(
                    "{at}: id_len must be between 1 and {SPLIT_ROW_ID_BYTES_MAX}, not {}",
                    r.id_len
                ));
            }
            if prefix.len() + r.id_len > lmskv_proto::limits::KEY_BYTES_MAX {
                return Err(format!(
                    "{at}: prefix and id_len together exceed the key limit of {} bytes",
                    lmskv_proto::limits::KEY_BYTES_MAX
                ));
            }
            if prefixes.contains(&prefix) {
                return Err(format!("{at}: the prefix is listed twice"));
            }
            prefixes.push(prefix);
        }
        let rows = self.split_rows();
        for k in self.pre_split_keys() {
            if crate::pd::row_start(&rows, &k) != k {
                return Err(format!(
                    "pre_split_keys: {:?} cuts a row of split_rows; use its row start {:?}",
                    lmskv_proto::keys::escape(&k),
                    lmskv_proto::keys::escape(&crate::pd::row_start(&rows, &k)),
                ));
            }
        }
        for j in &self.join {
            if j.parse::<SocketAddr>().is_err() && !j.contains(':') {
                return Err(format!("--join address {j:?} is not HOST:PORT"));
            }
        }
        Ok(())
    }

    /// The highest cluster version this node runs and lets the cluster go
    /// to: the binary's own, or lower when `cluster_version_max` says so.
    pub fn cluster_version_max(&self) -> u32 {
        self.file
            .cluster_version_max
            .unwrap_or(crate::version::CLUSTER_VERSION)
            .min(crate::version::CLUSTER_VERSION)
    }

    /// Raft settings.
    pub fn raft_tuning(&self) -> RaftTuning {
        let f = &self.file;
        RaftTuning {
            election_timeout_ms_min: f.election_timeout_ms_min,
            election_timeout_ms_max: f.election_timeout_ms_max,
            heartbeat_interval_ms: f.heartbeat_interval_ms,
            snapshot_logs_since_last: f.snapshot_logs_since_last,
            snapshot_logs_to_keep: f.snapshot_logs_to_keep,
            write_timeout: Duration::from_millis(f.write_timeout_ms),
            read_timeout: Duration::from_millis(f.read_timeout_ms),
            dedup_window: Duration::from_secs(f.dedup_window_s),
            proposals_in_flight_max: f.proposals_in_flight_max,
            park_after: Duration::from_millis(f.range_park_after_ms),
        }
    }

    /// Storage engine settings.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            block_cache_bytes: self.file.block_cache_bytes,
            write_buffer_bytes: self.file.write_buffer_bytes,
            log_cache_bytes: self.file.log_cache_bytes,
            applied_flush_after: Duration::from_millis(self.file.applied_flush_after_ms),
        }
    }

    /// The configured pre-split keys, parsed.
    pub fn pre_split_keys(&self) -> Vec<bytes::Bytes> {
        self.file
            .pre_split_keys
            .iter()
            .filter_map(|k| lmskv_proto::keys::parse_escaped(k).ok())
            .map(bytes::Bytes::from)
            .collect()
    }

    /// The configured split rows as (prefix, id length), parsed.
    pub fn split_rows(&self) -> Vec<(bytes::Bytes, usize)> {
        self.file
            .split_rows
            .iter()
            .filter_map(|r| {
                let p = lmskv_proto::keys::parse_escaped(&r.prefix).ok()?;
                Some((bytes::Bytes::from(p), r.id_len))
            })
            .collect()
    }

    /// The address peers and clients reach this node at.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            node_id: 1,
            listen: "127.0.0.1:7001".parse().unwrap(),
            advertise: None,
            source_ip: None,
            data_dir: "/tmp/x".into(),
            join: vec![],
            file: FileConfig::default(),
        }
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.node_id = 0;
        assert!(c.validate().unwrap_err().contains("node-id"));
        let mut c = cfg();
        c.file.heartbeat_interval_ms = 1_000;
        assert!(c.validate().unwrap_err().contains("heartbeat"));
        for bad in ["127.0.0.1", "127.0.0.1:0", ":7001", "127.0.0.1:port"] {
            let mut c = cfg();
            c.advertise = Some(bad.into());
            assert!(c.validate().unwrap_err().contains("--advertise"), "{bad}");
        }
        let mut c = cfg();
        c.advertise = Some("proxy.local:9001".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.advertise_addr(), "proxy.local:9001");
        for (ms, ok) in [(99, false), (100, true), (300_000, true), (300_001, false)] {
            let mut c = cfg();
            c.file.applied_flush_after_ms = ms;
            match c.validate() {
                Ok(()) => {
                    assert!(ok, "{ms} accepted");
                    assert_eq!(
                        c.engine_options().applied_flush_after.as_millis(),
                        ms as u128
                    );
                }
                Err(e) => assert!(!ok && e.contains("applied_flush_after_ms"), "{ms}: {e}"),
            }
        }
    }

    #[test]
    fn a_cluster_version_hold_is_checked_and_caps_the_binary_s_own() {
        let top = crate::version::CLUSTER_VERSION;
        assert_eq!(cfg().cluster_version_max(), top);
        for (v, ok) in [(0, false), (1, true), (top, true), (top + 1, false)] {
            let mut c = cfg();
            c.file = toml::from_str(&format!("cluster_version_max = {v}")).unwrap();
            assert_eq!(c.validate().is_ok(), ok, "{v}");
            if ok {
                assert_eq!(c.cluster_version_max(), v);
            } else {
                assert!(c.validate().unwrap_err().contains("cluster_version_max"));
            }
        }
    }

    #[test]
    fn idle_times_must_be_at_least_a_second_and_reach_the_replicas() {
        for (hibernate, park, ok) in [
            (999, 10_000, false),
            (10_000, 0, false),
            (1_000, 1_000, true),
        ] {
            let mut c = cfg();
            c.file.range_hibernate_after_ms = hibernate;
            c.file.range_park_after_ms = park;
            assert_eq!(c.validate().is_ok(), ok, "{hibernate} / {park}");
        }
        let f: FileConfig = toml::from_str("range_park_after_ms = 2500").unwrap();
        let mut c = cfg();
        c.file = f;
        assert_eq!(c.raft_tuning().park_after, Duration::from_millis(2_500));
    }

    #[test]
    fn proposals_in_flight_must_be_within_bounds() {
        for (n, ok) in [(0, false), (1, true), (2, true), (64, true), (65, false)] {
            let mut c = cfg();
            c.file.proposals_in_flight_max = n;
            assert_eq!(c.validate().is_ok(), ok, "proposals_in_flight_max = {n}");
        }
        let f: FileConfig = toml::from_str("proposals_in_flight_max = 8").unwrap();
        assert_eq!(f.proposals_in_flight_max, 8);
        let mut c = cfg();
        c.file = f;
        assert_eq!(c.raft_tuning().proposals_in_flight_max, 8);
    }

    #[test]
    fn split_qps_is_a_rate_or_zero_for_off() {
        for (qps, ok) in [
            (0.0, true),
            (2_500.0, true),
            (-1.0, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
        ] {
            let mut c = cfg();
            c.file.split_qps = qps;
            assert_eq!(c.validate().is_ok(), ok, "split_qps = {qps}");
        }
        let mut c = cfg();
        c.file.split_qps_duration_s = 0;
        assert!(c.validate().unwrap_err().contains("split_qps_duration_s"));
    }

    #[test]
    fn raft_append_pipeline_is_1_to_its_max() {
        for (n, ok) in [(0, false), (1, true), (4, true), (32, true), (33, false)] {
            let mut c = cfg();
            c.file.raft_append_pipeline = n;
            let r = c.validate();
            assert_eq!(r.is_ok(), ok, "raft_append_pipeline = {n}");
            if !ok {
                assert!(r
                    .unwrap_err()
                    .contains("raft_append_pipeline must be 1 to 32"));
            }
        }
        let f: FileConfig = toml::from_str("raft_append_pipeline = 1").unwrap();
        assert_eq!(f.raft_append_pipeline, 1);
    }

    /// The README's example `--config` file (the TOML block that sets
    /// `election_timeout_ms_min`) parses and passes the checks, and its
    /// `log_cache_bytes` reaches the engine.
    #[test]
    fn the_readmes_example_config_parses_and_validates() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split_once("```").map(|(toml, _)| toml))
            .find(|b| b.contains("election_timeout_ms_min"))
            .expect("the README has the example config");
        let f: FileConfig = toml::from_str(block).expect("the example parses");
        let mut c = cfg();
        c.file = f;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.engine_options().log_cache_bytes, 256 << 20);
        let f: FileConfig = toml::from_str("log_cache_bytes = 0").unwrap();
        c.file = f;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.engine_options().log_cache_bytes, 0);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("election_timeout_ms_min = 500").is_ok());
        assert!(toml::from_str::<FileConfig>("electon_timeout = 5").is_err());
        assert!(
            toml::from_str::<FileConfig>("split_rows = [{ prefix = \"c/\", idlen = 8 }]").is_err()
        );
    }

    #[test]
    fn split_rows_are_parsed_and_checked() {
        let f: FileConfig = toml::from_str(
            "split_rows = [{ prefix = \"course/\", id_len = 8 }, { prefix = \"t\\\\x01/\", id_len = 2 }]\n\
             pre_split_keys = [\"course/\", \"course/\\\\x00\\\\x00\\\\x00\\\\x00\\\\x00\\\\x00\\\\x00\\\\x09\"]",
        )
        .unwrap();
        let mut c = cfg();
        c.file = f;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.split_rows(),
            vec![
                (bytes::Bytes::from_static(b"course/"), 8),
                (bytes::Bytes::from_static(b"t\x01/"), 2)
            ]
        );
        let bad = |rows: &str| {
            let mut c = cfg();
            c.file = toml::from_str(&format!("split_rows = [{rows}]")).unwrap();
            c.validate().unwrap_err()
        };
        assert!(bad(r#"{ prefix = "c/", id_len = 0 }"#).contains("id_len must be between 1"));
        assert!(bad(r#"{ prefix = "c/", id_len = 257 }"#).contains("id_len"));
        assert!(bad(r#"{ prefix = "", id_len = 8 }"#).contains("split_rows[0]"));
        assert!(bad(r#"{ prefix = "\\x00m", id_len = 8 }"#).contains("reserved"));
        assert!(bad(r#"{ prefix = "\\xZZ", id_len = 8 }"#).contains("escape"));
        assert!(
            bad(r#"{ prefix = "c/", id_len = 8 }, { prefix = "c/", id_len = 4 }"#)
                .contains("twice")
        );
        let mut c = cfg();
        c.file = toml::from_str(
            "split_rows = [{ prefix = \"c/\", id_len = 2 }]\npre_split_keys = [\"c/ab/x\"]",
        )
        .unwrap();
        assert!(c.validate().unwrap_err().contains("cuts a row"));
    }
}
