//! An in-memory cache of synthesized prompts, bounded in bytes (quick_cache, least recently and
//! frequently used out), so fixed prompts such as the greeting start playing at once. A clip
//! larger than an eighth of the cache is never kept, and is not even accumulated for keeping.

use std::sync::Arc;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::{STREAM_DEPTH, Tts, TtsError, TtsStream, ready_stream};

type Key = (String, u32);
type Clip = Arc<Vec<i16>>;

/// A clip weighs its bytes (and its text), at least 1.
#[derive(Clone)]
struct Bytes;

impl quick_cache::Weighter<Key, Clip> for Bytes {
    fn weight(&self, key: &Key, clip: &Clip) -> u64 {
        let bytes = clip.len().saturating_mul(2).saturating_add(key.0.len());
        u64::try_from(bytes).unwrap_or(u64::MAX).max(1)
    }
}

/// Wraps a synthesizer with a byte-bounded cache of whole clips.
pub struct CachedTts {
    inner: Arc<dyn Tts>,
    cache: Option<Arc<quick_cache::sync::Cache<Key, Clip, Bytes>>>,
    /// Samples of the largest clip that is kept.
    max_clip: usize,
    stats: Arc<std::sync::Mutex<(u64, u64)>>,
    /// Clips being made, by key: a second request for the same text waits for the first and
    /// plays it from the cache (a reply made ahead whose first sentence is still being made
    /// when the turn ends), instead of making it again.
    making: Making,
}

type Making = Arc<std::sync::Mutex<HashMap<Key, (u64, watch::Receiver<()>)>>>;

/// The longest a request waits for the same text being made by another.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// A clip being made: its key leaves `making` when this is dropped (made, failed or cut), which
/// wakes whoever waits for it.
struct MakingGuard {
    making: Making,
    key: Key,
    generation: u64,
    _done: watch::Sender<()>,
}

impl Drop for MakingGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.making.lock()
            && m.get(&self.key).is_some_and(|(g, _)| *g == self.generation)
        {
            m.remove(&self.key);
        }
    }
}

impl CachedTts {
    /// `entries`: about how many prompts; `max_bytes`: the most audio kept (0 turns it off).
    pub fn new(inner: Arc<dyn Tts>, entries: usize, max_bytes: u64) -> Self {
        let cache = (entries > 0 && max_bytes > 0).then(|| {
            Arc::new(quick_cache::sync::Cache::with_weighter(
                entries, max_bytes, Bytes,
            ))
        });
        Self {
            inner,
            cache,
            // An eighth of the budget, in samples of two bytes.
            max_clip: usize::try_from(max_bytes / 16).unwrap_or(usize::MAX),
            stats: Arc::default(),
            making: Arc::default(),
        }
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        self.stats.lock().map(|s| *s).unwrap_or((0, 0))
    }

    /// Synthesizes `text` now so it is cached before a call needs it (behind every caller's
    /// synthesis).
    pub async fn warm(&self, text: &str, rate: u32) -> Result<(), TtsError> {
        let mut s = self.fetch(text, rate, true).await?;
        while let Some(chunk) = s.recv().await {
            chunk?;
        }
        Ok(())
    }

    fn count(&self, hit: bool) {
        if let Ok(mut s) = self.stats.lock() {
            if hit {
                s.0 += 1;
            } else {
                s.1 += 1;
            }
        }
    }
}

#[async_trait]
impl Tts for CachedTts {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        self.fetch(text, rate, false).await
    }

    async fn synthesize_background(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        self.fetch(text, rate, true).await
    }
}

