//! Network namespaces for chaos runs ([`lmskv_tests::netns::Fabric`]) and
//! the partition shapes ([`Partition`]) carried out in them and behind the
//! TCP proxies:
//! - every shape blocks exactly the links it names (TCP connects between
//!   every pair of nodes, and between the hub and every node);
//! - real nodes run in their own namespaces, and a partition there makes
//!   the cluster elect a leader on the majority side;
//! - dropping a fabric leaves no namespace (nor interface) behind, and one
//!   left by a dead process is removed by the next fabric; `lmskv-chaos`
//!   stopped with SIGINT stops its nodes and deletes its namespaces;
//! - behind proxies, every shape refuses exactly the connections it names.
//!
//! The namespace tests need root; elsewhere they say so and check nothing
//! (the proxy test runs everywhere).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use lmskv_tests::cluster::source_ip;
use lmskv_tests::netns::{self, Fabric, NODE_PORT};
use lmskv_tests::partition::{CutRoute, Fault, Partition};
use lmskv_tests::proxy::Proxy;
use lmskv_tests::{phase, ClusterOptions, TestCluster};

/// How long a connect may take before it counts as blocked (a cut seen
/// from the far side is silent: the handshake's answer never comes).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Port the hub listens on in the shape test.
const HUB_PORT: u16 = 7001;

fn namespaces_or_skip(test: &str) -> bool {
    match netns::available() {
        Ok(()) => true,
        Err(why) => {
            phase!("{test}: network namespaces unavailable ({why}); nothing checked");
            false
        }
    }
}

/// Listens on `addr` inside namespace `ns` and accepts (and closes)
/// connections until the process ends.
fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    let listener = Fabric::run_in(ns, move || TcpListener::bind(addr))
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
    let l = listener.try_clone().expect("clone listener");
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    listener
}

/// Whether a TCP connect from namespace `ns` to `to` succeeds.
fn connects(ns: &str, to: SocketAddr) -> bool {
    Fabric::run_in(ns, move || {
        TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).is_ok()
    })
    .expect("enter namespace")
}

