//! The bottom layer every other module may use for the network: the one shared HTTP client,
//! the root cause of a wrapped error, and identifiers and credentials drawn from the operating
//! system's CSPRNG (never from the clock or a hash seed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A new HTTP client. Build one per process (`app::Engines` does) and clone it: clones share
/// one connection pool. Not a global: pooled connections belong to the runtime that opened them.
/// Timeouts are set per request.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(8)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

/// The innermost error message (reqwest wraps hyper wraps io), for logs and records.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `N` bytes from the OS CSPRNG. If the OS cannot give any (it always can on Linux after
/// boot), the process cannot make safe credentials: that is logged and the bytes are mixed
/// from std's randomly seeded hasher so ids stay unique, never all zero.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = getrandom::fill(&mut b) {
        tracing::error!(error = %e, "the OS random source failed; falling back to a seeded hash");
        use std::hash::{BuildHasher, Hasher};
        for chunk in b.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    b
}

/// 64 random bits (RTP SSRC, sequence and timestamp bases).
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

/// 128 random bits as 32 lowercase hex digits: always the same length, so no id can be a
/// prefix of another (Asterisk matches channel ids by prefix; see `pbx::asterisk::ids`).
pub fn random_hex128() -> String {
    hex(&random_bytes::<16>())
}

/// A random UUID (version 4 layout), e.g. for AudioSocket calls.
pub fn uuid_v4() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_string(&b)
}

/// 16 bytes in the UUID text form (8-4-4-4-12 lowercase hex); other lengths as plain hex.
pub fn uuid_string(b: &[u8]) -> String {
    let h = hex(b);
    if h.len() != 32 {
        return h;
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Compares a presented credential with the expected one in constant time.
pub fn credential_eq(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected))
}

/// Takes the entry registered under the credential a connection presented. Every pending
/// credential is compared, each in constant time, so the answer's timing says nothing about
/// how close a guess was.
pub fn claim<T>(pending: &mut HashMap<String, T>, presented: &str) -> Option<T> {
    let mut found = None;
    for k in pending.keys() {
        if credential_eq(presented.as_bytes(), k.as_bytes()) {
            found = Some(k.clone());
        }
    }
    found.and_then(|k| pending.remove(&k))
}

/// The door of a listener that the PBX connects to: at most `max` connections may be in their
/// handshake at once (more are closed at once), and each has `handshake` to prove who it is.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    pub handshake: Duration,
}

impl Gate {
    pub fn new(max: usize, handshake: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            handshake,
        }
    }

    /// A place for one handshake, or None when the listener is full.
    pub fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_length_and_distinct() {
        let a = random_hex128();
        let b = random_hex128();
        assert_eq!(a.len(), 32);
        assert_eq!(b.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4", "{u}");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(u, uuid_v4());
    }

    #[test]
    fn claims_only_the_exact_credential_and_only_once() {
        let mut m = HashMap::new();
        let a = random_hex128();
        m.insert(a.clone(), 1);
        m.insert(random_hex128(), 2);
        assert_eq!(
            claim(&mut m, &a[..31]),
            None,
            "a prefix is not the credential"
        );
        assert_eq!(claim(&mut m, "stranger"), None);
        assert_eq!(claim(&mut m, &a), Some(1));
        assert_eq!(claim(&mut m, &a), None, "used once");
        let g = Gate::new(1, Duration::from_secs(1));
        let p = g.enter();
        assert!(p.is_some());
        assert!(g.enter().is_none(), "full");
        drop(p);
        assert!(g.enter().is_some());
    }

    #[test]
    fn credentials_compare_whole() {
        assert!(credential_eq(b"abc", b"abc"));
        assert!(!credential_eq(b"abd", b"abc"));
        assert!(!credential_eq(b"ab", b"abc"));
        assert!(!credential_eq(b"", b"abc"));
    }
}
