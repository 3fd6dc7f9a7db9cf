//! Scenarios for the call state machine on synthetic time: each test plays the PBX, the engines
//! and the clock by hand and asserts on the actions a caller would feel (what is sent, when it
//! stops, where the call goes).

use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::config::{Config, TransferTarget};
use crate::engines::dialog::{DigitSpec, ReplyPart, Segment};

/// A scripted VAD: frames whose first sample is not zero are voice, but for frames that begin
/// with `ONSET`, which may only be a voice starting.
#[derive(Default)]
struct Scripted {
    maybe: bool,
}
impl Vad for Scripted {
    fn is_voice(&mut self, frame: &[i16]) -> bool {
        let first = frame.first().copied().unwrap_or(0);
        self.maybe = first != 0;
        first != 0 && first != ONSET
    }
    fn maybe_voice(&self) -> bool {
        self.maybe
    }
}

/// The first sample of a frame that may be a voice starting, but is not one (yet).
const ONSET: i16 = 7;

const FRAME: usize = 320; // 20 ms at 16 kHz

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.call.sample_rate = 16_000;
    cfg.call.max_duration_s = 300;
    cfg.vad.min_speech_ms = 100;
    cfg.vad.end_silence_ms = 600;
    cfg.vad.barge_in_min_ms = 120;
    // The classic cut at barge_in_min_ms; pausing and backchannels have their own scenarios.
    cfg.vad.pause_on_voice = false;
    cfg.vad.backchannel_max_ms = 0;
    // Turns end on silence alone; the pause checks (model, early transcript) have their own
    // scenarios.
    cfg.turn.speculate = false;
    cfg.turn.reply_ahead = false;
    // Synthetic frames of constant level are not speech: the echo gate has its own tests.
    cfg.vad.echo.enabled = false;
    let dialplan = |ctx: &str, ext: &str| TransferTarget {
        context: Some(ctx.into()),
        extension: Some(ext.into()),
        priority: None,
        endpoint: None,
        announce: None,
    };
    cfg.transfers
        .insert("agent".into(), dialplan("agents", "support"));
    cfg.transfers
        .insert("billing".into(), dialplan("billing", "s"));
    cfg
}

/// The machine, the call clock, and every action it has asked for.
struct Call {
    core: CallCore,
    now: u64,
    log: Vec<(u64, Action)>,
}

impl Call {
    fn new(cfg: Config) -> Self {
        Self::with_core(CallCore::new(Arc::new(cfg), Box::new(Scripted::default())))
    }

    fn with_core(mut core: CallCore) -> Self {
        core.start(0, "test-call", "test");
        let mut c = Call {
            core,
            now: 0,
            log: Vec::new(),
        };
        c.drain();
        c
    }

    /// A call answered, whose greeting is still with the dialog.
    fn answered(cfg: Config) -> Self {
        let mut c = Call::new(cfg);
        assert!(c.has(|a| matches!(a, Action::Answer)));
        c.send(Event::Answered(Ok(())));
        assert_eq!(c.core.phase(), PhaseName::Thinking);
        c
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.core.poll_action() {
            self.log.push((self.now, a.clone()));
            out.push(a);
        }
        out
    }

    fn send(&mut self, ev: Event) -> Vec<Action> {
        self.core.handle(self.now, ev);
        self.drain()
    }

    /// Runs the clock for `ms` (20 ms ticks), the caller silent and the PBX sending nothing.
    fn wait(&mut self, ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for _ in 0..ms / 20 {
            self.now += 20;
            out.extend(self.send(Event::Tick));
        }
        out
    }

    /// The caller speaks for `ms` (a voiced frame per tick).
    fn speak(&mut self, ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for _ in 0..ms / 20 {
            self.now += 20;
            out.extend(self.send(Event::Media(MediaEvent::Audio(vec![1000; FRAME]))));
            out.extend(self.send(Event::Tick));
        }
        out
    }

    /// The id of the first reply synthesized in the call.
    fn first_reply(&self) -> u64 {
        self.log
            .iter()
            .find_map(|(_, a)| match a {
                Action::Synthesize { reply, .. } => Some(*reply),
                _ => None,
            })
            .expect("a reply was synthesized")
    }

    /// The id of the latest reply synthesized.
    fn latest_reply(&self) -> u64 {
        self.log
            .iter()
            .rev()
            .find_map(|(_, a)| match a {
                Action::Synthesize { reply, .. } => Some(*reply),
                _ => None,
            })
            .expect("a reply was synthesized")
    }

    fn has(&self, f: impl Fn(&Action) -> bool) -> bool {
        self.log.iter().any(|(_, a)| f(a))
    }

    fn records(&self, kind: &str) -> Vec<(u64, Value)> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Record {
                    at_ms,
                    kind: k,
                    fields,
                } if *k == kind => Some((*at_ms, fields.clone())),
                _ => None,
            })
            .collect()
    }

    /// The last dialog ask that wants an answer.
    fn last_ask(&self) -> (u64, DialogCmd) {
        self.log
            .iter()
            .rev()
            .find_map(|(_, a)| match a {
                Action::Dialog { seq, cmd }
                    if !matches!(cmd, DialogCmd::Heard(_) | DialogCmd::Discard) =>
                {
                    Some((*seq, cmd.clone()))
                }
                _ => None,
            })
            .expect("the dialog was asked")
    }

    /// The dialog answers its last ask with `turn`; TTS synthesizes every segment at once
    /// (`ms_per_segment` of audio each).
    fn reply(&mut self, turn: Turn, ms_per_segment: u64) -> u64 {
        let (seq, _) = self.last_ask();
        let actions = self.send(Event::Dialog {
            seq,
            result: Ok(turn),
            ms: 5,
        });
        let mut reply_id = 0;
        let mut pending: Vec<(u64, usize)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Synthesize { reply, seg, .. } => Some((*reply, *seg)),
                _ => None,
            })
            .collect();
        while let Some((reply, seg)) = pending.pop() {
            reply_id = reply;
            let samples = vec![500; (ms_per_segment as usize / 20) * FRAME];
            self.send(Event::TtsAudio {
                reply,
                seg,
                samples,
                first_ms: Some(30),
            });
            for a in self.send(Event::TtsDone { reply, seg }) {
                if let Action::Synthesize { reply, seg, .. } = a {
                    pending.push((reply, seg));
                }
            }
        }
        reply_id
    }

    /// Answers every mark sent so far (the PBX played everything).
    fn play_marks(&mut self) {
        let marks: Vec<u64> = self
            .log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Mark(id) => Some(*id),
                _ => None,
            })
            .collect();
        for m in marks {
            self.send(Event::Media(MediaEvent::MarkPlayed(m)));
        }
    }

    /// ASR answers utterance `seq` with `text` after `ms`.
    fn transcribed(&mut self, seq: u64, text: &str, ms: u64) -> Vec<Action> {
        self.send(Event::Asr {
            seq,
            result: Ok(Transcript {
                text: text.into(),
                ..Transcript::default()
            }),
            ms,
        })
    }

    fn frames_sent_after(&self, t: u64) -> usize {
        self.log
            .iter()
            .filter(|(at, a)| *at > t && matches!(a, Action::SendAudio(_)))
            .count()
    }
}

fn say(text: &str, barge_in: bool, next: Next) -> Turn {
    Turn {
        say: vec![Segment {
            text: text.into(),
            pause_after_ms: 0,
        }],
        barge_in,
        send_dtmf: None,
        next,
    }
}

fn listen() -> Next {
    Next::Listen(Expectation::default())
}

/// A call that has played its greeting and now listens.
fn listening(cfg: Config) -> Call {
    let mut c = Call::answered(cfg);
    c.reply(say("How can I help?", true, listen()), 400);
    c.wait(600);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c
}

#[test]
fn greeting_plays_paced_then_the_call_listens() {
    let mut c = Call::answered(config());
    assert_eq!(c.last_ask().1, DialogCmd::Start);
    c.reply(say("Hello, how can I help?", true, listen()), 200);
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    // The first audio goes out at once (lead frames included), the rest one frame per tick.
    let sent = |c: &Call| {
        c.log
            .iter()
            .filter(|(_, a)| matches!(a, Action::SendAudio(_)))
            .count()
    };
    assert_eq!(sent(&c), 3, "the first frame and two of lead, at once");
    c.wait(100);
    assert_eq!(sent(&c), 8, "then one per tick");
    c.wait(100);
    assert_eq!(sent(&c), 10, "200 ms of audio is 10 frames");
    assert!(c.has(|a| matches!(a, Action::Mark(_))));
    assert_eq!(
        c.core.phase(),
        PhaseName::Speaking,
        "until the PBX says it played"
    );
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], true);
    assert!(c.has(|a| matches!(a, Action::Dialog { cmd: DialogCmd::Heard(h), .. } if h.complete)));
}

#[test]
fn silence_becomes_no_input_exactly_at_the_timeout() {
    let mut c = listening(config());
    let from = c.now;
    c.wait(5_980);
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c.wait(20);
    assert_eq!(c.last_ask().1, DialogCmd::Input(Input::NoInput));
    assert_eq!(c.records("no_input")[0].0, from + 6_000);
}

#[test]
fn speech_is_transcribed_and_the_transcript_goes_to_the_dialog() {
    let mut c = listening(config());
    c.speak(600);
    c.wait(700);
    let (seq, audio) = c
        .log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Transcribe { seq, audio, .. } => Some((*seq, audio.len())),
            _ => None,
        })
        .expect("the utterance went to ASR");
    assert!(audio >= 30 * FRAME, "the whole utterance: {audio}");
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
    c.transcribed(seq, " Where is my order? ", 300);
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("Where is my order?".into()))
    );
}

