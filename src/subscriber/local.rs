//! The local cache: moka, with one loader per key, jittered TTLs, a bound in
//! entries or weight, a tag index, and the local twin of the fill guard.
//!
//! **Invariants:**
//! - A loaded value is kept only if no invalidation of its key, of one of
//!   its tags or of its cache (nor a flush) was applied after its load
//!   started: every drop first records a generation ([`Generations`]), and
//!   a load compares against the generation it started at, once before
//!   moka inserts the value and once after (an invalidation that raced the
//!   insert removes it again). A refused value is still returned to its
//!   caller, uncached, like a refused Redis fill.
//! - The tag index holds every cached key under each tag its load named;
//!   it may hold more (keys since evicted), never less, so a tag drop
//!   over-invalidates at worst.
//! - Keys are unique across caches (they are rendered from different
//!   templates): one moka key per rendered key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use super::stats::Stats;

/// What to load: the cache's name (as in the dependency graph), the
/// rendered key, and the tags the application registers the key under
/// (the same tags it passes to [`reader::register`](crate::reader::register)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub cache: String,
    pub key: String,
    pub tags: Vec<String>,
}

impl Load {
    pub fn new(cache: impl Into<String>, key: impl Into<String>) -> Load {
        Load { cache: cache.into(), key: key.into(), tags: Vec::new() }
    }

    /// Registers the entry under `tags`: a broadcast naming one drops it.
    pub fn tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Load {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
}

/// One cached value.
#[derive(Debug)]
struct Entry<V> {
    cache: Arc<str>,
    tags: Box<[String]>,
    value: V,
    /// This entry's jittered time to live.
    ttl: Duration,
}

/// Every entry expires after its own jittered TTL.
struct Jittered;

impl<V> Expiry<Arc<str>, Arc<Entry<V>>> for Jittered {
    fn expire_after_create(&self, _: &Arc<str>, entry: &Arc<Entry<V>>, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        entry: &Arc<Entry<V>>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// When each key, tag and cache was last invalidated, as generations, for
/// the loads in flight. A load started at generation `g` is stale if
/// anything it depends on has a generation above `g`. Key and tag
/// generations are kept only while loads are in flight, and pruned below
/// the oldest of them, so the maps stay as small as what is in flight.
#[derive(Debug, Default)]
struct Generations {
    now: u64,
    all: u64,
    tagged: u64,
    caches: HashMap<String, u64>,
    keys: HashMap<String, u64>,
    tags: HashMap<String, u64>,
    /// Starting generations of the loads in flight, with their counts.
    loads: BTreeMap<u64, usize>,
}

impl Generations {
    fn begin(&mut self) -> u64 {
        *self.loads.entry(self.now).or_default() += 1;
        self.now
    }

    fn end(&mut self, start: u64) {
        if let Some(n) = self.loads.get_mut(&start) {
            *n -= 1;
            if *n == 0 {
                self.loads.remove(&start);
            }
        }
        match self.loads.keys().next() {
            None => {
                self.keys.clear();
                self.tags.clear();
            }
            Some(&oldest) if self.keys.len() + self.tags.len() > 4096 => {
                self.keys.retain(|_, g| *g > oldest);
                self.tags.retain(|_, g| *g > oldest);
            }
            Some(_) => {}
        }
    }

    fn next(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    fn keys<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        if !self.loads.is_empty() {
            let g = self.next();
            self.keys.extend(keys.into_iter().map(|k| (k.to_owned(), g)));
        }
    }

    fn tags<'a>(&mut self, tags: impl IntoIterator<Item = &'a str>) {
        if !self.loads.is_empty() {
            let g = self.next();
            self.tags.extend(tags.into_iter().map(|t| (t.to_owned(), g)));
        }
    }

    fn caches<'a>(&mut self, caches: impl IntoIterator<Item = &'a str>) {
        let g = self.next();
        self.caches.extend(caches.into_iter().map(|c| (c.to_owned(), g)));
    }

    fn stale(&self, start: u64, load: &Load) -> bool {
        let after = |g: Option<&u64>| g.is_some_and(|&g| g > start);
        self.all > start
            || (self.tagged > start && !load.tags.is_empty())
            || after(self.caches.get(&load.cache))
            || after(self.keys.get(&load.key))
            || load.tags.iter().any(|t| after(self.tags.get(t)))
    }
}

/// A load in flight: ends its generation when dropped (also when the
/// caller's future is cancelled).
struct InFlight<'a> {
    gens: &'a Mutex<Generations>,
    start: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.gens).end(self.start);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A loader's result inside moka: the value read was stale.