impl CachedTts {
    /// From the cache, else from the engine (kept when whole and small enough).
    async fn fetch(&self, text: &str, rate: u32, background: bool) -> Result<TtsStream, TtsError> {
        let upstream = |inner: Arc<dyn Tts>| async move {
            if background {
                inner.synthesize_background(text, rate).await
            } else {
                inner.synthesize(text, rate).await
            }
        };
        let Some(cache) = self.cache.clone() else {
            return upstream(self.inner.clone()).await;
        };
        let key = (text.to_string(), rate);
        if let Some(clip) = cache.get(&key) {
            self.count(true);
            return Ok(ready_stream(clip.as_ref().clone()));
        }
        let under_way = self
            .making
            .lock()
            .ok()
            .and_then(|m| m.get(&key).map(|(_, rx)| rx.clone()));
        if let Some(mut done) = under_way {
            // Ends when that synthesis does, however it ends.
            let _ = tokio::time::timeout(JOIN_LIMIT, done.changed()).await;
            if let Some(clip) = cache.get(&key) {
                self.count(true);
                return Ok(ready_stream(clip.as_ref().clone()));
            }
        }
        self.count(false);
        let (done_tx, done_rx) = watch::channel(());
        let generation = {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        if let Ok(mut m) = self.making.lock() {
            m.insert(key.clone(), (generation, done_rx));
        }
        let guard = MakingGuard {
            making: self.making.clone(),
            key: key.clone(),
            generation,
            _done: done_tx,
        };
        let mut upstream = upstream(self.inner.clone()).await?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let max_clip = self.max_clip;
        tokio::spawn(async move {
            // Dropped last: the clip is in the cache before anyone waiting is woken.
            let _making = guard;
            let mut whole = Vec::new();
            let mut keep = true;
            loop {
                // A listener that went away ends the upstream request at once, not at its end.
                let chunk = tokio::select! {
                    _ = tx.closed() => return,
                    c = upstream.recv() => c,
                };
                let Some(chunk) = chunk else { break };
                match &chunk {
                    Ok(c) if keep && whole.len().saturating_add(c.len()) <= max_clip => {
                        whole.extend_from_slice(c)
                    }
                    // Too long to keep (or failed): pass it on, keep nothing.
                    _ => {
                        keep = false;
                        whole = Vec::new();
                    }
                }
                if tx.send(chunk).await.is_err() {
                    // The listener went away (barge-in): do not cache a partial clip.
                    return;
                }
            }
            if keep && !whole.is_empty() {
                cache.insert(key, Arc::new(whole));
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    #[async_trait]
    impl Tts for Counting {
        async fn synthesize(&self, text: &str, _rate: u32) -> Result<TtsStream, TtsError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(ready_stream(vec![text.len() as i16; 10]))
        }
    }

    /// Takes 200 ms per synthesis.
    struct Slow(AtomicUsize);

    #[async_trait]
    impl Tts for Slow {
        async fn synthesize(&self, text: &str, _rate: u32) -> Result<TtsStream, TtsError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel(4);
            let n = i16::try_from(text.len()).unwrap_or(i16::MAX);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = tx.send(Ok(vec![n; 10])).await;
            });
            Ok(rx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_text_being_made_is_made_once_for_two_requests() {
        let inner = Arc::new(Slow(AtomicUsize::new(0)));
        let cache = Arc::new(CachedTts::new(inner.clone(), 16, 1 << 20));
        // A reply's first sentence made ahead, then asked for again while still being made.
        let first = cache.synthesize("It shipped.", 8000).await.unwrap();
        let c = cache.clone();
        let second =
            tokio::spawn(
                async move { drain(c.synthesize("It shipped.", 8000).await.unwrap()).await },
            );
        assert_eq!(drain(first).await, vec![11; 10]);
        assert_eq!(second.await.unwrap(), vec![11; 10]);
        assert_eq!(inner.0.load(Ordering::SeqCst), 1, "made once");
        // A first request cut short (a barge-in) leaves nobody waiting for ever.
        drop(cache.synthesize("Other text.", 8000).await.unwrap());
        let again = drain(cache.synthesize("Other text.", 8000).await.unwrap()).await;
        assert_eq!(again, vec![11; 10]);
    }

    async fn drain(mut s: TtsStream) -> Vec<i16> {
        let mut v = Vec::new();
        while let Some(c) = s.recv().await {
            v.extend(c.unwrap());
        }
        v
    }

    #[tokio::test]
    async fn second_request_is_served_from_cache_and_bytes_stay_bounded() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        // 400 bytes: a 10-sample clip weighs about 25 and may take up to 1/8 of it.
        let cache = CachedTts::new(inner.clone(), 4, 400);
        assert_eq!(
            drain(cache.synthesize("hello", 8000).await.unwrap()).await,
            vec![5; 10]
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(
            drain(cache.synthesize("hello", 8000).await.unwrap()).await,
            vec![5; 10]
        );
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            1,
            "the second came from the cache"
        );
        for i in 0..100 {
            cache.warm(&format!("prompt {i}"), 8000).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let c = cache.cache.as_ref().unwrap();
        assert!(c.weight() <= 400, "{} bytes kept", c.weight());
        assert!(c.len() >= 4, "it still keeps what fits: {}", c.len());
    }

    #[tokio::test]
    async fn clips_too_large_for_the_byte_budget_are_not_kept() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        // 10 samples are 20 bytes; a clip may take at most 1/8 of the budget.
        let cache = CachedTts::new(inner.clone(), 8, 100);
        cache.warm("hi", 8000).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drain(cache.synthesize("hi", 8000).await.unwrap()).await;
        assert_eq!(inner.0.load(Ordering::SeqCst), 2, "not cached");
        let cache = CachedTts::new(inner.clone(), 8, 1_000);
        cache.warm("hi", 8000).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drain(cache.synthesize("hi", 8000).await.unwrap()).await;
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            3,
            "kept: one more upstream call only"
        );
        assert_eq!(cache.stats(), (1, 1));
    }
}
