//! The uplink: one NATS connection per node, on its own thread (`corecast-cluster`) with a
//! current-thread tokio runtime. Three tasks run on it together: the publisher drains the
//! shards' rings, packs their batches into messages and publishes them; the receiver takes
//! the other nodes' messages, checks their sequence numbers and hands them to every shard;
//! the watchdog checks that the server answers and replaces a client that is stuck. Their
//! state (rings, sequence numbers) outlives any one async-nats client. The uplink ends
//! when every shard's flush task has closed its ring (the drain at shutdown), and dropping
//! it closes the rings to the shards, whose receiver tasks then end. A panic does not end
//! it: the thread is supervised ([`spawn`]) and keeps the rings across the restart.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, Subject};
use bytes::Bytes;
use futures_lite::StreamExt;

use super::wire::{self, Header, Packer, SeqTracker, Verdict, HEADER_LEN};
use super::{Cluster, REMOTE_ORIGIN};
use crate::batch::{Batch, Run};
use crate::mesh::{Receiver, Sender, TryRecvError};

/// Commands async-nats may queue between us and its connection task. Each publish is one;
/// a message is at most `max_payload` (1 MiB by default), so this bounds what waits there
/// to 64 MiB, and past it `publish` waits: that is the uplink's backpressure.
const CLIENT_CAPACITY: usize = 64;

/// Messages async-nats buffers for our subscription before the server's slow-consumer rule
/// applies; beyond it, NATS drops messages, which the sequence check counts as gaps.
const SUBSCRIPTION_CAPACITY: usize = 4096;

/// How long a publish waits on a full client queue before the uplink looks whether the
/// connection is still up: connected, it goes on waiting (backpressure); disconnected, the
/// message is dropped so that the shards do not wait for NATS.
const PUBLISH_PATIENCE: Duration = Duration::from_millis(50);

/// How long a publish may wait on a connection that is up before the uplink calls NATS
/// stuck (a hung server, a partition that closed nothing): it then stops waiting, so that
/// the shards' flush tasks do not wait for NATS either, as a stuck consumer is closed
/// after its write deadline rather than holding the room back.
const PUBLISH_STALL: Duration = Duration::from_secs(2);

/// While stuck, what the shards hand over is dropped (counted) at once, and one message
/// at most this often is tried, for [`PUBLISH_PATIENCE`]; the first that goes through
/// ends the stall.
const STALL_PROBE_EVERY: Duration = Duration::from_millis(500);

/// How often the uplink checks that its server answers, and how long an answer may take.
/// async-nats's own pings wait while commands flow (each command resets its ping timer), so
/// a server that hangs with the connection open (a stopped process, a host gone without a
/// reset) would otherwise keep a busy node on it until the socket buffers fill. The check
/// is a request to a subject nobody serves: a live server answers at once with "no
/// responders"; no answer in time makes the uplink reconnect, to the next URL.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

/// A client still reconnecting after this long is replaced by a new one (see `watchdog`).
const STUCK_RECONNECT: Duration = Duration::from_secs(3);

/// Rounds over every URL a client tries before it gives up and is replaced.
const RECONNECT_ROUNDS: usize = 20;

/// Most batches one publisher pass takes before it publishes, so that a node with many
/// busy shards still publishes early batches without waiting for later ones.
const MAX_BATCHES_PER_PASS: usize = 256;

/// How long a connection attempt may take; a NATS server that died on this host refuses at
/// once, one on a dead host does not answer at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Delay before the n-th connection attempt since the last success (one attempt per server
/// URL): the first at once, then 10 ms more each time, at most 250 ms. A node that lost its
/// server therefore tries every other URL within a few tens of milliseconds (relaying
/// resumes well within 2 s), and a cluster that is down costs at most 4 attempts a second.
/// async-nats's own default grows to 4 s between attempts.
pub fn reconnect_delay(attempts: usize) -> Duration {
    Duration::from_millis((attempts.saturating_sub(1) as u64 * 10).min(250))
}

