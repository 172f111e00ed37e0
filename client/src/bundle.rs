//! Bundling: concurrent requests to one node share one `Kv.Bundle` call.
//!
//! Every unary gRPC call costs an HTTP/2 stream, a header block each way and
//! a task on both sides, whatever it carries; under load that is a large
//! share of what a small put or get costs a node and the client. So each
//! node has two lanes (writes, reads), each with at most
//! [`BUNDLE_CALLS_PER_LANE_MAX`] calls in flight. A request that finds the
//! lane idle (no call in flight, nobody waiting) goes at once, alone, as a
//! plain unary call: a lone caller pays nothing extra. Requests that arrive
//! while every slot is taken wait in the lane's bounded queue; when a call
//! finishes, the requests waiting then go out together as one `Bundle` (at
//! most [`BUNDLE_REQUESTS_CLIENT_MAX`] requests and [`BUNDLE_BYTES_MAX`]
//! bytes), sent by a task of the lane. A request that finds a free slot
//! while another call is in flight takes the slot but queues too, and its
//! bundle leaves once the lane's task has yielded to the callers woken with
//! it (those a finished bundle just answered), so that they go along instead
//! of waiting a round behind a call that carries one request. Each caller
//! gets exactly what its request
//! alone would have got: the node serves every request of a bundle on its
//! own and streams each answer back as soon as it is ready, so a slow one
//! (a range without a leader) holds up nobody else. Writes and reads keep
//! separate lanes so that a read never waits behind a round of writes.
//!
//! What is not bundled goes alone: requests asking a replica to hold the
//! call for a new leader (`suspect_leader`), writes that wait for every
//! voter, large values, and every other kind of request.
//!
//! A caller that gives up (its try timed out) before its request left is
//! skipped; once sent, giving up is the same as giving up on a unary call
//! (the outcome of a write is unknown and the caller retries it with the
//! same request id). A bundle call whose slot is held longer than
//! [`BUNDLE_SLOT_HOLD_MAX`] gives its slot to the next bundle and goes on
//! reading its answers, so a node that answers slowly does not stall the
//! lane.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmskv_proto::limits::BUNDLE_REQUESTS_MAX;
use lmskv_proto::v1::bundled_request::Request as In;
use lmskv_proto::v1::bundled_response::Response as Out;
use lmskv_proto::v1::kv_client::KvClient;
use lmskv_proto::v1::{self, BundleRequest, BundledRequest};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// Calls in flight at once per node and lane (unary or bundle).
pub const BUNDLE_CALLS_PER_LANE_MAX: usize = 4;
/// Requests waiting per node and lane; more are refused (`Overloaded`).
pub const BUNDLE_QUEUE_MAX: usize = 8_192;
/// Requests in one bundle at most (the node accepts up to
/// [`BUNDLE_REQUESTS_MAX`]).
pub const BUNDLE_REQUESTS_CLIENT_MAX: usize = 256;
/// Key and value bytes in one bundle at most.
pub const BUNDLE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Larger requests (key and value bytes) always go alone.
pub const BUNDLE_ITEM_BYTES_MAX: usize = 64 * 1024;
/// How long one call keeps its lane slot before the next may start.
pub const BUNDLE_SLOT_HOLD_MAX: Duration = Duration::from_millis(50);
/// Nodes with lanes at most; beyond, lanes of idle nodes are dropped.
pub const BUNDLE_NODES_MAX: usize = 256;

const _: () = assert!(BUNDLE_REQUESTS_CLIENT_MAX <= BUNDLE_REQUESTS_MAX);

/// The lanes of every node this client talks to.
#[derive(Debug, Default)]
pub(crate) struct Bundles {
    nodes: Mutex<HashMap<String, Arc<NodeLanes>>>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    alone: AtomicU64,
    bundles: AtomicU64,
    bundled: AtomicU64,
}

/// How a client's puts, deletes and gets went out since it was built
/// ([`crate::Client::bundle_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BundleStats {
    /// Requests sent alone, each as its own call.
    pub alone: u64,
    /// `Bundle` calls sent.
    pub bundles: u64,
    /// Requests those bundles carried.
    pub bundled: u64,
}

