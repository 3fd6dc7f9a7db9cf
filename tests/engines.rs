//! The HTTP engines against local fake servers: the ASR request carries what the API expects
//! (multipart WAV, model, language, prompt hint, bearer key); OpenAI-compatible TTS is read as a
//! stream (audio reaches the caller before the server has finished); `serve` answers /health and
//! /metrics.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::read_http_request;

use sidecall::config::{AsrConfig, TtsConfig};
use sidecall::engines::asr::{Asr, OpenAiAsr};
use sidecall::engines::tts::Tts;
use sidecall::engines::tts::openai::OpenAiTts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test]
async fn asr_request_has_the_openai_shape() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let req = read_http_request(&mut s).await;
        let body = b"{\"text\": \" five five four two one \"}";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let _ = tx.send(req);
    });
    let cfg = AsrConfig {
        url: format!("http://127.0.0.1:{port}/v1"),
        api_key: Some("sk-test".into()),
        ..AsrConfig::default()
    };
    let asr = OpenAiAsr::new(&cfg, sidecall::engines::http_client());
    let text = asr
        .transcribe(&vec![100i16; 1600], 16_000, Some("The caller says digits."))
        .await
        .unwrap()
        .text;
    assert_eq!(text, "five five four two one");
    let req = String::from_utf8_lossy(&rx.await.unwrap()).to_string();
    assert!(
        req.starts_with("POST /v1/audio/transcriptions HTTP/1.1"),
        "{req:.200}"
    );
    assert!(req.to_lowercase().contains("authorization: bearer sk-test"));
    for field in [
        "name=\"model\"\r\n\r\ntiny.en",
        "name=\"language\"\r\n\r\nen",
        "name=\"prompt\"\r\n\r\nThe caller says digits.",
    ] {
        assert!(req.contains(field), "missing {field:?}");
    }
    assert!(
        req.contains("filename=\"utterance.wav\"") && req.contains("RIFF"),
        "WAV file part"
    );
}

#[tokio::test]
async fn tts_stream_starts_before_the_server_finishes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let req = read_http_request(&mut s).await;
        assert!(String::from_utf8_lossy(&req).contains("\"response_format\":\"pcm\""));
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/pcm\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        // 1 s of 24 kHz audio in 10 chunks, 100 ms apart.
        for _ in 0..10 {
            let pcm: Vec<u8> = (0..2_400)
                .flat_map(|i| ((i % 50) as i16 * 100).to_le_bytes())
                .collect();
            s.write_all(format!("{:x}\r\n", pcm.len()).as_bytes())
                .await
                .unwrap();
            s.write_all(&pcm).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
    });
    let cfg = TtsConfig {
        engine: "openai".into(),
        url: format!("http://127.0.0.1:{port}/v1"),
        ..TtsConfig::default()
    };
    let tts = OpenAiTts::new(&cfg, sidecall::engines::http_client());
    let t0 = Instant::now();
    let mut stream = tts.synthesize("Hello there.", 16_000).await.unwrap();
    let first = stream.recv().await.unwrap().unwrap();
    let first_at = t0.elapsed();
    let mut total = first.len();
    while let Some(c) = stream.recv().await {
        total += c.unwrap().len();
    }
    let all_at = t0.elapsed();
    println!("first audio after {first_at:?}, all after {all_at:?}");
    assert!(!first.is_empty());
    assert!(
        first_at + Duration::from_millis(500) < all_at,
        "not streamed: first {first_at:?}, all {all_at:?}"
    );
    assert!(
        (total as i64 - 16_000).abs() <= 2,
        "1 s at 16 kHz, got {total}"
    );
}

/// A synthesis nobody listens to any more (barge-in, the call ended) ends its request at once,
/// through the prompt cache too: it does not hold a connection to a stalled server until the
/// TTS timeout.
#[tokio::test]
async fn a_synthesis_nobody_listens_to_ends_its_request_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_http_request(&mut s).await;
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/pcm\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let pcm = vec![0u8; 4_800];
        s.write_all(format!("{:x}\r\n", pcm.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&pcm).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
        // Then stall, and see when the client goes away.
        let mut buf = [0u8; 64];
        let t0 = Instant::now();
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(t0.elapsed());
    });
    let cfg = TtsConfig {
        engine: "openai".into(),
        url: format!("http://127.0.0.1:{port}/v1"),
        timeout_ms: 20_000,
        ..TtsConfig::default()
    };
    let inner: Arc<dyn Tts> = Arc::new(OpenAiTts::new(&cfg, sidecall::engines::http_client()));
    let tts = sidecall::engines::tts::cache::CachedTts::new(inner, 64, 1 << 20);
    let mut stream = tts.synthesize("Hello there.", 16_000).await.unwrap();
    assert!(stream.recv().await.unwrap().is_ok());
    drop(stream);
    let after = tokio::time::timeout(Duration::from_secs(10), closed_rx)
        .await
        .expect("the request was still open 10 s after nobody listened")
        .unwrap();
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
}

#[tokio::test]
async fn tts_http_error_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_http_request(&mut s).await;
        s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 11\r\n\r\nbad api key")
            .await
            .unwrap();
    });
    let cfg = TtsConfig {
        url: format!("http://127.0.0.1:{port}/v1"),
        ..TtsConfig::default()
    };
    let tts = OpenAiTts::new(&cfg, sidecall::engines::http_client());
    let e = tts.synthesize("Hi.", 8_000).await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("bad api key"), "{e}");
}