/// Starts the uplink thread. It is supervised (`supervisor`): a panic is logged, counted
/// in `cluster.uplink_thread` and shown on `/healthz`, and the uplink runs again after a
/// backoff on a new runtime. The rings and sequence numbers belong to the thread, not to a
/// run, so they outlive a panic: the shards never see their uplink's rings close, and
/// what they hand it while it is down is drained and counted as `dropped_uplink_down`.
pub fn spawn(
    cluster: Arc<Cluster>,
    from_shards: Vec<Receiver<Arc<Batch>>>,
    to_shards: Vec<Sender<Arc<Batch>>>,
) -> std::io::Result<()> {
    // The first runtime is made here, so that a failure is start-up's error.
    let mut first = Some(runtime()?);
    std::thread::Builder::new()
        .name("corecast-cluster".into())
        .spawn(move || {
            let publisher = RefCell::new(PublishState::new(from_shards));
            let mut incoming = ReceiveState {
                seqs: SeqTracker::default(),
                warned_invalid: false,
                to_shards,
            };
            let wait = |delay: Duration| {
                cluster.stats.connected.store(false, Ordering::Relaxed);
                let mut publisher = publisher.borrow_mut();
                // What the dead run had packed but not published never reached NATS.
                let lost = publisher.packer.discard();
                cluster.stats.dropped_uplink_down.fetch_add(lost, Ordering::Relaxed);
                match runtime() {
                    Ok(rt) => rt.block_on(discard_for(&cluster, &mut publisher.rings, delay)),
                    Err(_) => std::thread::sleep(delay),
                }
            };
            crate::supervisor::supervise("cluster uplink", &cluster.uplink_thread, wait, || {
                let rt = match first.take() {
                    Some(rt) => rt,
                    // A failure here is one more death, retried after the next backoff.
                    None => runtime().unwrap_or_else(|e| panic!("cannot restart the uplink's runtime: {e}")),
                };
                let mut publisher = publisher.borrow_mut();
                rt.block_on(run(&cluster, &mut publisher, &mut incoming));
            });
        })?;
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Runs the uplink until every shard has closed its ring (the drain at shutdown).
async fn run(cluster: &Arc<Cluster>, publisher: &mut PublishState, incoming: &mut ReceiveState) {
    let urls = cluster.config.nats.join(", ");
    tracing::info!(
        "cluster: node {:016x} joining subject {:?} over NATS ({urls})",
        cluster.node_id,
        cluster.config.subject
    );
    let mut servers: Vec<async_nats::ServerAddr> = match cluster.config.nats.iter().map(|u| u.parse()).collect() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cluster: bad NATS URL in {urls}: {e}; relaying locally only");
            return discard_forever(cluster, &mut publisher.rings).await;
        }
    };
    let mut order = cluster.config.nats.clone();
    let subject = Subject::from(cluster.config.subject.as_str());
    // Each client gets a generation; events of a client that was replaced are ignored.
    let generation = Arc::new(AtomicU64::new(0));
    let mut connects_at_last_log = u64::MAX;
    loop {
        let this = generation.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = Arc::new(AtomicBool::new(false));
        let client = match options(cluster, &generation, this, &closed, servers.len())
            .connect(servers.clone())
            .await
        {
            Ok(client) => client,
            Err(e) => {
                tracing::error!("cluster: cannot start the NATS client: {e}; relaying locally only");
                return discard_forever(cluster, &mut publisher.rings).await;
            }
        };
        let receive = async {
            match client.subscribe(subject.clone()).await {
                Ok(subscriber) => receive_loop(cluster, subscriber, incoming).await,
                Err(e) => tracing::error!(
                    "cluster: cannot subscribe to {:?}: {e}; receiving nothing",
                    cluster.config.subject
                ),
            }
            // The subscription ends only with the client; the watchdog replaces it then.
            std::future::pending::<bool>().await
        };
        let publish = async {
            publish_loop(cluster, &client, &subject, publisher).await;
            true
        };
        let watch = async {
            watchdog(cluster, &client, &closed).await;
            false
        };
        let finished = futures_lite::future::or(publish, futures_lite::future::or(watch, receive)).await;
        if finished {
            // Everything accepted locally has been handed over; give it to the server before
            // the process exits (bounded: the drain's own grace bounds the process anyway).
            let _ = tokio::time::timeout(Duration::from_millis(500), client.flush()).await;
            tracing::debug!("cluster: uplink stopped");
            return;
        }
        // The client is stuck or gave up: a new one, starting with the next URL (the one it
        // was stuck on goes last).
        cluster.stats.connected.store(false, Ordering::Relaxed);
        servers.rotate_left(1);
        order.rotate_left(1);
        // Once per outage, not once per client while every server is down.
        let connects = cluster.stats.connects.load(Ordering::Relaxed);
        if connects != connects_at_last_log {
            connects_at_last_log = connects;
            tracing::warn!(
                "cluster: still no NATS connection; retrying with a new client, {} first (logged once per outage)",
                order.first().map_or("", String::as_str)
            );
        }
    }
}

