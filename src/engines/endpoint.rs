//! The Smart Turn v3 end-of-turn model (BSD-2, shipped in the PyPI wheel `pipecat-ai`): given
//! the caller's audio up to a short pause, the probability that the utterance is complete. It
//! runs in-process on ONNX Runtime, loaded at start from `libonnxruntime.so` (the PyPI wheel
//! `onnxruntime`); each inference (~50 ms of one core) runs on the blocking pool, one per
//! session slot, with a bounded wait: a call whose pause finds the queue full ends that turn on
//! silence alone, it never waits behind other calls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use tokio::sync::Semaphore;

use crate::audio::mel::{self, WhisperMel};
use crate::audio::resample::StreamResampler;
use crate::config::TurnConfig;
use crate::engines::hugepages::{self, Backed};

/// Why the model could not load or answer.
#[derive(Debug, thiserror::Error)]
pub enum TurnModelError {
    #[error("ONNX Runtime library {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("Smart Turn model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("every turn-model slot is busy (turn.threads, turn.queue)")]
    Busy,
    #[error("turn-model inference: {0}")]
    Inference(String),
}

/// One answer of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Probability that the utterance is complete.
    pub probability: f32,
    /// Time spent in the model (features and inference), excluding the wait for a slot.
    pub infer_ms: u64,
    /// Time waiting for a free slot.
    pub wait_ms: u64,
}

/// One session with every buffer an inference needs, allocated once at load: memory touched
/// at every pause stays warm and on huge pages (see `hugepages`), none is fresh.
struct Slot {
    session: Session,
    mel: WhisperMel,
    /// The model's input, written in place.
    input: Tensor<f32>,
    /// The last rate resampled from, and its resampler.
    resampler: Option<StreamResampler>,
    pcm: Vec<i16>,
    samples: Vec<f32>,
}

/// The loaded model, shared by every call.
pub struct SmartTurn {
    slots: Vec<Mutex<Slot>>,
    /// Running plus waiting inferences.
    admission: Arc<Semaphore>,
    /// Running inferences (one per slot).
    running: Arc<Semaphore>,
    huge_pages: Backed,
}

/// ONNX Runtime allows one environment per process: loaded once, reused.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(lib: &Path) -> Result<&'static ort::environment::Environment, TurnModelError> {
    let env = ENVIRONMENT.get_or_init(|| {
        ort::init_from(lib)
            .map_err(|e| e.to_string())?
            .with_name("sidecall")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|message| TurnModelError::Library {
        path: lib.to_path_buf(),
        message: message.clone(),
    })
}

impl SmartTurn {
    /// Loads the model the config names; `Ok(None)` when none is configured.
    pub fn from_config(
        cfg: &TurnConfig,
        resolve: impl Fn(&str) -> PathBuf,
    ) -> Result<Option<Self>, TurnModelError> {
        if cfg.model.is_empty() || cfg.onnxruntime.is_empty() {
            return Ok(None);
        }
        Self::load(
            &resolve(&cfg.onnxruntime),
            &resolve(&cfg.model),
            cfg.threads.max(1),
            cfg.queue,
        )
        .map(Some)
    }

    /// Loads ONNX Runtime from `lib` and the model from `model`, with `threads` sessions.
    pub fn load(
        lib: &Path,
        model: &Path,
        threads: usize,
        queue: usize,
    ) -> Result<Self, TurnModelError> {
        let lib_abs = std::fs::canonicalize(lib).map_err(|e| TurnModelError::Library {
            path: lib.to_path_buf(),
            message: e.to_string(),
        })?;
        let env = environment(&lib_abs)?;
        let model_err = |message: String| TurnModelError::Model {
            path: model.to_path_buf(),
            message,
        };
        if !model.is_file() {
            return Err(model_err("no such file".into()));
        }
        let before = hugepages::snapshot();
        let mut slots = Vec::with_capacity(threads);
        for _ in 0..threads.max(1) {
            let e = |e: ort::Error<ort::session::builder::SessionBuilder>| model_err(e.to_string());
            let session = Session::builder(env)
                .map_err(|e| model_err(e.to_string()))?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(e)?
                .with_intra_threads(1)
                .map_err(e)?
                .with_inter_threads(1)
                .map_err(e)?
                .commit_from_file(model)
                .map_err(|e| model_err(e.to_string()))?;
            if session.inputs().first().map(|i| i.name()) != Some("input_features") {
                return Err(model_err(
                    "not a Smart Turn v3 model (no `input_features` input)".into(),
                ));
            }
            let mut slot = Slot::new(session).map_err(|e| model_err(e.to_string()))?;
            // One run at load (on silence): ONNX Runtime sets up its buffers on the first,
            // which would otherwise be a caller's first pause.
            slot.run(&[]).map_err(|e| match e {
                TurnModelError::Inference(m) => model_err(m),
                other => model_err(other.to_string()),
            })?;
            slots.push(Mutex::new(slot));
        }
        let huge_pages = hugepages::back_new_memory(&before);
        let n = slots.len();
        Ok(Self {
            slots,
            admission: Arc::new(Semaphore::new(n.saturating_add(queue))),
            running: Arc::new(Semaphore::new(n)),
            huge_pages,
        })
    }

