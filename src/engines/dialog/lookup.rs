//! Lookups a flow makes: a record by key from a local JSON file or from an HTTP webhook
//! (GET with the key in the URL, JSON object back), each with a timeout. Files are parsed once
//! and kept until they change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::DialogError;

/// Parsed lookup files, kept until the file changes (its modification time or size).
type FileCache = Mutex<HashMap<PathBuf, (Option<SystemTime>, u64, Arc<Value>)>>;

fn file_cache() -> &'static FileCache {
    static CACHE: OnceLock<FileCache> = OnceLock::new();
    CACHE.get_or_init(FileCache::default)
}

/// Finds `key` in a JSON file holding an object of records (`{"55421": {...}}`). The file is
/// read and parsed once, off the async runtime, and again only when it changes.
pub async fn from_file(path: &Path, key: &str) -> Result<Option<Value>, DialogError> {
    let err = |e: &dyn std::fmt::Display| DialogError::Lookup(format!("{}: {e}", path.display()));
    let meta = tokio::fs::metadata(path).await.map_err(|e| err(&e))?;
    let (mtime, len) = (meta.modified().ok(), meta.len());
    let cached = file_cache()
        .lock()
        .ok()
        .and_then(|c| c.get(path).cloned())
        .filter(|(t, l, _)| *t == mtime && *l == len)
        .map(|(_, _, doc)| doc);
    let doc = match cached {
        Some(doc) => doc,
        None => {
            let p = path.to_path_buf();
            let doc = tokio::task::spawn_blocking(move || -> Result<Value, String> {
                let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
                serde_json::from_str(&text).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?;
            let doc = Arc::new(doc);
            if let Ok(mut c) = file_cache().lock() {
                c.insert(path.to_path_buf(), (mtime, len, doc.clone()));
            }
            doc
        }
    };
    Ok(doc.get(key).cloned())
}

/// GETs `url` (the key already filled in); 404 means not found; anything else non-2xx is an error.
pub async fn from_webhook(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Option<Value>, DialogError> {
    let resp = client
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| DialogError::Lookup(format!("{url}: {e}")))?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(DialogError::Lookup(format!(
            "{url}: HTTP {}",
            resp.status()
        )));
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|e| DialogError::Lookup(format!("{url}: {e}")))?;
    Ok(Some(v))
}