/// Connects between every pair of nodes and between the hub and every node
/// at once; returns the `(from, to)` node pairs that connected (0 = hub).
fn reachable(f: &Fabric) -> Vec<(u64, u64)> {
    let n = f.nodes() as u64;
    let ns = |id: u64| {
        if id == 0 {
            f.hub_namespace()
        } else {
            f.node_namespace(id)
        }
    };
    let addr = |id: u64| -> SocketAddr {
        if id == 0 {
            (f.hub_ip(), HUB_PORT).into()
        } else {
            (f.node_ip(id), NODE_PORT).into()
        }
    };
    let pairs: Vec<(u64, u64)> = (0..=n)
        .flat_map(|a| (0..=n).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    std::thread::scope(|s| {
        let checks: Vec<_> = pairs
            .iter()
            .map(|&(a, b)| {
                let (from, to) = (ns(a), addr(b));
                (a, b, s.spawn(move || connects(&from, to)))
            })
            .collect();
        checks
            .into_iter()
            .filter_map(|(a, b, h)| h.join().expect("connect thread").then_some((a, b)))
            .collect()
    })
}

#[test]
fn each_partition_shape_blocks_exactly_its_links_in_namespaces() {
    if !namespaces_or_skip("partition shapes in namespaces") {
        return;
    }
    const NODES: u64 = 5;
    let f = Fabric::create(NODES as usize).expect("create the fabric");
    phase!("fabric {}: listeners in the hub and every node", f.prefix());
    let _hub = listen_in(&f.hub_namespace(), (f.hub_ip(), HUB_PORT).into());
    let _nodes: Vec<TcpListener> = (1..=NODES)
        .map(|id| listen_in(&f.node_namespace(id), (f.node_ip(id), NODE_PORT).into()))
        .collect();
    let all = |f: &Fabric| {
        let mut v = reachable(f);
        v.sort_unstable();
        v
    };
    let everything = all(&f);
    assert_eq!(
        everything.len() as u64,
        (NODES + 1) * NODES,
        "before any fault every pair connects: {everything:?}"
    );

    let others = |x: u64| (1..=NODES).filter(|n| *n != x).collect::<Vec<_>>();
    let mut shapes = vec![
        Partition::Isolate {
            node: 3,
            others: others(3),
            route: CutRoute::Prohibit,
        },
        Partition::Halves {
            minority: vec![1, 2],
            majority: vec![3, 4, 5],
            route: CutRoute::Unreachable,
        },
        Partition::Ring {
            order: vec![2, 5, 1, 4, 3],
            route: CutRoute::Blackhole,
        },
        Partition::Asymmetric {
            from: vec![4],
            to: others(4),
            route: CutRoute::Prohibit,
        },
        Partition::Asymmetric {
            from: vec![1, 3, 4],
            to: vec![2, 5],
            route: CutRoute::Blackhole,
        },
    ];
    if netns::nft_available() {
        // All packets lost, so that the check is certain; a lower share
        // takes the same rule with another number.
        shapes.push(Partition::Loss {
            nodes: vec![5],
            others: others(5),
            percent: 100,
        });
    } else {
        phase!("nft is not installed: the loss shape is not checked");
    }
    for shape in &shapes {
        phase!("apply {shape}");
        f.apply(&shape.faults()).expect("apply the shape");
        let got = all(&f);
        // TCP needs both directions: a pair connects iff neither direction
        // is faulted; the hub (0) always reaches every node and back.
        let want: Vec<(u64, u64)> = everything
            .iter()
            .copied()
            .filter(|&(a, b)| {
                a == 0 || b == 0 || (shape.fault(a, b).is_none() && shape.fault(b, a).is_none())
            })
            .collect();
        assert_eq!(got, want, "{shape}: connected pairs");
        if let Partition::Loss { .. } = shape {
            assert!(shape.faults().iter().all(|l| l.fault == Fault::Loss(100)));
        }
        f.heal().expect("heal");
        assert_eq!(all(&f), everything, "{shape}: healed, every pair connects");
    }
    let prefix = f.prefix().to_string();
    drop(f);
    assert!(
        !netns::namespaces().iter().any(|n| n.starts_with(&prefix)),
        "no namespace of {prefix} is left"
    );
}

/// Interfaces in this process's (root) namespace.
fn root_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect()
}

#[test]
fn fabrics_leave_nothing_behind_and_stale_namespaces_are_removed() {
    if !namespaces_or_skip("fabric cleanup") {
        return;
    }
    let links_before = root_links();
    // A namespace as a run killed with SIGKILL leaves it: its process is gone.
    let mut dead = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let stale = format!("{}{dead_pid}-0-hub", netns::NAMESPACE_PREFIX);
    let st = std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(st.success());

    let f = Fabric::create(3).expect("create the fabric");
    let prefix = f.prefix().to_string();
    let names = netns::namespaces();
    assert!(!names.contains(&stale), "the stale {stale} was removed");
    for want in [
        f.hub_namespace(),
        f.node_namespace(1),
        f.node_namespace(2),
        f.node_namespace(3),
    ] {
        assert!(names.contains(&want), "{want} exists: {names:?}");
    }
    assert_eq!(
        root_links(),
        links_before,
        "the root namespace got no interface"
    );
    // Faults in place when it is dropped go with it.
    f.apply(
        &Partition::Isolate {
            node: 1,
            others: vec![2, 3],
            route: CutRoute::Prohibit,
        }
        .faults(),
    )
    .expect("apply");
    drop(f);
    let left: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert_eq!(root_links(), links_before, "no interface left behind");

    // A failed creation cleans up too: no fabric holds 0 nodes.
    assert!(Fabric::create(0).is_err());
}

