//! Self-test of the FreeSWITCH + mod_audio_stream emulator (tests/freeswitch_emu), with the real
//! ESL client crate sidecall uses (freeswitch-esl-tokio) and a tokio-tungstenite server.

mod freeswitch_emu;

use std::time::Duration;

use base64::Engine;
use freeswitch_emu::{FsCall, FsCallLog, FsEmulator, FsOptions, Module, Script};
use freeswitch_esl_tokio::{EslClient, EslEvent, EslEventStream, EventFormat};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ALL_EVENTS: &str = "CHANNEL_ANSWER CHANNEL_PARK CHANNEL_HANGUP_COMPLETE DTMF BACKGROUND_JOB PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE_COMPLETE CUSTOM mod_audio_stream::play mod_audio_stream::connect mod_audio_stream::disconnect mod_audio_stream::error mod_audio_stream::json";

fn name(e: &EslEvent) -> String {
    let n = e.header_str("Event-Name").unwrap_or("").to_string();
    match e.header_str("Event-Subclass") {
        Some(s) => format!("{n}/{s}"),
        None => n,
    }
}

fn h<'a>(e: &'a EslEvent, k: &str) -> &'a str {
    e.header_str(k).unwrap_or("")
}

/// The next event matching `pred` (others are skipped), or a panic after `ms`.
async fn wait_for(
    ev: &mut EslEventStream,
    ms: u64,
    what: &str,
    pred: impl Fn(&EslEvent) -> bool,
) -> EslEvent {
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(Ok(e))) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("ESL closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Every event until one matches `stop` (included).
async fn collect_until(
    ev: &mut EslEventStream,
    ms: u64,
    stop: impl Fn(&EslEvent) -> bool,
) -> Vec<EslEvent> {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(Ok(e))) => {
                let done = stop(&e);
                out.push(e);
                if done {
                    return out;
                }
            }
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => return out,
        }
    }
}

/// Every event within `ms`.
async fn drain(ev: &mut EslEventStream, ms: u64) -> Vec<EslEvent> {
    collect_until(ev, ms, |_| false).await
}

async fn esl(emu: &FsEmulator, events: &str) -> (EslClient, EslEventStream) {
    let (c, e) = EslClient::connect("127.0.0.1", emu.esl_port(), "ClueCon")
        .await
        .expect("ESL connect");
    c.subscribe_events_raw(EventFormat::Json, events)
        .await
        .expect("subscribe");
    (c, e)
}

fn playback_msg(file: &str, lock: bool, event_uuid: &str) -> EslEvent {
    let mut m = EslEvent::new();
    m.set_header("call-command", "execute");
    m.set_header("execute-app-name", "playback");
    m.set_header("execute-app-arg", file);
    if lock {
        m.set_header("event-lock", "true");
    }
    m.set_header("event-uuid", event_uuid);
    m
}

fn tone(ms: u32, rate: u32, amp: f32) -> Vec<i16> {
    (0..ms * rate / 1000)
        .map(|i| (amp * (i as f32 * 2.0 * std::f32::consts::PI * 440.0 / rate as f32).sin()) as i16)
        .collect()
}

async fn refused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// One WebSocket connection the emulator made to the test server.
struct Peer {
    head: String,
    rx: mpsc::UnboundedReceiver<Message>,
    tx: mpsc::UnboundedSender<Message>,
}