impl Bundles {
    pub(crate) fn stats(&self) -> BundleStats {
        BundleStats {
            alone: self.counters.alone.load(Ordering::Relaxed),
            bundles: self.counters.bundles.load(Ordering::Relaxed),
            bundled: self.counters.bundled.load(Ordering::Relaxed),
        }
    }
}

impl Bundles {
    /// The lanes to the node at `addr`, whose calls go through `kv`.
    pub(crate) fn lanes(&self, addr: &str, kv: &KvClient<Channel>) -> Arc<NodeLanes> {
        let mut nodes = self.nodes.lock().expect("bundle lanes lock");
        if let Some(l) = nodes.get(addr) {
            return l.clone();
        }
        if nodes.len() >= BUNDLE_NODES_MAX {
            // Only lanes nobody is using (no call, nothing queued) go.
            nodes.retain(|_, l| Arc::strong_count(l) > 1 || l.busy());
        }
        let l = Arc::new(NodeLanes {
            counters: self.counters.clone(),
            kv: kv.clone(),
            writes: Lane::default(),
            reads: Lane::default(),
        });
        nodes.insert(addr.to_string(), l.clone());
        l
    }
}

/// One node's write and read lanes.
#[derive(Debug)]
pub(crate) struct NodeLanes {
    counters: Arc<Counters>,
    kv: KvClient<Channel>,
    writes: Lane,
    reads: Lane,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

impl NodeLanes {
    fn lane(&self, kind: Kind) -> &Lane {
        match kind {
            Kind::Write => &self.writes,
            Kind::Read => &self.reads,
        }
    }

    fn busy(&self) -> bool {
        self.writes.busy() || self.reads.busy()
    }
}

#[derive(Debug, Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Debug, Default)]
struct LaneState {
    queue: VecDeque<Waiting>,
    queued_bytes: usize,
    calls: usize,
}

#[derive(Debug)]
struct Waiting {
    req: BundledRequest,
    bytes: usize,
    until: Instant,
    tx: oneshot::Sender<Result<Out, Status>>,
}

enum Admission {
    /// A slot was free and nobody waited: send alone, then release.
    Alone(BundledRequest),
    /// Queued; a bundle (maybe started by this caller) will answer.
    Queued(oneshot::Receiver<Result<Out, Status>>, bool),
}

impl Lane {
    fn busy(&self) -> bool {
        let st = self.state.lock().expect("lane lock");
        st.calls > 0 || !st.queue.is_empty()
    }

    fn admit(
        &self,
        req: BundledRequest,
        bytes: usize,
        until: Instant,
    ) -> Result<Admission, Status> {
        let mut st = self.state.lock().expect("lane lock");
        if st.calls == 0 && st.queue.is_empty() {
            st.calls += 1;
            return Ok(Admission::Alone(req));
        }
        if st.queue.len() >= BUNDLE_QUEUE_MAX {
            return Err(Status::resource_exhausted(format!(
                "{BUNDLE_QUEUE_MAX} requests already wait for this node"
            )));
        }
        let (tx, rx) = oneshot::channel();
        st.queue.push_back(Waiting {
            req,
            bytes,
            until,
            tx,
        });
        st.queued_bytes += bytes;
        // A slot is free: another call is in flight, or one just ended and
        // its successor has not started yet. Take it for a bundle that
        // leaves shortly (see `submit`).
        let start = st.calls < BUNDLE_CALLS_PER_LANE_MAX;
        if start {
            st.calls += 1;
        }
        Ok(Admission::Queued(rx, start))
    }