#[test]
fn nodes_run_in_their_namespaces_and_a_cut_leader_is_replaced() {
    if !namespaces_or_skip("nodes in namespaces") {
        return;
    }
    let fabric = Arc::new(Fabric::create(3).expect("create the fabric"));
    let prefix = fabric.prefix().to_string();
    let f = fabric.clone();
    fabric
        .block_on(async move {
            phase!("start 3 nodes, each in its namespace");
            let c = TestCluster::start(ClusterOptions {
                nodes: 3,
                netns: Some(f.clone()),
                ..ClusterOptions::default()
            })
            .await
            .expect("start the cluster");
            assert_eq!(c.network(), "netns");
            for id in 1..=3u64 {
                assert_eq!(c.addr(id), format!("10.77.0.{id}:{NODE_PORT}"));
                // The node process itself (not a wrapper) is in the namespace.
                let pid = c.pid(id).expect("node runs");
                let node_ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("ns");
                let want = std::fs::metadata(format!("/var/run/netns/{}", f.node_namespace(id)))
                    .expect("ns file");
                use std::os::unix::fs::MetadataExt;
                assert_eq!(node_ns.ino(), want.ino(), "node {id} runs in its namespace");
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
                assert!(
                    exe.ends_with("lmskv-node"),
                    "pid {pid} is the node: {exe:?}"
                );
            }
            let leader = c
                .wait_leader(Duration::from_secs(30))
                .await
                .expect("a leader");
            phase!("isolate the leader, node {leader}, at the IP level");
            let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
            c.disrupt(
                &Partition::Isolate {
                    node: leader,
                    others: others.clone(),
                    route: CutRoute::Unreachable,
                }
                .faults(),
            )
            .expect("disrupt");
            // The client (in the hub) still reaches every node; the two
            // others elect one of them.
            let new_leader =
                lmskv_tests::wait_for("a leader among the others", Duration::from_secs(30), || {
                    let c = &c;
                    let others = others.clone();
                    async move {
                        for id in others {
                            if let Ok(s) = c.status(id).await {
                                if lmskv_tests::cluster::user_range(&s)
                                    .is_some_and(|r| r.local_role == "leader")
                                {
                                    return Some(id);
                                }
                            }
                        }
                        None
                    }
                })
                .await
                .expect("the majority elects a leader");
            phase!("node {new_leader} leads; heal");
            c.try_heal_network().expect("heal");
            let client = c.client();
            client
                .put("netns/k", "v")
                .await
                .expect("a write after the heal");
        })
        .expect("run in the hub");
    drop(fabric);
    assert!(
        !netns::namespaces().iter().any(|n| n.starts_with(&prefix)),
        "no namespace of {prefix} is left"
    );
}

/// Whether a connection from `from` through the proxy at `proxy` reaches
/// the listener behind it (which greets every connection with one byte).
async fn through_proxy(from: IpAddr, proxy: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind((from, 0).into()).expect("bind the source address");
    let connect = s.connect(proxy.parse().expect("proxy address"));
    let Ok(Ok(mut c)) = tokio::time::timeout(CONNECT_TIMEOUT, connect).await else {
        return false;
    };
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, c.read(&mut b)).await,
        Ok(Ok(1))
    )
}

