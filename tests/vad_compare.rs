//! Measures webrtc-vad and earshot on espeak-ng speech, clean and with noise mixed in by sox,
//! at 16 kHz and 8 kHz, against labels from the clean speech. Prints a table (run with
//! `--nocapture`) and holds the default detector to what endpointing needs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sidecall::audio::{rms_dbfs, wav};
use sidecall::call::vad::{EarshotVad, Vad, WebRtcVad};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("sox and espeak-ng must be installed (scripts/test installs them)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Score {
    recall: f64,
    false_alarm: f64,
    us_per_frame: f64,
}

/// Labels per frame: speech (louder than -45 dBFS in the clean signal), silence (no speech
/// within 300 ms), or None for the edges of words, where any detector's hangover is right.
fn labels(clean: &[i16], frame: usize) -> Vec<Option<bool>> {
    let loud: Vec<bool> = clean
        .chunks_exact(frame)
        .map(|f| rms_dbfs(f) > -45.0)
        .collect();
    (0..loud.len())
        .map(|i| {
            if loud[i] {
                Some(true)
            } else if loud[i.saturating_sub(15)..(i + 16).min(loud.len())]
                .iter()
                .any(|&l| l)
            {
                None
            } else {
                Some(false)
            }
        })
        .collect()
}

fn score(vad: &mut dyn Vad, audio: &[i16], labels: &[Option<bool>], frame: usize) -> Score {
    let (mut hit, mut speech, mut fa, mut quiet) = (0, 0, 0, 0);
    let t = Instant::now();
    let decisions: Vec<bool> = audio.chunks_exact(frame).map(|f| vad.is_voice(f)).collect();
    let us = t.elapsed().as_secs_f64() * 1e6 / decisions.len().max(1) as f64;
    for (d, l) in decisions.iter().zip(labels) {
        match l {
            Some(true) => {
                speech += 1;
                hit += *d as usize;
            }
            Some(false) => {
                quiet += 1;
                fa += *d as usize;
            }
            None => {}
        }
    }
    Score {
        recall: hit as f64 / speech.max(1) as f64,
        false_alarm: fa as f64 / quiet.max(1) as f64,
        us_per_frame: us,
    }
}

fn snr_db(clean: &[i16], noisy: &[i16]) -> f64 {
    let (mut s, mut n) = (0.0f64, 0.0f64);
    for (c, y) in clean.iter().zip(noisy) {
        s += (*c as f64).powi(2);
        n += (*y as f64 - *c as f64).powi(2);
    }
    10.0 * (s / n.max(1.0)).log10()
}

#[test]
fn compare_vads_on_speech_with_and_without_noise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).display().to_string();
    let sentences = [
        "My order number is five five four two one.",
        "Yes, that is correct.",
        "I would like to talk to an agent please.",
        "No thank you, that is all for today.",
    ];
    let mut parts = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let raw = p(&format!("s{i}.wav"));
        run(Command::new("espeak-ng").args(["-s", "150", "-w", &raw, s]));
        let padded = p(&format!("p{i}.wav"));
        // 16 kHz mono with a second of silence after each sentence.
        run(Command::new("sox").args([
            "-R", &raw, "-r", "16000", "-c", "1", &padded, "pad", "0.5", "1.0",
        ]));
        parts.push(padded);
    }
    let clean = p("clean.wav");
    run(Command::new("sox").args(
        std::iter::once("-R")
            .chain(parts.iter().map(String::as_str))
            .chain([clean.as_str()]),
    ));
    let clean16 = wav::read_file_at(Path::new(&clean), 16_000).unwrap();
    let secs = format!("{:.2}", clean16.len() as f64 / 16_000.0);
    let mut conditions = vec![("clean".to_string(), clean.clone())];
    for (name, kind, vol) in [
        ("white", "whitenoise", "0.03"),
        ("pink", "pinknoise", "0.06"),
        ("brown", "brownnoise", "0.1"),
        ("white-loud", "whitenoise", "0.06"),
    ] {
        let noise = p(&format!("{name}.wav"));
        // -R: the same noise every run (a fresh random draw made the false-alarm rate on
        // brown noise wander across the limit from run to run).
        run(Command::new("sox").args([
            "-R", "-n", "-r", "16000", "-c", "1", "-b", "16", &noise, "synth", &secs, kind, "vol",
            vol,
        ]));
        let mixed = p(&format!("mixed-{name}.wav"));
        run(Command::new("sox").args(["-R", "-m", "-v", "1", &clean, "-v", "1", &noise, &mixed]));
        conditions.push((name.to_string(), mixed));
    }
    println!(
        "\nVAD comparison on {secs} s of espeak-ng speech (4 sentences, 1 s gaps); labels from clean speech > -45 dBFS, word edges (300 ms) not scored"
    );
    println!(
        "{:<12} {:>5} {:>7} | {:>14} {:>14} {:>9} | {:>14} {:>14} {:>9}",
        "noise",
        "rate",
        "SNR dB",
        "webrtc recall",
        "webrtc FA",
        "us/frame",
        "earshot recall",
        "earshot FA",
        "us/frame"
    );
    let default_engine = sidecall::config::VadConfig::default().engine;
    let mut default_ok = true;
    for rate in [16_000u32, 8_000] {
        let frame = (rate / 50) as usize;
        let reference = wav::read_file_at(Path::new(&clean), rate).unwrap();
        let labels = labels(&reference, frame);
        for (name, file) in &conditions {
            let audio = wav::read_file_at(Path::new(file), rate).unwrap();
            let snr = if name == "clean" {
                f64::INFINITY
            } else {
                snr_db(&reference, &audio)
            };
            let w = score(&mut WebRtcVad::new(rate, 3), &audio, &labels, frame);
            let e = score(&mut EarshotVad::new(rate, 0.5, 0.5), &audio, &labels, frame);
            println!(
                "{name:<12} {rate:>5} {snr:>7.1} | {:>14.3} {:>14.3} {:>9.1} | {:>14.3} {:>14.3} {:>9.1}",
                w.recall, w.false_alarm, w.us_per_frame, e.recall, e.false_alarm, e.us_per_frame
            );
            // The default detector must find the speech and must not hear it where endpointing
            // needs silence, in every condition here.
            let d = if default_engine == "earshot" { &e } else { &w };
            default_ok &= d.recall >= 0.9 && d.false_alarm <= 0.05;
        }
    }
    assert!(
        default_ok,
        "the default VAD ({default_engine}) misses speech or hears it in silence (see table)"
    );
}