/// The async-nats options of the client of generation `this`.
fn options(
    cluster: &Arc<Cluster>,
    generation: &Arc<AtomicU64>,
    this: u64,
    closed: &Arc<AtomicBool>,
    urls: usize,
) -> ConnectOptions {
    let (events, generation, closed) = (cluster.clone(), generation.clone(), closed.clone());
    ConnectOptions::new()
        .name(format!("corecast-{:016x}", cluster.node_id))
        .no_echo()
        // The URLs in the order listed (async-nats shuffles them by default), so that each
        // node can name its nearest server first and the others as fail-overs.
        .retain_servers_order()
        .retry_on_initial_connect()
        // A few rounds over every URL, then this client gives up and the watchdog starts a
        // new one: an async-nats client retrying forever could never be dropped.
        .max_reconnects(Some(RECONNECT_ROUNDS * urls.max(1)))
        .connection_timeout(CONNECT_TIMEOUT)
        .reconnect_delay_callback(reconnect_delay)
        .client_capacity(CLIENT_CAPACITY)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let (cluster, generation, closed) = (events.clone(), generation.clone(), closed.clone());
            async move {
                if generation.load(Ordering::Relaxed) != this {
                    return;
                }
                if matches!(
                    event,
                    Event::Closed | Event::ClientError(async_nats::ClientError::MaxReconnects)
                ) {
                    closed.store(true, Ordering::Relaxed);
                }
                on_event(&cluster, event)
            }
        })
}

fn on_event(cluster: &Cluster, event: Event) {
    let s = &cluster.stats;
    match event {
        Event::Connected => {
            s.connected.store(true, Ordering::Relaxed);
            if s.connects.fetch_add(1, Ordering::Relaxed) > 0 {
                s.reconnects.fetch_add(1, Ordering::Relaxed);
                let down = cluster
                    .clock_ms()
                    .saturating_sub(s.disconnected_at_ms.load(Ordering::Relaxed));
                tracing::info!("cluster: reconnected to NATS after {down} ms");
            } else {
                tracing::info!("cluster: connected to NATS");
            }
        }
        Event::Disconnected => {
            s.connected.store(false, Ordering::Relaxed);
            s.disconnects.fetch_add(1, Ordering::Relaxed);
            s.disconnected_at_ms.store(cluster.clock_ms(), Ordering::Relaxed);
            tracing::warn!("cluster: lost the NATS connection; relaying locally and reconnecting");
        }
        Event::Closed => {
            s.connected.store(false, Ordering::Relaxed);
            tracing::warn!("cluster: the NATS client closed");
        }
        Event::SlowConsumer(_) => {
            tracing::warn!("cluster: this node is a slow consumer of NATS; messages were dropped")
        }
        other => tracing::warn!("cluster: NATS: {other}"),
    }
}

/// Waits for the next batch from any shard, polling every open ring (a closed one is set
/// to `None`). `None` once every ring is closed.
struct NextBatch<'a> {
    rings: &'a mut [Option<Receiver<Arc<Batch>>>],
    start: usize,
}

impl Future for NextBatch<'_> {
    type Output = Option<Arc<Batch>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let n = this.rings.len();
        let mut open = false;
        // Starting one further each time keeps one busy shard from starving the others.
        for k in 0..n {
            let slot = &mut this.rings[(this.start + k) % n];
            let Some(ring) = slot else { continue };
            match ring.poll_recv(cx) {
                Poll::Ready(Some(batch)) => {
                    this.start = (this.start + k + 1) % n.max(1);
                    return Poll::Ready(Some(batch));
                }
                Poll::Ready(None) => *slot = None,
                Poll::Pending => open = true,
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }
}

/// Takes one more batch that is already waiting in some ring, without waiting.
fn try_next(rings: &mut [Option<Receiver<Arc<Batch>>>], start: &mut usize) -> Option<Arc<Batch>> {
    let n = rings.len();
    for k in 0..n {
        let i = (*start + k) % n;
        if let Some(ring) = &rings[i] {
            match ring.try_recv() {
                Ok(batch) => {
                    *start = (i + 1) % n;
                    return Some(batch);
                }
                Err(TryRecvError::Closed) => rings[i] = None,
                Err(TryRecvError::Empty) => {}
            }
        }
    }
    None
}

