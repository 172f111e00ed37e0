//! A TCP proxy in front of one node, for faults that need the network: the
//! node advertises the proxy's address, so clients and peers reach it only
//! through here.
//!
//! Faults:
//! - [`Proxy::lose_reply_to`]: the next connection whose inbound bytes carry
//!   a marker (a key, which gRPC sends in plain bytes) gets no reply: the
//!   node's answer is read and thrown away, then the connection is cut. The
//!   request itself reached the node, so it is applied; the sender sees a
//!   broken connection and cannot know.
//! - [`Proxy::cut`]: refuses new connections and breaks the open ones (the
//!   node is unreachable from everyone, while it can still reach others).
//! - [`Proxy::block`]: the same for connections from one source address.
//!   Test nodes connect to each other from their own loopback address
//!   (`--source-ip`), so blocking a peer's address in this node's proxy and
//!   this node's address in the peer's proxy partitions the two both ways,
//!   while clients (from 127.0.0.1) still reach both. Blocking it in one
//!   proxy only cuts one direction: the peer cannot open connections to
//!   this node, while this node's connections to the peer go through.
//! - [`Proxy::lose`]: the proxy's stand-in for random packet loss on the
//!   connections from one source address. It cannot drop bytes from a TCP
//!   stream, so it does what TCP makes of a lost segment: each chunk it
//!   forwards on such a connection, either way, is held for
//!   [`LOSS_STALL`] (a retransmission timeout) with the given probability.
//!
//! Where the harness can use Linux network namespaces it partitions nodes at
//! the IP level instead (see [`crate::netns`]); the proxy is the fallback.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a connection whose reply is lost keeps reading (and dropping)
/// the node's answer before it is cut: long enough for a write to commit.
const LOST_REPLY_HOLD: Duration = Duration::from_millis(1500);
/// How long a "lost" chunk is held on a lossy connection: Linux's shortest
/// TCP retransmission timeout.
pub const LOSS_STALL: Duration = Duration::from_millis(200);
/// Bytes a marker may straddle between two reads.
const MARKER_BYTES_MAX: usize = 4096;

#[derive(Debug, Default)]
struct State {
    /// The marker of a reply still to lose, and how long its connection
    /// is held before it is cut.
    lose_marker: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Replies lost so far.
    lost: AtomicU64,
    /// Connections refused and broken while set.
    cut: AtomicBool,
    /// Source addresses whose connections are refused and broken.
    blocked: Mutex<HashSet<IpAddr>>,
    /// Source addresses whose connections lose this percentage of chunks.
    lossy: Mutex<HashMap<IpAddr, u8>>,
}

impl State {
    fn refuses(&self, from: IpAddr) -> bool {
        self.cut.load(Ordering::SeqCst)
            || self.blocked.lock().expect("blocked lock").contains(&from)
    }

    /// Whether the next chunk on a connection from `from` is "lost".
    fn loses(&self, from: IpAddr) -> bool {
        let percent = self
            .lossy
            .lock()
            .expect("lossy lock")
            .get(&from)
            .copied()
            .unwrap_or(0);
        percent > 0 && rand::random::<u8>() % 100 < percent
    }
}