#[test]
fn a_caller_who_pauses_mid_sentence_is_heard_as_one_input() {
    let mut c = listening(config());
    c.speak(500);
    c.wait(700); // end of the first utterance
    c.speak(500); // goes on before the first transcript is back
    c.wait(700);
    let seqs: Vec<u64> = c
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Transcribe { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs.len(), 2);
    // Transcripts come back out of order.
    for (seq, text) in [(seqs[1], "number 55421"), (seqs[0], "my order")] {
        c.transcribed(seq, text, 200);
    }
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("my order number 55421".into()))
    );
}

#[test]
fn barge_in_stops_the_agent_in_the_same_tick_and_flushes_the_pbx() {
    let mut c = Call::answered(config());
    c.reply(
        say(
            "Thank you for calling, let me tell you about our offers.",
            true,
            listen(),
        ),
        3_000,
    );
    c.wait(400);
    let actions = c.speak(120);
    let flush_at = c
        .log
        .iter()
        .find(|(_, a)| matches!(a, Action::Flush))
        .map(|(t, _)| *t)
        .expect("flushed");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::CancelTts { .. }))
    );
    assert_eq!(
        c.frames_sent_after(flush_at),
        0,
        "nothing sent after the flush"
    );
    // The detector says speech after 100 ms, barge-in needs 120 ms of voice.
    assert_eq!(flush_at, c.now);
    let heard = c.records("playout_end");
    assert_eq!(heard[0].1["complete"], false);
    let h = heard[0].1["heard"].as_str().unwrap_or("").to_string();
    // 400 ms of a 3 s sentence: its first words, never its end.
    assert!(h.starts_with("Thank") && !h.contains("offers"), "{h}");
    assert_eq!(c.core.phase(), PhaseName::Listening);
    // The interrupting utterance is what the dialog gets next.
    c.speak(400);
    c.wait(700);
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
}

#[test]
fn a_prompt_that_cannot_be_interrupted_ignores_speech_over_it() {
    let mut c = Call::answered(config());
    c.reply(say("Please listen carefully.", false, listen()), 2_000);
    c.wait(200);
    c.speak(600);
    assert!(!c.has(|a| matches!(a, Action::Flush)));
    c.wait(1_200);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    assert!(
        !c.has(|a| matches!(a, Action::Transcribe { .. })),
        "speech over the prompt is no answer"
    );
}

#[test]
fn lost_marks_are_taken_as_played_three_seconds_after_the_audio() {
    let mut c = Call::answered(config());
    c.reply(say("Your order shipped.", true, listen()), 400);
    c.wait(400);
    let all_sent = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Mark(_)))
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    let deadline = c.core.deadline().unwrap();
    assert!(
        deadline <= all_sent + 3_000 + 100,
        "{deadline} vs {all_sent}"
    );
    c.wait(3_200);
    assert_eq!(c.core.phase(), PhaseName::Listening);
    let errors = c.records("error");
    assert!(
        errors.iter().any(|(_, e)| e["stage"] == "playout"),
        "{errors:?}"
    );
    assert_eq!(c.records("playout_end")[0].1["complete"], true);
}

#[test]
fn a_dialog_that_never_answers_gets_the_error_prompt_then_a_human() {
    let mut cfg = config();
    cfg.dialog.timeout_ms = 4_000;
    let mut c = Call::answered(cfg);
    c.wait(4_980);
    assert_eq!(c.core.phase(), PhaseName::Thinking);
    c.wait(40);
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    let said = c.records("agent_say");
    assert!(
        said[0].1["text"]
            .as_str()
            .unwrap()
            .contains("technical trouble")
    );
    // A late answer from the dialog changes nothing.
    let (seq, _) = (1, ());
    c.send(Event::Dialog {
        seq,
        result: Ok(say("Hello!", true, listen())),
        ms: 5_000,
    });
    assert_eq!(c.records("agent_say").len(), 1);
    let reply = c.first_reply();
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 10],
        first_ms: None,
    });
    c.send(Event::TtsDone { reply, seg: 0 });
    c.send(Event::TtsDone { reply, seg: 1 });
    c.wait(400);
    c.play_marks();
    assert!(c.has(|a| matches!(a, Action::Transfer { name, .. } if name == "agent")));
}

#[test]
fn asr_that_never_answers_ends_at_its_deadline() {
    let mut cfg = config();
    cfg.asr.timeout_ms = 3_000;
    let mut c = listening(cfg);
    c.speak(400);
    c.wait(700);
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
    let started = c
        .log
        .iter()
        .find_map(|(t, a)| matches!(a, Action::Transcribe { .. }).then_some(*t))
        .unwrap();
    c.wait(6_500);
    assert_eq!(c.core.phase(), PhaseName::Speaking, "error prompt");
    assert!(c.has(|a| matches!(a, Action::CancelAsr)));
    let err = c.records("error");
    assert!(
        err.iter()
            .any(|(t, e)| e["stage"] == "asr" && *t == started + 3_000 + 2_000 + 1_000),
        "{err:?}"
    );
}

#[test]
fn no_answer_from_the_pbx_fails_the_call_for_the_adapter_to_overflow() {
    let mut c = Call::new(config());
    c.wait(6_000);
    assert_eq!(
        c.core.outcome(),
        Some(&CallOutcome::Failed {
            stage: "answer".into()
        })
    );
    assert_eq!(c.records("call_end")[0].1["outcome"], "failed");
}

#[test]
fn keys_go_out_before_the_transfer_and_a_refused_transfer_falls_back_to_a_human() {
    let mut c = Call::answered(config());
    let mut turn = say(
        "Transferring you to billing.",
        false,
        Next::Transfer {
            target: "billing".into(),
        },
    );
    turn.send_dtmf = Some("12#".into());
    c.reply(turn, 200);
    c.wait(300);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Ending);
    assert!(c.has(|a| matches!(a, Action::SendDtmf(d) if d == "12#")));
    assert!(
        !c.has(|a| matches!(a, Action::Transfer { .. })),
        "keys first"
    );
    c.send(Event::DtmfSent(Ok(())));
    let seq = c
        .log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Transfer { seq, name, target } if name == "billing" => {
                assert_eq!(
                    target,
                    &Target::Dialplan {
                        context: "billing".into(),
                        extension: "s".into(),
                        priority: None
                    }
                );
                Some(*seq)
            }
            _ => None,
        })
        .expect("transfer to billing");
    c.send(Event::ControlDone {
        seq,
        result: Err(ControlError::Refused("422".into())),
    });
    let seq2 = c
        .log
        .iter()
        .rev()
        .find_map(|(_, a)| match a {
            Action::Transfer { seq, name, .. } if name == "agent" => Some(*seq),
            _ => None,
        })
        .expect("fallback to the human target");
    // A stale answer for the first transfer is not taken for the second.
    c.send(Event::ControlDone {
        seq,
        result: Ok(()),
    });
    assert_eq!(c.core.phase(), PhaseName::Ending);
    c.send(Event::ControlDone {
        seq: seq2,
        result: Ok(()),
    });
    assert_eq!(
        c.core.outcome(),
        Some(&CallOutcome::Transferred {
            target: "agent".into()
        })
    );
}

#[test]
fn a_pbx_that_never_answers_the_transfer_gets_the_fallbacks_then_the_call_fails() {
    let mut c = Call::answered(config());
    c.reply(
        say(
            "Bye.",
            false,
            Next::Transfer {
                target: "billing".into(),
            },
        ),
        200,
    );
    c.wait(300);
    c.play_marks();
    // billing, then agent, then hangup: each gets the control deadline, then the call fails.
    c.wait(3 * (CONTROL_TIMEOUT_MS + BACKSTOP_MS) + 100);
    let names: Vec<String> = c
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Transfer { name, .. } => Some(name.clone()),
            Action::Hangup { reason, .. } => Some(format!("hangup:{reason}")),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["billing", "agent", "hangup:transfer_failed"]);
    assert_eq!(
        c.core.outcome(),
        Some(&CallOutcome::Failed {
            stage: "hangup".into()
        })
    );
}

#[test]
fn the_media_closing_during_a_transfer_waits_for_the_pbx_answer() {
    let mut c = Call::answered(config());
    c.reply(
        say(
            "Connecting you.",
            false,
            Next::Transfer {
                target: "agent".into(),
            },
        ),
        200,
    );
    c.wait(300);
    c.play_marks();
    c.send(Event::Media(MediaEvent::Hangup {
        cause: "StasisEnd".into(),
    }));
    assert_eq!(c.core.phase(), PhaseName::Ending);
    let seq = c
        .log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Transfer { seq, .. } => Some(*seq),
            _ => None,
        })
        .unwrap();
    c.send(Event::ControlDone {
        seq,
        result: Ok(()),
    });
    assert_eq!(
        c.core.outcome(),
        Some(&CallOutcome::Transferred {
            target: "agent".into()
        })
    );
}

#[test]
fn max_duration_cuts_the_reply_and_hangs_up() {
    let mut cfg = config();
    cfg.call.max_duration_s = 10;
    let mut c = Call::answered(cfg);
    c.reply(say("A very long story.", true, listen()), 60_000);
    c.wait(10_000);
    assert!(c.has(|a| matches!(a, Action::Hangup { reason, .. } if reason == "max_duration")));
    assert_eq!(c.records("playout_end")[0].1["complete"], false);
    let at = c.records("hangup")[0].0;
    assert_eq!(at, 10_000);
}

