//! The broadcast's format v2 against real servers, standalone and Cluster
//! (`docs/broadcast.md`): one script publishes each batch on pub/sub and
//! adds it to the channel's stream with a contiguous `seq`, records which
//! caches it touched, keeps the epoch until the sequence is lost, and
//! heartbeats carry the current `seq` and the highest applied position.

use std::time::Duration;

use evictd::change::{Lsn, Position};
use evictd::config::{BroadcastConfig, RedisTarget, Transport};
use evictd::resolve::Effect;
use evictd::sink::redis::layout::BroadcastKeys;
use evictd::sink::redis::{Envelope, RedisSink, WireApplied};
use evictd::sink::{Sink, SinkBatch};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::redis_support::{BOTH, Kind, Probe, TestGraph, kind_target, unique, urls};

fn target(kind: Kind, channel: &str, transport: Transport) -> RedisTarget {
    let mut t = kind_target(kind);
    t.broadcast = Some(BroadcastConfig {
        transport,
        stream_max_len: 1000,
        heartbeat: Duration::from_millis(100),
        ..BroadcastConfig::new(channel)
    });
    t
}

/// A pub/sub subscription to `channel` (classic pub/sub reaches
/// subscribers on every node of a Cluster).
async fn subscribe(kind: Kind, channel: &str) -> impl futures_util::Stream<Item = redis::Msg> + Unpin {
    let mut pubsub = redis::Client::open(urls(kind)[0].as_str()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(channel).await.unwrap();
    pubsub.into_on_message()
}

/// The next message's text and its parse, within 5 s.
async fn next(messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> (String, Envelope) {
    let msg = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.expect("a message").unwrap();
    let text: String = msg.get_payload().unwrap();
    let parsed = Envelope::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (text, parsed)
}

/// The stream's entries' `m` fields, oldest first.
async fn stream(probe: &Probe, keys: &BroadcastKeys) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        probe.q(redis::cmd("XRANGE").arg(&keys.stream).arg("-").arg("+")).await;
    entries
        .into_iter()
        .map(|(_, fields)| {
            assert_eq!(fields.len(), 1, "{fields:?}");
            assert_eq!(fields[0].0, "m");
            fields[0].1.clone()
        })
        .collect()
}

async fn apply(sink: &RedisSink, g: &TestGraph, id: u64, effects: &[Effect], position: Option<&Position>) {
    sink.apply(SinkBatch { id, graph: &g.graph, effects, version: id, position, commit_time_micros: None })
        .await
        .unwrap();
}

#[tokio::test]
async fn batches_go_to_pubsub_and_the_stream_with_contiguous_seq_and_touched_names_their_caches() {
    for kind in BOTH {
        let (g, p) = (TestGraph::new(&unique()), unique());
        let channel = format!("it:{p}:bc");
        let keys = BroadcastKeys::of(&channel);
        let sink = RedisSink::connect(&target(kind, &channel, Transport::Both)).await.unwrap();
        let probe = Probe::new(kind).await;
        let mut messages = subscribe(kind, &channel).await;

        let gone = Effect::Key { cache: g.cache("gone"), key: format!("it:{p}:gone:1") };
        let tag = Effect::Tag { cache: g.cache("tagged"), tag: format!("it:{p}:item:1") };
        let versioned = Effect::Key { cache: g.cache("versioned"), key: format!("it:{p}:versioned:1") };
        let bump = Effect::NamespaceBump { cache: g.cache("fading") };
        let position = Position::Postgres { commit_lsn: Lsn(0x100), lsn: Lsn(0x128) };
        apply(&sink, &g, 1, &[gone], Some(&position)).await;
        apply(&sink, &g, 2, &[tag, versioned], None).await;
        apply(&sink, &g, 3, &[bump], None).await;

        let mut published = Vec::new();
        for _ in 0..3 {
            published.push(next(&mut messages).await);
        }
        let (first, m1) = &published[0];
        assert!(
            first.starts_with(&format!(
                "{{\"v\":2,\"kind\":\"batch\",\"epoch\":\"{}\",\"seq\":",
                m1.epoch.as_ref().unwrap()
            )),
            "{first}"
        );
        assert_eq!(m1.caches, [format!("gone_{}", g.suffix)], "{kind:?}: {first}");
        // The batch's own position is applied on this target once its effects are.
        assert_eq!(m1.applied, Some(WireApplied::Postgres { lsn: "0/128".into() }), "{kind:?}: {first}");
        let seq = m1.seq.unwrap();
        for (i, (text, m)) in published.iter().enumerate() {
            assert_eq!(m.kind.as_deref(), Some("batch"), "{text}");
            assert_eq!(m.epoch, m1.epoch, "{kind:?}: one epoch");
            assert_eq!(m.seq, Some(seq + i as u64), "{kind:?}: contiguous: {text}");
            assert_eq!(m.batch, Some(i as u64 + 1));
        }
        assert_eq!(published[1].1.tags, [format!("it:{p}:item:1")]);
        assert_eq!(published[2].1.flush, [format!("fading_{}", g.suffix)]);

        // The stream holds the same messages, byte for byte.
        let texts: Vec<String> = published.iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(stream(&probe, &keys).await, texts, "{kind:?}");
        assert_eq!(probe.get(&keys.seq).await, Some((seq + 2).to_string()));
        assert_eq!(probe.get(&keys.epoch).await, m1.epoch);
        let touched: std::collections::HashMap<String, u64> = probe.q(redis::cmd("HGETALL").arg(&keys.touched)).await;
        let expected = std::collections::HashMap::from([
            (format!("gone_{}", g.suffix), seq),
            (format!("versioned_{}", g.suffix), seq + 1),
            ("*tags".to_owned(), seq + 1),
            (format!("fading_{}", g.suffix), seq + 2),
        ]);
        assert_eq!(touched, expected, "{kind:?}");
        assert_eq!(
            probe.q::<Option<String>>(redis::cmd("HGET").arg(&keys.applied).arg("postgres")).await.as_deref(),
            Some("0/128")
        );
    }
}

#[tokio::test]
async fn the_epoch_survives_a_restart_and_changes_only_when_the_sequence_is_lost() {
    for kind in BOTH {
        let (g, p) = (TestGraph::new(&unique()), unique());
        let channel = format!("it:{p}:bc");
        let keys = BroadcastKeys::of(&channel);
        let probe = Probe::new(kind).await;
        let effects = [Effect::Key { cache: g.cache("gone"), key: format!("it:{p}:gone:1") }];
        let newest = || async {
            let entries: Vec<(String, Vec<(String, String)>)> =
                probe.q(redis::cmd("XREVRANGE").arg(&keys.stream).arg("+").arg("-").arg("COUNT").arg(1)).await;
            Envelope::parse(&entries[0].1[0].1).unwrap()
        };
        // Stream only: nothing on pub/sub.
        let mut messages = subscribe(kind, &channel).await;
        let sink = RedisSink::connect(&target(kind, &channel, Transport::Stream)).await.unwrap();
        apply(&sink, &g, 1, &effects, None).await;
        let first = newest().await;
        drop(sink);

        // A restart of evictd (a new connection, a new process): same epoch, seq + 1.
        let sink = RedisSink::connect(&target(kind, &channel, Transport::Stream)).await.unwrap();
        apply(&sink, &g, 1, &effects, None).await;
        let second = newest().await;
        assert_eq!(second.epoch, first.epoch, "{kind:?}: no reset on a restart");
        assert_eq!(second.seq, Some(first.seq.unwrap() + 1), "{kind:?}");

        // Redis lost the sequence: a new epoch, from the clock, above the old sequence.
        probe.q::<i64>(redis::cmd("DEL").arg(&keys.seq)).await;
        apply(&sink, &g, 2, &effects, None).await;
        let third = newest().await;
        let epoch: u64 = third.epoch.as_deref().unwrap().parse().unwrap();
        assert_ne!(third.epoch, first.epoch, "{kind:?}");
        assert_eq!(third.seq, Some(epoch + 1), "{kind:?}: the new sequence starts at its epoch");
        assert!(epoch > second.seq.unwrap(), "{kind:?}: {epoch}");
        let nothing = tokio::time::timeout(Duration::from_millis(200), messages.next()).await;
        assert!(nothing.is_err(), "{kind:?}: the stream transport publishes nothing");
    }
}

#[tokio::test]
async fn heartbeats_on_an_idle_channel_carry_the_current_seq_and_the_highest_applied_position() {
    for kind in BOTH {
        let (g, p) = (TestGraph::new(&unique()), unique());
        let channel = format!("it:{p}:bc");
        let keys = BroadcastKeys::of(&channel);
        let probe = Probe::new(kind).await;
        let sink = RedisSink::connect(&target(kind, &channel, Transport::Both)).await.unwrap();
        apply(&sink, &g, 1, &[Effect::Key { cache: g.cache("gone"), key: format!("it:{p}:gone:1") }], None).await;
        let seq: u64 = probe.get(&keys.seq).await.unwrap().parse().unwrap();
        let epoch = probe.get(&keys.epoch).await;

        let mut messages = subscribe(kind, &channel).await;
        // The run loop acknowledged a keepalive position: 1/0.
        sink.acknowledged(&Position::Postgres { commit_lsn: Lsn(1 << 32), lsn: Lsn(1 << 32) });
        let stop = CancellationToken::new();
        sink.spawn_heartbeats(true, stop.clone()).unwrap();
        let (text, beat) = next(&mut messages).await;
        assert_eq!(beat.kind.as_deref(), Some("heartbeat"), "{text}");
        assert_eq!((beat.seq, beat.epoch.clone()), (Some(seq), epoch.clone()), "{kind:?}: the current seq: {text}");
        assert_eq!(beat.applied, Some(WireApplied::Postgres { lsn: "1/0".into() }), "{text}");
        assert!(beat.published_at_ms.is_some() && beat.keys.is_empty() && beat.batch.is_none(), "{text}");
        let (_, again) = next(&mut messages).await;
        assert_eq!(again.seq, Some(seq), "{kind:?}: a heartbeat takes no number");

        // Another process (a standby) that applied less publishes the
        // highest stored position, compared as hex digits: 1/0 > 0/FFFFFFFF.
        let other = RedisSink::connect(&target(kind, &channel, Transport::PubSub)).await.unwrap();
        other.acknowledged(&Position::Postgres { commit_lsn: Lsn(0xFFFF_FFFF), lsn: Lsn(0xFFFF_FFFF) });
        stop.cancel();
        assert_eq!(other.heartbeat().await.unwrap(), Some(seq));
        assert_eq!(
            probe.q::<Option<String>>(redis::cmd("HGET").arg(&keys.applied).arg("postgres")).await.as_deref(),
            Some("1/0")
        );
        // Heartbeats are not messages of the stream.
        assert_eq!(probe.q::<u64>(redis::cmd("XLEN").arg(&keys.stream)).await, 1, "{kind:?}");
    }
}
