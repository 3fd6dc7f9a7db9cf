//! Engines that fail: an ASR server that is down, answers 500, or hangs. The caller hears the
//! fallback prompt, the call ends per config (transfer to a human here), the record shows the
//! error, and nothing panics. These need espeak-ng but no whisper server.

mod common;

use std::time::Duration;

use common::*;
use sidecall::app::SimulateArgs;
use sidecall::call::CallOutcome;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

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

async fn call_with(kind: Fake) -> Call {
    let url = fake_asr(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "", &url);
    cfg.asr.timeout_ms = 1_500;
    let callers = vec![speak(dir.path(), "order", "five five four two one")];
    simulate(
        cfg,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_server_down() {
    let call = call_with(Fake::Down).await;
    assert_fallback(&call, "unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_server_answers_500() {
    let call = call_with(Fake::Error500).await;
    assert_fallback(&call, "HTTP 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_server_hangs() {
    let call = call_with(Fake::Hang).await;
    assert_fallback(&call, "timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_server_answers_garbage_json() {
    let call = call_with(Fake::Garbage).await;
    assert_fallback(&call, "no `text`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_hangup_ends_the_call_after_the_fallback() {
    let url = fake_asr(Fake::Error500).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "on_error = \"hangup\"", &url);
    let callers = vec![speak(dir.path(), "order", "five five four two one")];
    let call = simulate(
        cfg,
        dir.path(),
        SimulateArgs {
            callers,
            max_seconds: 45,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        call.outcome,
        CallOutcome::AgentHungUp {
            reason: "asr_error".into()
        },
        "{}",
        call.dump()
    );
}