#[test]
fn results_for_an_old_reply_or_ask_are_dropped() {
    let mut c = listening(config());
    let old_reply = c
        .log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Synthesize { reply, .. } => Some(*reply),
            _ => None,
        })
        .unwrap();
    c.wait(6_000); // no input: the dialog is asked
    let before = c.log.len();
    c.send(Event::TtsAudio {
        reply: old_reply,
        seg: 0,
        samples: vec![1; FRAME * 5],
        first_ms: None,
    });
    c.send(Event::Dialog {
        seq: 1,
        result: Ok(say("stale", true, listen())),
        ms: 1,
    });
    c.send(Event::Asr {
        seq: 99,
        result: Ok(Transcript::default()),
        ms: 1,
    });
    assert_eq!(c.log.len(), before, "{:?}", &c.log[before..]);
    assert_eq!(c.core.phase(), PhaseName::Thinking);
}

#[test]
fn keys_win_over_speech_still_being_recognized() {
    let mut c = listening(config());
    c.speak(400);
    c.wait(700);
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
    for k in ['5', '5', '#'] {
        c.send(Event::Media(MediaEvent::Dtmf(k)));
    }
    assert!(c.has(|a| matches!(a, Action::CancelAsr)));
    assert_eq!(c.last_ask().1, DialogCmd::Input(Input::Digits("55".into())));
}

#[test]
fn keys_typed_over_a_prompt_that_cannot_be_interrupted_are_kept_for_the_next_listen() {
    let mut c = Call::answered(config());
    let turn = say(
        "Please enter your five digit order number.",
        false,
        Next::Listen(Expectation {
            asr_hint: None,
            pause_on_voice: None,
            digits: Some(DigitSpec {
                max: 5,
                terminator: None,
            }),
            spoken: None,
        }),
    );
    c.reply(turn, 2_000);
    c.wait(300);
    for k in "55421".chars() {
        c.send(Event::Media(MediaEvent::Dtmf(k)));
    }
    assert_eq!(c.core.phase(), PhaseName::Speaking, "the prompt plays on");
    assert!(!c.has(|a| matches!(a, Action::Flush)));
    c.wait(2_000);
    c.play_marks();
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Digits("55421".into()))
    );
}

#[test]
fn the_human_key_cuts_the_reply_and_transfers_after_the_announcement() {
    let mut cfg = config();
    if let Some(t) = cfg.transfers.get_mut("agent") {
        t.announce = Some("Connecting you to an agent.".into());
    }
    let mut c = Call::answered(cfg);
    c.reply(say("Welcome to a long menu.", false, listen()), 3_000);
    c.wait(200);
    c.send(Event::Media(MediaEvent::Dtmf('0')));
    assert!(c.has(|a| matches!(a, Action::Flush)));
    let said = c.records("agent_say");
    assert_eq!(
        said.last().unwrap().1["text"],
        "Connecting you to an agent."
    );
    let reply = c.latest_reply();
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 20],
        first_ms: None,
    });
    c.send(Event::TtsDone { reply, seg: 0 });
    c.wait(600);
    c.play_marks();
    assert!(c.has(|a| matches!(a, Action::Transfer { name, .. } if name == "agent")));
}

#[test]
fn a_caller_hanging_up_mid_reply_leaves_a_record_of_what_was_heard() {
    let mut c = Call::answered(config());
    c.reply(
        say("One two three four five six seven eight.", true, listen()),
        2_000,
    );
    c.wait(1_000);
    c.send(Event::Media(MediaEvent::Hangup {
        cause: "normal".into(),
    }));
    assert_eq!(c.core.outcome(), Some(&CallOutcome::CallerHungUp));
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], false);
    let heard = end[0].1["heard"].as_str().unwrap();
    assert!(
        heard.starts_with("One") && !heard.contains("eight"),
        "{heard}"
    );
    assert!(c.has(|a| matches!(a, Action::CancelTts { .. })));
    // Nothing happens after the end.
    let n = c.log.len();
    c.wait(1_000);
    c.send(Event::Media(MediaEvent::Dtmf('1')));
    assert_eq!(c.log.len(), n);
}

#[test]
fn a_flood_of_inbound_audio_is_bounded_in_frames() {
    let mut c = listening(config());
    // One 64 KiB message is ~100 frames; five of them.
    for _ in 0..5 {
        c.send(Event::Media(MediaEvent::Audio(vec![0; 32 * 1024])));
    }
    assert!(c.core.inbound.len() <= INBOUND_MAX);
    c.wait(20);
    assert_eq!(c.core.inbound.len(), INBOUND_MAX - FRAMES_PER_TICK);
}

/// A tiny deterministic generator for the exploration below.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Whatever happens first, once the outside world goes quiet (no engine, no PBX answers
/// anything again) every call still ends by itself, before `max_duration_s` plus the time the
/// end takes: no phase waits for ever.
#[test]
fn from_any_state_a_silent_world_still_ends_the_call() {
    for seed in 0..600u64 {
        let mut rng = Lcg(seed);
        // Half the histories with pausing and backchannels on (the default configuration).
        let mut cfg = if seed % 2 == 0 { config() } else { pausing() };
        cfg.call.max_duration_s = 120;
        let mut c = Call::new(cfg);
        let steps = rng.next(400);
        for _ in 0..steps {
            let pending: Vec<Action> = c.log.iter().map(|(_, a)| a.clone()).collect();
            let ev = match rng.next(12) {
                0 => Event::Answered(Ok(())),
                1 => {
                    let (seq, _) = c
                        .log
                        .iter()
                        .rev()
                        .find_map(|(_, a)| match a {
                            Action::Dialog { seq, .. } => Some((*seq, ())),
                            _ => None,
                        })
                        .unwrap_or((0, ()));
                    let next = match rng.next(4) {
                        0 => Next::Transfer {
                            target: "billing".into(),
                        },
                        1 => Next::Hangup {
                            reason: "done".into(),
                        },
                        _ => listen(),
                    };
                    Event::Dialog {
                        seq,
                        result: Ok(say("Some words here.", rng.next(2) == 0, next)),
                        ms: 1,
                    }
                }
                2 => {
                    let seq = pending
                        .iter()
                        .rev()
                        .find_map(|a| match a {
                            Action::Transcribe { seq, .. } => Some(*seq),
                            _ => None,
                        })
                        .unwrap_or(0);
                    Event::Asr {
                        seq,
                        result: Ok(Transcript {
                            text: "yes".into(),
                            ..Transcript::default()
                        }),
                        ms: 1,
                    }
                }
                3 | 4 => {
                    match pending.iter().rev().find_map(|a| match a {
                        Action::Synthesize { reply, seg, .. } => Some((*reply, *seg)),
                        _ => None,
                    }) {
                        Some((reply, seg)) if rng.next(2) == 0 => Event::TtsAudio {
                            reply,
                            seg,
                            samples: vec![300; FRAME * 8],
                            first_ms: None,
                        },
                        Some((reply, seg)) => Event::TtsDone { reply, seg },
                        None => Event::Tick,
                    }
                }
                5 => Event::Media(MediaEvent::Audio(vec![
                    if rng.next(2) == 0 {
                        1000
                    } else {
                        0
                    };
                    FRAME * (1 + rng.next(3) as usize)
                ])),
                6 => Event::Media(MediaEvent::Dtmf(['0', '1', '#', '5'][rng.next(4) as usize])),
                7 => {
                    let m = pending
                        .iter()
                        .rev()
                        .find_map(|a| match a {
                            Action::Mark(m) => Some(*m),
                            _ => None,
                        })
                        .unwrap_or(0);
                    Event::Media(MediaEvent::MarkPlayed(m))
                }
                8 => {
                    let seq = pending
                        .iter()
                        .rev()
                        .find_map(|a| match a {
                            Action::Transfer { seq, .. } | Action::Hangup { seq, .. } => Some(*seq),
                            _ => None,
                        })
                        .unwrap_or(0);
                    Event::ControlDone {
                        seq,
                        result: if rng.next(2) == 0 {
                            Ok(())
                        } else {
                            Err(ControlError::Refused("no".into()))
                        },
                    }
                }
                9 => Event::DtmfSent(Ok(())),
                _ => {
                    c.now += 20 * (1 + rng.next(50));
                    Event::Tick
                }
            };
            c.send(ev);
            if c.core.outcome().is_some() {
                break;
            }
            assert!(
                c.core.deadline().is_some(),
                "seed {seed}: a phase without a deadline: {:?}",
                c.core.phase()
            );
        }
        // The world goes quiet: only the clock runs.
        let limit = 120_000 + 4 * (CONTROL_TIMEOUT_MS + BACKSTOP_MS) + 1_000;
        while c.core.outcome().is_none() && c.now <= limit {
            c.now += 20;
            c.send(Event::Tick);
        }
        assert!(
            c.core.outcome().is_some(),
            "seed {seed}: still {:?} at {} ms",
            c.core.phase(),
            c.now
        );
        assert_eq!(c.records("call_end").len(), 1, "seed {seed}");
    }
}

// ---- found in review: each failed before its fix ----

