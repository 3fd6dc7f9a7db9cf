//! Engines that fail: an ASR server that is down, answers 500, hangs, or answers garbage.
//! The HTTP client turns each into a typed error (real sockets, a fake server each); a call
//! whose ASR fails that way says the fallback prompt to the end and then goes where config says
//! (a human, or a hangup), the record shows the error, and nothing panics. The calls run on
//! tokio's paused clock with in-process engines: seconds of call in milliseconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use sidecall::app::{Engines, SimulateArgs};
use sidecall::call::CallOutcome;
use sidecall::config::AsrConfig;
use sidecall::engines::asr::{Asr, AsrError, OpenAiAsr, Transcript};
use sidecall::engines::instant::InstantTts;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Fake {
    Down,
    Error500,
    Hang,
    Garbage,
}

/// Starts a fake ASR endpoint and returns its base URL.
async fn fake_asr(kind: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    match kind {
        Fake::Down => drop(listener),
        kind => {
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((mut sock, _)) = listener.accept().await {
                    // Read the whole request first, or the client sees a reset, not the answer.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), read_http_request(&mut sock))
                            .await;
                    let reply: &[u8] = match kind {
                        Fake::Error500 => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!",
                        Fake::Garbage => b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"tex\":1}",
                        _ => {
                            held.push(sock);
                            continue;
                        }
                    };
                    let _ = sock.write_all(reply).await;
                }
            });
        }
    }
    format!("http://127.0.0.1:{port}/v1")
}

#[tokio::test]
async fn asr_failures_are_typed_errors() {
    for (kind, want) in [
        (Fake::Down, "unreachable"),
        (Fake::Error500, "HTTP 500"),
        (Fake::Hang, "timed out"),
        (Fake::Garbage, "no `text`"),
    ] {
        let cfg = AsrConfig {
            url: fake_asr(kind).await,
            timeout_ms: 400,
            ..AsrConfig::default()
        };
        let asr = OpenAiAsr::new(&cfg, sidecall::net::http_client());
        let err = asr
            .transcribe(&[100i16; 1600], 16_000, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
}

/// An ASR engine that fails as the HTTP client reports each failure.
struct FailingAsr(Fake);

#[async_trait]
impl Asr for FailingAsr {
    async fn transcribe(
        &self,
        _audio: &[i16],
        _rate: u32,
        _hint: Option<&str>,
    ) -> Result<Transcript, AsrError> {
        Err(match self.0 {
            Fake::Down => AsrError::Connect {
                url: "http://127.0.0.1:9/v1".into(),
                message: "Connection refused".into(),
            },
            Fake::Error500 => AsrError::Http {
                status: 500,
                body: "oops!".into(),
            },
            Fake::Hang => {
                // The engine's whole budget passes (virtual time), then the timeout.
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                AsrError::Timeout(1_500)
            }
            Fake::Garbage => AsrError::BadResponse("no `text` in {\"tex\":1}".into()),
        })
    }
}

/// One call whose ASR fails as `kind`, on the paused clock; the caller says an order number.
async fn call_with(kind: Fake, call_extra: &str) -> Call {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), call_extra, "http://127.0.0.1:9/v1");
    let callers = vec![speak(dir.path(), "order", "five five four two one")];
    let engines = Engines {
        asr: Arc::new(FailingAsr(kind)),
        tts: Arc::new(InstantTts),
        cache: None,
        http: sidecall::net::http_client(),
        turn: None,
    };
    simulate_with(
        cfg,
        engines,
        dir.path(),
        SimulateArgs {
            callers,
            max_seconds: 45,
            ..Default::default()
        },
    )
    .await
}

fn assert_fallback(call: &Call, message_part: &str) {
    let err = call
        .first("error")
        .unwrap_or_else(|| panic!("no error record\n{}", call.dump()));
    assert_eq!(err["stage"], "asr");
    assert!(
        err["message"].as_str().unwrap().contains(message_part),
        "{err}"
    );
    assert!(
        call.said()
            .iter()
            .any(|s| s.contains("I am having technical trouble")),
        "{:#?}",
        call.said()
    );
    assert_eq!(
        call.outcome,
        CallOutcome::Transferred {
            target: "agent".into()
        },
        "{}",
        call.dump()
    );
    // The fallback prompt was heard to the end before the transfer.
    call.assert_last_reply_played_before("transfer");
}

#[tokio::test(start_paused = true)]
async fn asr_server_down() {
    assert_fallback(&call_with(Fake::Down, "").await, "unreachable");
}

#[tokio::test(start_paused = true)]
async fn asr_server_answers_500() {
    assert_fallback(&call_with(Fake::Error500, "").await, "HTTP 500");
}

#[tokio::test(start_paused = true)]
async fn asr_server_hangs() {
    assert_fallback(&call_with(Fake::Hang, "").await, "timed out");
}

#[tokio::test(start_paused = true)]
async fn asr_server_answers_garbage_json() {
    assert_fallback(&call_with(Fake::Garbage, "").await, "no `text`");
}

#[tokio::test(start_paused = true)]
async fn on_error_hangup_ends_the_call_after_the_fallback() {
    let call = call_with(Fake::Error500, "on_error = \"hangup\"").await;
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "asr_error".into()
        },
        "{}",
        call.dump()
    );
    call.assert_last_reply_played_before("hangup");
}
