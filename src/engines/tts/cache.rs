//! A small in-memory cache of synthesized prompts (least recently used out), so fixed prompts
//! such as the greeting start playing at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{STREAM_DEPTH, Tts, TtsError, TtsStream, ready_stream};

type Key = (String, u32);

/// Wraps a synthesizer with an LRU cache of whole clips.
pub struct CachedTts {
    inner: Arc<dyn Tts>,
    capacity: usize,
    state: Arc<Mutex<Lru>>,
}

#[derive(Default)]
struct Lru {
    map: HashMap<Key, Arc<Vec<i16>>>,
    order: VecDeque<Key>,
    hits: u64,
    misses: u64,
}

impl Lru {
    fn get(&mut self, k: &Key) -> Option<Arc<Vec<i16>>> {
        let v = self.map.get(k).cloned()?;
        if let Some(pos) = self.order.iter().position(|x| x == k) {
            self.order.remove(pos);
        }
        self.order.push_back(k.clone());
        Some(v)
    }

    fn put(&mut self, k: Key, v: Arc<Vec<i16>>, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

impl CachedTts {
    pub fn new(inner: Arc<dyn Tts>, capacity: usize) -> Self {
        Self {
            inner,
            capacity,
            state: Arc::new(Mutex::new(Lru::default())),
        }
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        self.state
            .lock()
            .map(|s| (s.hits, s.misses))
            .unwrap_or((0, 0))
    }

    /// Synthesizes `text` now so it is cached before a call needs it.
    pub async fn warm(&self, text: &str, rate: u32) -> Result<(), TtsError> {
        let mut s = self.synthesize(text, rate).await?;
        while let Some(chunk) = s.recv().await {
            chunk?;
        }
        Ok(())
    }
}

#[async_trait]
impl Tts for CachedTts {
    async fn synthesize(&self, text: &str, rate: u32) -> Result<TtsStream, TtsError> {
        let key = (text.to_string(), rate);
        if let Ok(mut s) = self.state.lock() {
            if let Some(clip) = s.get(&key) {
                s.hits += 1;
                return Ok(ready_stream(clip.as_ref().clone()));
            }
            s.misses += 1;
        }
        let mut upstream = self.inner.synthesize(text, rate).await?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let state = self.state.clone();
        let cap = self.capacity;
        tokio::spawn(async move {
            let mut whole = Vec::new();
            let mut ok = true;
            while let Some(chunk) = upstream.recv().await {
                if let Ok(c) = &chunk {
                    whole.extend_from_slice(c);
                } else {
                    ok = false;
                }
                if tx.send(chunk).await.is_err() {
                    // The listener went away (barge-in): do not cache a partial clip.
                    return;
                }
            }
            if ok && !whole.is_empty() {
                if let Ok(mut s) = state.lock() {
                    s.put(key, Arc::new(whole), cap);
                }
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

    async fn drain(mut s: TtsStream) -> Vec<i16> {
        let mut v = Vec::new();
        while let Some(c) = s.recv().await {
            v.extend(c.unwrap());
        }
        v
    }

    #[tokio::test]
    async fn second_request_is_served_from_cache_and_lru_evicts() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let cache = CachedTts::new(inner.clone(), 2);
        assert_eq!(
            drain(cache.synthesize("hello", 8000).await.unwrap()).await,
            vec![5; 10]
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert_eq!(
            drain(cache.synthesize("hello", 8000).await.unwrap()).await,
            vec![5; 10]
        );
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
        cache.warm("a", 8000).await.unwrap();
        cache.warm("b", 8000).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        drain(cache.synthesize("hello", 8000).await.unwrap()).await;
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            4,
            "hello was evicted by a and b"
        );
    }
}
