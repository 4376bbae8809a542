//! The uplink: one NATS connection per node, on its own thread (`corecast-cluster`) with a
//! current-thread tokio runtime. Two halves run on it together: the publisher drains the
//! shards' rings, packs their batches into messages and publishes them; the receiver takes
//! the other nodes' messages, checks their sequence numbers and hands each to every shard.
//! It ends when every shard's flush task has closed its ring (the drain at shutdown), and
//! dropping it closes the rings to the shards, whose receiver tasks then end.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, Subject};
use bytes::Bytes;
use futures_lite::StreamExt;

use super::wire::{self, Header, Packer, SeqTracker, Verdict, HEADER_LEN};
use super::{Cluster, REMOTE_ORIGIN};
use crate::fanout::{Batch, Run};
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

pub fn spawn(
    cluster: Arc<Cluster>,
    from_shards: Vec<Receiver<Arc<Batch>>>,
    to_shards: Vec<Sender<Arc<Batch>>>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("corecast-cluster".into())
        .spawn(move || runtime.block_on(run(cluster, from_shards, to_shards)))?;
    Ok(())
}

async fn run(cluster: Arc<Cluster>, from_shards: Vec<Receiver<Arc<Batch>>>, to_shards: Vec<Sender<Arc<Batch>>>) {
    let urls = cluster.config.nats.join(", ");
    tracing::info!(
        "cluster: node {:016x} joining subject {:?} over NATS ({urls})",
        cluster.node_id,
        cluster.config.subject
    );
    let events = cluster.clone();
    let options = ConnectOptions::new()
        .name(format!("corecast-{:016x}", cluster.node_id))
        .no_echo()
        // The URLs in the order listed (async-nats shuffles them by default), so that each
        // node can name its nearest server first and the others as fail-overs.
        .retain_servers_order()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        .reconnect_delay_callback(reconnect_delay)
        .client_capacity(CLIENT_CAPACITY)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let cluster = events.clone();
            async move { on_event(&cluster, event) }
        });
    let servers: Vec<async_nats::ServerAddr> = match cluster.config.nats.iter().map(|u| u.parse()).collect() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cluster: bad NATS URL in {urls}: {e}; relaying locally only");
            return discard_forever(&cluster, from_shards).await;
        }
    };
    let client = match options.connect(servers).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("cluster: cannot start the NATS client: {e}; relaying locally only");
            return discard_forever(&cluster, from_shards).await;
        }
    };
    let subject = Subject::from(cluster.config.subject.as_str());
    let receive = async {
        let subject = subject.clone();
        match client.subscribe(subject).await {
            Ok(subscriber) => receive_loop(&cluster, subscriber, to_shards).await,
            Err(e) => tracing::error!(
                "cluster: cannot subscribe to {:?}: {e}; receiving nothing",
                cluster.config.subject
            ),
        }
        // The subscription ends only with the client; the publisher decides when we stop.
        std::future::pending::<()>().await
    };
    let publish = publish_loop(&cluster, &client, subject.clone(), from_shards);
    futures_lite::future::or(publish, receive).await;
    // Everything accepted locally has been handed over; give it to the server before the
    // process exits (bounded: the drain's own grace bounds the process anyway).
    let _ = tokio::time::timeout(Duration::from_millis(500), client.flush()).await;
    tracing::debug!("cluster: uplink stopped");
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

