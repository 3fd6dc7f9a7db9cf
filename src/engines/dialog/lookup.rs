//! Lookups a flow makes: a record by key from a local JSON file or from an HTTP webhook
//! (GET with the key in the URL, JSON object back), each with a timeout.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::DialogError;

/// Finds `key` in a JSON file holding an object of records (`{"55421": {...}}`).
pub fn from_file(path: &Path, key: &str) -> Result<Option<Value>, DialogError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DialogError::Lookup(format!("{}: {e}", path.display())))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| DialogError::Lookup(format!("{}: {e}", path.display())))?;
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