fn envelopes(batch: &Batch) -> u64 {
    batch.runs.iter().map(|r| r.count as u64).sum()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the publisher keeps across NATS clients (the uplink builds a new client when one
/// is stuck): the rings, the sequence numbers and the state of the current stall.
struct PublishState {
    rings: Vec<Option<Receiver<Arc<Batch>>>>,
    start: usize,
    packer: Packer,
    seq: u64,
    published: u64,
    room: usize,
    was_connected: bool,
    warned_oversize: bool,
    /// Set while NATS takes nothing (see PUBLISH_STALL): when the next message may be tried.
    stalled: Option<tokio::time::Instant>,
}

impl PublishState {
    fn new(from_shards: Vec<Receiver<Arc<Batch>>>) -> Self {
        PublishState {
            rings: from_shards.into_iter().map(Some).collect(),
            start: 0,
            packer: Packer::default(),
            seq: 0,
            published: 0,
            room: 0,
            was_connected: false,
            warned_oversize: false,
            stalled: None,
        }
    }
}

/// Publishes what the shards hand over until every ring is closed. Cancelled when the
/// client is replaced; everything it must keep is in `st`.
async fn publish_loop(cluster: &Cluster, client: &Client, subject: &Subject, st: &mut PublishState) {
    let s = &cluster.stats;
    let PublishState {
        rings,
        start,
        packer,
        seq,
        published,
        room,
        was_connected,
        warned_oversize,
        stalled,
    } = st;
    // A new client has not announced its limit yet.
    *was_connected = false;
    loop {
        crate::supervisor::test_panic_hook("cluster");
        let first = NextBatch {
            rings: &mut rings[..],
            start: *start,
        }
        .await;
        let Some(first) = first else { return };
        let connected = client.connection_state() == State::Connected;
        if connected && !*was_connected {
            // The server may announce another limit after a failover.
            *room = client.server_info().max_payload.saturating_sub(HEADER_LEN);
        }
        *was_connected = connected;
        if !connected {
            // A reconnect starts afresh; the stall was that connection's.
            if stalled.take().is_some() {
                s.stalled.store(false, Ordering::Relaxed);
            }
        }
        let probing = stalled.is_some_and(|next| tokio::time::Instant::now() >= next);
        if !connected || *room == 0 || (stalled.is_some() && !probing) {
            // Local clients already have these; other nodes cannot get them now.
            let mut lost = envelopes(&first);
            while let Some(b) = try_next(rings, start) {
                lost += envelopes(&b);
            }
            let counter = if stalled.is_some() && connected {
                &s.dropped_stalled
            } else {
                &s.dropped_disconnected
            };
            counter.fetch_add(lost, Ordering::Relaxed);
            continue;
        }
        let mut batches = 1u64;
        packer.push(&first, *room);
        while batches < MAX_BATCHES_PER_PASS as u64 && packer.pending_len() < *room {
            let Some(b) = try_next(rings, start) else {
                break;
            };
            packer.push(&b, *room);
            batches += 1;
        }
        s.batches_out.fetch_add(batches, Ordering::Relaxed);
        if packer.oversize > 0 {
            s.dropped_oversize.fetch_add(packer.oversize, Ordering::Relaxed);
            if !*warned_oversize {
                *warned_oversize = true;
                tracing::warn!(
                    "cluster: {} envelope(s) larger than the NATS max_payload ({} bytes) were not sent to other nodes; raise max_payload in the NATS server config (counted in corecast_cluster_dropped_envelopes_total{{reason=\"oversize\"}})",
                    packer.oversize,
                    *room + HEADER_LEN
                );
            }
            packer.oversize = 0;
        }
        for (mut msg, count) in packer.take() {
            if client.connection_state() != State::Connected {
                s.dropped_disconnected.fetch_add(count as u64, Ordering::Relaxed);
                continue;
            }
            if stalled.is_some_and(|next| tokio::time::Instant::now() < next) {
                s.dropped_stalled.fetch_add(count as u64, Ordering::Relaxed);
                continue;
            }
            let bound = if stalled.is_some() {
                PUBLISH_PATIENCE
            } else {
                PUBLISH_STALL
            };
            Header {
                count,
                node: cluster.node_id,
                seq: *seq + 1,
                envelopes_before: *published,
                sent_us: now_us(),
            }
            .write_into(&mut msg);
            let len = msg.len() as u64;
            match publish(client, subject, Bytes::from(msg), bound).await {
                Published::Yes => {
                    if stalled.take().is_some() {
                        s.stalled.store(false, Ordering::Relaxed);
                        tracing::info!("cluster: NATS takes messages again; relaying to other nodes resumes");
                    }
                    // Numbered only once queued, so that other nodes see a gap only for
                    // what NATS itself lost.
                    *seq += 1;
                    *published += count as u64;
                    s.messages_out.fetch_add(1, Ordering::Relaxed);
                    s.envelopes_out.fetch_add(count as u64, Ordering::Relaxed);
                    s.bytes_out.fetch_add(len, Ordering::Relaxed);
                }
                Published::Disconnected => {
                    s.dropped_disconnected.fetch_add(count as u64, Ordering::Relaxed);
                }
                Published::Failed => {
                    s.dropped_publish_error.fetch_add(count as u64, Ordering::Relaxed);
                }
                Published::Stalled => {
                    s.dropped_stalled.fetch_add(count as u64, Ordering::Relaxed);
                    if stalled.is_none() {
                        s.stalls.fetch_add(1, Ordering::Relaxed);
                        s.stalled.store(true, Ordering::Relaxed);
                        tracing::warn!(
                            "cluster: NATS has taken nothing for {} ms though connected; relaying locally only until it does (counted in corecast_cluster_dropped_envelopes_total{{reason=\"stalled\"}})",
                            PUBLISH_STALL.as_millis()
                        );
                    }
                    *stalled = Some(tokio::time::Instant::now() + STALL_PROBE_EVERY);
                }
            }
        }
    }
}

/// Returns when the client must be replaced: it gave up (`closed`), or it has been
/// reconnecting for longer than [`STUCK_RECONNECT`] (async-nats bounds a connection attempt's
/// TCP connect but not its wait for the server's greeting, so a hung server keeps it
/// forever). Meanwhile checks every [`LIVENESS_EVERY`] that the server answers, and makes
/// the client reconnect when it does not.
async fn watchdog(cluster: &Cluster, client: &Client, closed: &AtomicBool) {
    let subject = Subject::from(format!("_corecast.live.{:016x}", cluster.node_id));
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(LIVENESS_EVERY).await;
        if closed.load(Ordering::Relaxed) {
            return;
        }
        if client.connection_state() != State::Connected {
            let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= STUCK_RECONNECT {
                tracing::debug!(
                    "cluster: no NATS connection for {} ms; replacing the client",
                    since.elapsed().as_millis()
                );
                return;
            }
            continue;
        }
        down_since = None;
        // Any answer, "no responders" included, is the server's.
        if tokio::time::timeout(LIVENESS_TIMEOUT, client.request(subject.clone(), Bytes::new()))
            .await
            .is_err()
            && client.connection_state() == State::Connected
        {
            cluster.stats.unresponsive.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "cluster: the NATS server has not answered for {} ms; reconnecting",
                LIVENESS_TIMEOUT.as_millis()
            );
            if let Err(e) = client.force_reconnect().await {
                tracing::warn!("cluster: cannot reconnect: {e}");
            }
        }
    }
}