    /// How much of the model's memory went onto huge pages at load.
    pub fn huge_pages(&self) -> Backed {
        self.huge_pages
    }

    /// The probability that `audio` (the caller's utterance so far, at `rate`) is a complete
    /// turn. Fails at once with `Busy` when the queue is full.
    pub async fn complete(
        self: &Arc<Self>,
        audio: Vec<i16>,
        rate: u32,
    ) -> Result<Verdict, TurnModelError> {
        let _admitted = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| TurnModelError::Busy)?;
        let asked = Instant::now();
        let _running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TurnModelError::Busy)?;
        let wait_ms = elapsed_ms(asked);
        let me = self.clone();
        let started = Instant::now();
        let probability = tokio::task::spawn_blocking(move || me.infer(&audio, rate))
            .await
            .map_err(|e| TurnModelError::Inference(format!("inference task: {e}")))??;
        Ok(Verdict {
            probability,
            infer_ms: elapsed_ms(started),
            wait_ms,
        })
    }

    /// Runs the model on the calling thread (a free slot is guaranteed by `running`).
    pub fn infer(&self, audio: &[i16], rate: u32) -> Result<f32, TurnModelError> {
        // A slot whose lock is free (one exists: `running` admits at most one per slot).
        let mut guard = None;
        for slot in &self.slots {
            if let Ok(g) = slot.try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut slot = match guard {
            Some(g) => g,
            None => self
                .slots
                .first()
                .ok_or(TurnModelError::Busy)?
                .lock()
                .map_err(|_| TurnModelError::Inference("a previous inference panicked".into()))?,
        };
        slot.hear(audio, rate)?;
        let samples = std::mem::take(&mut slot.samples);
        let p = slot.run(&samples);
        slot.samples = samples;
        p
    }
}

impl Slot {
    fn new(session: Session) -> Result<Self, TurnModelError> {
        let input = Tensor::from_array((
            [1usize, mel::N_MELS, mel::N_FRAMES],
            vec![0.0f32; mel::N_MELS * mel::N_FRAMES],
        ))
        .map_err(|e| TurnModelError::Inference(e.to_string()))?;
        Ok(Self {
            session,
            mel: WhisperMel::new(),
            input,
            resampler: None,
            pcm: Vec::with_capacity(mel::WINDOW_SAMPLES),
            samples: Vec::with_capacity(mel::WINDOW_SAMPLES),
        })
    }

    /// Puts the last 8 s of `audio` (at `rate`) into `samples`, at 16 kHz.
    fn hear(&mut self, audio: &[i16], rate: u32) -> Result<(), TurnModelError> {
        let keep = usize::try_from(u64::from(rate) * 8).unwrap_or(usize::MAX);
        let audio = &audio[audio.len().saturating_sub(keep)..];
        self.pcm.clear();
        if rate == mel::RATE {
            self.pcm.extend_from_slice(audio);
        } else {
            let err = |e: crate::audio::AudioError| TurnModelError::Inference(e.to_string());
            let r = match &mut self.resampler {
                Some(r) if r.from_rate() == rate => r,
                slot => slot.insert(StreamResampler::new(rate, mel::RATE).map_err(err)?),
            };
            // `flush` also resets it for the next utterance; one that failed midway is
            // made anew next time.
            let done = r
                .process(audio, &mut self.pcm)
                .and_then(|()| r.flush(&mut self.pcm));
            if let Err(e) = done {
                self.resampler = None;
                return Err(err(e));
            }
        }
        self.samples.clear();
        self.samples
            .extend(self.pcm.iter().map(|&s| f32::from(s) / 32768.0));
        Ok(())
    }

    /// The model's score for `samples` (16 kHz, -1..1).
    fn run(&mut self, samples: &[f32]) -> Result<f32, TurnModelError> {
        let (_, features) = self.input.extract_tensor_mut();
        self.mel.features_into(samples, features);
        let outputs = self
            .session
            .run(ort::inputs!["input_features" => &self.input])
            .map_err(|e| TurnModelError::Inference(e.to_string()))?;
        let first = outputs
            .values()
            .next()
            .ok_or_else(|| TurnModelError::Inference("the model has no output".into()))?;
        let (_, values) = first
            .try_extract_tensor::<f32>()
            .map_err(|e| TurnModelError::Inference(e.to_string()))?;
        let p = values
            .first()
            .copied()
            .ok_or_else(|| TurnModelError::Inference("empty output".into()))?;
        if !p.is_finite() {
            return Err(TurnModelError::Inference(format!("score {p}")));
        }
        Ok(p.clamp(0.0, 1.0))
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