fn transcribe_seqs(c: &Call) -> Vec<u64> {
    c.log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Transcribe { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn said(c: &Call) -> Vec<String> {
    c.records("agent_say")
        .into_iter()
        .map(|(_, v)| v["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A caller who pauses, then goes on talking for a while, is not an ASR failure: the first
/// transcript is back at once; only the caller is still speaking.
#[test]
fn a_long_second_utterance_is_not_an_asr_failure() {
    let mut c = listening(config()); // asr.timeout_ms 8000: Recognizing deadline since + 11 s
    c.speak(500);
    c.wait(700);
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
    let seq = transcribe_seqs(&c)[0];
    c.speak(200); // goes on
    c.transcribed(seq, "I want to say", 200);
    c.speak(12_000); // one long sentence (under vad.max_utterance_ms = 15 s)
    let errors = c.records("error");
    assert!(
        errors.iter().all(|(_, e)| e["stage"] != "asr"),
        "caller still talking, transcript long back: {errors:?}; agent said {:?}",
        said(&c)
    );
}

/// Keys typed while the dialog thinks are not lost.
#[test]
fn keys_typed_while_the_dialog_thinks_reach_the_dialog() {
    let mut c = listening(config());
    c.wait(6_000); // no input: Thinking
    assert_eq!(c.core.phase(), PhaseName::Thinking);
    for k in "1234#".chars() {
        c.send(Event::Media(MediaEvent::Dtmf(k)));
    }
    c.reply(say("Sorry, I did not hear you.", true, listen()), 400);
    c.wait(600);
    c.play_marks();
    c.wait(100);
    let asks: Vec<DialogCmd> = c
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Dialog { cmd, .. } if !matches!(cmd, DialogCmd::Heard(_)) => Some(cmd.clone()),
            _ => None,
        })
        .collect();
    assert!(
        asks.contains(&DialogCmd::Input(Input::Digits("1234".into()))),
        "{asks:?}; dtmf records {:?}",
        c.records("dtmf")
    );
}

/// A transfer reply that the caller talks over ("ok") still sends its keys before the transfer,
/// and the transfer waits for the farewell.
#[test]
fn speaking_over_a_transfer_reply_keeps_its_keys_and_its_farewell() {
    let mut c = Call::answered(config());
    let mut turn = say(
        "I am transferring you to billing now, please hold.",
        true, // the flow default: states are interruptible unless told otherwise
        Next::Transfer {
            target: "billing".into(),
        },
    );
    turn.send_dtmf = Some("12#".into());
    c.reply(turn, 3_000);
    c.wait(400);
    c.speak(200); // "okay"
    assert!(
        !c.has(|a| matches!(a, Action::Flush)),
        "the farewell plays on"
    );
    assert!(!c.has(|a| matches!(a, Action::Transfer { .. })));
    c.wait(2_800);
    c.play_marks();
    assert!(c.has(|a| matches!(a, Action::SendDtmf(d) if d == "12#")));
    assert!(
        !c.has(|a| matches!(a, Action::Transfer { .. })),
        "keys first"
    );
    c.send(Event::DtmfSent(Ok(())));
    assert!(c.has(|a| matches!(a, Action::Transfer { name, .. } if name == "billing")));
    assert_eq!(c.records("playout_end")[0].1["complete"], true);
}

/// A caller who starts answering in the last moments of an interruptible question is heard.
#[test]
fn an_answer_overlapping_the_end_of_an_interruptible_question_is_heard() {
    let mut cfg = config();
    cfg.vad.barge_in_min_ms = 400;
    let mut c = Call::answered(cfg);
    c.reply(say("What is your order number?", true, listen()), 1_000);
    c.wait(800);
    c.speak(200); // speech starts (100 ms) before the marks are back
    c.play_marks(); // the question has played
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c.speak(1_500);
    c.wait(700);
    assert!(
        !transcribe_seqs(&c).is_empty(),
        "the caller's answer was dropped; phase {:?}",
        c.core.phase()
    );
}

/// A reply promising a transfer to a target not allow-listed: the caller is not left in silence.
#[test]
fn a_refused_transfer_does_not_leave_the_caller_waiting() {
    let mut c = Call::answered(config());
    c.reply(
        say(
            "Let me put you through to sales.",
            false,
            Next::Transfer {
                target: "sales".into(),
            },
        ),
        400,
    );
    c.wait(600);
    c.play_marks();
    let after = c.now;
    c.wait(5_000);
    let phase = c.core.phase();
    let transferred = c.has(|a| matches!(a, Action::Transfer { .. }));
    let spoke = c.records("agent_say").iter().any(|(t, _)| *t > after);
    assert!(
        transferred || spoke || phase != PhaseName::Listening,
        "caller heard 'put you through', then {} ms of silence in {phase:?}",
        c.now - after
    );
}

/// deadline() is never in the past for long (a driver sleeping until it would spin).
#[test]
fn deadline_is_not_left_in_the_past() {
    let mut c = listening(config());
    c.speak(7_000); // talking past the no-input time
    let mut past = 0;
    for _ in 0..20 {
        c.now += 20;
        c.send(Event::Media(MediaEvent::Audio(vec![1000; FRAME])));
        c.send(Event::Tick);
        if c.core.deadline().is_some_and(|d| d <= c.now) {
            past += 1;
        }
    }
    assert_eq!(
        past,
        0,
        "deadline {:?} at {} in {:?}",
        c.core.deadline(),
        c.now,
        c.core.phase()
    );
}

#[test]
fn empty_replies_with_each_next_end_or_listen_at_once() {
    for (next, want) in [
        (listen(), PhaseName::Listening),
        (
            Next::Transfer {
                target: "billing".into(),
            },
            PhaseName::Ending,
        ),
        (
            Next::Hangup {
                reason: "done".into(),
            },
            PhaseName::Ending,
        ),
        // Not allow-listed: the human target instead.
        (
            Next::Transfer {
                target: "nowhere".into(),
            },
            PhaseName::Ending,
        ),
    ] {
        let mut c = Call::answered(config());
        let (seq, _) = c.last_ask();
        c.send(Event::Dialog {
            seq,
            result: Ok(Turn {
                say: vec![],
                barge_in: true,
                send_dtmf: Some("1".into()),
                next: next.clone(),
            }),
            ms: 1,
        });
        c.send(Event::DtmfSent(Ok(())));
        c.wait(100);
        assert_eq!(c.core.phase(), want, "{next:?}");
        assert!(c.core.deadline().is_some_and(|d| d > c.now), "{next:?}");
    }
}

#[test]
fn keys_before_the_answer_change_nothing() {
    let mut c = Call::new(config());
    c.send(Event::Media(MediaEvent::Dtmf('0')));
    assert_eq!(c.core.phase(), PhaseName::Answering);
    c.send(Event::Answered(Err(ControlError::Timeout(5000))));
    assert_eq!(
        c.core.outcome(),
        Some(&CallOutcome::Failed {
            stage: "answer".into()
        })
    );
    assert!(!c.has(|a| matches!(a, Action::Transfer { .. })));
}

#[test]
fn the_deadline_is_not_left_in_the_past_while_the_caller_talks_on() {
    let mut c = Call::answered(config());
    c.reply(say("Please listen carefully.", false, listen()), 1_000);
    c.wait(500);
    c.speak(600);
    c.play_marks();
    let mut past = 0;
    for _ in 0..500 {
        c.now += 20;
        c.send(Event::Media(MediaEvent::Audio(vec![1000; FRAME])));
        c.send(Event::Tick);
        if c.core.deadline().is_some_and(|d| d <= c.now) {
            past += 1;
        }
    }
    assert_eq!(past, 0, "phase {:?}", c.core.phase());
}

#[test]
fn two_key_sends_both_go_out_before_the_transfer() {
    let mut c = Call::answered(config());
    let mut t1 = say("Entering your account.", false, listen());
    t1.send_dtmf = Some("1".into());
    c.reply(t1, 200);
    c.wait(300);
    c.play_marks();
    c.send(Event::Media(MediaEvent::Dtmf('9')));
    c.wait(3_000); // the entry times out: the dialog is asked
    let mut t2 = say(
        "Transferring.",
        false,
        Next::Transfer {
            target: "billing".into(),
        },
    );
    t2.send_dtmf = Some("2".into());
    c.reply(t2, 200);
    c.wait(300);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Ending);
    c.send(Event::DtmfSent(Ok(())));
    assert!(
        !c.has(|a| matches!(a, Action::Transfer { .. })),
        "the second keys are still out"
    );
    c.send(Event::DtmfSent(Ok(())));
    assert!(c.has(|a| matches!(a, Action::Transfer { .. })));
}

// ---- a reply streamed part by part (the dialog seam an LLM uses) ----

fn part(c: &mut Call, part: ReplyPart) -> Vec<Action> {
    let (seq, _) = c.last_ask();
    c.send(Event::DialogPart { seq, part })
}

fn seg(text: &str) -> Segment {
    Segment {
        text: text.into(),
        pause_after_ms: 0,
    }
}

#[test]
fn a_streamed_reply_is_spoken_from_its_first_piece() {
    let mut c = Call::answered(config());
    part(&mut c, ReplyPart::Begin { barge_in: true });
    assert_eq!(c.core.phase(), PhaseName::Thinking);
    let first = part(&mut c, ReplyPart::Say(seg("Let me look that up.")));
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    let reply = first
        .iter()
        .find_map(|a| match a {
            Action::Synthesize { reply, seg: 0, .. } => Some(*reply),
            _ => None,
        })
        .expect("the first piece goes to TTS at once");
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 10],
        first_ms: Some(20),
    });
    c.send(Event::TtsDone { reply, seg: 0 });
    assert!(
        c.has(|a| matches!(a, Action::SendAudio(_))),
        "speaking while it thinks"
    );
    c.wait(100);
    let second = part(&mut c, ReplyPart::Say(seg("Your order shipped.")));
    assert!(
        second
            .iter()
            .any(|a| matches!(a, Action::Synthesize { seg: 1, .. })),
        "{second:?}"
    );
    c.send(Event::TtsAudio {
        reply,
        seg: 1,
        samples: vec![500; FRAME * 10],
        first_ms: None,
    });
    c.send(Event::TtsDone { reply, seg: 1 });
    part(
        &mut c,
        ReplyPart::End {
            send_dtmf: None,
            next: listen(),
        },
    );
    let said = c.records("agent_say");
    assert_eq!(said.len(), 1);
    assert_eq!(
        said[0].1["text"],
        "Let me look that up. Your order shipped."
    );
    c.wait(600);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    assert_eq!(c.records("playout_end")[0].1["complete"], true);
}