enum Published {
    Yes,
    Disconnected,
    Failed,
    /// Waited `bound` with the connection up: NATS takes nothing.
    Stalled,
}

/// Publishes one message, waiting while async-nats's queue is full and the connection is
/// up (backpressure) for at most `bound`, giving up as soon as it is down. A message given
/// up on was not queued (a cancelled send queues nothing).
async fn publish(client: &Client, subject: &Subject, payload: Bytes, bound: Duration) -> Published {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if tokio::time::Instant::now() >= deadline {
            return Published::Stalled;
        }
        match tokio::time::timeout(PUBLISH_PATIENCE, client.publish(subject.clone(), payload.clone())).await {
            Ok(Ok(())) => return Published::Yes,
            Ok(Err(e)) => {
                tracing::debug!("cluster: publish failed: {e}");
                return Published::Failed;
            }
            Err(_) if client.connection_state() != State::Connected => return Published::Disconnected,
            Err(_) => {}
        }
    }
}

/// Discards what the shards hand over when there is no client at all (a URL the NATS client
/// refused), counting it, until the shards close their rings.
async fn discard_forever(cluster: &Cluster, rings: &mut [Option<Receiver<Arc<Batch>>>]) {
    while let Some(b) = (NextBatch { rings, start: 0 }).await {
        cluster
            .stats
            .dropped_disconnected
            .fetch_add(envelopes(&b), Ordering::Relaxed);
    }
}