/// The `(from, to)` pairs of nodes whose connections through `proxies`
/// do not do what `shape` says (all connect without one), with what they
/// did; `from` 0 is a client.
async fn wrong_connections(proxies: &[Proxy], shape: Option<&Partition>) -> Vec<(u64, u64, bool)> {
    let n = proxies.len() as u64;
    let mut bad = Vec::new();
    for a in 1..=n {
        for b in (1..=n).filter(|b| *b != a) {
            let got = through_proxy(source_ip(a), proxies[(b - 1) as usize].addr()).await;
            // Behind proxies a fault `a -> b` refuses the connections `a`
            // opens to `b`; the other direction is a fault of its own.
            let want = shape.is_none_or(|s| !matches!(s.fault(a, b), Some(Fault::Cut(_))));
            if got != want {
                bad.push((a, b, got));
            }
        }
        // A client (from 127.0.0.1) reaches every node.
        let addr = proxies[(a - 1) as usize].addr();
        if !through_proxy(IpAddr::V4(Ipv4Addr::LOCALHOST), addr).await {
            bad.push((0, a, false));
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_shape_refuses_exactly_its_connections_behind_proxies() {
    const NODES: u64 = 5;
    // A greeting listener per node, and a proxy in front of each.
    let mut proxies = Vec::new();
    for _ in 1..=NODES {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.write_all(b"!");
                    let mut sink = [0u8; 16];
                    let _ = c.read(&mut sink);
                });
            }
        });
        proxies.push(Proxy::start(target).await.expect("proxy"));
    }
    let others = |x: u64| (1..=NODES).filter(|n| *n != x).collect::<Vec<_>>();
    let shapes = [
        Partition::Isolate {
            node: 2,
            others: others(2),
            route: CutRoute::Prohibit,
        },
        Partition::Halves {
            minority: vec![4, 5],
            majority: vec![1, 2, 3],
            route: CutRoute::Prohibit,
        },
        Partition::Ring {
            order: vec![1, 3, 5, 2, 4],
            route: CutRoute::Prohibit,
        },
        Partition::Asymmetric {
            from: vec![3],
            to: others(3),
            route: CutRoute::Prohibit,
        },
    ];
    let bad = wrong_connections(&proxies, None).await;
    assert!(bad.is_empty(), "before any fault: {bad:?}");
    for shape in &shapes {
        phase!("proxies: apply {shape}");
        // What TestCluster::disrupt does for a cut behind proxies.
        for lf in shape.faults() {
            if let Fault::Cut(_) = lf.fault {
                proxies[(lf.to - 1) as usize].block(source_ip(lf.from));
            }
        }
        let bad = wrong_connections(&proxies, Some(shape)).await;
        assert!(
            bad.is_empty(),
            "{shape}: wrong (from, to, connected): {bad:?}"
        );
        for p in &proxies {
            p.heal();
        }
        let bad = wrong_connections(&proxies, None).await;
        assert!(bad.is_empty(), "{shape} healed: {bad:?}");
    }
    // Loss stalls chunks but loses no byte: with every chunk "lost", the
    // greeting still arrives, one stall late.
    proxies[0].lose(source_ip(2), 100);
    let at = std::time::Instant::now();
    assert!(through_proxy(source_ip(2), proxies[0].addr()).await);
    assert!(
        at.elapsed() >= lmskv_tests::proxy::LOSS_STALL,
        "the chunk was held"
    );
}

/// Pids of the processes whose network namespace is the one named `ns`.
fn processes_in(ns: &str) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(format!("/var/run/netns/{ns}")) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.ino() == want.ino() && m.dev() == want.dev() {
                pids.push(pid);
            }
        }
    }
    pids
}

#[test]
fn an_interrupted_chaos_run_stops_its_nodes_and_deletes_its_namespaces() {
    if !namespaces_or_skip("interrupted chaos run") {
        return;
    }
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lmskv-chaos"))
        .args([
            "--nodes",
            "3",
            "--duration",
            "60s",
            "--nemesis",
            "kill,pause",
        ])
        .args(["--network", "netns", "--seed", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lmskv-chaos");
    let pid = child.id();
    let prefix = format!("{}{pid}-", netns::NAMESPACE_PREFIX);
    // Wait (bounded) until its workloads run, i.e. its nodes are up.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let started = line.contains("start workloads and nemesis");
            eprintln!("  | {line}");
            if started {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the chaos run started its workloads");
    let node_namespaces: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix) && !n.ends_with("-hub"))
        .collect();
    assert_eq!(
        node_namespaces.len(),
        3,
        "a namespace per node: {node_namespaces:?}"
    );
    let nodes: Vec<u32> = node_namespaces
        .iter()
        .flat_map(|n| processes_in(n))
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "a node process in each namespace: {nodes:?}"
    );

    phase!("SIGINT to lmskv-chaos (pid {pid})");
    let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(p, rustix::process::Signal::INT).expect("SIGINT");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("lmskv-chaos did not exit within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "an interrupted run fails: {status}");
    let left: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for node in nodes {
        assert!(
            !std::path::Path::new(&format!("/proc/{node}")).exists(),
            "node process {node} is gone"
        );
    }
}