async fn publish_loop(cluster: &Cluster, client: &Client, subject: Subject, from_shards: Vec<Receiver<Arc<Batch>>>) {
    let s = &cluster.stats;
    let mut rings: Vec<Option<Receiver<Arc<Batch>>>> = from_shards.into_iter().map(Some).collect();
    let mut start = 0;
    let mut packer = Packer::default();
    let (mut seq, mut published) = (0u64, 0u64);
    let mut room = 0usize;
    let mut was_connected = false;
    let mut warned_oversize = false;
    loop {
        let first = NextBatch {
            rings: &mut rings,
            start,
        }
        .await;
        let Some(first) = first else { return };
        let connected = client.connection_state() == State::Connected;
        if connected && !was_connected {
            // The server may announce another limit after a failover.
            room = client.server_info().max_payload.saturating_sub(HEADER_LEN);
        }
        was_connected = connected;
        if !connected || room == 0 {
            // Local clients already have these; other nodes cannot get them now.
            let mut lost = envelopes(&first);
            while let Some(b) = try_next(&mut rings, &mut start) {
                lost += envelopes(&b);
            }
            s.dropped_disconnected.fetch_add(lost, Ordering::Relaxed);
            continue;
        }
        let mut batches = 1u64;
        packer.push(&first, room);
        while batches < MAX_BATCHES_PER_PASS as u64 && packer.pending_len() < room {
            let Some(b) = try_next(&mut rings, &mut start) else {
                break;
            };
            packer.push(&b, room);
            batches += 1;
        }
        s.batches_out.fetch_add(batches, Ordering::Relaxed);
        if packer.oversize > 0 {
            s.dropped_oversize.fetch_add(packer.oversize, Ordering::Relaxed);
            if !warned_oversize {
                warned_oversize = true;
                tracing::warn!(
                    "cluster: {} envelope(s) larger than the NATS max_payload ({} bytes) were not sent to other nodes; raise max_payload in the NATS server config (counted in corecast_cluster_dropped_oversize)",
                    packer.oversize,
                    room + HEADER_LEN
                );
            }
            packer.oversize = 0;
        }
        for (mut msg, count) in packer.take() {
            if client.connection_state() != State::Connected {
                s.dropped_disconnected.fetch_add(count as u64, Ordering::Relaxed);
                continue;
            }
            Header {
                count,
                node: cluster.node_id,
                seq: seq + 1,
                envelopes_before: published,
                sent_us: now_us(),
            }
            .write_into(&mut msg);
            let len = msg.len() as u64;
            match publish(client, &subject, Bytes::from(msg)).await {
                Published::Yes => {
                    // Numbered only once queued, so that other nodes see a gap only for
                    // what NATS itself lost.
                    seq += 1;
                    published += count as u64;
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
            }
        }
    }
}

enum Published {
    Yes,
    Disconnected,
    Failed,
}

/// Publishes one message, waiting while async-nats's queue is full and the connection is
/// up (backpressure), giving up as soon as it is down.
async fn publish(client: &Client, subject: &Subject, payload: Bytes) -> Published {
    loop {
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
async fn discard_forever(cluster: &Cluster, from_shards: Vec<Receiver<Arc<Batch>>>) {
    let mut rings: Vec<Option<Receiver<Arc<Batch>>>> = from_shards.into_iter().map(Some).collect();
    while let Some(b) = (NextBatch {
        rings: &mut rings,
        start: 0,
    })
    .await
    {
        cluster
            .stats
            .dropped_disconnected
            .fetch_add(envelopes(&b), Ordering::Relaxed);
    }
}

/// Most envelope bytes one batch to the shards gathers from messages already received.
const MAX_RECEIVED_BATCH_BYTES: usize = 256 << 10;

async fn receive_loop(
    cluster: &Cluster,
    mut subscriber: async_nats::Subscriber,
    mut to_shards: Vec<Sender<Arc<Batch>>>,
) {
    let mut seqs = SeqTracker::default();
    let mut warned_invalid = false;
    while let Some(msg) = subscriber.next().await {
        // The messages that have already arrived travel to the shards as one batch: one
        // delivery pass and one wake-up per shard for a burst instead of one per message.
        let mut data = Vec::new();
        let mut count = 0u32;
        accept(
            cluster,
            &mut seqs,
            &mut warned_invalid,
            &msg.payload,
            &mut data,
            &mut count,
        );
        while data.len() < MAX_RECEIVED_BATCH_BYTES && count < u32::MAX / 2 {
            match futures_lite::future::poll_once(subscriber.next()).await {
                Some(Some(msg)) => accept(
                    cluster,
                    &mut seqs,
                    &mut warned_invalid,
                    &msg.payload,
                    &mut data,
                    &mut count,
                ),
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
        });
        // In order to every shard; waits while a shard's ring is full (that shard is
        // behind), which leaves messages in NATS's per-client buffer meanwhile.
        for tx in &mut to_shards {
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
                    "cluster: dropped a message on {:?}: {e} (counted in corecast_cluster_invalid; is another program publishing there?)",
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