/// Discards what the shards hand over for `delay`, while the uplink is down between a
/// panic and its restart, counting it: the shards never wait for a dead uplink.
async fn discard_for(cluster: &Cluster, rings: &mut [Option<Receiver<Arc<Batch>>>], delay: Duration) {
    let drain = async {
        while let Some(b) = (NextBatch { rings, start: 0 }).await {
            cluster
                .stats
                .dropped_uplink_down
                .fetch_add(envelopes(&b), Ordering::Relaxed);
        }
    };
    let _ = tokio::time::timeout(delay, drain).await;
}

/// Most envelope bytes one batch to the shards gathers from messages already received.
const MAX_RECEIVED_BATCH_BYTES: usize = 256 << 10;

/// What the receiver keeps across NATS clients: each node's last sequence number and the
/// rings to the shards.
struct ReceiveState {
    seqs: SeqTracker,
    warned_invalid: bool,
    to_shards: Vec<Sender<Arc<Batch>>>,
}

async fn receive_loop(cluster: &Cluster, mut subscriber: async_nats::Subscriber, st: &mut ReceiveState) {
    let ReceiveState {
        seqs,
        warned_invalid,
        to_shards,
    } = st;
    while let Some(msg) = subscriber.next().await {
        // The messages that have already arrived travel to the shards as one batch: one
        // delivery pass and one wake-up per shard for a burst instead of one per message.
        let mut data = Vec::new();
        let mut count = 0u32;
        accept(cluster, seqs, warned_invalid, &msg.payload, &mut data, &mut count);
        while data.len() < MAX_RECEIVED_BATCH_BYTES && count < u32::MAX / 2 {
            match futures_lite::future::poll_once(subscriber.next()).await {
                Some(Some(msg)) => accept(cluster, seqs, warned_invalid, &msg.payload, &mut data, &mut count),
                _ => break,
            }
        }
        if count == 0 {
            continue;
        }
        let end = data.len();
        let batch = Arc::new(Batch {
            data,
            runs: vec![Run {
                origin: REMOTE_ORIGIN,
                end,
                count,
            }],
            first_read: None,
        });
        // In order to every shard; waits while a shard's ring is full (that shard is
        // behind), which leaves messages in NATS's per-client buffer meanwhile.
        for tx in to_shards.iter_mut() {
            let _ = tx.send(batch.clone()).await;
        }
    }
}

/// Checks one received message and, if it is next in its node's order, appends its
/// envelopes to `data` (counting them in `count`).
fn accept(
    cluster: &Cluster,
    seqs: &mut SeqTracker,
    warned_invalid: &mut bool,
    payload: &[u8],
    data: &mut Vec<u8>,
    count: &mut u32,
) {
    let s = &cluster.stats;
    let (header, body) = match wire::decode(payload) {
        Ok(parts) => parts,
        Err(e) => {
            s.invalid.fetch_add(1, Ordering::Relaxed);
            if !*warned_invalid {
                *warned_invalid = true;
                tracing::warn!(
                    "cluster: dropped a message on {:?}: {e} (counted in corecast_cluster_invalid_messages_total; is another program publishing there?)",
                    cluster.config.subject
                );
            }
            return;
        }
    };
    if header.node == cluster.node_id {
        // no_echo keeps our own messages away; a copy that came back anyway is not news.
        s.stale.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match seqs.check(&header) {
        Verdict::Stale => {
            s.stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Verdict::AfterGap { messages, envelopes } => {
            s.gaps.fetch_add(1, Ordering::Relaxed);
            s.lines_lost.fetch_add(envelopes, Ordering::Relaxed);
            tracing::warn!(
                "cluster: {messages} message(s) with {envelopes} line(s) from node {:016x} were lost in NATS (at-most-once across a server failure); relaying goes on in order",
                header.node
            );
        }
        Verdict::Deliver => {}
    }
    s.nodes_heard.store(seqs.nodes() as u64, Ordering::Relaxed);
    let lag = now_us().saturating_sub(header.sent_us);
    s.lag_us.store(lag, Ordering::Relaxed);
    s.lag_max_us.fetch_max(lag, Ordering::Relaxed);
    s.messages_in.fetch_add(1, Ordering::Relaxed);
    s.envelopes_in.fetch_add(header.count as u64, Ordering::Relaxed);
    s.bytes_in.fetch_add(payload.len() as u64, Ordering::Relaxed);
    data.extend_from_slice(body);
    *count += header.count;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_attempts_start_at_once_and_stay_short() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(3), Duration::from_millis(20));
        assert_eq!(reconnect_delay(1000), Duration::from_millis(250));
    }
}
