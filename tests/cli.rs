//! The command line as an operator meets it: `check` names the bad key, its line and why;
//! `simulate` refuses bad audio files with a clear message and no panic.

use std::path::Path;
use std::process::Command;

fn sidecall(args: &[&str]) -> (bool, String) {
    // The file is what is under test: no overrides from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_sidecall"))
        .args(args)
        .env_remove("SIDECALL_ASR_URL")
        .env_remove("SIDECALL_TTS_URL")
        .env_remove("SIDECALL_LLM_URL")
        .env_remove("SIDECALL_TTS_ENGINE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn flows() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/flows")
        .display()
        .to_string()
}

fn base(flows_dir: &str) -> String {
    format!(
        "[dialog]\nflows_dir = \"{flows_dir}\"\n\n[transfers.agent]\ncontext = \"agents\"\nextension = \"s\"\n"
    )
}

#[test]
fn example_config_and_all_flows_check_ok() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecall.example.toml");
    let (ok, text) = sidecall(&["check", "--config", example.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "OK (5 flows: appointment, balance, order_status, payment, support; 1 agents: support)"
        ),
        "{text}"
    );
}

#[test]
fn check_refuses_an_agent_with_a_target_outside_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let flows = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/flows");
    std::fs::create_dir(dir.path().join("agents")).unwrap();
    std::fs::write(
        dir.path().join("agents/a.toml"),
        "system_prompt = \"Help.\"\n[transfers.sales]\ndescription = \"sales\"\n",
    )
    .unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        base(flows.to_str().unwrap()).replacen(
            "[dialog]\n",
            "[dialog]\nagents_dir = \"agents\"\n",
            1,
        ),
    )
    .unwrap();
    let (ok, text) = sidecall(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("a.toml")
            && text.contains("`sales` is not in the config's [transfers] allow-list"),
        "{text}"
    );
}

#[test]
fn check_names_key_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = base(&flows());
    let cases = [
        (
            format!("{b}\n[vad]\nend_silence_mss = 700\n"),
            "vad.end_silence_mss",
            "unknown field",
        ),
        (
            format!("{b}\n[vad]\nend_silence_ms = \"long\"\n"),
            "vad.end_silence_ms",
            "invalid type",
        ),
        (
            format!("{b}\n[call]\nsample_rate = 11025\n"),
            "call.sample_rate",
            "not 8000 or 16000",
        ),
        (
            format!("{b}\n[tts]\nengine = \"festival\"\n"),
            "tts.engine",
            "festival",
        ),
        (
            format!(
                "[dialog]\nflow = \"nope\"\nflows_dir = \"{}\"\n[transfers.agent]\nendpoint = \"PJSIP/1\"\n",
                flows()
            ),
            "dialog.flow",
            "cannot read",
        ),
        (
            format!("{b}\n[asr]\nurl = \"ftp://x\"\n"),
            "asr.url",
            "not an http(s) URL",
        ),
        (
            "[call]\nhuman_target = \"boss\"\n".into(),
            "call.human_target",
            "not a [transfers] entry",
        ),
    ];
    for (i, (toml, key, why)) in cases.iter().enumerate() {
        // The line of the offending key in the file.
        let leaf = key.rsplit('.').next().unwrap();
        let n = toml
            .lines()
            .position(|l| l.trim_start().starts_with(leaf))
            .unwrap()
            + 1;
        let line = format!(":{n}: ");
        let path = write(d, &format!("c{i}.toml"), toml);
        let (ok, text) = sidecall(&["check", "--config", &path]);
        assert!(!ok, "case {i} passed:\n{toml}");
        assert!(
            text.contains(key) && text.contains(&line) && text.contains(why),
            "case {i} ({line}): {text}"
        );
    }
    // Keys that exist in two sections, and numbers from outside: the error names the key in
    // its own section (an `asterisk.url` error pointed at `[asr] url` before).
    let twice = [
        (
            format!(
                "{b}\n[asr]\nurl = \"http://127.0.0.1:8765/v1\"\n\n[asterisk]\nurl = \"not a url\"\n"
            ),
            "asterisk.url",
            "not an http(s) URL",
        ),
        (
            format!(
                "{b}\n[asr]\ntimeout_ms = 100\n[call]\nmax_duration_s = 18446744073709551615\n"
            ),
            "call.max_duration_s",
            "outside 10..=86400",
        ),
        (
            format!("{b}\n[asterisk]\nshutdown_grace_s = 99999999999\n"),
            "asterisk.shutdown_grace_s",
            "outside 0..=3600",
        ),
        (
            format!("{b}\n[asterisk]\nmedia = \"rtp\"\nformat = \"slin16\"\n"),
            "asterisk.format",
            "use \"ulaw\"",
        ),
    ];
    for (i, (toml, key, why)) in twice.iter().enumerate() {
        let (section, leaf) = key.split_once('.').unwrap();
        let header = toml
            .lines()
            .position(|l| l.trim() == format!("[{section}]"))
            .unwrap();
        let n = header
            + toml
                .lines()
                .skip(header)
                .position(|l| l.trim_start().starts_with(leaf))
                .unwrap()
            + 1;
        let path = write(d, &format!("t{i}.toml"), toml);
        let (ok, text) = sidecall(&["check", "--config", &path]);
        assert!(!ok, "case {i} passed:\n{toml}");
        assert!(
            text.contains(key) && text.contains(&format!(":{n}: ")) && text.contains(why),
            "case {i} (line {n}): {text}"
        );
    }
    let (ok, text) = sidecall(&[
        "check",
        "--config",
        &d.join("absent.toml").display().to_string(),
    ]);
    assert!(!ok && text.contains("absent.toml: cannot read"), "{text}");
}