impl Peer {
    async fn next(&mut self, ms: u64) -> Option<Message> {
        timeout(Duration::from_millis(ms), self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// A tokio-tungstenite server that hands each connection over with its raw request head.
async fn ws_server() -> (u16, mpsc::UnboundedReceiver<Peer>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let head = loop {
                    let n = sock.peek(&mut buf).await.unwrap_or(0);
                    let s = String::from_utf8_lossy(&buf[..n]).to_string();
                    if s.contains("\r\n\r\n") || n == 0 {
                        break s;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                let Ok(ws) = tokio_tungstenite::accept_async(sock).await else {
                    return;
                };
                let (mut sink, mut src) = ws.split();
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
                tokio::spawn(async move {
                    while let Some(m) = out_rx.recv().await {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                let _ = tx.send(Peer {
                    head,
                    rx: in_rx,
                    tx: out_tx,
                });
                while let Some(Ok(m)) = src.next().await {
                    if in_tx.send(m).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esl_auth_subscriptions_dtmf_and_bgapi() {
    let emu = FsEmulator::start(FsOptions::default()).await;

    // Bad password: -ERR invalid, a disconnect notice, then the socket closes.
    assert!(
        EslClient::connect("127.0.0.1", emu.esl_port(), "wrong")
            .await
            .is_err()
    );
    let mut raw = TcpStream::connect(("127.0.0.1", emu.esl_port()))
        .await
        .unwrap();
    raw.write_all(b"auth nope\n\n").await.unwrap();
    let mut all = Vec::new();
    timeout(Duration::from_secs(2), raw.read_to_end(&mut all))
        .await
        .expect("closed after a bad password")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("Content-Type: auth/request\n\n"), "{all}");
    assert!(all.contains("Reply-Text: -ERR invalid\n\n"), "{all}");
    assert!(
        all.contains("Content-Type: text/disconnect-notice\n"),
        "{all}"
    );
    assert_eq!(emu.esl_connections(), 0);

    // A: DTMF after CUSTOM is taken as a subclass, so it is not subscribed (reply still +OK).
    let (_a, mut ea) = esl(
        &emu,
        "CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE CUSTOM mod_audio_stream::error DTMF",
    )
    .await;
    // B: event commands add up.
    let (b, mut eb) = esl(&emu, "CHANNEL_ANSWER").await;
    b.subscribe_events_raw(EventFormat::Json, "DTMF BACKGROUND_JOB")
        .await
        .unwrap();
    b.subscribe_events_raw(
        EventFormat::Json,
        "CHANNEL_HANGUP_COMPLETE CUSTOM mod_audio_stream::error",
    )
    .await
    .unwrap();
    assert_eq!(emu.esl_connections(), 2);

    let port = refused_port().await;
    let (uuid, log) = emu.place_call(FsCall {
        url: format!("ws://127.0.0.1:{port}/fs/{{uuid}}"),
        rate: 8000,
        script: Script {
            dtmf: vec![(200, "1#".into())],
            max_ms: 900,
            ..Script::default()
        },
        ..FsCall::default()
    });
    assert_eq!(emu.live_channels(), vec![uuid.clone()]);
    let is_end = |e: &EslEvent| name(e) == "CHANNEL_HANGUP_COMPLETE";
    let evs_a = collect_until(&mut ea, 4000, is_end).await;
    let evs_b = collect_until(&mut eb, 4000, is_end).await;
    let names_a: Vec<String> = evs_a.iter().map(name).collect();
    let names_b: Vec<String> = evs_b.iter().map(name).collect();
    assert_eq!(
        names_a,
        [
            "CHANNEL_ANSWER",
            "CUSTOM/mod_audio_stream::error",
            "CHANNEL_HANGUP_COMPLETE"
        ],
        "A sees no DTMF and no CHANNEL_PARK"
    );
    assert_eq!(
        names_b,
        [
            "CHANNEL_ANSWER",
            "CUSTOM/mod_audio_stream::error",
            "DTMF",
            "DTMF",
            "CHANNEL_HANGUP_COMPLETE"
        ]
    );
    for e in evs_a.iter().chain(&evs_b) {
        assert_eq!(h(e, "Unique-ID"), uuid);
        assert!(!h(e, "Core-UUID").is_empty() && !h(e, "Event-Date-Timestamp").is_empty());
    }
    // A refused port: ::error code 6 (about 20 ms after the start).
    let err: Value = serde_json::from_str(evs_b[1].body().unwrap()).unwrap();
    assert_eq!(err["status"], "error");
    assert_eq!(err["message"]["code"], 6);
    let digits: Vec<(&str, &str, &str)> = evs_b[2..4]
        .iter()
        .map(|e| {
            (
                h(e, "DTMF-Digit"),
                h(e, "DTMF-Duration"),
                h(e, "DTMF-Source"),
            )
        })
        .collect();
    assert_eq!(digits, [("1", "2000", "RTP"), ("#", "2000", "RTP")]);
    assert_eq!(h(&evs_b[4], "Hangup-Cause"), "NORMAL_CLEARING");
    {
        let l = log.lock().unwrap();
        assert!(l.ended && !l.stream_connected);
        assert!(l.stream_error.as_deref().unwrap().contains("\"code\":6"));
    }
    assert!(emu.live_channels().is_empty());

    // bgapi: +OK Job-UUID first, then the BACKGROUND_JOB with the output in its body.
    let r = b.bgapi(&format!("uuid_break {uuid} all")).await.unwrap();
    let job = r.job_uuid().expect("Job-UUID header").to_string();
    assert!(r.reply_text().unwrap().starts_with("+OK Job-UUID: "));
    let bg = wait_for(&mut eb, 2000, "BACKGROUND_JOB", |e| {
        name(e) == "BACKGROUND_JOB"
    })
    .await;
    assert_eq!(h(&bg, "Job-UUID"), job);
    assert_eq!(h(&bg, "Job-Command"), "uuid_break");
    assert_eq!(h(&bg, "Job-Command-Arg"), format!("{uuid} all"));
    assert_eq!(bg.body(), Some("-ERR No such channel!\n"));
    let r = b.api("bogus_cmd x").await.unwrap();
    assert_eq!(r.body(), Some("-ERR bogus_cmd Command not found!\n"));
    let r = b.api("status").await.unwrap();
    assert!(r.body().unwrap().contains("is ready"));

    // exit: +OK bye, a disconnect notice, the connection ends.
    let r = b.exit().await.unwrap();
    assert_eq!(r.reply_text(), Some("+OK bye"));
    let end = timeout(Duration::from_secs(2), async {
        while let Some(x) = eb.recv().await {
            let _ = x;
        }
    })
    .await;
    assert!(end.is_ok(), "the event stream ends after exit");
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_stream_play_json_and_kill() {
    let (ws_port, mut peers) = ws_server().await;
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(&emu, ALL_EVENTS).await;
    let meta = r#"{"callId":"c-1","from":"5551000"}"#;
    let (uuid, log) = emu.place_call(FsCall {
        url: format!("ws://127.0.0.1:{ws_port}/fs/{{uuid}}?token=t1"),
        rate: 16000,
        metadata: Some(meta.into()),
        variables: vec![("sidecall_agent".into(), "demo".into())],
        script: Script {
            turns: vec![tone(200, 16000, 5000.0)],
            max_ms: 20_000,
            ..Script::default()
        },
        ..FsCall::default()
    });
    let mut peer = timeout(Duration::from_secs(3), peers.recv())
        .await
        .expect("mod_audio_stream connects")
        .unwrap();
    // libwsc's handshake: no space after the colons, path and query kept, nothing offered.
    assert!(
        peer.head
            .starts_with(&format!("GET /fs/{uuid}?token=t1 HTTP/1.1\r\n")),
        "{}",
        peer.head
    );
    assert!(
        peer.head
            .contains(&format!("\r\nHost:127.0.0.1:{ws_port}\r\n"))
    );
    assert!(peer.head.contains("\r\nUpgrade:websocket\r\n"));
    assert!(
        peer.head
            .contains(&format!("\r\nOrigin:http://127.0.0.1:{ws_port}\r\n"))
    );
    assert!(
        !peer
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol")
    );
    assert!(
        !peer
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions")
    );

    // The metadata as one TEXT frame, then 640 B binary frames (16k mono), sent while silent.
    assert_eq!(peer.next(2000).await, Some(Message::text(meta)));
    let t0 = Instant::now();
    let mut frames = 0;
    while frames < 25 {
        match peer.next(2000).await {
            Some(Message::Binary(b)) => {
                assert_eq!(b.len(), 640);
                let s: Vec<i16> = b
                    .chunks(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect();
                assert!(
                    s.iter().all(|v| v.abs() <= 3),
                    "near-zero while the caller is silent"
                );
                frames += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(t0.elapsed() >= Duration::from_millis(300), "paced at 20 ms");

    let park = wait_for(&mut ev, 2000, "CHANNEL_PARK", |e| name(e) == "CHANNEL_PARK").await;
    assert_eq!(h(&park, "variable_sidecall_agent"), "demo");
    let conn = wait_for(&mut ev, 2000, "::connect", |e| {
        name(e) == "CUSTOM/mod_audio_stream::connect"
    })
    .await;
    assert_eq!(conn.body(), Some(r#"{"status":"connected"}"#));
    assert_eq!(h(&conn, "Unique-ID"), uuid);

    // streamAudio -> ::play with the file and the extra key, no audioData.
    let audio = tone(300, 16000, 8000.0);
    let b64 = base64::engine::general_purpose::STANDARD.encode(
        audio
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let msg = json!({"type": "streamAudio", "data": {"audioDataType": "raw", "sampleRate": 16000, "audioData": b64, "segment": "s1"}});
    peer.tx.send(Message::text(msg.to_string())).unwrap();
    peer.tx.send(Message::binary(vec![1u8, 2, 3])).unwrap(); // ignored silently
    let play = wait_for(&mut ev, 2000, "::play", |e| {
        name(e) == "CUSTOM/mod_audio_stream::play"
    })
    .await;
    let body: Value = serde_json::from_str(play.body().unwrap()).unwrap();
    let file = format!("/tmp/{uuid}_0.tmp.r16");
    assert_eq!(
        body,
        json!({"audioDataType": "raw", "sampleRate": 16000, "segment": "s1", "file": file})
    );
    assert_eq!(h(&play, "Unique-ID"), uuid);

    // sendmsg playback with event-lock: PLAYBACK_START, STOP done, EXECUTE_COMPLETE.
    let r = c
        .sendmsg(Some(&uuid), playback_msg(&file, true, "seg-1"))
        .await
        .unwrap();
    assert_eq!(r.reply_text(), Some("+OK"));
    let st = wait_for(&mut ev, 2000, "PLAYBACK_START", |e| {
        name(e) == "PLAYBACK_START"
    })
    .await;
    assert_eq!(h(&st, "Playback-File-Path"), file);
    let sp = wait_for(&mut ev, 3000, "PLAYBACK_STOP", |e| {
        name(e) == "PLAYBACK_STOP"
    })
    .await;
    assert_eq!(h(&sp, "Playback-Status"), "done");
    let done = wait_for(&mut ev, 2000, "EXECUTE_COMPLETE", |e| {
        name(e) == "CHANNEL_EXECUTE_COMPLETE"
    })
    .await;
    assert_eq!(h(&done, "Application-UUID"), "seg-1");
    assert_eq!(h(&done, "Application"), "playback");
    {
        let l = log.lock().unwrap();
        let loud = l.heard.iter().filter(|s| s.abs() > 2000).count();
        assert!(
            loud > 2000 && loud <= audio.len(),
            "the file was heard ({loud})"
        );
        assert_eq!(l.playbacks.len(), 1);
        assert_eq!(
            (l.playbacks[0].1.as_str(), l.playbacks[0].2.as_str()),
            (file.as_str(), "done")
        );
        assert!(l.stream_connected && l.metadata_sent);
    }

    // The caller answers 700 ms after the agent's audio stops: loud frames reach the server.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, peer.rx.recv()).await {
            Ok(Some(Message::Binary(b))) => {
                assert_eq!(b.len(), 640);
                if b.chunks(2)
                    .any(|c| i16::from_le_bytes([c[0], c[1]]).abs() > 2000)
                {
                    break;
                }
            }
            Ok(Some(_)) => {}
            other => panic!("the caller's turn never came: {other:?}"),
        }
    }
    assert_eq!(log.lock().unwrap().caller_spoke_at.len(), 1);

    // Anything else -> ::json with the raw text.
    peer.tx.send(Message::text("not json")).unwrap();
    let j = wait_for(&mut ev, 2000, "::json", |e| {
        name(e) == "CUSTOM/mod_audio_stream::json"
    })
    .await;
    assert_eq!(j.body(), Some("not json"));
    peer.tx
        .send(Message::text(r#"{"type":"streamAudio","data":{"audioDataType":"raw","sampleRate":44100,"audioData":"AAAA"}}"#))
        .unwrap();
    wait_for(&mut ev, 2000, "::json", |e| {
        name(e) == "CUSTOM/mod_audio_stream::json"
    })
    .await;
    assert_eq!(log.lock().unwrap().json_events, 2);

    // uuid_kill: CHANNEL_HANGUP_COMPLETE, then close 1000, and no ::disconnect.
    let r = c.api(&format!("uuid_kill {uuid} USER_BUSY")).await.unwrap();
    assert_eq!(r.body(), Some("+OK\n"));
    let hc = wait_for(&mut ev, 2000, "HANGUP_COMPLETE", |e| {
        name(e) == "CHANNEL_HANGUP_COMPLETE"
    })
    .await;
    assert_eq!(h(&hc, "Hangup-Cause"), "USER_BUSY");
    let close = loop {
        match peer.next(2000).await {
            Some(Message::Close(f)) => break f,
            Some(_) => {}
            None => panic!("no close frame"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));
    let rest = drain(&mut ev, 300).await;
    assert!(
        !rest.iter().any(|e| name(e).contains("::disconnect")),
        "no ::disconnect on hangup"
    );
    let l = log.lock().unwrap();
    assert_eq!(l.killed.as_deref(), Some("USER_BUSY"));
    assert!(l.ended);
    assert!(
        l.commands
            .iter()
            .any(|(_, c)| c.starts_with("sendmsg execute playback"))
    );
    assert!(l.commands.iter().any(|(_, c)| c.starts_with("uuid_kill")));
    drop(l);
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_nesting_queueing_and_break() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(
        &emu,
        "PLAYBACK_START PLAYBACK_STOP CHANNEL_EXECUTE_COMPLETE CHANNEL_HANGUP_COMPLETE",
    )
    .await;
    emu.add_file("/tmp/a.r16", 16000, tone(600, 16000, 6000.0));
    emu.add_file("/tmp/b.r16", 16000, tone(200, 16000, 6000.0));
    emu.add_file("/tmp/c.r8", 8000, tone(200, 8000, 6000.0));
    let port = refused_port().await;
    let (uuid, log) = emu.place_call(FsCall {
        url: format!("ws://127.0.0.1:{port}/"),
        rate: 16000,
        script: Script {
            max_ms: 30_000,
            ..Script::default()
        },
        ..FsCall::default()
    });
    let pb = |e: &EslEvent| {
        format!(
            "{} {}{}",
            name(e),
            match h(e, "Playback-File-Path") {
                "" => h(e, "Application-Data"),
                f => f,
            },
            match h(e, "Playback-Status") {
                "" => String::new(),
                s => format!(" {s}"),
            }
        )
    };
    let is = |n: &'static str| move |e: &EslEvent| name(e) == n;

    // Without event-lock the second playback nests: it starts at once, the first resumes.
    c.sendmsg(Some(&uuid), playback_msg("/tmp/a.r16", false, "a1"))
        .await
        .unwrap()
        .check()
        .unwrap();
    c.sendmsg(Some(&uuid), playback_msg("/tmp/b.r16", false, "b1"))
        .await
        .unwrap()
        .check()
        .unwrap();
    let evs: Vec<String> = collect_until(&mut ev, 4000, |e| {
        name(e) == "PLAYBACK_STOP" && h(e, "Playback-File-Path") == "/tmp/a.r16"
    })
    .await
    .iter()
    .filter(|e| name(e) != "CHANNEL_EXECUTE_COMPLETE")
    .map(pb)
    .collect();
    assert_eq!(
        evs,
        [
            "PLAYBACK_START /tmp/a.r16",
            "PLAYBACK_START /tmp/b.r16",
            "PLAYBACK_STOP /tmp/b.r16 done",
            "PLAYBACK_STOP /tmp/a.r16 done"
        ]
    );
    wait_for(
        &mut ev,
        1000,
        "EXECUTE_COMPLETE",
        is("CHANNEL_EXECUTE_COMPLETE"),
    )
    .await;
    assert_eq!(log.lock().unwrap().nested, 1);

    // With event-lock they queue; uuid_break all stops the current one and drops the rest
    // without any event.
    for (f, id) in [
        ("/tmp/a.r16", "a2"),
        ("/tmp/b.r16", "b2"),
        ("/tmp/c.r8", "c2"),
    ] {
        c.sendmsg(Some(&uuid), playback_msg(f, true, id))
            .await
            .unwrap()
            .check()
            .unwrap();
    }
    let s = wait_for(&mut ev, 2000, "START", is("PLAYBACK_START")).await;
    assert_eq!(h(&s, "Playback-File-Path"), "/tmp/a.r16");
    let r = c.api(&format!("uuid_break {uuid} all")).await.unwrap();
    assert_eq!(r.body(), Some("+OK\n"));
    let rest: Vec<String> = drain(&mut ev, 400).await.iter().map(pb).collect();
    assert_eq!(
        rest,
        [
            "PLAYBACK_STOP /tmp/a.r16 break",
            "CHANNEL_EXECUTE_COMPLETE /tmp/a.r16"
        ]
        .map(String::from),
    );
    assert_eq!(log.lock().unwrap().nested, 1, "event-lock does not nest");

    // Without `all`, the next queued file starts after the break.
    c.sendmsg(Some(&uuid), playback_msg("/tmp/a.r16", true, "a3"))
        .await
        .unwrap()
        .check()
        .unwrap();
    c.sendmsg(Some(&uuid), playback_msg("/tmp/c.r8", true, "c3"))
        .await
        .unwrap()
        .check()
        .unwrap();
    wait_for(&mut ev, 2000, "START", is("PLAYBACK_START")).await;
    c.bgapi(&format!("uuid_break {uuid}"))
        .await
        .unwrap()
        .check()
        .unwrap();
    let evs: Vec<String> = collect_until(&mut ev, 3000, |e| {
        name(e) == "PLAYBACK_STOP" && h(e, "Playback-File-Path") == "/tmp/c.r8"
    })
    .await
    .iter()
    .filter(|e| name(e) != "CHANNEL_EXECUTE_COMPLETE")
    .map(pb)
    .collect();
    assert_eq!(
        evs,
        [
            "PLAYBACK_STOP /tmp/a.r16 break",
            "PLAYBACK_START /tmp/c.r8",
            "PLAYBACK_STOP /tmp/c.r8 done"
        ]
    );

    // An unknown file: no PLAYBACK_* events, CHANNEL_EXECUTE_COMPLETE says FILE NOT FOUND.
    c.sendmsg(Some(&uuid), playback_msg("/tmp/nope.r16", true, "n1"))
        .await
        .unwrap()
        .check()
        .unwrap();
    let e = wait_for(&mut ev, 2000, "EXECUTE_COMPLETE", |e| {
        name(e) == "CHANNEL_EXECUTE_COMPLETE" && h(e, "Application-UUID") == "n1"
    })
    .await;
    assert_eq!(h(&e, "Application-Response"), "FILE NOT FOUND");

    let l = log.lock().unwrap().clone();
    assert_eq!(
        l.breaks.iter().map(|b| b.1).collect::<Vec<_>>(),
        [true, false]
    );
    let statuses: Vec<&str> = l.playbacks.iter().map(|p| p.2.as_str()).collect();
    assert_eq!(
        statuses,
        ["done", "done", "break", "break", "done", "notfound"]
    );
    // The 8 kHz file was played at the call's 16 kHz.
    assert!(l.heard.len() > 16000 / 2);

    emu.hangup(&uuid);
    let hc = wait_for(&mut ev, 2000, "HANGUP", is("CHANNEL_HANGUP_COMPLETE")).await;
    assert_eq!(h(&hc, "Hangup-Cause"), "NORMAL_CLEARING");
    assert!(emu.live_channels().is_empty());
    let r = c.api(&format!("uuid_break {uuid}")).await.unwrap();
    assert_eq!(r.body(), Some("-ERR No such channel!\n"));
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_restart_and_server_close() {
    // A server that accepts TCP and never answers the upgrade.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            keep.push(s);
        }
    });
    let (ws_port, mut peers) = ws_server().await;
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(&emu, ALL_EVENTS).await;
    let t0 = Instant::now();
    let (uuid, log) = emu.place_call(FsCall {
        url: format!("ws://127.0.0.1:{mute_port}/fs/{{uuid}}"),
        rate: 16000,
        variables: vec![("STREAM_HEART_BEAT".into(), "1".into())],
        script: Script {
            max_ms: 30_000,
            ..Script::default()
        },
        ..FsCall::default()
    });
    let err = wait_for(&mut ev, 4000, "::error", |e| {
        name(e) == "CUSTOM/mod_audio_stream::error"
    })
    .await;
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(800), "{waited:?}");
    let body: Value = serde_json::from_str(err.body().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"status": "error", "message": {"code": 10, "error": "Timeout"}})
    );
    assert!(log.lock().unwrap().stream_error.is_some());

    // Detached after ::error: stop fails, a new start works (here at 8k: 320 B frames).
    let api = |cmd: String| {
        let c = c.clone();
        async move { c.api(&cmd).await.unwrap().body().unwrap_or("").to_string() }
    };
    assert_eq!(
        api(format!("uuid_audio_stream {uuid} stop")).await,
        "-ERR Operation Failed\n"
    );
    assert_eq!(
        api(format!(
            "uuid_audio_stream {uuid} start ws://127.0.0.1:{ws_port}/again mono 11k"
        ))
        .await,
        "-ERR Operation Failed\n"
    );
    assert_eq!(
        api(format!(
            "uuid_audio_stream {uuid} start ws://127.0.0.1:{ws_port}/again mono 8k"
        ))
        .await,
        "+OK Success\n"
    );
    let mut peer = timeout(Duration::from_secs(3), peers.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(peer.head.starts_with("GET /again HTTP/1.1\r\n"));
    match peer.next(2000).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 320),
        other => panic!("{other:?}"),
    }
    wait_for(&mut ev, 2000, "::connect", |e| {
        name(e) == "CUSTOM/mod_audio_stream::connect"
    })
    .await;

    // The server closes: ::disconnect with its code and reason; still attached.
    peer.tx
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "bye".into(),
        })))
        .unwrap();
    let d = wait_for(&mut ev, 2000, "::disconnect", |e| {
        name(e) == "CUSTOM/mod_audio_stream::disconnect"
    })
    .await;
    let body: Value = serde_json::from_str(d.body().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"status": "disconnected", "message": {"code": 4001, "reason": "bye"}})
    );
    assert_eq!(log.lock().unwrap().stream_closed_by_app, Some(4001));
    let start = format!("uuid_audio_stream {uuid} start ws://127.0.0.1:{ws_port}/third mono 16k");
    assert_eq!(api(start.clone()).await, "-ERR Operation Failed\n");
    assert_eq!(
        api(format!("uuid_audio_stream {uuid} stop")).await,
        "+OK Success\n"
    );
    assert_eq!(api(start).await, "+OK Success\n");
    let mut peer = timeout(Duration::from_secs(3), peers.recv())
        .await
        .unwrap()
        .unwrap();
    match peer.next(2000).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 640),
        other => panic!("{other:?}"),
    }
    // Heartbeat: a PING "ping" every STREAM_HEART_BEAT seconds.
    let deadline = Instant::now() + Duration::from_millis(2500);
    loop {
        match tokio::time::timeout_at(deadline, peer.rx.recv()).await {
            Ok(Some(Message::Ping(p))) => {
                assert_eq!(&p[..], b"ping");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no ping: {other:?}"),
        }
    }
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_job_uuid_and_dropped_connections() {
    let emu = FsEmulator::start(FsOptions::default()).await;

    // Garbage must not hurt the server.
    let mut g = TcpStream::connect(("127.0.0.1", emu.esl_port()))
        .await
        .unwrap();
    let mut junk: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    junk.extend_from_slice(b"\n\nauth\n\n\x00\xff\n\n");
    g.write_all(&junk).await.unwrap();
    drop(g);

    // A client-chosen Job-UUID is honoured, the reply comes before the BACKGROUND_JOB.
    let mut raw = TcpStream::connect(("127.0.0.1", emu.esl_port()))
        .await
        .unwrap();
    raw.write_all(b"auth ClueCon\n\nevent json BACKGROUND_JOB\n\napi\n\nevent json\n\nbgapi status\nJob-UUID: my-job-1\n\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(3);
    while !String::from_utf8_lossy(&got).contains("\"_body\"") {
        let n = tokio::time::timeout_at(deadline, raw.read(&mut buf))
            .await
            .expect("BACKGROUND_JOB arrives")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got).to_string();
    let i_cmd = got
        .find("Reply-Text: -ERR command not found\n\n")
        .expect(&got);
    let i_kw = got
        .find("Reply-Text: -ERR no keywords supplied\n\n")
        .expect(&got);
    let i_reply = got
        .find("Reply-Text: +OK Job-UUID: my-job-1\nJob-UUID: my-job-1\n\n")
        .expect(&got);
    let i_ev = got.find("Content-Type: text/event-json\n\n").expect(&got);
    assert!(i_cmd < i_kw && i_kw < i_reply && i_reply < i_ev, "{got}");
    let json_start = got[i_ev..].find('{').unwrap() + i_ev;
    let ev: Value = serde_json::from_str(&got[json_start..]).unwrap();
    assert_eq!(ev["Job-UUID"], "my-job-1");
    assert_eq!(ev["Job-Command"], "status");
    assert!(
        ev.as_object().unwrap().values().all(|v| v.is_string()),
        "all values are strings"
    );

    // drop_esl_connections cuts everyone; new connections work.
    let (c1, mut e1) = esl(&emu, "CHANNEL_ANSWER").await;
    let before = emu.esl_connections();
    emu.drop_esl_connections();
    let ended = timeout(Duration::from_secs(2), async {
        while e1.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the client sees the connection drop");
    assert!(c1.api("status").await.is_err());
    let (c2, _e2) = esl(&emu, "CHANNEL_ANSWER").await;
    assert!(
        c2.api("status")
            .await
            .unwrap()
            .body()
            .unwrap()
            .contains("ready")
    );
    assert_eq!(emu.esl_connections(), before + 1);
    emu.stop();
}

// ---------------------------------------------------------------------------------------------
// jambonz mod_audio_fork (bidirectional)

const FORK_EVENTS: &str = "CHANNEL_HANGUP_COMPLETE PLAYBACK_START PLAYBACK_STOP CUSTOM mod_audio_fork::connect mod_audio_fork::connect_failed mod_audio_fork::disconnect mod_audio_fork::kill_audio mod_audio_fork::transcription mod_audio_fork::json";

/// A server like `ws_server` whose 101 echoes `proto` in Sec-WebSocket-Protocol when set.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn fork_server(proto: Option<&'static str>) -> (u16, mpsc::UnboundedReceiver<Peer>) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let head = loop {
                    let n = sock.peek(&mut buf).await.unwrap_or(0);
                    let s = String::from_utf8_lossy(&buf[..n]).to_string();
                    if s.contains("\r\n\r\n") || n == 0 {
                        break s;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                let cb = move |_: &Request, mut r: Response| {
                    if let Some(p) = proto {
                        r.headers_mut()
                            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
                    }
                    Ok(r)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(sock, cb).await else {
                    return;
                };
                let (mut sink, mut src) = ws.split();
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
                tokio::spawn(async move {
                    while let Some(m) = out_rx.recv().await {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                let _ = tx.send(Peer {
                    head,
                    rx: in_rx,
                    tx: out_tx,
                });
                while let Some(Ok(m)) = src.next().await {
                    if in_tx.send(m).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, rx)
}

impl Peer {
    /// TEXT messages received within `ms` (binary frames skipped), with their arrival time.
    async fn texts(&mut self, ms: u64) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let Message::Text(t) = m {
                out.push((Instant::now(), t.to_string()));
            }
        }
        out
    }

    /// The next TEXT message within `ms`.
    async fn text(&mut self, ms: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Message::Text(t))) => return Some(t.to_string()),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }

    fn audio(&self, samples: &[i16]) {
        let b: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.tx.send(Message::binary(b)).unwrap();
    }

    fn mark(&self, name: &str) {
        let m = json!({"type": "mark", "data": {"name": name}});
        self.tx.send(Message::text(m.to_string())).unwrap();
    }
}

fn mark_reply(name: &str, ev: &str) -> String {
    format!("{{\"type\": \"mark\", \"data\": {{\"name\":\"{name}\", \"event\": \"{ev}\"}}}}")
}

fn fork_call(port: u16, rate: u32, silence: bool) -> FsCall {
    FsCall {
        url: format!("ws://127.0.0.1:{port}/fork/{{uuid}}"),
        rate,
        metadata: Some(r#"{"lab":400}"#.into()),
        variables: if silence {
            vec![("send_silence_when_idle".into(), "-1".into())]
        } else {
            Vec::new()
        },
        script: Script {
            max_ms: 60_000,
            ..Script::default()
        },
        module: Module::AudioFork,
    }
}

async fn wait_played(log: &std::sync::Arc<std::sync::Mutex<FsCallLog>>, n: u64, ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while log.lock().unwrap().fork_samples_played < n {
        assert!(
            Instant::now() < deadline,
            "played {} < {n}",
            log.lock().unwrap().fork_samples_played
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_handshake_prebuffer_marks_kill_and_collision() {
    let (ws_port, mut peers) = ws_server().await; // its 101 does not echo the subprotocol
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(&emu, FORK_EVENTS).await;
    emu.add_file("/tmp/loud.r8", 8000, vec![30000; 16000]);
    let (uuid, log) = emu.place_call(fork_call(ws_port, 8000, true));
    let mut peer = timeout(Duration::from_secs(3), peers.recv())
        .await
        .expect("mod_audio_fork connects")
        .unwrap();
    // libwebsockets' handshake: Host and Origin without the port, the subprotocol, nothing else.
    assert!(
        peer.head
            .starts_with(&format!("GET /fork/{uuid} HTTP/1.1\r\n")),
        "{}",
        peer.head
    );
    for h in [
        "\r\nHost: 127.0.0.1\r\n",
        "\r\nOrigin: http://127.0.0.1\r\n",
        "\r\nSec-WebSocket-Protocol: audio.drachtio.org\r\n",
        "\r\nConnection: Upgrade\r\n",
    ] {
        assert!(peer.head.contains(h), "{h} in {}", peer.head);
    }
    assert!(
        !peer
            .head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions")
    );
    assert_eq!(peer.next(2000).await, Some(Message::text(r#"{"lab":400}"#)));
    match peer.next(2000).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 320),
        other => panic!("{other:?}"),
    }
    let conn = wait_for(&mut ev, 2000, "::connect", |e| {
        name(e) == "CUSTOM/mod_audio_fork::connect"
    })
    .await;
    assert_eq!(h(&conn, "Unique-ID"), uuid);
    assert_eq!(conn.body(), None);

    // Pre-buffer: nothing plays below 1280 samples (8k, f = 1); an odd byte waits for the next
    // message.
    let mut b: Vec<u8> = [1000i16; 1000]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    b.push(0xe8); // the low byte of a 1000 sample
    peer.tx.send(Message::binary(b)).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(log.lock().unwrap().fork_samples_played, 0);
    let mut b = vec![0x03u8]; // ...and its high byte
    b.extend([1000i16; 399].iter().flat_map(|s| s.to_le_bytes()));
    peer.tx.send(Message::binary(b)).unwrap();
    wait_played(&log, 1400, 1000).await;
    // Then each batch needs 640 samples: 600 wait, 100 more release all 700.
    peer.audio(&[1000; 600]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(log.lock().unwrap().fork_samples_played, 1400);
    peer.audio(&[1000; 100]);
    wait_played(&log, 2100, 1000).await;
    assert_eq!(log.lock().unwrap().fork_bytes_received, 4200);
    {
        let l = log.lock().unwrap();
        assert_eq!(l.heard.iter().filter(|&&s| s == 1000).count(), 2100);
    }

    // A mark behind 1 s of audio: answered when the play-out buffer runs dry.
    let t_sent = Instant::now();
    for _ in 0..10 {
        peer.audio(&[2000; 800]);
    }
    peer.mark("M1");
    let r = peer.text(3000).await.expect("M1 answered");
    assert_eq!(r, mark_reply("M1", "playout"));
    let waited = t_sent.elapsed();
    assert!(
        waited >= Duration::from_millis(850) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );

    // Mixed into what FreeSWITCH plays (i16 wrap-around), not substituted; killAudio breaks the
    // playback, fires ::kill_audio, empties the play-out buffer on the next frame and answers
    // the pending mark `cleared`.
    c.sendmsg(Some(&uuid), playback_msg("/tmp/loud.r8", false, "p1"))
        .await
        .unwrap()
        .check()
        .unwrap();
    for _ in 0..30 {
        peer.audio(&[10000; 800]);
    }
    peer.mark("K1");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        log.lock()
            .unwrap()
            .heard
            .contains(&30000i16.wrapping_add(10000)),
        "30000 + 10000 wraps"
    );
    let before = log.lock().unwrap().fork_samples_played;
    peer.tx
        .send(Message::text(r#"{"type":"killAudio"}"#))
        .unwrap();
    let k = wait_for(&mut ev, 2000, "::kill_audio", |e| {
        name(e) == "CUSTOM/mod_audio_fork::kill_audio"
    })
    .await;
    assert_eq!(k.body(), None);
    assert_eq!(h(&k, "Unique-ID"), uuid);
    let stop = wait_for(&mut ev, 2000, "PLAYBACK_STOP", |e| {
        name(e) == "PLAYBACK_STOP"
    })
    .await;
    assert_eq!(h(&stop, "Playback-Status"), "break");
    assert_eq!(
        peer.text(1000).await.as_deref(),
        Some(mark_reply("K1", "cleared").as_str())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = log.lock().unwrap().fork_samples_played;
    assert!(after - before < 5 * 160, "{before} -> {after}");
    {
        let l = log.lock().unwrap();
        assert_eq!(l.kills.len(), 1);
        assert_eq!(l.marks_answered.last().unwrap().2, "cleared");
    }

    // -1 samples are taken for markers: D2 (behind 1 s of -1) comes with D1, 1 s early; D3
    // comes when the buffer runs dry.
    let t0 = Instant::now();
    peer.mark("D1");
    peer.audio(&[-1; 8000]);
    peer.mark("D2");
    peer.audio(&[3000; 8000]);
    peer.mark("D3");
    let got = peer.texts(3000).await;
    let names: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        names,
        [
            mark_reply("D1", "playout"),
            mark_reply("D2", "playout"),
            mark_reply("D3", "playout")
        ]
    );
    assert!(got[1].0 - t0 < Duration::from_millis(300), "D2 early");
    assert!(got[2].0 - t0 > Duration::from_millis(1700), "D3 at the end");

    // Text messages: transcription -> its data; no type -> ::json with the whole message.
    peer.tx
        .send(Message::text(
            r#"{"type": "transcription", "data": {"text": "hi there", "final": true}}"#,
        ))
        .unwrap();
    let tr = wait_for(&mut ev, 2000, "::transcription", |e| {
        name(e) == "CUSTOM/mod_audio_fork::transcription"
    })
    .await;
    assert_eq!(tr.body(), Some(r#"{"text":"hi there","final":true}"#));
    peer.tx.send(Message::text(r#"{"foo": 1}"#)).unwrap();
    let js = wait_for(&mut ev, 2000, "::json", |e| {
        name(e) == "CUSTOM/mod_audio_fork::json"
    })
    .await;
    assert_eq!(js.body(), Some(r#"{"foo":1}"#));

    // 30 outstanding marks at most: behind 1 s of audio, X's marker goes to the pre-buffer with
    // 100 samples (< 640) and stays there, so the inventory never drains; the 31st is dropped;
    // clearMarks forgets them all without events.
    peer.audio(&[500; 8000]);
    peer.mark("X");
    peer.audio(&[500; 100]);
    for i in 1..=30 {
        peer.mark(&format!("Y{i}"));
    }
    assert!(peer.texts(1600).await.is_empty());
    assert_eq!(log.lock().unwrap().marks_dropped, 1);
    peer.tx
        .send(Message::text(r#"{"type":"clearMarks"}"#))
        .unwrap();
    assert!(peer.texts(300).await.is_empty());

    // stop_play via the API; hangup: CHANNEL_HANGUP_COMPLETE, then close 1000.
    let r = c
        .api(&format!("uuid_audio_fork {uuid} stop_play"))
        .await
        .unwrap();
    assert_eq!(r.body(), Some("+OK Success\n"));
    emu.hangup(&uuid);
    wait_for(&mut ev, 2000, "HANGUP", |e| {
        name(e) == "CHANNEL_HANGUP_COMPLETE"
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, peer.rx.recv()).await {
            Ok(Some(Message::Close(f))) => {
                let f = f.expect("a close frame");
                assert_eq!(u16::from(f.code), 1000);
                assert_eq!(f.reason.as_str(), "");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no close: {other:?}"),
        }
    }
    assert_eq!(log.lock().unwrap().stop_plays.len(), 1);
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_without_silence_plays_nothing_and_api() {
    let (ws_port, mut peers) = fork_server(Some("audio.drachtio.org")).await;
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(&emu, FORK_EVENTS).await;
    let (uuid, log) = emu.place_call(fork_call(ws_port, 16000, false));
    let mut peer = timeout(Duration::from_secs(3), peers.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peer.next(2000).await, Some(Message::text(r#"{"lab":400}"#)));
    match peer.next(2000).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 640),
        other => panic!("{other:?}"),
    }
    wait_for(&mut ev, 2000, "::connect", |e| {
        name(e) == "CUSTOM/mod_audio_fork::connect"
    })
    .await;
    // Parked without send_silence_when_idle: no frame is written, so nothing is heard and no
    // mark comes back.
    peer.mark("A0");
    for _ in 0..10 {
        peer.audio(&[4000; 1600]);
    }
    peer.mark("A");
    assert!(peer.texts(1500).await.is_empty());
    {
        let l = log.lock().unwrap();
        assert!(l.marks_answered.is_empty());
        assert_eq!(l.fork_samples_played, 0);
        assert!(l.heard.iter().all(|&s| s == 0));
        assert_eq!(l.fork_bytes_received, 32000);
    }

    // The API: usage, attach checks, stop then start again.
    let api = |cmd: String| {
        let c = c.clone();
        async move { c.api(&cmd).await.unwrap().body().unwrap_or("").to_string() }
    };
    assert!(
        api(format!("uuid_audio_fork {uuid}"))
            .await
            .starts_with("-USAGE: ")
    );
    assert_eq!(
        api(format!("uuid_audio_fork {uuid} pause")).await,
        "+OK Success\n"
    );
    assert_eq!(
        api(format!("uuid_audio_fork {uuid} pause otherbug")).await,
        "-ERR Operation Failed\n"
    );
    let start = format!(
        "uuid_audio_fork {uuid} start ws://127.0.0.1:{ws_port}/again mono 8k audio_fork {{\"n\":2}} true true 8000"
    );
    assert_eq!(
        api(start.clone()).await,
        "-ERR Operation Failed\n",
        "attached"
    );
    assert_eq!(
        api(format!("uuid_audio_fork {uuid} stop {{\"bye\":1}}")).await,
        "+OK Success\n"
    );
    assert_eq!(peer.text(1000).await.as_deref(), Some(r#"{"bye":1}"#));
    assert_eq!(
        api(format!("uuid_audio_fork {uuid} stop")).await,
        "-ERR Operation Failed\n"
    );
    assert_eq!(api(start).await, "+OK Success\n");
    let mut peer2 = timeout(Duration::from_secs(3), peers.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(peer2.head.starts_with("GET /again HTTP/1.1\r\n"));
    assert_eq!(peer2.next(2000).await, Some(Message::text(r#"{"n":2}"#)));
    match peer2.next(2000).await {
        Some(Message::Binary(b)) => assert_eq!(b.len(), 320, "8k requested on a 16k call"),
        other => panic!("{other:?}"),
    }
    // The server closes: ::disconnect without a body.
    peer2.tx.send(Message::Close(None)).unwrap();
    let d = wait_for(&mut ev, 2000, "::disconnect", |e| {
        name(e) == "CUSTOM/mod_audio_fork::disconnect"
    })
    .await;
    assert_eq!(d.body(), None);
    emu.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_connect_failed() {
    let emu = FsEmulator::start(FsOptions::default()).await;
    let (c, mut ev) = esl(&emu, FORK_EVENTS).await;
    let dead = refused_port().await;
    let (uuid, log) = emu.place_call(fork_call(dead, 8000, true));
    let e = wait_for(&mut ev, 3000, "::connect_failed", |e| {
        name(e) == "CUSTOM/mod_audio_fork::connect_failed"
    })
    .await;
    assert_eq!(h(&e, "Unique-ID"), uuid);
    let body: Value = serde_json::from_str(e.body().unwrap()).unwrap();
    assert!(!body["reason"].as_str().unwrap().is_empty(), "{body}");
    assert!(!log.lock().unwrap().stream_connected);
    assert!(log.lock().unwrap().stream_error.is_some());
    // The bug stays attached: stop works, then a server answering another subprotocol fails.
    let r = c
        .api(&format!("uuid_audio_fork {uuid} stop"))
        .await
        .unwrap();
    assert_eq!(r.body(), Some("+OK Success\n"));
    let (port, _peers) = fork_server(Some("other.proto")).await;
    let r = c
        .api(&format!(
            "uuid_audio_fork {uuid} start ws://127.0.0.1:{port}/x mono 8k audio_fork {{}} true true 8000"
        ))
        .await
        .unwrap();
    assert_eq!(r.body(), Some("+OK Success\n"));
    let e = wait_for(&mut ev, 3000, "::connect_failed", |e| {
        name(e) == "CUSTOM/mod_audio_fork::connect_failed"
    })
    .await;
    assert_eq!(e.body(), Some(r#"{"reason":"HS: PROTOCOL malformed"}"#));
    emu.stop();
}