enum Failure<V, E> {
    Loader(Arc<E>),
    Stale(V),
}

/// The weight of a value, for a bound in weight.
type Weigh<V> = Arc<dyn Fn(&V) -> u32 + Send + Sync>;

/// What an invalidation dropped, as passed to
/// [`LocalCacheBuilder::on_drop`]: what it named, not the entries it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped<'a> {
    Keys(&'a [String]),
    Tags(&'a [String]),
    Caches(&'a [String]),
    /// Every entry loaded under a tag (a gap repair).
    Tagged,
    /// Everything (a flush).
    All,
}

type OnDrop = Arc<dyn Fn(Dropped<'_>) + Send + Sync>;

/// How a [`LocalCache`] is built.
pub struct LocalCacheBuilder<V> {
    max_entries: u64,
    weigher: Option<(u64, Weigh<V>)>,
    ttl: Duration,
    jitter: Duration,
    redis_ttl: Option<Duration>,
    on_drop: Option<OnDrop>,
}

impl<V: Clone + Send + Sync + 'static> LocalCacheBuilder<V> {
    /// At most `n` entries (default 10 000).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// At most `max` in total of `weigh(value)` (e.g. bytes), instead of a
    /// number of entries.
    pub fn max_weight(mut self, max: u64, weigh: impl Fn(&V) -> u32 + Send + Sync + 'static) -> Self {
        self.weigher = Some((max, Arc::new(weigh)));
        self
    }

    /// Each entry lives `base` plus a uniform random part of `jitter`
    /// (default 10 s + up to 10 s), so entries filled together do not
    /// expire together.
    pub fn ttl(mut self, base: Duration, jitter: Duration) -> Self {
        self.ttl = base;
        self.jitter = jitter;
        self
    }

    /// The shortest TTL the application gives these keys in Redis. On the
    /// pub/sub transport a [`Subscriber`](super::Subscriber) refuses a
    /// local TTL (base + jitter) longer than it, or none given.
    pub fn redis_ttl(mut self, ttl: Duration) -> Self {
        self.redis_ttl = Some(ttl);
        self
    }

    /// Calls `f` after each invalidation, once its entries are gone (e.g. to
    /// log, or to drop what the application derived from them). It runs on
    /// the subscriber's task: it must be quick and must not block.
    pub fn on_drop(mut self, f: impl Fn(Dropped<'_>) + Send + Sync + 'static) -> Self {
        self.on_drop = Some(Arc::new(f));
        self
    }

    pub fn build(self) -> LocalCache<V> {
        let builder = Cache::builder().expire_after(Jittered).support_invalidation_closures();
        let entries = match self.weigher {
            Some((max, weigh)) => builder
                .max_capacity(max)
                .weigher(move |_: &Arc<str>, entry: &Arc<Entry<V>>| weigh(&entry.value))
                .build(),
            None => builder.max_capacity(self.max_entries).build(),
        };
        LocalCache {
            inner: Arc::new(Inner {
                entries,
                tag_index: Mutex::default(),
                gens: Mutex::default(),
                stats: Arc::default(),
                ttl: self.ttl,
                jitter: self.jitter,
                redis_ttl: self.redis_ttl,
                on_drop: self.on_drop,
            }),
        }
    }
}

/// An in-process cache kept coherent by a [`Subscriber`](super::Subscriber).
/// Cheap to clone (one shared cache).
pub struct LocalCache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for LocalCache<V> {
    fn clone(&self) -> Self {
        LocalCache { inner: Arc::clone(&self.inner) }
    }
}

struct Inner<V> {
    entries: Cache<Arc<str>, Arc<Entry<V>>>,
    /// tag → keys loaded under it.
    tag_index: Mutex<HashMap<String, HashSet<Arc<str>>>>,
    gens: Mutex<Generations>,
    stats: Arc<Stats>,
    ttl: Duration,
    jitter: Duration,
    redis_ttl: Option<Duration>,
    on_drop: Option<OnDrop>,
}

impl<V: Clone + Send + Sync + 'static> LocalCache<V> {
    pub fn builder() -> LocalCacheBuilder<V> {
        LocalCacheBuilder {
            max_entries: 10_000,
            weigher: None,
            ttl: Duration::from_secs(10),
            jitter: Duration::from_secs(10),
            redis_ttl: None,
            on_drop: None,
        }
    }

    /// The value of `load.key`: the local entry, or `loader`'s value. Of
    /// concurrent calls for one key, one runs its loader and the others
    /// wait for it. The value is kept only if nothing it depends on was
    /// invalidated since the load started (see the module's invariants);
    /// either way the caller gets it. A loader error is returned to every
    /// caller waiting on that load, and nothing is cached.
    pub async fn get_or_load<F, Fut, E>(&self, load: &Load, loader: F) -> Result<V, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Send + Sync + 'static,
    {
        let inner = &*self.inner;
        let key: Arc<str> = Arc::from(load.key.as_str());
        if let Some(entry) = inner.entries.get(&key).await {
            inner.stats.hit();
            return Ok(entry.value.clone());
        }
        inner.stats.miss();
        let started = InFlight { gens: &inner.gens, start: lock(&inner.gens).begin() };
        let mut ran = false;
        let init = async {
            ran = true;
            let value = loader().await.map_err(|e| Failure::Loader(Arc::new(e)))?;
            if lock(&inner.gens).stale(started.start, load) {
                return Err(Failure::Stale(value));
            }
            Ok(Arc::new(Entry {
                cache: Arc::from(load.cache.as_str()),
                tags: load.tags.clone().into_boxed_slice(),
                value,
                ttl: self.jittered_ttl(),
            }))
        };
        let result = inner.entries.try_get_with(Arc::clone(&key), init).await;
        match result {
            Ok(entry) => {
                if ran {
                    self.index(&key, &entry.tags);
                    // An invalidation recorded between the check above and
                    // moka's insert: the entry is in, take it out again.
                    if lock(&inner.gens).stale(started.start, load) {
                        inner.entries.invalidate(&key).await;
                        inner.stats.fill_rejected();
                    }
                }
                Ok(entry.value.clone())
            }
            Err(failure) => match &*failure {
                Failure::Stale(value) => {
                    if ran {
                        inner.stats.fill_rejected();
                    }
                    Ok(value.clone())
                }
                Failure::Loader(e) => Err(Arc::clone(e)),
            },
        }
    }

    /// The local value of `key`, if cached (counted as a hit or a miss).
    pub async fn get(&self, key: &str) -> Option<V> {
        let found = self.inner.entries.get(key).await;
        match &found {
            Some(_) => self.inner.stats.hit(),
            None => self.inner.stats.miss(),
        }
        found.map(|e| e.value.clone())
    }

    /// Drops `keys`.
    pub async fn drop_keys(&self, keys: &[String]) {
        lock(&self.inner.gens).keys(keys.iter().map(String::as_str));
        for key in keys {
            self.inner.entries.invalidate(key.as_str()).await;
        }
        if !keys.is_empty() {
            self.dropped(Dropped::Keys(keys));
        }
    }

    /// Drops every entry loaded under one of `tags`.
    pub async fn drop_tags(&self, tags: &[String]) {
        lock(&self.inner.gens).tags(tags.iter().map(String::as_str));
        let keys: Vec<Arc<str>> = {
            let mut index = lock(&self.inner.tag_index);
            tags.iter().filter_map(|t| index.remove(t)).flatten().collect()
        };
        for key in keys {
            self.inner.entries.invalidate(&key).await;
        }
        if !tags.is_empty() {
            self.dropped(Dropped::Tags(tags));
        }
    }

    /// Drops every entry of `caches`.
    pub fn drop_caches(&self, caches: &[String]) {
        if caches.is_empty() {
            return;
        }
        lock(&self.inner.gens).caches(caches.iter().map(String::as_str));
        let names: HashSet<String> = caches.iter().cloned().collect();
        let dropped = self.inner.entries.invalidate_entries_if(move |_, e| names.contains(&*e.cache));
        if dropped.is_err() {
            // Cannot happen: the builder enables invalidation closures.
            self.inner.entries.invalidate_all();
        }
        self.dropped(Dropped::Caches(caches));
    }

    /// Drops every entry loaded under any tag (a gap repair whose missed
    /// messages named tags).
    pub fn drop_tagged(&self) {
        let mut gens = lock(&self.inner.gens);
        gens.tagged = gens.next();
        drop(gens);
        lock(&self.inner.tag_index).clear();
        if self.inner.entries.invalidate_entries_if(|_, e| !e.tags.is_empty()).is_err() {
            self.inner.entries.invalidate_all();
        }
        self.dropped(Dropped::Tagged);
    }

    /// Drops everything.
    pub fn flush(&self) {
        let mut gens = lock(&self.inner.gens);
        gens.all = gens.next();
        drop(gens);
        self.inner.entries.invalidate_all();
        lock(&self.inner.tag_index).clear();
        self.dropped(Dropped::All);
    }

    fn dropped(&self, what: Dropped<'_>) {
        if let Some(f) = &self.inner.on_drop {
            f(what);
        }
    }

    /// Whether `key` has a live entry (not counted as a hit or a miss).
    pub fn contains(&self, key: &str) -> bool {
        self.inner.entries.contains_key(key)
    }

    /// The counters, shared with the cache's subscriber.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.inner.stats)
    }

    /// Entries cached (approximate until moka's pending work runs).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// The longest local TTL an entry can get: base + jitter.
    pub fn max_ttl(&self) -> Duration {
        self.inner.ttl + self.inner.jitter
    }

    pub fn redis_ttl(&self) -> Option<Duration> {
        self.inner.redis_ttl
    }

    fn jittered_ttl(&self) -> Duration {
        let jitter = self.inner.jitter.as_micros().min(u128::from(u64::MAX)) as u64;
        self.inner.ttl + Duration::from_micros(fastrand::u64(0..=jitter))
    }

    /// Adds `key` under `tags`; rebuilds the index from the cache's entries
    /// when it has grown well past them (keys evicted meanwhile).
    fn index(&self, key: &Arc<str>, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let mut index = lock(&self.inner.tag_index);
        for tag in tags {
            index.entry(tag.clone()).or_default().insert(Arc::clone(key));
        }
        let limit = 2 * self.inner.entries.entry_count().max(1024);
        if index.len() as u64 > limit {
            index.clear();
            for (key, entry) in self.inner.entries.iter() {
                for tag in &entry.tags {
                    index.entry(tag.clone()).or_default().insert(Arc::clone(&key));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache() -> LocalCache<String> {
        LocalCache::builder().ttl(Duration::from_secs(60), Duration::ZERO).build()
    }

    async fn value(v: &str) -> Result<String, Infallible> {
        Ok(v.to_owned())
    }

    #[tokio::test]
    async fn on_drop_hears_every_invalidation_after_its_entries_are_gone() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let c: LocalCache<String> = {
            let heard = Arc::clone(&heard);
            LocalCache::builder()
                .ttl(Duration::from_secs(60), Duration::ZERO)
                .on_drop(move |what| lock(&heard).push(format!("{what:?}")))
                .build()
        };
        let a = Load::new("users", "user:1");
        c.get_or_load(&a, || value("a")).await.unwrap();
        assert!(c.contains("user:1"));
        let hits = c.stats().snapshot().hits;
        c.drop_keys(&["user:1".to_owned()]).await;
        assert!(!c.contains("user:1"), "gone before the hook runs");
        assert_eq!(c.stats().snapshot().hits, hits, "contains counts nothing");
        c.drop_keys(&[]).await;
        c.drop_tags(&["t".to_owned()]).await;
        c.drop_caches(&["users".to_owned()]);
        c.drop_tagged();
        c.flush();
        assert_eq!(
            *lock(&heard),
            [r#"Keys(["user:1"])"#, r#"Tags(["t"])"#, r#"Caches(["users"])"#, "Tagged", "All"],
            "an empty list is no invalidation"
        );
    }

    #[tokio::test]
    async fn a_second_read_is_a_hit_and_keys_tags_and_caches_drop_entries() {
        let c = cache();
        let profile = Load::new("user_profile", "user:{1}:profile").tags(["user:1"]);
        let feed = Load::new("feed", "feed:{1}");
        assert_eq!(c.get_or_load(&profile, || value("a")).await.unwrap(), "a");
        assert_eq!(c.get_or_load(&profile, || value("b")).await.unwrap(), "a", "a hit");
        c.get_or_load(&feed, || value("f")).await.unwrap();
        c.drop_tags(&["user:1".into()]).await;
        assert_eq!(c.get("user:{1}:profile").await, None, "dropped by its tag");
        assert_eq!(c.get("feed:{1}").await.as_deref(), Some("f"));
        c.drop_caches(&["feed".into()]);
        assert_eq!(c.get("feed:{1}").await, None, "dropped with its cache");
        c.get_or_load(&feed, || value("g")).await.unwrap();
        c.drop_keys(&["feed:{1}".into()]).await;
        assert_eq!(c.get("feed:{1}").await, None, "dropped by key");
        let s = c.stats().snapshot();
        assert_eq!((s.hits, s.fills_rejected), (2, 0));
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_key_run_one_loader() {
        let c = cache();
        let runs = Arc::new(AtomicUsize::new(0));
        let load = Load::new("c", "k");
        let reads = (0..16).map(|_| {
            let (c, runs, load) = (c.clone(), Arc::clone(&runs), load.clone());
            tokio::spawn(async move {
                c.get_or_load(&load, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>("v".to_owned())
                })
                .await
                .unwrap()
            })
        });
        for read in reads.collect::<Vec<_>>() {
            assert_eq!(read.await.unwrap(), "v");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// The local fill guard: an invalidation of the key, one of its tags or
    /// its cache that arrives while the loader reads is not overwritten by
    /// what the loader read.
    #[tokio::test]
    async fn a_fill_that_raced_an_invalidation_is_served_but_not_kept() {
        for what in ["key", "tag", "cache", "tagged", "flush"] {
            let c = cache();
            let load = Load::new("user_profile", "user:{1}:profile").tags(["user:1"]);
            let c2 = c.clone();
            let got = c
                .get_or_load(&load, || async move {
                    match what {
                        "key" => c2.drop_keys(&["user:{1}:profile".into()]).await,
                        "tag" => c2.drop_tags(&["user:1".into()]).await,
                        "cache" => c2.drop_caches(&["user_profile".into()]),
                        "tagged" => c2.drop_tagged(),
                        _ => c2.flush(),
                    }
                    Ok::<_, Infallible>("old".to_owned())
                })
                .await
                .unwrap();
            assert_eq!(got, "old", "{what}: served");
            assert_eq!(c.get("user:{1}:profile").await, None, "{what}: not kept");
            assert_eq!(c.stats().snapshot().fills_rejected, 1, "{what}");
        }
    }

    #[tokio::test]
    async fn an_invalidation_of_something_else_does_not_refuse_a_fill() {
        let c = cache();
        let load = Load::new("user_profile", "user:{1}:profile").tags(["user:1"]);
        let c2 = c.clone();
        c.get_or_load(&load, || async move {
            c2.drop_keys(&["user:{2}:profile".into()]).await;
            c2.drop_tags(&["user:2".into()]).await;
            c2.drop_caches(&["feed".into()]);
            Ok::<_, Infallible>("v".to_owned())
        })
        .await
        .unwrap();
        assert_eq!(c.get("user:{1}:profile").await.as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn a_loader_error_reaches_the_caller_and_caches_nothing() {
        let c = cache();
        let load = Load::new("c", "k");
        let err = c.get_or_load(&load, || async { Err::<String, _>("db down") }).await.unwrap_err();
        assert_eq!(*err, "db down");
        assert_eq!(c.get("k").await, None);
    }

    #[tokio::test]
    async fn ttls_are_jittered_within_base_and_base_plus_jitter() {
        let c: LocalCache<String> = LocalCache::builder().ttl(Duration::from_secs(10), Duration::from_secs(10)).build();
        let ttls: Vec<Duration> = (0..200).map(|_| c.jittered_ttl()).collect();
        assert!(ttls.iter().all(|t| *t >= Duration::from_secs(10) && *t <= Duration::from_secs(20)));
        assert!(ttls.iter().any(|t| *t != ttls[0]), "not all the same");
        assert_eq!(c.max_ttl(), Duration::from_secs(20));
    }

    #[tokio::test]
    async fn the_bound_in_weight_evicts() {
        let c: LocalCache<String> = LocalCache::builder().max_weight(100, |v: &String| v.len() as u32).build();
        for i in 0..50 {
            let load = Load::new("c", format!("k{i}"));
            c.get_or_load(&load, || async { Ok::<_, Infallible>("x".repeat(20)) }).await.unwrap();
        }
        c.inner.entries.run_pending_tasks().await;
        assert!(c.inner.entries.weighted_size() <= 100, "{}", c.inner.entries.weighted_size());
    }

    #[test]
    fn generations_are_kept_only_while_loads_are_in_flight() {
        let mut g = Generations::default();
        g.keys(["a"]);
        assert!(g.keys.is_empty(), "no load in flight: nothing to remember");
        let start = g.begin();
        g.keys(["a"]);
        assert!(g.stale(start, &Load::new("c", "a")));
        assert!(!g.stale(start, &Load::new("c", "b")));
        g.end(start);
        assert!(g.keys.is_empty());
    }
}