#[test]
fn check_rejects_a_flow_with_an_unknown_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flows_dir = d.join("flows");
    std::fs::create_dir(&flows_dir).unwrap();
    write(
        &flows_dir,
        "order_status.toml",
        "start = \"ask\"\n\n[states.ask]\nprompt = \"Yes?\"\n\n[states.ask.intents]\nyes = \"nowhere\"\n",
    );
    let cfg = write(d, "c.toml", &base(&flows_dir.display().to_string()));
    let (ok, text) = sidecall(&["check", "--config", &cfg]);
    assert!(!ok);
    assert!(
        text.contains("order_status.toml")
            && text.contains("line 7")
            && text.contains("unknown state `nowhere`"),
        "{text}"
    );
}

#[test]
fn check_rejects_a_flow_transferring_outside_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flows_dir = d.join("flows");
    std::fs::create_dir(&flows_dir).unwrap();
    std::fs::copy(
        Path::new(&flows()).join("order_status.toml"),
        flows_dir.join("order_status.toml"),
    )
    .unwrap();
    std::fs::create_dir(flows_dir.join("data")).unwrap();
    std::fs::copy(
        Path::new(&flows()).join("data/orders.json"),
        flows_dir.join("data/orders.json"),
    )
    .unwrap();
    write(
        &flows_dir,
        "evil.toml",
        "start = \"a\"\n[states.a]\nsay = \"Bye\"\ntransfer = \"premium_line\"\n",
    );
    let cfg = write(d, "c.toml", &base(&flows_dir.display().to_string()));
    let (ok, text) = sidecall(&["check", "--config", &cfg]);
    assert!(!ok);
    assert!(
        text.contains("evil.toml")
            && text.contains("`premium_line` is not in the config's [transfers] allow-list"),
        "{text}"
    );
}

#[test]
fn simulate_refuses_corrupt_and_empty_wav_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = write(d, "c.toml", &base(&flows()));
    let corrupt = write(
        d,
        "corrupt.wav",
        "RIFF\u{0}\u{0}\u{0}\u{0}WAVEgarbage that is not audio",
    );
    let empty = write(d, "empty.wav", "");
    for (file, _) in [(&corrupt, "corrupt"), (&empty, "empty")] {
        let (ok, text) = sidecall(&["simulate", "--config", &cfg, "--caller", file, "-q"]);
        assert!(!ok, "{text}");
        assert!(
            text.contains(file.as_str()),
            "message names the file: {text}"
        );
    }
    let (ok, text) = sidecall(&["simulate", "--config", &cfg, "--dtmf", "abc", "-q"]);
    assert!(!ok && text.contains("expected MS:VALUE"), "{text}");
    let (ok, text) = sidecall(&["simulate", "--config", &cfg, "--dtmf", "100:5X", "-q"]);
    assert!(!ok && text.contains("`X` is not a DTMF key"), "{text}");
    for (echo, why) in [
        ("--echo=loud:80", "`loud` is not a level in dB"),
        ("--echo=-10", "expected DB:MS"),
        ("--echo=6:80", "-60 to 0 dB"),
        ("--echo=-10:soon", "`soon` is not a delay in milliseconds"),
        ("--echo=-10:5000", "at most 2000 ms"),
    ] {
        let (ok, text) = sidecall(&["simulate", "--config", &cfg, echo, "-q"]);
        assert!(!ok && text.contains(why), "{echo}: {text}");
    }
}