/// A proxy listening on a loopback port and forwarding to one node.
#[derive(Debug)]
pub struct Proxy {
    addr: String,
    state: Arc<State>,
    /// Bumped on a cut, so open connections end.
    cut_tx: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_tx.send_modify(|n| *n += 1);
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port that forwards to `target`.
    pub async fn start(target: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State::default());
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, from)) = listener.accept().await else {
                    continue;
                };
                if st.refuses(from.ip()) {
                    drop(inbound);
                    continue;
                }
                let (st, target, cut_rx) = (st.clone(), target.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        serve(inbound, from.ip(), outbound, st, cut_rx).await;
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            state,
            cut_tx,
            task,
        })
    }

    /// The address clients and peers use for the node.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Loses the reply on the next connection that sends `marker` to the node.
    pub fn lose_reply_to(&self, marker: &[u8]) {
        self.lose_reply_to_holding(marker, LOST_REPLY_HOLD);
    }

    /// [`Proxy::lose_reply_to`], holding the connection (reading and
    /// dropping everything the node sends on it) for `hold` before it is
    /// cut: its sender hears nothing on it for that long.
    pub fn lose_reply_to_holding(&self, marker: &[u8], hold: Duration) {
        assert!(!marker.is_empty() && marker.len() <= MARKER_BYTES_MAX);
        *self.state.lose_marker.lock().expect("marker lock") = Some((marker.to_vec(), hold));
    }

    /// Replies lost so far.
    pub fn lost_replies(&self) -> u64 {
        self.state.lost.load(Ordering::SeqCst)
    }

    /// Cuts the node off (`true`) or reconnects it (`false`).
    pub fn cut(&self, cut: bool) {
        self.state.cut.store(cut, Ordering::SeqCst);
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Refuses (and breaks) connections from `from`.
    pub fn block(&self, from: IpAddr) {
        self.state
            .blocked
            .lock()
            .expect("blocked lock")
            .insert(from);
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Loses `percent` of the chunks on connections from `from` (see
    /// [`LOSS_STALL`]); 0 ends it.
    pub fn lose(&self, from: IpAddr, percent: u8) {
        let mut lossy = self.state.lossy.lock().expect("lossy lock");
        if percent == 0 {
            lossy.remove(&from);
        } else {
            lossy.insert(from, percent.min(100));
        }
    }

    /// Accepts connections from every address again, with no loss (and ends a cut).
    pub fn heal(&self) {
        self.state.blocked.lock().expect("blocked lock").clear();
        self.state.lossy.lock().expect("lossy lock").clear();
        self.cut(false);
    }
}

async fn serve(
    inbound: TcpStream,
    from: IpAddr,
    outbound: TcpStream,
    st: Arc<State>,
    mut cut: watch::Receiver<u64>,
) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    cut.borrow_and_update();
    let (mut in_r, mut in_w) = inbound.into_split();
    let (mut out_r, mut out_w) = outbound.into_split();
    // Set once this connection carried the marker: its replies are dropped
    // for the hold (in ms) stored here, then it is cut.
    let losing = Arc::new(AtomicU64::new(0));
    let to_node = {
        let (st, losing) = (st.clone(), losing.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            // The tail of the previous read, so a marker split across reads is seen.
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let n = match in_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                {
                    let mut m = st.lose_marker.lock().expect("marker lock");
                    if let Some((marker, hold)) = m.as_ref() {
                        tail.extend_from_slice(&buf[..n]);
                        if tail.windows(marker.len()).any(|w| w == marker.as_slice()) {
                            losing.store(hold.as_millis().max(1) as u64, Ordering::SeqCst);
                            *m = None;
                        }
                        let keep = tail.len().min(MARKER_BYTES_MAX);
                        tail.drain(..tail.len() - keep);
                    }
                }
                if st.loses(from) {
                    tokio::time::sleep(LOSS_STALL).await;
                }
                if out_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = {
        let (st, losing) = (st.clone(), losing.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match out_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let hold_ms = losing.load(Ordering::SeqCst);
                if hold_ms > 0 {
                    // Read the node's answer for a while, forward none of it,
                    // then cut the connection.
                    // Counted now: the sender may give up on the connection
                    // (and end it) before the hold does.
                    st.lost.fetch_add(1, Ordering::SeqCst);
                    let until = tokio::time::Instant::now() + Duration::from_millis(hold_ms);
                    while let Ok(Ok(n)) = tokio::time::timeout_at(until, out_r.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                    }
                    return;
                }
                if st.loses(from) {
                    tokio::time::sleep(LOSS_STALL).await;
                }
                if in_w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::pin!(to_node, to_client);
    loop {
        tokio::select! {
            _ = &mut to_node => return,
            _ = &mut to_client => return,
            changed = cut.changed() => {
                if changed.is_err() || st.refuses(from) {
                    return;
                }
            }
        }
    }
}