    /// Gives a slot back, or hands it to a bundle of the requests waiting
    /// (returned: the caller sends it).
    fn release(&self) -> Option<Vec<Waiting>> {
        let mut st = self.state.lock().expect("lane lock");
        let group = take_group(&mut st);
        if group.is_empty() {
            st.calls -= 1;
            None
        } else {
            Some(group)
        }
    }
}

/// The waiting requests the next bundle carries, in queue order, skipping
/// callers that gave up.
fn take_group(st: &mut LaneState) -> Vec<Waiting> {
    let mut group = Vec::new();
    let mut bytes = 0usize;
    while let Some(w) = st.queue.front() {
        if w.tx.is_closed() {
            let w = st.queue.pop_front().expect("front");
            st.queued_bytes -= w.bytes;
            continue;
        }
        if group.len() >= BUNDLE_REQUESTS_CLIENT_MAX
            || (!group.is_empty() && bytes + w.bytes > BUNDLE_BYTES_MAX)
        {
            break;
        }
        let w = st.queue.pop_front().expect("front");
        st.queued_bytes -= w.bytes;
        bytes += w.bytes;
        group.push(w);
    }
    group
}

/// Runs bundles on `kind`'s lane, starting with `group`, while requests
/// wait; gives the slot back when none do.
fn run_bundles(
    lanes: Arc<NodeLanes>,
    kind: Kind,
    mut group: Vec<Waiting>,
) -> futures::future::BoxFuture<'static, ()> {
    // Boxed: a bundle holding its slot too long starts the next one from
    // inside `send_bundle`.
    Box::pin(async move {
        loop {
            let released = send_bundle(&lanes, kind, group).await;
            if released {
                return;
            }
            match lanes.lane(kind).release() {
                Some(next) => group = next,
                None => return,
            }
        }
    })
}

/// Sends one bundle and answers its callers. Returns whether the slot was
/// already given on (the call held it past [`BUNDLE_SLOT_HOLD_MAX`]).
async fn send_bundle(lanes: &Arc<NodeLanes>, kind: Kind, group: Vec<Waiting>) -> bool {
    let until = group
        .iter()
        .map(|w| w.until)
        .max()
        .unwrap_or_else(Instant::now);
    let mut txs: Vec<Option<oneshot::Sender<Result<Out, Status>>>> =
        Vec::with_capacity(group.len());
    let mut requests = Vec::with_capacity(group.len());
    for w in group {
        requests.push(w.req);
        txs.push(Some(w.tx));
    }
    lanes.counters.bundles.fetch_add(1, Ordering::Relaxed);
    lanes
        .counters
        .bundled
        .fetch_add(requests.len() as u64, Ordering::Relaxed);
    let mut kv = lanes.kv.clone();
    let hold_until = Instant::now() + BUNDLE_SLOT_HOLD_MAX;
    let mut released = false;
    let call = async {
        let mut stream = kv.bundle(BundleRequest { requests }).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            for r in msg.responses {
                let Some(tx) = txs.get_mut(r.index as usize).and_then(Option::take) else {
                    continue;
                };
                let _ = tx.send(match r.response {
                    Some(Out::Error(s)) => Err(Status::with_details(
                        Code::from(s.code),
                        s.message,
                        s.details,
                    )),
                    Some(out) => Ok(out),
                    None => Err(Status::internal(
                        "the node answered a bundled request with nothing",
                    )),
                });
            }
        }
        Ok::<(), Status>(())
    };
    let outcome = {
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = tokio::time::timeout_at(until, &mut call) => {
                    break r.unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded("no answer to the bundle in time"))
                    });
                }
                _ = tokio::time::sleep_until(hold_until), if !released => {
                    released = true;
                    if let Some(next) = lanes.lane(kind).release() {
                        tokio::spawn(run_bundles(lanes.clone(), kind, next));
                    }
                }
            }
        }
    };
    let failure = match outcome {
        Ok(()) => Status::internal("the node ended a bundle without answering every request"),
        Err(s) => s,
    };
    for tx in txs.into_iter().flatten() {
        let _ = tx.send(Err(failure.clone()));
    }
    released
}

/// Gives the slot back when a lone call ends or is dropped, or hands it to
/// the bundle of the requests that waited meanwhile.
struct AloneSlot<'a> {
    lanes: &'a Arc<NodeLanes>,
    kind: Kind,
}

impl Drop for AloneSlot<'_> {
    fn drop(&mut self) {
        if let Some(group) = self.lanes.lane(self.kind).release() {
            spawn_or_fail(self.lanes.clone(), self.kind, group);
        }
    }
}