#[test]
fn a_streamed_reply_is_not_over_until_the_dialog_says_so() {
    let mut c = Call::answered(config());
    part(&mut c, ReplyPart::Say(seg("One moment.")));
    let reply = c.first_reply();
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 5],
        first_ms: None,
    });
    c.send(Event::TtsDone { reply, seg: 0 });
    c.wait(400);
    c.play_marks();
    // Everything said so far has played, and no lost-mark deadline runs: more may come.
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    c.wait(5_000);
    assert_eq!(c.core.phase(), PhaseName::Speaking);
    assert!(c.records("error").is_empty(), "{:?}", c.records("error"));
    part(
        &mut c,
        ReplyPart::End {
            send_dtmf: None,
            next: Next::Hangup {
                reason: "done".into(),
            },
        },
    );
    assert!(
        c.has(|a| matches!(a, Action::Hangup { .. })),
        "ends at once: all was heard"
    );
}

#[test]
fn a_barge_in_mid_stream_drops_the_rest_of_the_reply() {
    let mut c = Call::answered(config());
    part(
        &mut c,
        ReplyPart::Say(seg("Here is a long answer about your order.")),
    );
    let reply = c.first_reply();
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 150],
        first_ms: None,
    });
    c.wait(400);
    c.speak(140);
    assert!(c.has(|a| matches!(a, Action::Flush)));
    let said = c.records("agent_say");
    assert_eq!(said[0].1["partial"], true, "{said:?}");
    // The dialog goes on for a moment: none of it is spoken.
    let late = part(&mut c, ReplyPart::Say(seg("And another thing.")));
    assert!(
        !late.iter().any(|a| matches!(a, Action::Synthesize { .. })),
        "{late:?}"
    );
    let (seq, _) = c.last_ask();
    c.send(Event::DialogDone {
        seq,
        result: Ok(()),
        ms: 900,
    });
    assert_eq!(c.core.phase(), PhaseName::Listening);
}

#[test]
fn a_dialog_failing_mid_stream_gets_the_error_prompt() {
    let mut c = Call::answered(config());
    part(&mut c, ReplyPart::Say(seg("Let me check.")));
    let (seq, _) = c.last_ask();
    c.send(Event::DialogDone {
        seq,
        result: Err(DialogError::Timeout(8_000)),
        ms: 8_000,
    });
    let said = c.records("agent_say");
    assert!(
        said.last().is_some_and(|(_, v)| v["text"]
            .as_str()
            .unwrap_or("")
            .contains("technical trouble")),
        "{said:?}"
    );
    let errors = c.records("error");
    assert!(
        errors.iter().any(|(_, e)| e["stage"] == "dialog"),
        "{errors:?}"
    );
}

// ---- pause, resume, backchannels (the default configuration) ----

fn pausing() -> Config {
    let mut cfg = config();
    cfg.vad.pause_on_voice = true;
    cfg.vad.resume_after_ms = 240;
    cfg.vad.backchannel_max_ms = 700;
    cfg
}

/// The frames sent between two times (exclusive, inclusive).
fn frames_between(c: &Call, from: u64, to: u64) -> usize {
    c.log
        .iter()
        .filter(|(at, a)| *at > from && *at <= to && matches!(a, Action::SendAudio(_)))
        .count()
}

/// The caller makes a sound for `ms` (voiced frames below min_speech_ms are a cough).
fn pause_then(c: &mut Call, ms: u64) -> u64 {
    let onset = c.now + 20;
    c.speak(ms);
    onset
}

#[test]
fn a_cough_pauses_the_reply_in_its_tick_and_it_resumes_to_the_end() {
    let mut c = Call::answered(pausing());
    let text = "Thank you for calling, let me tell you about our offers.";
    c.reply(say(text, true, listen()), 3_000);
    c.wait(400);
    let onset = pause_then(&mut c, 60); // 60 ms: never speech (min_speech_ms is 100)
    let paused = c.records("pause");
    assert_eq!(paused.len(), 1);
    assert_eq!(
        paused[0].0, onset,
        "paused in the tick of the first voiced frame"
    );
    assert_eq!(
        frames_between(&c, onset - 20, c.now),
        0,
        "nothing sent from the voiced frame on"
    );
    c.wait(200);
    assert!(c.records("resume").is_empty(), "too soon to resume");
    c.wait(100);
    let resumed = c.records("resume");
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].1["by"], "noise");
    // The rest of the reply plays; nothing was flushed, the caller hears all of it.
    c.wait(3_200);
    c.play_marks();
    // One flush, at the pause (the PBX's queue, sent again on resume); no cut.
    let flushes: Vec<u64> = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Flush))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(flushes, vec![onset]);
    assert!(paused[0].1["resend_frames"].as_u64() > Some(0));
    assert!(c.records("barge_in").is_empty());
    let end = c.records("playout_end");
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].1["complete"], true);
    assert_eq!(end[0].1["heard"], text);
    assert_eq!(c.core.phase(), PhaseName::Listening);
}

/// The caller's line carries `frames` frames of `first`, one per tick.
fn frames_of(c: &mut Call, first: i16, frames: usize) {
    for _ in 0..frames {
        c.now += 20;
        c.send(Event::Media(MediaEvent::Audio(vec![first; FRAME])));
        c.send(Event::Tick);
    }
}

/// The caller's line carries `frames` frames that may be a voice starting, one per tick.
fn onset_frames(c: &mut Call, frames: usize) {
    frames_of(c, ONSET, frames);
}

#[test]
fn an_onset_pauses_the_reply_in_its_tick_and_it_goes_on_60_ms_later_when_no_voice_follows() {
    let mut c = Call::answered(pausing());
    let text = "Thank you for calling, let me tell you about our offers.";
    c.reply(say(text, true, listen()), 3_000);
    c.wait(400);
    let at = c.now + 20;
    onset_frames(&mut c, 1);
    let paused = c.records("pause");
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].0, at, "paused in the tick of the onset");
    assert_eq!(paused[0].1["on"], "onset");
    assert_eq!(frames_between(&c, at - 20, c.now), 0);
    // Three frames of quiet: the reply goes on, 60 ms after it stopped.
    frames_of(&mut c, 0, 2);
    assert!(c.records("resume").is_empty());
    frames_of(&mut c, 0, 1);
    let resumed = c.records("resume");
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].0, at + 60);
    assert_eq!(resumed[0].1["by"], "unconfirmed");
    c.wait(20);
    assert!(frames_between(&c, at + 40, c.now) > 0, "sending again");
    // Another onset within the second after pauses nothing; a voice does.
    c.wait(200);
    onset_frames(&mut c, 2);
    assert_eq!(c.records("pause").len(), 1);
    let cough = pause_then(&mut c, 60);
    let paused = c.records("pause");
    assert_eq!(paused.len(), 2);
    assert_eq!((paused[1].0, &paused[1].1["on"]), (cough, &json!("voice")));
    c.wait(3_600);
    c.play_marks();
    assert!(c.records("barge_in").is_empty());
    let end = c.records("playout_end");
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].1["complete"], true);
    assert_eq!(end[0].1["heard"], text);
}

#[test]
fn an_onset_that_turns_into_speech_cuts_the_reply_as_a_voice_would() {
    let mut c = Call::answered(pausing());
    c.reply(
        say(
            "Thank you for calling, let me tell you about our offers.",
            true,
            listen(),
        ),
        3_000,
    );
    c.wait(400);
    let at = c.now + 20;
    onset_frames(&mut c, 1);
    c.speak(800);
    assert_eq!(c.records("pause").len(), 1);
    assert!(c.records("resume").is_empty());
    let barge = c.records("barge_in");
    assert_eq!(barge.len(), 1, "{:?}", c.records("pause"));
    assert_eq!(
        frames_between(&c, at - 20, c.now),
        0,
        "silent from the onset on"
    );
}

#[test]
fn a_backchannel_is_transcribed_and_the_reply_resumes_without_asking_the_dialog() {
    let mut c = Call::answered(pausing());
    let text = "Your order left the warehouse yesterday and will arrive tomorrow morning.";
    c.reply(say(text, true, listen()), 4_000);
    let asks_before = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Dialog { .. }))
        .count();
    c.wait(600);
    pause_then(&mut c, 300); // "mm-hm"
    c.wait(700); // the utterance ends (600 ms of silence)
    let (seq, _) = c
        .log
        .iter()
        .find_map(|(_, a)| match a {
            Action::Transcribe { seq, audio, .. } => Some((*seq, audio.len())),
            _ => None,
        })
        .expect("the short utterance went to ASR");
    assert_eq!(c.core.phase(), PhaseName::Speaking, "still paused, not cut");
    // From the streaming recognizer: its record says so, as every transcript record does.
    c.send(Event::Asr {
        seq,
        result: Ok(Transcript {
            text: " Mm-hmm. ".into(),
            streamed: true,
            ..Transcript::default()
        }),
        ms: 250,
    });
    assert_eq!(c.records("resume")[0].1["by"], "backchannel");
    let heard = c.records("transcript");
    assert_eq!(heard[0].1["backchannel"], true);
    assert_eq!(heard[0].1["streamed"], true);
    c.wait(4_000);
    c.play_marks();
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], true);
    assert_eq!(end[0].1["heard"], text);
    let asks_after = c
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Dialog { .. }))
        .count();
    // Only the heard report of the finished reply: no input from the backchannel.
    assert_eq!(asks_after, asks_before + 1);
    assert!(c.records("barge_in").is_empty());
}

