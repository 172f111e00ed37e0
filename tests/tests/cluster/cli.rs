//! The `lmskv` operator CLI against a real cluster: the JSON shapes scripts
//! rely on, exit codes, and escaping of binary keys.

use std::process::Output;
use std::time::Duration;

use lmskv_tests::cluster::binary;
use lmskv_tests::{phase, ClusterOptions, TestCluster};
use serde_json::Value;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn lmskv(c: &TestCluster, args: &[&str]) -> Output {
    std::process::Command::new(binary("lmskv"))
        .arg("--endpoints")
        .arg(c.endpoints().join(","))
        .arg("-o")
        .arg("json")
        .args(args)
        .output()
        .expect("run lmskv")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "lmskv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_json_shapes_and_exit_codes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = TestCluster::start(ClusterOptions::default()).await.unwrap();
        let leader = c.wait_leader(Duration::from_secs(10)).await.unwrap();

        phase!("status");
        let st = json(&lmskv(&c, &["status"]));
        let nodes = st["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3);
        for n in nodes {
            assert_eq!(n["state"], "up");
            assert!(n["address"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
        let r = &st["ranges"][0];
        assert_eq!(r["range_id"], 1);
        assert_eq!(r["leader"], leader);
        assert_eq!(r["replicas"], serde_json::json!([1, 2, 3]));
        assert!(r["term"].as_u64().unwrap() >= 1);
        assert!(r["commit_index"].as_u64().unwrap() >= 1);
        assert!(r["applied_index"].is_u64());

        phase!("kv put / get / scan / del");
        let put = json(&lmskv(&c, &["kv", "put", "k1", "v1"]));
        let version = put["version"].as_u64().unwrap();
        assert_eq!(put["key"], "k1");
        let got = json(&lmskv(&c, &["kv", "get", "k1"]));
        assert_eq!(
            got,
            serde_json::json!({"key": "k1", "value": "v1", "version": version})
        );
        json(&lmskv(
            &c,
            &["kv", "put", "k2", "v2", "--durability", "all"],
        ));
        json(&lmskv(&c, &["kv", "put", "bin\\x01\\xff", "x"]));
        let scan = json(&lmskv(&c, &["kv", "scan", "--prefix", "k"]));
        let keys: Vec<&str> = scan
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| kv["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        let all = json(&lmskv(&c, &["kv", "scan"]));
        assert_eq!(
            all[0]["key"], "bin\\x01\\xff",
            "non-printable bytes are escaped"
        );

        phase!("every read consistency level, the session token a put prints");
        let put = json(&lmskv(&c, &["kv", "put", "k3", "v3"]));
        let token = put["session_token"].as_str().unwrap().to_string();
        let (range, index) = token.split_once(':').expect("RANGE:INDEX");
        assert!(range.parse::<u64>().unwrap() >= 1);
        assert!(index.parse::<u64>().unwrap() >= put["version"].as_u64().unwrap());
        let session = format!("session:{token}");
        for level in [
            "strong",
            "bounded:500ms",
            session.as_str(),
            "prefix",
            "eventual",
        ] {
            let got = json(&lmskv(&c, &["kv", "get", "k3", "--consistency", level]));
            assert_eq!(got["value"], "v3", "{level}");
            let scan = json(&lmskv(
                &c,
                &["kv", "scan", "--prefix", "k3", "--consistency", level],
            ));
            assert_eq!(scan[0]["value"], "v3", "{level}");
        }
        for bad in ["session:42", "session:x", "bounded:5", "linear"] {
            let out = lmskv(&c, &["kv", "get", "k3", "--consistency", bad]);
            assert_eq!(out.status.code(), Some(2), "{bad}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("--consistency"), "{bad}: {err}");
        }
        json(&lmskv(&c, &["kv", "del", "k3"]));

        let del = json(&lmskv(&c, &["kv", "del", "k1"]));
        assert_eq!(del["deleted"], true);

        phase!("a missing key exits 1 with `not found`");
        let out = lmskv(&c, &["kv", "get", "k1"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

        phase!("bad input is a one-line error and writes nothing");
        let out = lmskv(&c, &["kv", "put", "\\x00sys", "v"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        let all = json(&lmskv(&c, &["kv", "scan"]));
        assert_eq!(all.as_array().unwrap().len(), 2);
    })
    .await
    .expect("test timed out");
}