/// Sends the bundle of a slot taken by a queued request from a task that
/// first yields, so that the callers already woken (by the answers of a
/// bundle that just finished) queue their requests and go along.
fn gather_soon(lanes: Arc<NodeLanes>, kind: Kind) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move {
                tokio::task::yield_now().await;
                if let Some(group) = lanes.lane(kind).release() {
                    run_bundles(lanes, kind, group).await;
                }
            });
        }
        Err(_) => {
            if let Some(group) = lanes.lane(kind).release() {
                spawn_or_fail(lanes, kind, group);
            }
        }
    }
}

fn spawn_or_fail(lanes: Arc<NodeLanes>, kind: Kind, group: Vec<Waiting>) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(run_bundles(lanes, kind, group));
        }
        Err(_) => {
            for w in group {
                let _ =
                    w.tx.send(Err(Status::unavailable("the client is shutting down")));
            }
            let mut st = lanes.lane(kind).state.lock().expect("lane lock");
            st.calls -= 1;
        }
    }
}

/// A connection to one node for one try of a call: the node's `Kv` client
/// and, when bundling is on, its lanes. Put, delete and get go through the
/// lanes; everything else is a plain call on the `Kv` client it derefs to.
pub(crate) struct Conn {
    kv: KvClient<Channel>,
    lanes: Option<Arc<NodeLanes>>,
    until: Instant,
}

impl std::ops::Deref for Conn {
    type Target = KvClient<Channel>;
    fn deref(&self) -> &Self::Target {
        &self.kv
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.kv
    }
}

fn held(h: &Option<v1::RequestHeader>) -> bool {
    h.as_ref().is_some_and(|h| h.suspect_leader != 0)
}

impl Conn {
    pub(crate) fn new(
        kv: KvClient<Channel>,
        lanes: Option<Arc<NodeLanes>>,
        until: Instant,
    ) -> Self {
        Conn { kv, lanes, until }
    }

    /// `Kv.Put`, alone or in a bundle.
    pub(crate) async fn put(
        &mut self,
        req: v1::PutRequest,
    ) -> Result<Response<v1::PutResponse>, Status> {
        let bytes = req.key.len() + req.value.len();
        let all = req
            .write
            .as_ref()
            .is_some_and(|w| w.durability == v1::Durability::All as i32);
        match self.lanes.clone() {
            Some(lanes) if !held(&req.header) && !all && bytes <= BUNDLE_ITEM_BYTES_MAX => {
                let mut kv = self.kv.clone();
                match submit(
                    &lanes,
                    Kind::Write,
                    In::Put(req),
                    bytes,
                    self.until,
                    |r| async move {
                        let In::Put(r) = r else {
                            unreachable!("put lane")
                        };
                        kv.put(r).await.map(|r| Out::Put(r.into_inner()))
                    },
                )
                .await?
                {
                    Out::Put(r) => Ok(Response::new(r)),
                    _ => Err(Status::internal(
                        "a bundled put was answered with another kind",
                    )),
                }
            }
            _ => self.kv.put(req).await,
        }
    }

    /// `Kv.Delete`, alone or in a bundle.
    pub(crate) async fn delete(
        &mut self,
        req: v1::DeleteRequest,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let bytes = req.key.len();
        let all = req
            .write
            .as_ref()
            .is_some_and(|w| w.durability == v1::Durability::All as i32);
        match self.lanes.clone() {
            Some(lanes) if !held(&req.header) && !all => {
                let mut kv = self.kv.clone();
                match submit(
                    &lanes,
                    Kind::Write,
                    In::Delete(req),
                    bytes,
                    self.until,
                    |r| async move {
                        let In::Delete(r) = r else {
                            unreachable!("delete lane")
                        };
                        kv.delete(r).await.map(|r| Out::Delete(r.into_inner()))
                    },
                )
                .await?
                {
                    Out::Delete(r) => Ok(Response::new(r)),
                    _ => Err(Status::internal(
                        "a bundled delete was answered with another kind",
                    )),
                }
            }
            _ => self.kv.delete(req).await,
        }
    }