#[test]
fn a_short_interruption_is_a_barge_in_and_its_words_are_the_callers_input() {
    let mut c = Call::answered(pausing());
    c.reply(
        say(
            "Our offers this week include phones, tablets and watches.",
            true,
            listen(),
        ),
        4_000,
    );
    c.wait(600);
    pause_then(&mut c, 400); // "No, stop."
    c.wait(700);
    let seq = transcribe_seqs(&c)[0];
    c.transcribed(seq, "No, stop.", 250);
    assert!(c.has(|a| matches!(a, Action::Flush)));
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], false);
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("No, stop.".into()))
    );
    assert_eq!(c.core.phase(), PhaseName::Thinking);
}

#[test]
fn long_speech_over_a_paused_reply_cuts_it_at_the_backchannel_limit() {
    let mut c = Call::answered(pausing());
    c.reply(
        say("Let me tell you about our offers.", true, listen()),
        4_000,
    );
    c.wait(400);
    let onset = pause_then(&mut c, 900);
    let flush_at = c.records("barge_in").first().map(|(t, _)| *t).expect("cut");
    // The detector counts voice from its first frame: the cut comes at 700 ms of it.
    assert!(
        flush_at >= onset + 680 && flush_at <= onset + 720,
        "{flush_at} vs {onset}"
    );
    assert_eq!(
        frames_between(&c, onset - 20, c.now),
        0,
        "silent since the onset"
    );
    c.wait(700);
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
}

#[test]
fn an_answer_at_the_end_of_a_question_is_heard_with_pausing_on() {
    let mut c = Call::answered(pausing());
    c.reply(say("What is your order number?", true, listen()), 1_000);
    c.wait(800);
    c.speak(200);
    c.play_marks();
    c.speak(1_500);
    c.wait(700);
    let seqs = transcribe_seqs(&c);
    assert!(
        !seqs.is_empty(),
        "the answer was dropped; phase {:?}",
        c.core.phase()
    );
    c.transcribed(*seqs.last().unwrap_or(&0), "five five four two one", 300);
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("five five four two one".into()))
    );
}

#[test]
fn a_pause_with_little_left_waits_for_its_backchannel_check() {
    let mut c = Call::answered(pausing());
    let text = "Your order has shipped.";
    c.reply(say(text, true, listen()), 600);
    // One frame is still to go out; the caller says "okay" over the last words.
    c.wait(520);
    pause_then(&mut c, 300);
    c.wait(700);
    let seq = transcribe_seqs(&c)[0];
    // The transcript takes its time: the reply is not taken as played meanwhile.
    c.wait(4_000);
    assert!(
        c.records("playout_end").is_empty(),
        "{:?}",
        c.records("error")
    );
    c.transcribed(seq, "Okay.", 4_000);
    c.wait(200);
    c.play_marks();
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], true);
    assert_eq!(end[0].1["heard"], text);
}

/// The question has gone out but its marks are late (lost): the caller's short "yes" is their
/// answer, not a backchannel that resumes nothing.
#[test]
fn a_short_answer_after_the_whole_question_went_out_is_the_callers_input() {
    let mut c = Call::answered(pausing());
    c.reply(say("Did you say 5, 5, 4, 2, 1?", true, listen()), 600);
    c.wait(1_000); // all sent and played; no marks come back
    c.speak(300); // "yes"
    assert!(c.records("pause").is_empty());
    assert!(!c.records("barge_in").is_empty());
    c.wait(700);
    let seq = *transcribe_seqs(&c).last().expect("the answer went to ASR");
    c.transcribed(seq, "Yes.", 300);
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("Yes.".into()))
    );
}

/// The dialog ends its streamed reply with a hang-up while a cough paused it: the farewell
/// plays on at once (it cannot be interrupted), it is not left paused.
#[test]
fn a_paused_reply_that_turns_into_a_farewell_plays_on() {
    let mut c = Call::answered(pausing());
    part(&mut c, ReplyPart::Begin { barge_in: true });
    let first = part(
        &mut c,
        ReplyPart::Say(seg("Thank you for calling, and goodbye.")),
    );
    let reply = first
        .iter()
        .find_map(|a| match a {
            Action::Synthesize { reply, .. } => Some(*reply),
            _ => None,
        })
        .expect("synthesized");
    c.send(Event::TtsAudio {
        reply,
        seg: 0,
        samples: vec![500; FRAME * 60],
        first_ms: Some(20),
    });
    c.send(Event::TtsDone { reply, seg: 0 });
    c.wait(200);
    c.speak(40); // a cough
    assert_eq!(c.records("pause").len(), 1);
    part(
        &mut c,
        ReplyPart::End {
            send_dtmf: None,
            next: Next::Hangup {
                reason: "done".into(),
            },
        },
    );
    c.speak(40);
    c.wait(40);
    assert_eq!(c.records("resume")[0].1["by"], "farewell");
    c.wait(1_400);
    c.play_marks();
    c.wait(100);
    assert!(c.has(|a| matches!(a, Action::Hangup { .. })));
    let end = c.records("playout_end");
    assert_eq!(end[0].1["complete"], true);
}

/// Words with gaps over a paused reply: longer than a backchannel though with little voice.
/// The caller's turn is heard in full.
#[test]
fn speech_with_gaps_over_a_paused_reply_is_the_callers_turn() {
    let mut c = Call::answered(pausing());
    c.reply(
        say(
            "Let me tell you about our offers this week.",
            true,
            listen(),
        ),
        4_000,
    );
    c.wait(400);
    c.speak(200);
    c.wait(300);
    c.speak(300);
    c.wait(700);
    assert!(
        !c.records("barge_in").is_empty(),
        "{:?}",
        c.records("resume")
    );
    let seq = *transcribe_seqs(&c).last().expect("the turn went to ASR");
    c.transcribed(seq, "No, Tuesday.", 200);
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("No, Tuesday.".into()))
    );
}

/// A flow state or an agent profile chooses for its own replies: the config pauses, this
/// question cuts at once; the config cuts, this explanation pauses.
#[test]
fn a_reply_may_choose_to_pause_or_to_cut() {
    let cuts = |pause| {
        Next::Listen(Expectation {
            pause_on_voice: Some(pause),
            ..Expectation::default()
        })
    };
    let mut c = Call::answered(pausing());
    c.reply(
        say("Please say your PIN now, or press it.", true, cuts(false)),
        3_000,
    );
    c.wait(400);
    let onset = c.now + 20;
    c.speak(200);
    assert!(c.records("pause").is_empty());
    let barge = c.records("barge_in");
    assert_eq!(barge.len(), 1);
    assert!(
        barge[0].0 <= onset + 140,
        "cut at {} for a voice at {onset}",
        barge[0].0
    );

    let mut c = Call::answered(config());
    let text = "Our stores open at nine every day of the week.";
    c.reply(say(text, true, cuts(true)), 3_000);
    c.wait(400);
    c.speak(60); // a cough
    c.wait(300);
    assert_eq!(c.records("resume")[0].1["by"], "noise");
    c.wait(3_000);
    c.play_marks();
    assert_eq!(c.records("playout_end")[0].1["heard"], text);
}

/// "Okay... wait, what?": a second utterance while the first is checked is the caller
/// talking; both reach the dialog, joined, nothing is resumed over them.
#[test]
fn a_second_utterance_during_a_backchannel_check_joins_the_first() {
    let mut c = Call::answered(pausing());
    c.reply(
        say(
            "Our offers this week include phones, tablets and watches.",
            true,
            listen(),
        ),
        4_000,
    );
    c.wait(600);
    c.speak(300); // "okay"
    c.wait(700);
    c.speak(300); // "wait, what?"
    c.wait(700);
    let seqs = transcribe_seqs(&c);
    assert_eq!(seqs.len(), 2, "{seqs:?}");
    assert!(!c.records("barge_in").is_empty());
    assert_eq!(c.core.phase(), PhaseName::Recognizing);
    for (seq, text) in [(seqs[1], "Wait, what?"), (seqs[0], "Okay.")] {
        c.transcribed(seq, text, 200);
    }
    assert_eq!(
        c.last_ask().1,
        DialogCmd::Input(Input::Speech("Okay. Wait, what?".into()))
    );
    assert!(c.records("resume").is_empty());
}

// ---- Early endpointing: the end-of-turn model and the transcript of the pause ----

/// A call with the end-of-turn model loaded, listening after a greeting that asked `next`.
fn listening_with_model(next: Next) -> Call {
    let mut cfg = config();
    cfg.turn.speculate = true;
    let mut c = Call::with_core(
        CallCore::new(Arc::new(cfg), Box::new(Scripted::default())).with_turn_model(true),
    );
    assert!(c.has(|a| matches!(a, Action::Answer)));
    c.send(Event::Answered(Ok(())));
    c.reply(say("What can I do for you?", true, next), 400);
    c.wait(600);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c
}

impl Call {
    /// The caller is silent for `ms`, the PBX sending silent frames (as most do).
    fn quiet(&mut self, ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for _ in 0..ms / 20 {
            self.now += 20;
            out.extend(self.send(Event::Media(MediaEvent::Audio(vec![0; FRAME]))));
            out.extend(self.send(Event::Tick));
        }
        out
    }

    /// The pause check and the speculative transcription asked since `t`: (check id, ASR seq).
    fn pause_checks_since(&self, t: u64) -> (Vec<u64>, Vec<u64>) {
        let mut ids = Vec::new();
        let mut seqs = Vec::new();
        for (at, a) in &self.log {
            match a {
                Action::CheckTurn { id, .. } if *at >= t => ids.push(*id),
                Action::Transcribe { seq, .. } if *at >= t => seqs.push(*seq),
                _ => {}
            }
        }
        (ids, seqs)
    }

