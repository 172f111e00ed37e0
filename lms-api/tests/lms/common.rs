//! Test support: a real lmskv cluster (node processes) with the LMS API
//! served in-process on a loopback port, and a small HTTP client.

use std::time::Duration;

use lms_api::accounts;
use lms_api::model::Role;
use lms_api::{AppState, Config};
use lmskv_tests::{ClusterOptions, TestCluster};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const PASSWORD: &str = "correct horse battery";

/// A running API on a running cluster.
pub struct Api {
    pub cluster: TestCluster,
    pub st: AppState,
    pub base: String,
    pub http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

/// A response: status, headers and JSON body (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Asserts the status, printing the body when it differs.
    #[track_caller]
    pub fn expect(self, status: u16) -> Resp {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts an RFC 9457 problem with this status.
    #[track_caller]
    pub fn problem(self, status: u16) -> Resp {
        let r = self.expect(status);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/problem+json"),
            "problem+json expected: {}",
            r.text
        );
        assert_eq!(r.body["status"], status);
        assert!(r.body["title"].is_string() && r.body["type"].is_string());
        r
    }
}

/// Settings a test may change.
pub fn config(endpoints: Vec<String>) -> Config {
    let mut c = Config::new(endpoints, SECRET);
    c.repair_interval = None;
    c.retention.interval = None;
    c.rate_limit_ip_per_s = 100_000;
    c.rate_limit_ip_burst = 100_000;
    c.rate_limit_user_per_s = 100_000;
    c.rate_limit_user_burst = 100_000;
    c.login_attempts_per_min = 100_000;
    c.login_attempts_burst = 100_000;
    c.lmskv_deadline = Duration::from_secs(20);
    c.request_timeout = Duration::from_secs(30);
    c
}

/// The node settings of every LMS test cluster: the LMS's own
/// ([`lms_api::keys::node_config_toml`]: one range per table, automatic
/// splits that keep each course's keys together), with quick placement
/// rounds so the pre-splits are done in a second or two, plus `extra` lines.
pub fn cluster_options(extra: &str) -> ClusterOptions {
    ClusterOptions {
        config: format!(
            "{}placement_interval_ms = 100\n{extra}",
            lms_api::keys::node_config_toml()
        ),
        ..ClusterOptions::default()
    }
}

/// The start keys of the cluster's ranges, as the meta range lists them
/// (`None` when it cannot be asked right now).
pub async fn range_starts(client: &lmskv_client::Client) -> Option<Vec<Vec<u8>>> {
    Some(
        client
            .range_list()
            .await
            .ok()?
            .into_iter()
            .filter_map(|r| r.descriptor.map(|d| d.start_key.to_vec()))
            .collect(),
    )
}

/// Starts a 3-node cluster with [`cluster_options`] and waits until every
/// LMS table has its own range: every test runs on a multi-range cluster.
pub async fn cluster_with(extra: &str) -> TestCluster {
    let cluster = TestCluster::start(cluster_options(extra))
        .await
        .expect("cluster");
    let client = cluster.client();
    lmskv_tests::wait_for("a range per LMS table", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let starts = range_starts(&client).await?;
            lms_api::keys::TABLES
                .iter()
                .all(|t| starts.iter().any(|s| s == t))
                .then_some(())
        }
    })
    .await
    .expect("pre-split cluster");
    cluster
}

/// [`cluster_with`] and no extra settings.
pub async fn cluster() -> TestCluster {
    cluster_with("").await
}

impl Api {
    /// Starts a 3-node cluster (a range per table) and the API on it.
    pub async fn start() -> Api {
        let cluster = cluster().await;
        let cfg = config(cluster.endpoints());
        Api::on(cluster, cfg).await
    }

    /// Starts the API with `cfg` on `cluster`.
    pub async fn on(cluster: TestCluster, cfg: Config) -> Api {
        let (st, base, server) = serve(cfg).await;
        Api {
            cluster,
            st,
            base,
            http: reqwest::Client::new(),
            server,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        self.call_with(method, path, token, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        };
        let mut req = self.http.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("http request");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Registers an account and logs in; returns (user id, access token).
    pub async fn register_login(&self, email: &str, name: &str) -> (u64, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/register",
                None,
                Some(serde_json::json!({"email": email, "password": PASSWORD, "name": name})),
            )
            .await
            .expect(201);
        let id = r.body["id"].as_u64().expect("id");
        (id, self.login(email).await)
    }

    pub async fn login(&self, email: &str) -> String {
        let r = self
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(serde_json::json!({"email": email, "password": PASSWORD})),
            )
            .await
            .expect(200);
        r.body["access_token"].as_str().expect("token").to_string()
    }

    /// Creates an account with `role` directly (the first admin has no one
    /// to promote it) and returns (id, access token).
    pub async fn user_with_role(&self, email: &str, name: &str, role: Role) -> (u64, String) {
        let u = accounts::create_user(&self.st, email, PASSWORD.into(), name, role)
            .await
            .expect("create user");
        (u.id, self.st.tokens.issue(u.id, 0).expect("token"))
    }

    /// Creates a published course as `teacher` and returns its id.
    pub async fn course(&self, teacher: &str, title: &str, capacity: u32) -> u64 {
        self.post(
            "/api/v1/courses",
            teacher,
            serde_json::json!({"title": title, "capacity": capacity, "published": true}),
        )
        .await
        .expect(201)
        .body["id"]
            .as_u64()
            .expect("course id")
    }

    /// Creates an assignment (`body`: its fields) in course `cid` as
    /// `teacher` and returns its id.
    pub async fn assignment(&self, teacher: &str, cid: u64, body: serde_json::Value) -> u64 {
        self.post(&format!("/api/v1/courses/{cid}/assignments"), teacher, body)
            .await
            .expect(201)
            .body["id"]
            .as_u64()
            .expect("assignment id")
    }

    /// Every user key and value in lmskv, to check that a request wrote nothing.
    pub async fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        let opts = lmskv_client::ScanOptions {
            start: bytes::Bytes::from_static(b"\x01"),
            end: bytes::Bytes::new(),
            limit: 1000,
            consistency: lmskv_client::ReadConsistency::Strong,
            ..Default::default()
        };
        self.st
            .db
            .client()
            .scan_all(&opts, 1_000_000)
            .await
            .expect("scan")
            .into_iter()
            .map(|kv| (kv.key.to_vec(), kv.value.to_vec(), kv.version))
            .collect()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Serves the API for `cfg` on a free loopback port.
pub async fn serve(cfg: Config) -> (AppState, String, tokio::task::JoinHandle<()>) {
    let st = AppState::new(cfg).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    lms_api::spawn_background(&st);
    let s2 = st.clone();
    let server = tokio::spawn(async move {
        let _ = lms_api::serve(s2, listener, std::future::pending()).await;
    });
    (st, base, server)
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(r: &Resp) -> Option<String> {
    let link = r.header("link")?;
    link.split(',').find_map(|part| {
        let part = part.trim();
        if part.ends_with("rel=\"next\"") {
            let start = part.find('<')? + 1;
            let end = part.find('>')?;
            Some(part[start..end].to_string())
        } else {
            None
        }
    })
}