    /// `Kv.Get`, alone or in a bundle.
    pub(crate) async fn get(
        &mut self,
        req: v1::GetRequest,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let bytes = req.key.len();
        match self.lanes.clone() {
            Some(lanes) if !held(&req.header) => {
                let mut kv = self.kv.clone();
                match submit(
                    &lanes,
                    Kind::Read,
                    In::Get(req),
                    bytes,
                    self.until,
                    |r| async move {
                        let In::Get(r) = r else {
                            unreachable!("get lane")
                        };
                        kv.get(r).await.map(|r| Out::Get(r.into_inner()))
                    },
                )
                .await?
                {
                    Out::Get(r) => Ok(Response::new(r)),
                    _ => Err(Status::internal(
                        "a bundled get was answered with another kind",
                    )),
                }
            }
            _ => self.kv.get(req).await,
        }
    }
}

/// Sends `req` alone through `alone` when the lane has a free slot and
/// nobody waits, else queues it for the next bundle.
async fn submit<F, Fut>(
    lanes: &Arc<NodeLanes>,
    kind: Kind,
    req: In,
    bytes: usize,
    until: Instant,
    alone: F,
) -> Result<Out, Status>
where
    F: FnOnce(In) -> Fut,
    Fut: std::future::Future<Output = Result<Out, Status>>,
{
    let lane = lanes.lane(kind);
    let bundled = BundledRequest { request: Some(req) };
    match lane.admit(bundled, bytes, until)? {
        Admission::Alone(b) => {
            let _slot = AloneSlot { lanes, kind };
            lanes.counters.alone.fetch_add(1, Ordering::Relaxed);
            match b.request {
                Some(req) => alone(req).await,
                None => Err(Status::internal("empty bundled request")),
            }
        }
        Admission::Queued(rx, start) => {
            if start {
                gather_soon(lanes.clone(), kind);
            }
            rx.await.unwrap_or_else(|_| {
                Err(Status::unavailable(
                    "the bundle carrying this request was dropped",
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str) -> BundledRequest {
        BundledRequest {
            request: Some(In::Get(v1::GetRequest {
                header: None,
                key: bytes::Bytes::copy_from_slice(key.as_bytes()),
                read: None,
            })),
        }
    }

    fn key_of(w: &Waiting) -> String {
        match &w.req.request {
            Some(In::Get(g)) => String::from_utf8(g.key.to_vec()).unwrap(),
            _ => unreachable!(),
        }
    }

    fn until() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Takes every slot of `lane` as callers would: one request alone, the
    /// others by requests whose bundles (of one) have left.
    fn fill_slots(lane: &Lane) -> Vec<oneshot::Receiver<Result<Out, Status>>> {
        assert!(matches!(
            lane.admit(req("a0"), 1, until()).unwrap(),
            Admission::Alone(_)
        ));
        let mut rxs = Vec::new();
        for i in 1..BUNDLE_CALLS_PER_LANE_MAX {
            let Admission::Queued(rx, true) =
                lane.admit(req(&format!("a{i}")), 1, until()).unwrap()
            else {
                panic!("slot {i} was not free")
            };
            assert_eq!(lane.release().expect("its bundle").len(), 1);
            rxs.push(rx);
        }
        assert_eq!(lane.state.lock().unwrap().calls, BUNDLE_CALLS_PER_LANE_MAX);
        rxs
    }

    #[tokio::test]
    async fn a_request_to_an_idle_lane_goes_alone_and_a_free_slot_gathers_the_ones_behind_it() {
        let lane = Lane::default();
        assert!(matches!(
            lane.admit(req("a"), 1, until()).unwrap(),
            Admission::Alone(_)
        ));
        // A call is in flight: requests that find a free slot take it but
        // queue, and those after the last free slot queue without one.
        let mut rxs = Vec::new();
        for i in 0..BUNDLE_CALLS_PER_LANE_MAX {
            match lane.admit(req(&format!("q{i}")), 1, until()).unwrap() {
                Admission::Queued(rx, start) => {
                    assert_eq!(start, i + 1 < BUNDLE_CALLS_PER_LANE_MAX, "request {i}");
                    rxs.push(rx);
                }
                Admission::Alone(_) => panic!("went alone while a call was in flight"),
            }
        }
        // The first taken slot's bundle carries every waiting request, in
        // order; the other taken slots find nothing left and are freed.
        let group = lane.release().expect("the waiting requests");
        assert_eq!(
            group.iter().map(key_of).collect::<Vec<_>>(),
            (0..BUNDLE_CALLS_PER_LANE_MAX)
                .map(|i| format!("q{i}"))
                .collect::<Vec<_>>()
        );
        for _ in 2..BUNDLE_CALLS_PER_LANE_MAX {
            assert!(lane.release().is_none());
        }
        assert_eq!(lane.state.lock().unwrap().calls, 2);
        // Both calls end with nothing waiting: the lane is idle again.
        assert!(lane.release().is_none());
        assert!(lane.release().is_none());
        assert!(!lane.busy());
        assert!(matches!(
            lane.admit(req("b"), 1, until()).unwrap(),
            Admission::Alone(_)
        ));
        drop(rxs);
    }

    #[tokio::test]
    async fn requests_queue_in_order_while_every_slot_is_taken() {
        let lane = Lane::default();
        let _slots = fill_slots(&lane);
        let mut rxs = Vec::new();
        for i in 0..3 {
            match lane.admit(req(&format!("q{i}")), 1, until()).unwrap() {
                Admission::Queued(rx, start) => {
                    assert!(!start, "no slot is free: nothing starts");
                    rxs.push(rx);
                }
                Admission::Alone(_) => panic!("went alone while every slot was taken"),
            }
        }
        // A call ends: its slot carries every waiting request, in order.
        let group = lane.release().expect("the waiting requests");
        assert_eq!(
            group.iter().map(key_of).collect::<Vec<_>>(),
            ["q0", "q1", "q2"]
        );
        assert_eq!(lane.state.lock().unwrap().calls, BUNDLE_CALLS_PER_LANE_MAX);
        // Nothing waits: each call's end frees its slot.
        for _ in 0..BUNDLE_CALLS_PER_LANE_MAX {
            assert!(lane.release().is_none());
        }
        assert!(!lane.busy());
        drop(rxs);
    }

    #[tokio::test]
    async fn a_bundle_skips_callers_that_gave_up_and_keeps_to_its_bounds() {
        let lane = Lane::default();
        let _slots = fill_slots(&lane);
        let mut kept = Vec::new();
        for i in 0..(2 * BUNDLE_REQUESTS_CLIENT_MAX + 30) {
            let Admission::Queued(rx, _) =
                lane.admit(req(&format!("q{i:04}")), 1, until()).unwrap()
            else {
                panic!("queued")
            };
            // Every third caller gives up before its bundle leaves.
            if i % 3 != 0 {
                kept.push(rx);
            }
        }
        let group = lane.release().unwrap();
        assert_eq!(group.len(), BUNDLE_REQUESTS_CLIENT_MAX);
        assert!(group.iter().all(|w| !w.tx.is_closed()));
        assert_eq!(key_of(&group[0]), "q0001");
        let rest = lane.release().unwrap();
        assert_eq!(group.len() + rest.len(), kept.len());

        // Bytes: a bundle stops before it would pass the byte bound, but a
        // single request larger than the bound still goes (alone).
        let big = BUNDLE_BYTES_MAX / 2 + 1;
        let mut rxs = Vec::new();
        for i in 0..3 {
            let Admission::Queued(rx, _) =
                lane.admit(req(&format!("big{i}")), big, until()).unwrap()
            else {
                panic!("queued")
            };
            rxs.push(rx);
        }
        assert_eq!(lane.release().unwrap().len(), 1);
        assert_eq!(lane.release().unwrap().len(), 1);
        assert_eq!(lane.release().unwrap().len(), 1);
        assert_eq!(lane.state.lock().unwrap().queued_bytes, 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_overloaded() {
        let lane = Lane::default();
        let _slots = fill_slots(&lane);
        let mut rxs = Vec::new();
        for _ in 0..BUNDLE_QUEUE_MAX {
            let Admission::Queued(rx, _) = lane.admit(req("q"), 1, until()).unwrap() else {
                panic!("queued")
            };
            rxs.push(rx);
        }
        let err = match lane.admit(req("over"), 1, until()) {
            Err(e) => e,
            Ok(_) => panic!("the queue took more than its bound"),
        };
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(matches!(
            lmskv_proto::error::Error::from_status(&err),
            lmskv_proto::error::Error::Overloaded { .. }
        ));
    }
}