    fn verdict(&mut self, id: u64, probability: f32) -> Vec<Action> {
        self.send(Event::TurnVerdict {
            id,
            result: Ok(Verdict {
                probability,
                infer_ms: 40,
                wait_ms: 0,
            }),
        })
    }

    fn inputs(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Dialog {
                    cmd: DialogCmd::Input(Input::Speech(t)),
                    ..
                } => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// When the last speech_end was recorded, and its endpoint (silence) in ms.
    fn speech_end(&self) -> Option<(u64, u64)> {
        self.records("speech_end")
            .last()
            .map(|(at, f)| (*at, f["endpoint_ms"].as_u64().unwrap_or(0)))
    }
}

#[test]
fn a_complete_answer_ends_the_turn_at_the_pause_with_its_transcript_ready() {
    let mut c = listening_with_model(listen());
    let from = c.now;
    c.speak(400);
    c.quiet(200);
    let (ids, seqs) = c.pause_checks_since(from);
    assert_eq!(
        (ids.len(), seqs.len()),
        (1, 1),
        "asked once at the pause (160 ms)"
    );
    c.quiet(40);
    c.verdict(ids[0], 0.93);
    c.transcribed(seqs[0], " Yes. ", 60);
    assert!(c.inputs().is_empty(), "not before the next frame");
    c.quiet(20);
    let (_, endpoint) = c.speech_end().expect("the turn ended");
    assert!(
        endpoint <= 280,
        "ended {endpoint} ms into the silence, not 600"
    );
    assert_eq!(c.inputs(), vec!["Yes.".to_string()]);
    assert_eq!(
        c.pause_checks_since(from).1.len(),
        1,
        "the pause's transcript is the turn's: no second request"
    );
    assert_eq!(
        c.records("speech_end")[0].1["turn_probability"],
        0.93f32 as f64
    );
    // The reply's turn record says how much of ASR ran before the endpoint.
    c.reply(say("Great.", true, listen()), 200);
    c.quiet(40);
    let turn = c.records("turn");
    assert_eq!(turn[0].1["asr_early_ms"], 60, "{turn:?}");
}

#[test]
fn an_unfinished_utterance_waits_and_the_caller_gets_one_answer_to_all_of_it() {
    let mut c = listening_with_model(listen());
    let from = c.now;
    c.speak(800); // "my order number is"
    c.quiet(240);
    let (ids, seqs) = c.pause_checks_since(from);
    c.verdict(ids[0], 0.12);
    c.quiet(700);
    assert!(
        c.speech_end().is_none(),
        "600 ms of silence does not end an unfinished turn"
    );
    let again = c.now;
    c.speak(1_200); // "five five four two one"
    // The first pause's transcript comes late: it is not the caller's turn any more.
    c.transcribed(seqs[0], "My order number is", 500);
    c.quiet(200);
    let (ids2, seqs2) = c.pause_checks_since(again);
    assert_eq!((ids2.len(), seqs2.len()), (1, 1));
    // The model hears all of it; ASR only what came after the first pause.
    let (model_audio, asr_audio) = c
        .log
        .iter()
        .fold((0, 0), |(m, a), (at, action)| match action {
            Action::CheckTurn { audio, .. } if *at >= again => (audio.len(), a),
            Action::Transcribe { audio, .. } if *at >= again => (m, audio.len()),
            _ => (m, a),
        });
    assert!(model_audio >= (800 + 1_200) / 20 * FRAME, "{model_audio}");
    assert!(asr_audio < (1_200 + 1_000) / 20 * FRAME, "{asr_audio}");
    c.verdict(ids2[0], 0.97);
    c.transcribed(seqs2[0], "55421.", 300);
    c.quiet(20);
    assert_eq!(c.inputs(), vec!["My order number is 55421.".to_string()]);
}

#[test]
fn words_that_trail_off_wait_though_the_model_says_complete() {
    let mut c = listening_with_model(listen());
    c.speak(800);
    c.quiet(200);
    let (ids, seqs) = c.pause_checks_since(0);
    let (id, seq) = (*ids.last().unwrap(), *seqs.last().unwrap());
    c.verdict(id, 0.9);
    c.transcribed(seq, "I would like to change my address and", 100);
    c.quiet(1_200);
    assert!(
        c.speech_end().is_none(),
        "1,400 ms: still the caller's turn"
    );
    c.quiet(100);
    let (_, endpoint) = c.speech_end().expect("ended at turn.max_silence_ms");
    assert_eq!(endpoint, 1_500);
    assert_eq!(
        c.inputs(),
        vec!["I would like to change my address and".to_string()]
    );
}

#[test]
fn a_number_being_read_out_never_ends_early_and_waits_longer_when_unfinished() {
    let number = || {
        Next::Listen(Expectation {
            digits: Some(DigitSpec {
                max: 10,
                terminator: Some('#'),
            }),
            ..Expectation::default()
        })
    };
    // Complete by the model: the fixed endpoint, not at once (digits come in groups).
    let mut c = listening_with_model(number());
    let from = c.now;
    c.speak(600);
    c.quiet(220);
    let (ids, seqs) = c.pause_checks_since(from);
    c.verdict(ids[0], 0.95);
    c.transcribed(seqs[0], "5 5 4", 50);
    c.quiet(360);
    assert!(c.speech_end().is_none());
    c.quiet(40);
    assert_eq!(c.speech_end().map(|e| e.1), Some(600));
    // Unfinished: turn.digits_silence_ms.
    let mut c = listening_with_model(number());
    let from = c.now;
    c.speak(600);
    c.quiet(220);
    let (ids, _) = c.pause_checks_since(from);
    c.verdict(ids[0], 0.2);
    c.quiet(2_240);
    assert!(c.speech_end().is_none(), "2,460 ms");
    c.quiet(60);
    assert_eq!(c.speech_end().map(|e| e.1), Some(2_500));
}

#[test]
fn without_the_models_answer_the_fixed_silence_ends_the_turn_with_the_early_transcript() {
    let mut c = listening_with_model(listen());
    let from = c.now;
    c.speak(500);
    c.quiet(200);
    let (ids, seqs) = c.pause_checks_since(from);
    c.send(Event::TurnVerdict {
        id: ids[0],
        result: Err("every turn-model slot is busy".into()),
    });
    c.transcribed(seqs[0], "Where is my parcel?", 150);
    c.quiet(380);
    assert!(c.speech_end().is_none());
    c.quiet(20);
    assert_eq!(c.speech_end().map(|e| e.1), Some(600));
    assert_eq!(c.inputs(), vec!["Where is my parcel?".to_string()]);
    assert_eq!(c.pause_checks_since(from).1.len(), 1);
    assert_eq!(
        c.records("turn_check")[0].1["error"],
        "every turn-model slot is busy"
    );
}

#[test]
fn words_that_trail_off_after_the_end_wait_for_the_rest_of_the_sentence() {
    let mut c = listening_with_model(listen());
    let from = c.now;
    c.speak(800);
    c.quiet(200);
    let (ids, seqs) = c.pause_checks_since(from);
    // The model is sure; the turn ends at once, before its words are known.
    c.verdict(ids[0], 0.95);
    c.quiet(20);
    assert!(c.speech_end().is_some());
    c.quiet(300);
    c.transcribed(seqs[0], "I'd like to talk to", 500);
    c.quiet(400);
    assert!(c.inputs().is_empty(), "the sentence is not over");
    let again = c.now;
    c.speak(600);
    c.quiet(200);
    let (ids2, seqs2) = c.pause_checks_since(again);
    c.verdict(ids2[0], 0.9);
    c.transcribed(seqs2[0], "an agent.", 100);
    c.quiet(20);
    assert_eq!(
        c.inputs(),
        vec!["I'd like to talk to an agent.".to_string()]
    );
    // And one that never goes on is heard after turn.max_silence_ms.
    let mut c = listening_with_model(listen());
    let from = c.now;
    c.speak(800);
    c.quiet(200);
    let (ids, seqs) = c.pause_checks_since(from);
    c.verdict(ids[0], 0.95);
    c.quiet(20);
    c.transcribed(seqs[0], "My order number is", 300);
    let end = c.speech_end().unwrap().0 - 220;
    while c.inputs().is_empty() && c.now < end + 3_000 {
        c.quiet(20);
    }
    assert_eq!(
        c.now - end,
        1_500,
        "heard at turn.max_silence_ms after the voice"
    );
}

#[test]
fn speech_over_a_reply_is_not_checked_at_its_pauses() {
    let mut cfg = config();
    cfg.turn.speculate = true;
    let mut c = Call::with_core(
        CallCore::new(Arc::new(cfg), Box::new(Scripted::default())).with_turn_model(true),
    );
    c.send(Event::Answered(Ok(())));
    // A prompt the caller cannot interrupt: their speech over it is ignored, and not sent
    // to the model or ASR at its pauses either.
    c.reply(
        say("Please listen carefully to the following.", false, listen()),
        3_000,
    );
    c.quiet(200);
    let from = c.now;
    c.speak(400);
    c.quiet(400);
    assert_eq!(c.pause_checks_since(from), (vec![], vec![]));
}

#[test]
fn trailing_words_are_told_from_complete_ones() {
    use crate::call::turn::trails_off;
    for t in [
        "My order number is",
        "I want to change my address and",
        "It's for the,",
        "Can I speak to um",
        "so I was thinking...",
    ] {
        assert!(trails_off(t), "{t}");
    }
    for t in [
        "Yes.",
        "My order number is 55421",
        "yes please",
        "No",
        "",
        "that's it",
    ] {
        assert!(!trails_off(t), "{t}");
    }
}

/// Frames of distinct content (each frame's samples its number), so audio can be matched.
fn speak_numbered(c: &mut Call, ms: u64, first: &mut i16) {
    for _ in 0..ms / 20 {
        c.now += 20;
        *first = first.wrapping_add(1).max(1);
        c.send(Event::Media(MediaEvent::Audio(vec![*first; FRAME])));
        c.send(Event::Tick);
    }
}

#[test]
fn a_streaming_recognizer_gets_each_utterance_as_it_comes_and_every_commit_names_that_audio() {
    let mut cfg = config();
    cfg.turn.speculate = true;
    let mut c = Call::with_core(
        CallCore::new(Arc::new(cfg), Box::new(Scripted::default())).with_stream_asr(true),
    );
    c.send(Event::Answered(Ok(())));
    c.reply(say("What can I do for you?", true, listen()), 400);
    c.wait(600);
    c.play_marks();
    let mut n = 0i16;
    // A pause the turn logic checks (its audio transcribed ahead), the caller goes on, ends.
    speak_numbered(&mut c, 500, &mut n);
    c.wait(300);
    speak_numbered(&mut c, 400, &mut n);
    c.wait(700);
    // A second utterance.
    speak_numbered(&mut c, 300, &mut n);
    c.wait(700);
    let mut streamed: Vec<i16> = Vec::new();
    let (mut begins, mut commits) = (0, Vec::new());
    for (_, a) in &c.log {
        match a {
            Action::StreamAudio { begin, audio } => {
                if *begin {
                    begins += 1;
                    streamed.clear();
                }
                streamed.extend_from_slice(audio);
            }
            Action::Transcribe {
                audio,
                span: (from, to),
                speculative,
                ..
            } => {
                // What the recognizer was given, at the place the commit names, is exactly the
                // audio the batch engine would get.
                assert!(*to <= streamed.len(), "{to} > {}", streamed.len());
                assert_eq!(to - from, audio.len());
                assert_eq!(&streamed[*from..*to], &audio[..]);
                commits.push((*from, *to, *speculative));
            }
            _ => {}
        }
    }
    assert_eq!(begins, 2, "one stream start per utterance");
    // The pause (speculative, from 0), the rest from where it ended, the second utterance.
    assert_eq!(commits.len(), 3, "{commits:?}");
    assert_eq!((commits[0].0, commits[0].2), (0, true));
    assert_eq!(commits[1].0, commits[0].1);
    assert_eq!(commits[2].0, 0);
}

#[test]
fn without_a_streaming_recognizer_no_audio_is_streamed() {
    let mut c = listening(config());
    c.speak(500);
    c.wait(700);
    assert!(c.has(|a| matches!(a, Action::Transcribe { .. })));
    assert!(!c.has(|a| matches!(a, Action::StreamAudio { .. })));
}

/// A call listening after its greeting, transcribing at each pause and making the reply
/// ahead on that transcript (no end-of-turn model: turns end after 600 ms of silence).
fn listening_ahead() -> Call {
    let mut cfg = config();
    cfg.turn.speculate = true;
    cfg.turn.reply_ahead = true;
    let mut c = Call::with_core(CallCore::new(Arc::new(cfg), Box::new(Scripted::default())));
    c.send(Event::Answered(Ok(())));
    c.reply(say("What can I do for you?", true, listen()), 400);
    c.wait(600);
    c.play_marks();
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c
}

impl Call {
    /// The reply made ahead that was asked for, if any: (seq, input text).
    fn ahead_asked(&self) -> Option<(u64, String)> {
        self.log.iter().find_map(|(_, a)| match a {
            Action::Dialog {
                seq,
                cmd: DialogCmd::Ahead(Input::Speech(t)),
            } => Some((*seq, t.clone())),
            _ => None,
        })
    }