#[test]
fn serve_answers_health_and_metrics() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecall.example.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sidecall"))
        .args([
            "serve",
            "--config",
            example.to_str().unwrap(),
            "--admin-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let mut health = None;
    for _ in 0..100 {
        health = get("/health");
        if health.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = get("/metrics");
    let _ = child.kill();
    let _ = child.wait();
    let health = health.expect("serve never answered /health");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"status\":\"ok\""),
        "{health}"
    );
    let metrics = metrics.unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
}

#[tokio::test]
async fn digits_read_back_are_heard_as_digits_by_asr() {
    // The agent reads an order number back; what espeak-ng says, whisper hears as the same
    // digits (never "five dash five dash ...").
    let asr_cfg = AsrConfig {
        url: common::asr_url(),
        ..AsrConfig::default()
    };
    let asr = OpenAiAsr::new(&asr_cfg, sidecall::engines::http_client());
    let tts = sidecall::engines::tts::espeak::Espeak::new(&TtsConfig::default());
    for number in ["55421", "5551234567", "4815"] {
        let text = format!(
            "Did you say order {}?",
            sidecall::engines::dialog::entities::spell_digits(number)
        );
        let mut stream = tts.synthesize(&text, 16_000).await.unwrap();
        let mut audio = Vec::new();
        while let Some(chunk) = stream.recv().await {
            audio.extend(chunk.unwrap());
        }
        let heard = asr.transcribe(&audio, 16_000, None).await.unwrap().text;
        println!("{number}: said {text:?}, heard {heard:?}");
        assert!(
            !heard.to_lowercase().contains("dash"),
            "{number}: heard {heard:?}"
        );
        assert_eq!(
            sidecall::engines::dialog::entities::digits(&heard).as_deref(),
            Some(number),
            "{number}: said {text:?}, heard {heard:?}"
        );
    }
}

/// A fake ASR server that answers after `delay_ms`, saying it worked `processing_ms` of it.
async fn slow_asr_server(delay_ms: u64, processing_ms: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = read_http_request(&mut s).await;
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let body = b"{\"text\": \"yes\"}";
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-asr-processing-ms: {processing_ms}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            });
        }
    });
    port
}

/// An ASR client with one slot, on a server that answers after 300 ms having worked 200 ms.
async fn one_slot_asr() -> std::sync::Arc<OpenAiAsr> {
    let port = slow_asr_server(300, 200).await;
    let cfg = AsrConfig {
        url: format!("http://127.0.0.1:{port}/v1"),
        max_concurrent: 1,
        ..AsrConfig::default()
    };
    std::sync::Arc::new(OpenAiAsr::new(&cfg, sidecall::engines::http_client()))
}

#[tokio::test]
async fn asr_queue_wait_is_told_apart_from_processing() {
    // One slot, three callers at once: the later ones wait in sidecall's queue, and the wait
    // is reported as queue, not as a slow engine. The server's own figure splits its part.
    let asr = one_slot_asr().await;
    let load = asr.load().unwrap();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let asr = asr.clone();
        calls.push(tokio::spawn(async move {
            asr.transcribe(&[0i16; 1600], 16_000, None).await.unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(load.saturated(), "callers are waiting for the engine");
    assert_eq!(load.waiting.load(std::sync::atomic::Ordering::Relaxed), 2);
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.unwrap());
    }
    got.sort_by_key(|t| t.queue_ms);
    println!("{got:?}");
    for t in &got {
        assert_eq!(t.text, "yes");
        assert_eq!(t.process_ms, 200, "the server's own figure: {t:?}");
    }
    // 100 ms of each round trip was the server's queue; the second and third also waited for
    // one and two earlier requests (300 ms each) in sidecall. Lower bounds only: a busy machine
    // makes waits longer, never shorter.
    assert!(got[0].queue_ms >= 90, "{got:?}");
    assert!(got[1].queue_ms >= got[0].queue_ms + 280, "{got:?}");
    assert!(got[2].queue_ms >= got[1].queue_ms + 280, "{got:?}");
    assert_eq!(load.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(load.in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_request_dropped_while_waiting_for_the_engine_is_not_counted_for_ever() {
    let asr = one_slot_asr().await;
    let load = asr.load().unwrap();
    let a = asr.clone();
    let busy = tokio::spawn(async move { a.transcribe(&[0i16; 1600], 16_000, None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a = asr.clone();
    let waiting = tokio::spawn(async move { a.transcribe(&[0i16; 1600], 16_000, None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(load.waiting.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The caller hangs up: the call drops its ASR request while it waits for a slot.
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(load.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    busy.await.unwrap().unwrap();
    assert_eq!(load.in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// `serve` makes every fixed sentence of every flow before calls need it: a reprompt of a flow
/// that is not the default, and a retry's wording, come from the prompt cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixed_prompt_of_every_flow_is_made_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(dir.path(), "", "http://127.0.0.1:9/v1");
    let engines = sidecall::app::Engines::from_config(&cfg);
    let made = sidecall::app::warm_all(&cfg, &engines).await;
    let cache = engines.cache.clone().unwrap();
    let (hits, misses) = cache.stats();
    // The five example flows have 52 distinct fixed sentences.
    assert!(made >= 45, "only {made} sentences made");
    assert_eq!((hits, misses), (0, made as u64));
    for text in [
        "Please type your six digit account number on your keypad, then press pound.",
        "Please say the amount in dollars, for example fifty dollars.",
        "Sorry, I didn't catch that.",
        "You can also type it on your keypad, then press pound.",
    ] {
        let mut s = cache.synthesize(text, cfg.call.sample_rate).await.unwrap();
        let mut samples = 0;
        while let Some(chunk) = s.recv().await {
            samples += chunk.unwrap().len();
        }
        assert!(samples > 8_000, "{text}: {samples} samples");
    }
    assert_eq!(cache.stats(), (4, made as u64), "every one a cache hit");
}
