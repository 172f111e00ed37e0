//! The systems under test: lmskv (through `lmskv-client`) and etcd (through
//! the `etcd-client` crate, etcd's v3 API), behind one set of operations.
//!
//! Read consistency maps as follows: lmskv takes the level as given; etcd
//! has two, so STRONG is a linearizable read (etcd's default) and every
//! weaker level a serializable one.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use lmskv_client::{Client, ReadConsistency, ScanOptions};

/// How long one operation may take, retries included, before it counts as failed.
pub const OP_DEADLINE: Duration = Duration::from_secs(10);

/// Which system a run targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    Lmskv,
    Etcd,
}

impl TargetKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Lmskv => "lmskv",
            TargetKind::Etcd => "etcd",
        }
    }

    /// The file name of the target's server program, to find its processes.
    pub fn server_program(self) -> &'static str {
        match self {
            TargetKind::Lmskv => "lmskv-node",
            TargetKind::Etcd => "etcd",
        }
    }

    /// Parses a name from [`TargetKind::name`].
    pub fn parse(s: &str) -> Option<TargetKind> {
        match s.to_ascii_lowercase().as_str() {
            "lmskv" => Some(TargetKind::Lmskv),
            "etcd" => Some(TargetKind::Etcd),
            _ => None,
        }
    }
}

/// Read consistency requested on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Strong,
    Bounded(Duration),
    Session,
    Prefix,
    Eventual,
}

impl Consistency {
    /// Parses `strong`, `bounded:500ms`, `session`, `prefix` or `eventual`.
    pub fn parse(s: &str) -> Result<Consistency, String> {
        match s {
            "strong" => Ok(Consistency::Strong),
            "session" => Ok(Consistency::Session),
            "prefix" => Ok(Consistency::Prefix),
            "eventual" => Ok(Consistency::Eventual),
            _ => match s.strip_prefix("bounded:") {
                Some(d) => crate::parse_duration(d).map(Consistency::Bounded),
                None => Err(format!(
                    "unknown consistency {s:?}; use strong, bounded:DURATION, session, prefix or eventual"
                )),
            },
        }
    }

    /// The name for reports.
    pub fn name(self) -> String {
        match self {
            Consistency::Strong => "strong".into(),
            Consistency::Bounded(d) => format!("bounded:{}ms", d.as_millis()),
            Consistency::Session => "session".into(),
            Consistency::Prefix => "prefix".into(),
            Consistency::Eventual => "eventual".into(),
        }
    }
}

/// A connection to the system under test; cheap to clone, one per client task.
#[derive(Clone)]
pub enum Target {
    Lmskv(Client),
    Etcd(etcd_client::KvClient),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Lmskv(_) => f.write_str("Target::Lmskv"),
            Target::Etcd(_) => f.write_str("Target::Etcd"),
        }
    }
}

fn etcd_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

impl Target {
    /// Connects to `endpoints`.
    /// `bundle`: whether the lmskv client bundles concurrent requests to
    /// one node (see `lmskv_client::ClientBuilder::bundle_requests`).
    pub async fn connect(
        kind: TargetKind,
        endpoints: &[String],
        bundle: bool,
    ) -> anyhow::Result<Target> {
        match kind {
            TargetKind::Lmskv => Ok(Target::Lmskv(
                Client::builder()
                    .endpoints(endpoints.to_vec())
                    .deadline(OP_DEADLINE)
                    .bundle_requests(bundle)
                    .build()
                    .context("lmskv client")?,
            )),
            TargetKind::Etcd => {
                let urls: Vec<String> = endpoints.iter().map(|e| etcd_url(e)).collect();
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(OP_DEADLINE);
                let c = etcd_client::Client::connect(urls, Some(opts))
                    .await
                    .context("etcd client")?;
                Ok(Target::Etcd(c.kv_client()))
            }
        }
    }

    /// Reads a record; `Ok(false)` when it does not exist.
    pub async fn read(&mut self, key: Bytes, consistency: Consistency) -> anyhow::Result<bool> {
        match self {
            Target::Lmskv(c) => {
                let level = match consistency {
                    Consistency::Strong => ReadConsistency::Strong,
                    Consistency::Bounded(d) => ReadConsistency::BoundedStaleness(d),
                    Consistency::Session => c.session_token().read_consistency(),
                    Consistency::Prefix => ReadConsistency::ConsistentPrefix,
                    Consistency::Eventual => ReadConsistency::Eventual,
                };
                Ok(c.get(key, level).await?.is_some())
            }
            Target::Etcd(kv) => {
                let opts = (consistency != Consistency::Strong)
                    .then(|| etcd_client::GetOptions::new().with_serializable());
                let r = kv.get(key.to_vec(), opts).await?;
                Ok(!r.kvs().is_empty())
            }
        }
    }

    /// Writes a record.
    pub async fn write(&mut self, key: Bytes, value: Bytes) -> anyhow::Result<()> {
        match self {
            Target::Lmskv(c) => {
                c.put(key, value).await?;
            }
            Target::Etcd(kv) => {
                kv.put(key.to_vec(), value.to_vec(), None).await?;
            }
        }
        Ok(())
    }

    /// Reads up to `limit` records from `start` on, in key order, within
    /// `[start, end)`; returns how many it got.
    pub async fn scan(
        &mut self,
        start: Bytes,
        end: Bytes,
        limit: u32,
        consistency: Consistency,
    ) -> anyhow::Result<usize> {
        if limit == 0 {
            bail!("scan limit must be positive");
        }
        match self {
            Target::Lmskv(c) => {
                let level = match consistency {
                    Consistency::Strong => ReadConsistency::Strong,
                    Consistency::Bounded(d) => ReadConsistency::BoundedStaleness(d),
                    Consistency::Session => c.session_token().read_consistency(),
                    Consistency::Prefix => ReadConsistency::ConsistentPrefix,
                    Consistency::Eventual => ReadConsistency::Eventual,
                };
                let page = c
                    .scan(&ScanOptions {
                        start,
                        end,
                        limit,
                        consistency: level,
                        ..ScanOptions::default()
                    })
                    .await?;
                Ok(page.kvs.len())
            }
            Target::Etcd(kv) => {
                let mut opts = etcd_client::GetOptions::new()
                    .with_range(end.to_vec())
                    .with_limit(i64::from(limit));
                if consistency != Consistency::Strong {
                    opts = opts.with_serializable();
                }
                let r = kv.get(start.to_vec(), Some(opts)).await?;
                Ok(r.kvs().len())
            }
        }
    }
}