    /// The dialog streams `text` as the whole reply to ask `seq`, then is done.
    fn stream_reply(&mut self, seq: u64, text: &str) -> Vec<Action> {
        let mut out = self.send(Event::DialogPart {
            seq,
            part: ReplyPart::Begin { barge_in: true },
        });
        out.extend(self.send(Event::DialogPart {
            seq,
            part: ReplyPart::Say(Segment {
                text: text.into(),
                pause_after_ms: 0,
            }),
        }));
        out.extend(self.send(Event::DialogPart {
            seq,
            part: ReplyPart::End {
                send_dtmf: None,
                next: listen(),
            },
        }));
        out.extend(self.send(Event::DialogDone {
            seq,
            result: Ok(()),
            ms: 30,
        }));
        out
    }

    fn synthesized(&self, text: &str) -> Vec<u64> {
        self.log
            .iter()
            .filter_map(|(at, a)| match a {
                Action::Synthesize { text: t, .. } if t == text => Some(*at),
                _ => None,
            })
            .collect()
    }

    /// TTS answers every segment of the latest reply with `ms` of audio.
    fn reply_audio(&mut self, ms: u64) {
        let segs: Vec<(u64, usize)> = self
            .log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Synthesize { reply, seg, .. } => Some((*reply, *seg)),
                _ => None,
            })
            .collect();
        let last = segs.iter().map(|(r, _)| *r).max().unwrap_or(0);
        for (reply, seg) in segs.into_iter().filter(|(r, _)| *r == last) {
            let samples = vec![500; (ms as usize / 20) * FRAME];
            self.send(Event::TtsAudio {
                reply,
                seg,
                samples,
                first_ms: Some(10),
            });
            self.send(Event::TtsDone { reply, seg });
        }
    }
}

#[test]
fn a_reply_made_ahead_on_the_pause_plays_the_moment_the_turn_ends() {
    let mut c = listening_ahead();
    let from = c.now;
    c.speak(600);
    c.quiet(200);
    let (_, seqs) = c.pause_checks_since(from);
    assert_eq!(seqs.len(), 1);
    c.quiet(60);
    c.transcribed(seqs[0], "Where is my order?", 60);
    let (seq, text) = c.ahead_asked().expect("the reply is made ahead");
    assert_eq!(text, "Where is my order?");
    let out = c.stream_reply(seq, "It shipped yesterday.");
    // Its first sentence goes to the cache; nothing plays while the turn may go on.
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Prefetch { text } if text == "It shipped yesterday."))
    );
    assert!(c.synthesized("It shipped yesterday.").is_empty());
    assert_eq!(c.core.phase(), PhaseName::Listening);
    c.quiet(340);
    let (end_at, endpoint) = c.speech_end().expect("the turn ended at 600 ms of silence");
    assert_eq!(endpoint, 600);
    // Confirmed: the copy is the dialog, its reply plays at once; the dialog is not asked
    // again.
    assert!(c.has(|a| matches!(a, Action::Dialog { seq: s, cmd: DialogCmd::Adopt } if *s == seq)));
    assert!(c.inputs().is_empty(), "{:?}", c.inputs());
    assert_eq!(c.synthesized("It shipped yesterday."), vec![end_at]);
    c.reply_audio(200);
    c.quiet(40);
    let turn = c.records("turn");
    assert_eq!(turn[0].1["reply_ahead"], "done", "{turn:?}");
    assert_eq!(turn[0].1["dialog_ms"], 0, "{turn:?}");
}

#[test]
fn a_caller_who_goes_on_never_hears_the_reply_made_ahead_and_the_dialog_gets_all_of_it() {
    let mut c = listening_ahead();
    let from = c.now;
    c.speak(600);
    c.quiet(200);
    let (_, seqs) = c.pause_checks_since(from);
    c.transcribed(seqs[0], "Check my order", 60);
    let (seq, _) = c.ahead_asked().expect("made ahead");
    c.stream_reply(seq, "What is your order number?");
    // The caller goes on.
    c.speak(600);
    assert!(
        c.has(|a| matches!(a, Action::Dialog { seq: s, cmd: DialogCmd::Discard } if *s == seq))
    );
    c.quiet(200);
    let (_, seqs2) = c.pause_checks_since(from);
    assert_eq!(seqs2.len(), 2);
    c.transcribed(seqs2[1], "five five four two one", 60);
    c.quiet(400);
    assert!(c.speech_end().is_some());
    assert_eq!(
        c.inputs(),
        vec!["Check my order five five four two one".to_string()]
    );
    assert!(!c.has(|a| matches!(
        a,
        Action::Dialog {
            cmd: DialogCmd::Adopt,
            ..
        }
    )));
    assert!(c.synthesized("What is your order number?").is_empty());
}

#[test]
fn a_reply_that_cannot_be_made_ahead_is_made_when_the_turn_ends() {
    let mut c = listening_ahead();
    let from = c.now;
    c.speak(600);
    c.quiet(200);
    let (_, seqs) = c.pause_checks_since(from);
    c.transcribed(seqs[0], "Where is my order?", 60);
    let (seq, _) = c.ahead_asked().expect("made ahead");
    // It needs a webhook: not ahead.
    c.send(Event::DialogDone {
        seq,
        result: Err(DialogError::NotAhead("a webhook lookup".into())),
        ms: 2,
    });
    c.quiet(400);
    assert!(c.speech_end().is_some());
    assert_eq!(c.inputs(), vec!["Where is my order?".to_string()]);
    assert!(!c.has(|a| matches!(
        a,
        Action::Dialog {
            cmd: DialogCmd::Adopt,
            ..
        }
    )));
    assert!(
        c.records("error").is_empty(),
        "no error prompt: {:?}",
        c.records("error")
    );
}
