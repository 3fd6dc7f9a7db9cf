//! Configuration: one TOML file, overridden by command-line flags and environment variables,
//! with secrets (API keys) read from the environment only. Validation names the bad key, its
//! line and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A configuration problem, with the file and line it was found at when known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Other { path: String, message: String },
}

fn default_true() -> bool {
    true
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub call: CallConfig,
    pub vad: VadConfig,
    pub turn: TurnConfig,
    pub dtmf: DtmfConfig,
    pub asr: AsrConfig,
    pub tts: TtsConfig,
    pub llm: LlmConfig,
    pub dialog: DialogConfig,
    /// Allow-listed transfer targets by name; the agent can reach nothing else.
    pub transfers: BTreeMap<String, TransferTarget>,
    pub admin: AdminConfig,
    pub asterisk: AsteriskConfig,
    pub freeswitch: FreeSwitchConfig,
    /// Where this config was read from, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// What happens on every call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallConfig {
    /// Internal sample rate: 8000 or 16000.
    pub sample_rate: u32,
    /// Hard limit on a call's length.
    pub max_duration_s: u64,
    /// Silence after a prompt before the dialog is told "no input".
    pub no_input_timeout_ms: u64,
    /// The key that always reaches a human.
    pub human_key: String,
    /// The transfer target that key (and escalations) go to.
    pub human_target: String,
    /// Played first on every call.
    pub disclosure: String,
    /// Played when an engine fails for good; then `on_error` happens.
    pub error_prompt: String,
    /// "transfer" (to `human_target`) or "hangup" after an engine failure.
    pub on_error: String,
    /// How many frames of agent audio may be queued at the PBX ahead of real time.
    pub playout_lead_frames: usize,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            sample_rate: 16_000,
            max_duration_s: 900,
            no_input_timeout_ms: 6_000,
            human_key: "0".into(),
            human_target: "agent".into(),
            disclosure: "You are speaking with an automated assistant.".into(),
            error_prompt: "Sorry, I am having technical trouble. Let me get someone to help you."
                .into(),
            on_error: "transfer".into(),
            playout_lead_frames: 2,
        }
    }
}

/// Voice activity detection and endpointing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// "webrtc" or "earshot".
    pub engine: String,
    /// webrtc-vad aggressiveness 0..3.
    pub webrtc_mode: u8,
    /// earshot score threshold 0..1.
    pub earshot_threshold: f32,
    /// earshot score from which a frame well above the line's noise floor may be a voice
    /// starting (the first 20 ms of a word score low): a reply that may pause pauses on it, and
    /// resumes after 60 ms of quiet unless a voice follows. At `earshot_threshold` or above:
    /// only a voice pauses.
    pub earshot_onset_threshold: f32,
    /// Voiced audio needed before speech counts as started.
    pub min_speech_ms: u64,
    /// Silence that ends a turn.
    pub end_silence_ms: u64,
    /// Longest utterance before it is cut and sent to ASR.
    pub max_utterance_ms: u64,
    /// Frames below this level never count as speech (dBFS).
    pub min_level_dbfs: f32,
    /// Whether callers may interrupt the agent at all.
    #[serde(default = "default_true")]
    pub barge_in: bool,
    /// Caller speech needed during playout before the agent stops.
    pub barge_in_min_ms: u64,
    /// At the first voiced frame over a reply the caller may interrupt, stop sending it at
    /// once (the PBX plays out only its lead); a cough, a click or a backchannel resumes it.
    pub pause_on_voice: bool,
    /// A sound that stopped this long before it became speech (a cough, a click) resumes the
    /// paused reply.
    pub resume_after_ms: u64,
    /// Speech shorter than this over a reply is transcribed before it cuts: a backchannel
    /// ("mm-hm", "okay", "right") resumes the reply, anything else is a barge-in and the
    /// caller's input. Longer speech cuts at once. 0: every speech past `barge_in_min_ms` cuts.
    pub backchannel_max_ms: u64,
    /// The agent's own voice coming back on the caller's channel (`[vad.echo]`).
    pub echo: EchoConfig,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            engine: "earshot".into(),
            webrtc_mode: 3,
            earshot_threshold: 0.5,
            earshot_onset_threshold: 0.35,
            min_speech_ms: 100,
            end_silence_ms: 600,
            max_utterance_ms: 15_000,
            min_level_dbfs: -50.0,
            barge_in: true,
            barge_in_min_ms: 120,
            pause_on_voice: true,
            resume_after_ms: 240,
            backchannel_max_ms: 700,
            echo: EchoConfig::default(),
        }
    }
}

/// Echo gating: the agent's own voice coming back on the caller's channel (line echo, a
/// speakerphone) never counts as the caller speaking, so it cannot interrupt the agent. The
/// echo's delay and level are learned on each call from the audio sidecall plays.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EchoConfig {
    /// Gate voice activity on the agent's echo.
    pub enabled: bool,
    /// A caller frame counts as the caller's voice only when it is this much louder (dB) than
    /// the echo predicted for it. Once the echo path is learned and predicts tightly, the gate
    /// narrows this down to 3 sigma of the path's own spread (not below 3 dB).
    pub margin_db: f32,
    /// Until the echo path is learned, the echo is assumed at most this much (dB) quieter than
    /// the loudest agent audio within `max_delay_ms`.
    pub default_erl_db: f32,
    /// Longest echo delay looked for, from the agent audio sent to its echo coming back (the
    /// PBX's queue included).
    pub max_delay_ms: u64,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            margin_db: 6.0,
            default_erl_db: 6.0,
            max_delay_ms: 600,
        }
    }
}

/// Early endpointing: at a short pause the Smart Turn model says whether the caller's
/// utterance is complete. Without a model, turns end after `vad.end_silence_ms` of silence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// The Smart Turn v3 ONNX file (`scripts/test` installs it from the PyPI wheel
    /// `pipecat-ai`); empty: silence-only endpointing.
    pub model: String,
    /// ONNX Runtime's `libonnxruntime.so` (from the PyPI wheel `onnxruntime`).
    pub onnxruntime: String,
    /// Silence after which the model is asked (and the audio so far transcribed ahead), counted
    /// in 20 ms frames.
    pub pause_ms: u64,
    /// Model score from which the utterance counts as complete.
    pub threshold: f32,
    /// The model found the utterance unfinished: silence that still ends the turn.
    pub max_silence_ms: u64,
    /// Same while the caller reads out a number (the question expects digits).
    pub digits_silence_ms: u64,
    /// Inferences run at once (each on one core, off the call tasks).
    pub threads: usize,
    /// Inferences that may wait for a free thread; past that a pause ends on silence alone.
    pub queue: usize,
    /// Transcribe the audio so far at the pause, so the transcript is ready at the endpoint.
    pub speculate: bool,
    /// With that transcript, make the reply ahead (the dialog or the LLM on a copy of the
    /// conversation, and its first sentence's audio): the caller who has finished hears it at
    /// once; one who goes on never hears it, and the dialog is told nothing of it.
    pub reply_ahead: bool,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            onnxruntime: String::new(),
            pause_ms: 160,
            threshold: 0.5,
            max_silence_ms: 1_500,
            digits_silence_ms: 2_500,
            threads: 1,
            queue: 8,
            speculate: true,
            reply_ahead: true,
        }
    }
}

/// Keypad entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DtmfConfig {
    pub inter_digit_timeout_ms: u64,
    pub terminator: String,
    pub max_digits: usize,
}

impl Default for DtmfConfig {
    fn default() -> Self {
        Self {
            inter_digit_timeout_ms: 3_000,
            terminator: "#".into(),
            max_digits: 20,
        }
    }
}

/// Speech recognition over an OpenAI-compatible transcription API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    /// Base URL up to and including `/v1`.
    pub url: String,
    pub model: String,
    pub language: String,
    pub timeout_ms: u64,
    /// Requests sidecall sends to the ASR server at once; more wait in sidecall, where the wait
    /// is measured (turn records' `asr_queue_ms`, `/health`). Set it to what the server runs in
    /// parallel (`scripts/asr-server --workers`, 2 by default).
    pub max_concurrent: usize,
    /// Retries after a failed request (timeouts, 5xx) before giving up on the utterance.
    pub retries: u32,
    /// Environment variable holding the API key (never put keys in this file).
    pub api_key_env: String,
    #[serde(skip)]
    pub api_key: Option<Secret>,
    /// Streaming recognition (OpenAI Realtime transcription); off unless `url` is set. The
    /// batch engine above stays the fallback for any turn the stream cannot transcribe.
    pub stream: AsrStreamConfig,
}

/// Streaming speech recognition over the OpenAI Realtime transcription protocol
/// (`/v1/realtime?intent=transcription`): the caller's audio goes to the server while they
/// speak, each turn is committed at its end (and at each pause, with `turn.speculate`), and
/// the final transcript comes back over the same socket. OpenAI, Azure OpenAI and speaches
/// serve it. The API key is the batch engine's (`asr.api_key_env`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsrStreamConfig {
    /// `ws://` or `wss://` URL of the realtime endpoint, query included; empty: no streaming.
    pub url: String,
    /// The transcription model the server is to use.
    pub model: String,
    /// "ga": `session.update` with a session of type `transcription` (OpenAI's current API,
    /// Azure, speaches); "beta": `transcription_session.update` (OpenAI's beta API); "vllm":
    /// vLLM's own dialect of `/v1/realtime` (a realtime model such as Voxtral; 16 kHz).
    pub protocol: String,
    /// Sample rate of the PCM sent (24000 for OpenAI; whatever the server accepts elsewhere).
    pub rate: u32,
    /// Connecting, and the server's answer to session.update.
    pub connect_timeout_ms: u64,
    /// From a commit to its final transcript; past it, the batch engine transcribes the turn.
    pub timeout_ms: u64,
    /// After a failed connection, the time the batch engine alone is used before retrying.
    pub retry_after_ms: u64,
}

impl Default for AsrStreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: "gpt-4o-transcribe".into(),
            protocol: "ga".into(),
            rate: 24_000,
            connect_timeout_ms: 3_000,
            timeout_ms: 2_000,
            retry_after_ms: 5_000,
        }
    }
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8765/v1".into(),
            model: "tiny.en".into(),
            language: "en".into(),
            timeout_ms: 8_000,
            max_concurrent: 2,
            retries: 1,
            api_key_env: "SIDECALL_ASR_API_KEY".into(),
            api_key: None,
            stream: AsrStreamConfig::default(),
        }
    }
}

/// Speech synthesis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// "espeak" (offline, default), "piper" (offline, neural) or "openai".
    pub engine: String,
    /// espeak-ng voice, or the API's voice name.
    pub voice: String,
    /// espeak-ng words per minute.
    pub rate: u32,
    /// espeak-ng pitch 0..99.
    pub pitch: u32,
    /// espeak-ng binary.
    pub espeak_bin: String,
    pub url: String,
    pub model: String,
    /// "pcm" (24 kHz s16le, streamed) or "wav".
    pub response_format: String,
    pub timeout_ms: u64,
    /// Synthesized prompts kept in memory.
    pub cache_entries: usize,
    /// Most synthesized audio kept in memory, in MiB (0 turns the cache off).
    pub cache_mb: u64,
    pub api_key_env: String,
    #[serde(skip)]
    pub api_key: Option<Secret>,
    /// The Piper engine (`engine = "piper"`).
    pub piper: PiperConfig,
}

/// Piper (PyPI `piper-tts`), run as long-lived worker processes of the given Python.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiperConfig {
    /// The voice's `.onnx` file (its `.onnx.json` beside it). `--piper-voice` /
    /// `SIDECALL_PIPER_VOICE`.
    pub voice: String,
    /// A Python with `piper-tts` installed. `--piper-python` / `SIDECALL_PIPER_PYTHON`.
    pub python: String,
    /// Worker processes (syntheses at once), each with the voice loaded (about 100 MB).
    pub workers: usize,
    /// Speaking pace: above 1 slower, below faster.
    pub length_scale: f32,
}

impl Default for PiperConfig {
    fn default() -> Self {
        Self {
            voice: String::new(),
            python: "python3".into(),
            workers: 2,
            length_scale: 1.0,
        }
    }
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            engine: "espeak".into(),
            voice: "en-us".into(),
            rate: 165,
            pitch: 50,
            espeak_bin: "espeak-ng".into(),
            url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini-tts".into(),
            response_format: "pcm".into(),
            timeout_ms: 10_000,
            cache_entries: 512,
            cache_mb: 32,
            api_key_env: "SIDECALL_TTS_API_KEY".into(),
            api_key: None,
            piper: PiperConfig::default(),
        }
    }
}

/// The LLM agent's model endpoint (OpenAI-compatible chat completions, streamed) and how the
/// agent behaves when it is slow or failing; agent profiles may override model and sampling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Base URL: `POST {url}/chat/completions` (OpenAI, vLLM, llama.cpp, Ollama's `/v1`, Groq).
    pub url: String,
    pub model: String,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Connecting to the server.
    pub connect_timeout_ms: u64,
    /// From the request to the first streamed token (content or tool call).
    pub first_token_timeout_ms: u64,
    /// One whole streamed completion.
    pub timeout_ms: u64,
    /// Without a first token by then, the agent says `filler` (once a turn).
    pub filler_after_ms: u64,
    pub filler: String,
    /// Said when a model request fails; the caller may try again.
    pub fallback_prompt: String,
    /// Failed turns in a row before the caller goes to `call.human_target`.
    pub max_failures: u32,
    /// Said before that transfer.
    pub escalate_prompt: String,
    /// Messages of history kept (besides the system prompt); older turns drop out whole.
    pub history_messages: usize,
    /// Model requests in one turn (each tool result asks again).
    pub max_rounds: u32,
    /// Send the tools (built-ins and webhooks). Off for a server that rejects tools (vLLM
    /// without `--enable-auto-tool-choice`): the agent then only talks.
    pub tools: bool,
    /// The request field for the reply's length: "max_tokens" (most servers) or
    /// "max_completion_tokens" (OpenAI's reasoning models, which refuse the other).
    pub max_tokens_field: String,
    pub api_key_env: String,
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            temperature: 0.3,
            max_tokens: 300,
            connect_timeout_ms: 2_000,
            first_token_timeout_ms: 5_000,
            timeout_ms: 15_000,
            filler_after_ms: 1_200,
            filler: "One moment.".into(),
            fallback_prompt: "Sorry, I'm having trouble right now. Could you say that again?"
                .into(),
            max_failures: 2,
            escalate_prompt: "Let me connect you with someone who can help.".into(),
            history_messages: 40,
            max_rounds: 5,
            tools: true,
            max_tokens_field: "max_tokens".into(),
            api_key_env: "SIDECALL_LLM_API_KEY".into(),
            api_key: None,
        }
    }
}

/// Which conversation runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DialogConfig {
    /// The flow a call runs when nothing chooses another (a name in `flows_dir` or a path).
    pub flow: Spanned<String>,
    /// Folder of flow files; a flow's name is its file name without `.toml`.
    pub flows_dir: Spanned<String>,
    /// Timeout for webhook lookups made by flows.
    pub webhook_timeout_ms: u64,
    /// Longest a dialog engine may take to answer one turn; then the call says the error prompt
    /// and goes to a human (`call.on_error`). An LLM agent's turn (model rounds and tools) has
    /// the longer of this and its own limits.
    pub timeout_ms: u64,
    /// Folder of LLM agent profiles (`agent=NAME` in the dialplan, `next = "agent:NAME"` in a flow).
    pub agents_dir: String,
    /// Run this agent when the dialplan names neither a flow nor an agent (instead of `flow`).
    pub agent: Option<String>,
}

impl Default for DialogConfig {
    fn default() -> Self {
        Self {
            flow: Spanned::new(0..0, "order_status".into()),
            flows_dir: Spanned::new(0..0, "examples/flows".into()),
            webhook_timeout_ms: 3_000,
            timeout_ms: 10_000,
            agents_dir: "examples/agents".into(),
            agent: None,
        }
    }
}

/// One allow-listed place a call may be transferred to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransferTarget {
    /// Dialplan context (Asterisk `continue`, FreeSWITCH `uuid_transfer`).
    pub context: Option<String>,
    pub extension: Option<String>,
    pub priority: Option<u32>,
    /// An endpoint such as `PJSIP/2000` (Asterisk `redirect`).
    pub endpoint: Option<String>,
    /// What the agent says before transferring.
    pub announce: Option<String>,
}

/// The Asterisk adapter: ARI control plane and the media transport.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsteriskConfig {
    /// Whether `serve` connects to Asterisk.
    pub enabled: bool,
    /// ARI base URL (http.conf's bind address and port), without `/ari`.
    pub url: String,
    /// ARI user (ari.conf).
    pub username: String,
    /// Environment variable holding the ARI password.
    pub password_env: String,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// The Stasis application name used in the dialplan: `Stasis(sidecall,...)`.
    pub app: String,
    /// Media transport: "websocket" (chan_websocket), "audiosocket" or "rtp".
    pub media: String,
    /// chan_websocket: "server" (sidecall connects to Asterisk) or "client" (Asterisk connects
    /// to sidecall's listener, named by a websocket_client.conf section).
    pub websocket_mode: String,
    /// chan_websocket client mode: the websocket_client.conf section Asterisk dials.
    pub websocket_client_section: String,
    /// Client mode: the `username` of that websocket_client.conf section; when set, Asterisk's
    /// connections must present it and the password (HTTP Basic), or they are refused.
    pub websocket_client_username: String,
    /// Environment variable holding that section's `password`.
    pub websocket_client_password_env: String,
    /// From `websocket_client_password_env` (never from the file).
    #[serde(skip)]
    pub websocket_client_password: Option<Secret>,
    /// Listener for chan_websocket client mode.
    pub websocket_listen: String,
    /// Listener for AudioSocket connections from Asterisk.
    pub audiosocket_listen: String,
    /// Address RTP sockets bind to (Asterisk sends media there).
    pub rtp_bind: String,
    /// Media format: "slin16", "slin", "ulaw" or "alaw" (RTP: "ulaw" or "slin16";
    /// AudioSocket: "slin16" or "slin").
    pub format: String,
    /// Control messages on the media WebSocket: "auto" (JSON where Asterisk supports it),
    /// "json" or "plain".
    pub control_format: String,
    /// Playout marks on chan_websocket: "auto" (by Asterisk's version; a probe mark when the
    /// version does not say), "on" (20.18/22.8/23.2+) or "off" (older: sidecall's own playout
    /// clock says what was played).
    pub marks: String,
    /// Most calls at once; more go to the overflow target.
    pub max_calls: usize,
    /// Where calls go when sidecall is full or shutting down (a [transfers] entry).
    pub overflow_target: String,
    /// On SIGTERM, how long active calls may go on before they are sent to the overflow target.
    pub shutdown_grace_s: u64,
    /// How long the media connection may take before the call goes to the overflow target.
    pub media_timeout_ms: u64,
    /// An ARI events connection silent this long (no event, no answer to pings) is dropped and
    /// made anew: a half-open connection must not look healthy.
    pub events_silence_ms: u64,
    /// Timeout of each ARI REST request.
    pub request_timeout_ms: u64,
}

impl Default for AsteriskConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "http://127.0.0.1:8088".into(),
            username: "sidecall".into(),
            password_env: "SIDECALL_ARI_PASSWORD".into(),
            password: None,
            app: "sidecall".into(),
            media: "websocket".into(),
            websocket_mode: "server".into(),
            websocket_client_section: "sidecall".into(),
            websocket_client_username: String::new(),
            websocket_client_password_env: "SIDECALL_MEDIA_PASSWORD".into(),
            websocket_client_password: None,
            websocket_listen: "127.0.0.1:9093".into(),
            audiosocket_listen: "127.0.0.1:9092".into(),
            rtp_bind: "127.0.0.1".into(),
            format: "slin16".into(),
            control_format: "auto".into(),
            marks: "auto".into(),
            max_calls: 100,
            overflow_target: "agent".into(),
            shutdown_grace_s: 30,
            media_timeout_ms: 5_000,
            events_silence_ms: 15_000,
            request_timeout_ms: 3_000,
        }
    }
}

/// The FreeSWITCH adapter: Event Socket control plane and mod_audio_stream media.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreeSwitchConfig {
    /// Whether `serve` connects to FreeSWITCH.
    pub enabled: bool,
    /// Event Socket address (event_socket.conf.xml `listen-ip`:`listen-port`).
    pub esl_address: String,
    /// Environment variable holding the Event Socket password.
    pub password_env: String,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Listener mod_audio_stream connects to (`uuid_audio_stream <uuid> start
    /// ws://THIS/fs/<uuid>?token=... mono 16k`).
    pub media_listen: String,
    /// Environment variable holding the token every media connection must present (in the
    /// path, the query `token=`, or an `Authorization: Bearer` header set through
    /// STREAM_EXTRA_HEADERS).
    pub media_token_env: String,
    #[serde(skip)]
    pub media_token: Option<Secret>,
    /// The rate the dialplan starts the stream at: 16000 (`mono 16k`) or 8000 (`mono 8k`).
    pub stream_rate: u32,
    /// How agent audio is played: "stock" (stock mod_audio_stream: `streamAudio` files played
    /// over the Event Socket) or "audio_fork" (jambonz mod_audio_fork: audio back over the
    /// stream's own WebSocket, marks and killAudio).
    pub playback: String,
    /// Most calls at once; more go to the overflow target.
    pub max_calls: usize,
    /// Where calls go when sidecall is full, shutting down, or loses a call's media (a
    /// [transfers] entry).
    pub overflow_target: String,
    /// On SIGTERM, how long active calls may go on before they are sent to the overflow target.
    pub shutdown_grace_s: u64,
    /// How long after the channel parks (the dialplan started the stream) its media connection
    /// may take before the caller goes to the overflow target.
    pub media_timeout_ms: u64,
    /// Limit on each Event Socket command (bgapi answers included).
    pub request_timeout_ms: u64,
    /// An Event Socket connection silent this long (FreeSWITCH sends a HEARTBEAT every 20 s)
    /// is dropped and made anew.
    pub events_silence_ms: u64,
}

impl Default for FreeSwitchConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            esl_address: "127.0.0.1:8021".into(),
            password_env: "SIDECALL_ESL_PASSWORD".into(),
            password: None,
            media_listen: "127.0.0.1:8098".into(),
            media_token_env: "SIDECALL_FS_MEDIA_TOKEN".into(),
            media_token: None,
            stream_rate: 16_000,
            playback: "stock".into(),
            max_calls: 100,
            overflow_target: "agent".into(),
            shutdown_grace_s: 30,
            media_timeout_ms: 5_000,
            request_timeout_ms: 3_000,
            events_silence_ms: 45_000,
        }
    }
}

/// The admin HTTP listener of `serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    /// Folder for per-call JSONL records (empty: none).
    pub records_dir: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            records_dir: String::new(),
        }
    }
}

/// Flag and environment values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub asr_url: Option<String>,
    pub tts_url: Option<String>,
    pub llm_url: Option<String>,
    pub tts_engine: Option<String>,
    pub turn_model: Option<String>,
    pub onnxruntime: Option<String>,
    pub piper_voice: Option<String>,
    pub piper_python: Option<String>,
    pub flow: Option<String>,
    pub admin_listen: Option<String>,
}

/// An error at a value with a span (or at the key's default when it has none).
fn spanned_error(
    path: &str,
    text: &str,
    v: &Spanned<String>,
    key: &str,
    message: String,
) -> ConfigError {
    let span = v.span();
    if span.end == 0 {
        return ConfigError::Other {
            path: path.to_string(),
            message: format!("{key} (default value): {message}"),
        };
    }
    ConfigError::Invalid {
        path: path.to_string(),
        line: line_of(text, span.start),
        key: key.to_string(),
        message,
    }
}

/// 1-based line of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Best guess at the dotted key an error span points into: the `key =` on that line and the
/// nearest `[table]` header above it.
pub fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let key = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
        .to_string();
    let mut table = String::new();
    for l in text[..line_start].lines().rev() {
        let l = l.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            break;
        }
    }
    if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// Turns a toml deserialisation error into one that names key and line.
pub fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let path = path.display().to_string();
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let mut key = key_at(text, span.start);
            // serde names the unknown field itself; prefer that over the line's text.
            if let Some(rest) = message.strip_prefix("unknown field `")
                && let Some(name) = rest.split('`').next()
            {
                let table = key.rsplit_once('.').map(|(t, _)| t.to_string());
                key = match table {
                    Some(t) if !key.ends_with(name) => format!("{t}.{name}"),
                    _ => key.clone(),
                };
                if key.is_empty() {
                    key = name.to_string();
                }
            }
            ConfigError::Invalid {
                path,
                line: line_of(text, span.start),
                key,
                message,
            }
        }
        None => ConfigError::Other { path, message },
    }
}

impl Config {
    /// Reads and validates `path`, then applies `overrides` and environment secrets.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_checking(path, overrides, &|_| Ok(()))
    }

    /// Loads and validates, and has `check_flow` read the default flow file (the dialog layer
    /// does that; this layer does not know flows), naming `dialog.flow`'s line if it fails.
    pub fn load_checking(
        path: &Path,
        overrides: &Overrides,
        check_flow: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let mut cfg = Self::parse(path, &text)?;
        cfg.apply(overrides);
        cfg.validate(path, &text)?;
        let flow_path = cfg.flow_path(cfg.dialog.flow.get_ref());
        if let Err(message) = check_flow(&flow_path) {
            return Err(spanned_error(
                &path.display().to_string(),
                &text,
                &cfg.dialog.flow,
                "dialog.flow",
                message,
            ));
        }
        Ok(cfg)
    }

    /// Defaults only (no file), with overrides; relative paths resolve from the working directory.
    pub fn defaults(overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut cfg = Config {
            base_dir: PathBuf::from("."),
            ..Config::default()
        };
        cfg.apply(overrides);
        cfg.validate(Path::new("<defaults>"), "")?;
        Ok(cfg)
    }

    fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        cfg.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if cfg.base_dir.as_os_str().is_empty() {
            cfg.base_dir = PathBuf::from(".");
        }
        Ok(cfg)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.asr_url {
            self.asr.url = v.clone();
        }
        if let Some(v) = &o.tts_url {
            self.tts.url = v.clone();
        }
        if let Some(v) = &o.llm_url {
            self.llm.url = v.clone();
        }
        if let Some(v) = &o.tts_engine {
            self.tts.engine = v.clone();
        }
        if let Some(v) = &o.turn_model {
            self.turn.model = v.clone();
        }
        if let Some(v) = &o.onnxruntime {
            self.turn.onnxruntime = v.clone();
        }
        if let Some(v) = &o.piper_voice {
            self.tts.piper.voice = v.clone();
        }
        if let Some(v) = &o.piper_python {
            self.tts.piper.python = v.clone();
        }
        if let Some(v) = &o.flow {
            self.dialog.flow = Spanned::new(0..0, v.clone());
        }
        if let Some(v) = &o.admin_listen {
            self.admin.listen = v.clone();
        }
        let secret = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Secret::from)
        };
        self.asterisk.password = secret(&self.asterisk.password_env);
        self.asterisk.websocket_client_password =
            secret(&self.asterisk.websocket_client_password_env);
        self.freeswitch.password = secret(&self.freeswitch.password_env);
        self.freeswitch.media_token = secret(&self.freeswitch.media_token_env);
        self.asr.api_key = secret(&self.asr.api_key_env).or_else(|| secret("OPENAI_API_KEY"));
        self.tts.api_key = secret(&self.tts.api_key_env).or_else(|| secret("OPENAI_API_KEY"));
        self.llm.api_key = secret(&self.llm.api_key_env).or_else(|| secret("OPENAI_API_KEY"));
    }

    /// Resolves a path from the config file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The file of an agent profile given by name (`agents_dir/NAME.toml`) or by path.
    pub fn agent_path(&self, name: &str) -> PathBuf {
        if name.ends_with(".toml") || name.contains('/') {
            return self.resolve(name);
        }
        self.resolve(&self.dialog.agents_dir)
            .join(format!("{name}.toml"))
    }

    /// The file of a flow given by name (`flows_dir/NAME.toml`) or by path.
    pub fn flow_path(&self, name: &str) -> PathBuf {
        if name.ends_with(".toml") || name.contains('/') {
            return self.resolve(name);
        }
        self.resolve(self.dialog.flows_dir.get_ref())
            .join(format!("{name}.toml"))
    }

    fn validate_freeswitch(
        &self,
        bad: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let f = &self.freeswitch;
        if self.asterisk.enabled && f.enabled {
            return Err(bad(
                "freeswitch.enabled",
                "one PBX per process: asterisk.enabled is also true (run two sidecalls)".into(),
            ));
        }
        if ![8_000, 16_000].contains(&f.stream_rate) {
            return Err(bad(
                "freeswitch.stream_rate",
                format!("{} is not 8000 or 16000", f.stream_rate),
            ));
        }
        if !["stock", "audio_fork"].contains(&f.playback.as_str()) {
            return Err(bad(
                "freeswitch.playback",
                format!(
                    "`{}` is not \"stock\" (stock mod_audio_stream) or \"audio_fork\" (jambonz mod_audio_fork)",
                    f.playback
                ),
            ));
        }
        for (key, addr) in [
            ("freeswitch.esl_address", &f.esl_address),
            ("freeswitch.media_listen", &f.media_listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(key, format!("`{addr}` is not IP:PORT")));
            }
        }
        if f.enabled && !self.transfers.contains_key(&f.overflow_target) {
            return Err(bad(
                "freeswitch.overflow_target",
                format!("`{}` is not a [transfers] entry", f.overflow_target),
            ));
        }
        // Targets become Event Socket command arguments: nothing that splits or quotes them (a
        // comma would split FreeSWITCH's inline application list).
        for (name, t) in &self.transfers {
            let parts = [&t.context, &t.extension, &t.endpoint];
            let bad_char = |v: &String| {
                v.chars()
                    .any(|c| c.is_whitespace() || "'\"\\{},".contains(c))
            };
            if parts.into_iter().flatten().any(bad_char) {
                return Err(bad(
                    &format!("transfers.{name}"),
                    "context, extension and endpoint may not hold spaces, quotes, backslashes, braces or commas".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_asterisk(
        &self,
        bad: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let a = &self.asterisk;
        let one_of = |key: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                Err(bad(
                    key,
                    format!("`{v}` is not one of {}", allowed.join(", ")),
                ))
            }
        };
        one_of(
            "asterisk.media",
            &a.media,
            &["websocket", "audiosocket", "rtp"],
        )?;
        one_of(
            "asterisk.websocket_mode",
            &a.websocket_mode,
            &["server", "client"],
        )?;
        one_of(
            "asterisk.control_format",
            &a.control_format,
            &["auto", "json", "plain"],
        )?;
        one_of("asterisk.marks", &a.marks, &["auto", "on", "off"])?;
        if a.media == "rtp" && a.format == "slin16" {
            // Seen on a real Asterisk (master 27fb039): chan_rtp registers no receive mapping
            // for the dynamic payload type 118, so the caller hears nothing; Asterisk logs nothing.
            return Err(bad(
                "asterisk.format",
                "slin16 over RTP is not played by Asterisk (chan_rtp drops payload type 118 \
                 without a word): use \"ulaw\", or AudioSocket/WebSocket for 16 kHz"
                    .into(),
            ));
        }
        let formats: &[&str] = match a.media.as_str() {
            "rtp" => &["ulaw", "slin16"],
            "audiosocket" => &["slin16", "slin"],
            _ => &["slin16", "slin", "ulaw", "alaw"],
        };
        one_of("asterisk.format", &a.format, formats)?;
        if reqwest::Url::parse(&a.url).is_err() || !a.url.starts_with("http") {
            return Err(bad(
                "asterisk.url",
                format!("`{}` is not an http(s) URL", a.url),
            ));
        }
        for (key, v) in [
            ("asterisk.websocket_listen", &a.websocket_listen),
            ("asterisk.audiosocket_listen", &a.audiosocket_listen),
        ] {
            if v.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(key, format!("`{v}` is not HOST:PORT")));
            }
        }
        if a.rtp_bind.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                "asterisk.rtp_bind",
                format!("`{}` is not an IP address", a.rtp_bind),
            ));
        }
        if a.app.is_empty()
            || a.app
                .contains(|c: char| c.is_whitespace() || c == ',' || c == '&')
        {
            return Err(bad(
                "asterisk.app",
                format!("`{}` is not a usable Stasis app name", a.app),
            ));
        }
        if a.enabled && !self.transfers.contains_key(&a.overflow_target) {
            return Err(bad(
                "asterisk.overflow_target",
                format!("`{}` is not a [transfers] entry", a.overflow_target),
            ));
        }
        Ok(())
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let p = path.display().to_string();
        let bad = |key: &str, message: String| match key_line(text, key) {
            0 => ConfigError::Other {
                path: p.clone(),
                message: format!("{key} (default value): {message}"),
            },
            line => ConfigError::Invalid {
                path: p.clone(),
                line,
                key: key.to_string(),
                message,
            },
        };
        if ![8_000, 16_000].contains(&self.call.sample_rate) {
            return Err(bad(
                "call.sample_rate",
                format!("{} is not 8000 or 16000", self.call.sample_rate),
            ));
        }
        if !["transfer", "hangup"].contains(&self.call.on_error.as_str()) {
            return Err(bad(
                "call.on_error",
                format!("`{}` is not \"transfer\" or \"hangup\"", self.call.on_error),
            ));
        }
        if self.call.human_key.chars().count() != 1
            || !self
                .call
                .human_key
                .chars()
                .all(|c| "0123456789*#ABCD".contains(c))
        {
            return Err(bad(
                "call.human_key",
                format!("`{}` is not one DTMF key", self.call.human_key),
            ));
        }
        if !self.call.human_target.is_empty()
            && !self.transfers.contains_key(&self.call.human_target)
        {
            return Err(bad(
                "call.human_target",
                format!(
                    "`{0}` is not a [transfers] entry; add [transfers.{0}] (where the human key and escalations go)",
                    self.call.human_target
                ),
            ));
        }
        if !["webrtc", "earshot"].contains(&self.vad.engine.as_str()) {
            return Err(bad(
                "vad.engine",
                format!("`{}` is not \"webrtc\" or \"earshot\"", self.vad.engine),
            ));
        }
        if self.vad.webrtc_mode > 3 {
            return Err(bad("vad.webrtc_mode", "must be 0..3".into()));
        }
        if !(0.0..=1.0).contains(&self.vad.earshot_threshold) {
            return Err(bad(
                "vad.earshot_threshold",
                "must be between 0 and 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.vad.earshot_onset_threshold) {
            return Err(bad(
                "vad.earshot_onset_threshold",
                "must be between 0 and 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.turn.threshold) {
            return Err(bad("turn.threshold", "must be between 0 and 1".into()));
        }
        if self.turn.model.is_empty() != self.turn.onnxruntime.is_empty() {
            return Err(bad(
                "turn.model",
                "set both turn.model and turn.onnxruntime (or neither: silence-only endpointing)"
                    .into(),
            ));
        }
        // Every number from the file is checked against a range that makes sense on a call, so
        // that nothing later overflows or waits for ever (a huge max_duration_s passed `check`
        // and then panicked every call).
        let a = &self.asterisk;
        for (key, v, lo, hi) in [
            ("call.max_duration_s", self.call.max_duration_s, 10, 86_400),
            (
                "call.no_input_timeout_ms",
                self.call.no_input_timeout_ms,
                500,
                120_000,
            ),
            (
                "call.playout_lead_frames",
                to_u64(self.call.playout_lead_frames),
                0,
                50,
            ),
            ("vad.min_speech_ms", self.vad.min_speech_ms, 20, 2_000),
            ("vad.end_silence_ms", self.vad.end_silence_ms, 100, 5_000),
            (
                "vad.max_utterance_ms",
                self.vad.max_utterance_ms,
                1_000,
                120_000,
            ),
            ("vad.barge_in_min_ms", self.vad.barge_in_min_ms, 0, 5_000),
            ("turn.pause_ms", self.turn.pause_ms, 60, 2_000),
            ("turn.max_silence_ms", self.turn.max_silence_ms, 100, 10_000),
            (
                "turn.digits_silence_ms",
                self.turn.digits_silence_ms,
                100,
                10_000,
            ),
            ("turn.threads", to_u64(self.turn.threads), 1, 64),
            ("turn.queue", to_u64(self.turn.queue), 0, 1_000),
            ("vad.resume_after_ms", self.vad.resume_after_ms, 20, 5_000),
            (
                "vad.backchannel_max_ms",
                self.vad.backchannel_max_ms,
                0,
                5_000,
            ),
            (
                "dtmf.inter_digit_timeout_ms",
                self.dtmf.inter_digit_timeout_ms,
                100,
                60_000,
            ),
            ("dtmf.max_digits", to_u64(self.dtmf.max_digits), 1, 64),
            (
                "asr.max_concurrent",
                to_u64(self.asr.max_concurrent),
                1,
                1_024,
            ),
            ("asr.retries", u64::from(self.asr.retries), 0, 5),
            (
                "tts.cache_entries",
                to_u64(self.tts.cache_entries),
                0,
                100_000,
            ),
            ("tts.cache_mb", self.tts.cache_mb, 0, 4_096),
            ("dialog.timeout_ms", self.dialog.timeout_ms, 100, 120_000),
            ("asterisk.max_calls", to_u64(a.max_calls), 1, 100_000),
            (
                "freeswitch.max_calls",
                to_u64(self.freeswitch.max_calls),
                1,
                100_000,
            ),
            (
                "freeswitch.shutdown_grace_s",
                self.freeswitch.shutdown_grace_s,
                0,
                3_600,
            ),
            (
                "freeswitch.media_timeout_ms",
                self.freeswitch.media_timeout_ms,
                100,
                60_000,
            ),
            (
                "freeswitch.request_timeout_ms",
                self.freeswitch.request_timeout_ms,
                100,
                60_000,
            ),
            (
                "freeswitch.events_silence_ms",
                self.freeswitch.events_silence_ms,
                25_000,
                600_000,
            ),
            ("asterisk.shutdown_grace_s", a.shutdown_grace_s, 0, 3_600),
            ("asterisk.media_timeout_ms", a.media_timeout_ms, 100, 60_000),
            (
                "asterisk.events_silence_ms",
                a.events_silence_ms,
                1_000,
                300_000,
            ),
            (
                "asterisk.request_timeout_ms",
                a.request_timeout_ms,
                100,
                60_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(bad(key, format!("{v} is outside {lo}..={hi}")));
            }
        }
        if self.dialog.timeout_ms <= self.dialog.webhook_timeout_ms {
            return Err(bad(
                "dialog.timeout_ms",
                format!(
                    "must be longer than dialog.webhook_timeout_ms ({} ms): a turn that looks a record up would time out",
                    self.dialog.webhook_timeout_ms
                ),
            ));
        }
        if !(-100.0..=0.0).contains(&self.vad.min_level_dbfs) {
            return Err(bad("vad.min_level_dbfs", "must be -100..0".into()));
        }
        let echo = &self.vad.echo;
        if !(0.0..=30.0).contains(&echo.margin_db) {
            return Err(bad("vad.echo.margin_db", "must be 0..30 (dB)".into()));
        }
        if !(0.0..=40.0).contains(&echo.default_erl_db) {
            return Err(bad("vad.echo.default_erl_db", "must be 0..40 (dB)".into()));
        }
        if !(20..=2_000).contains(&echo.max_delay_ms) {
            return Err(bad(
                "vad.echo.max_delay_ms",
                format!("{} is outside 20..=2000", echo.max_delay_ms),
            ));
        }
        for (key, url) in [("asterisk.url", &a.url)] {
            if reqwest::Url::parse(url).is_err()
                || !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(bad(key, format!("`{url}` is not an http(s) URL")));
            }
        }
        let stream = &self.asr.stream;
        if !stream.url.is_empty() {
            if reqwest::Url::parse(&stream.url).is_err()
                || !(stream.url.starts_with("ws://") || stream.url.starts_with("wss://"))
            {
                return Err(bad(
                    "asr.stream.url",
                    format!("`{}` is not a ws(s) URL", stream.url),
                ));
            }
            if !["ga", "beta", "vllm"].contains(&stream.protocol.as_str()) {
                return Err(bad(
                    "asr.stream.protocol",
                    "must be \"ga\", \"beta\" or \"vllm\"".into(),
                ));
            }
            if !(8_000..=48_000).contains(&stream.rate) || !stream.rate.is_multiple_of(50) {
                return Err(bad(
                    "asr.stream.rate",
                    format!("{} is not 8000..=48000 Hz in steps of 50", stream.rate),
                ));
            }
            if stream.protocol == "beta" && stream.rate != 24_000 {
                return Err(bad(
                    "asr.stream.rate",
                    "the beta protocol's pcm16 is 24000 Hz".into(),
                ));
            }
            if stream.protocol == "vllm" && stream.rate != 16_000 {
                return Err(bad(
                    "asr.stream.rate",
                    "vLLM's realtime audio is 16000 Hz: set rate = 16000".into(),
                ));
            }
            if stream.timeout_ms >= self.asr.timeout_ms {
                return Err(bad(
                    "asr.stream.timeout_ms",
                    format!(
                        "must be shorter than asr.timeout_ms ({} ms): the batch engine does a turn the stream could not in what is left of that",
                        self.asr.timeout_ms
                    ),
                ));
            }
            for (key, ms) in [
                ("asr.stream.connect_timeout_ms", stream.connect_timeout_ms),
                ("asr.stream.timeout_ms", stream.timeout_ms),
                ("asr.stream.retry_after_ms", stream.retry_after_ms),
            ] {
                if ms == 0 || ms > 120_000 {
                    return Err(bad(key, "must be 1..120000 ms".into()));
                }
            }
        }
        if self.dtmf.terminator.chars().count() > 1 {
            return Err(bad("dtmf.terminator", "must be one key or empty".into()));
        }
        if !["espeak", "piper", "openai"].contains(&self.tts.engine.as_str()) {
            return Err(bad(
                "tts.engine",
                format!(
                    "`{}` is not \"espeak\", \"piper\" or \"openai\"",
                    self.tts.engine
                ),
            ));
        }
        if self.tts.engine == "piper" {
            let p = &self.tts.piper;
            if p.voice.is_empty() {
                return Err(bad(
                    "tts.piper.voice",
                    "the Piper engine needs a voice (.onnx): tts.piper.voice, --piper-voice or SIDECALL_PIPER_VOICE".into(),
                ));
            }
            if !(1..=32).contains(&p.workers) {
                return Err(bad("tts.piper.workers", "must be 1..32".into()));
            }
            if !(0.25..=4.0).contains(&p.length_scale) {
                return Err(bad("tts.piper.length_scale", "must be 0.25..4.0".into()));
            }
        }
        if !["pcm", "wav"].contains(&self.tts.response_format.as_str()) {
            return Err(bad(
                "tts.response_format",
                "must be \"pcm\" or \"wav\"".into(),
            ));
        }
        for (key, url) in [
            ("asr.url", &self.asr.url),
            ("tts.url", &self.tts.url),
            ("llm.url", &self.llm.url),
        ] {
            if reqwest::Url::parse(url).is_err()
                || !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(bad(key, format!("`{url}` is not an http(s) URL")));
            }
        }
        for (key, ms) in [
            ("asr.timeout_ms", self.asr.timeout_ms),
            ("tts.timeout_ms", self.tts.timeout_ms),
            ("llm.timeout_ms", self.llm.timeout_ms),
            ("llm.connect_timeout_ms", self.llm.connect_timeout_ms),
            (
                "llm.first_token_timeout_ms",
                self.llm.first_token_timeout_ms,
            ),
            ("llm.filler_after_ms", self.llm.filler_after_ms),
            ("dialog.webhook_timeout_ms", self.dialog.webhook_timeout_ms),
        ] {
            if ms == 0 || ms > 120_000 {
                return Err(bad(key, "must be 1..120000 ms".into()));
            }
        }
        if !["max_tokens", "max_completion_tokens"].contains(&self.llm.max_tokens_field.as_str()) {
            return Err(bad(
                "llm.max_tokens_field",
                "must be \"max_tokens\" or \"max_completion_tokens\"".into(),
            ));
        }
        if !(0.0..=2.0).contains(&self.llm.temperature) {
            return Err(bad("llm.temperature", "must be 0.0..2.0".into()));
        }
        if self.llm.max_tokens == 0 || self.llm.max_rounds == 0 || self.llm.history_messages < 2 {
            return Err(bad(
                "llm",
                "max_tokens and max_rounds must be at least 1, history_messages at least 2".into(),
            ));
        }
        for (name, t) in &self.transfers {
            let dialplan = t.context.is_some() || t.extension.is_some();
            if dialplan == t.endpoint.is_some() {
                return Err(bad(
                    &format!("transfers.{name}"),
                    "give either context/extension or endpoint, not both or neither".into(),
                ));
            }
        }
        self.validate_asterisk(&bad)?;
        self.validate_freeswitch(&bad)?;
        if self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "admin.listen",
                format!("`{}` is not HOST:PORT", self.admin.listen),
            ));
        }
        // The default flow must exist and parse.
        let flows_dir = self.resolve(self.dialog.flows_dir.get_ref());
        if !flows_dir.is_dir() {
            return Err(spanned_error(
                &p,
                text,
                &self.dialog.flows_dir,
                "dialog.flows_dir",
                format!("{} is not a folder", flows_dir.display()),
            ));
        }
        Ok(())
    }
}

/// A secret from the environment (API key, password). Its `Debug` and `Display` never show it,
/// so a config printed into a log line or a panic message leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The line (1-based) of a dotted key (`asterisk.url`, `transfers.agent`) in the TOML text, from
/// the parser's spans, so a key that exists in two sections is found in the right one; 0 when the
/// key is not in the file (its default value is what failed).
fn key_line(text: &str, dotted: &str) -> usize {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return 0;
    };
    let mut table = doc.get_ref();
    let mut span = None;
    let segs: Vec<&str> = dotted.split('.').collect();
    for (i, seg) in segs.iter().enumerate() {
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *seg) else {
            return 0;
        };
        span = Some(k.span());
        match v.get_ref() {
            toml::de::DeValue::Table(t) if i + 1 < segs.len() => table = t,
            _ if i + 1 < segs.len() => return 0,
            _ => {}
        }
    }
    span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(0)
}

fn to_u64(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_never_prints_secrets() {
        let mut c = Config::default();
        c.asr.api_key = Some("sk-live-asr-123".into());
        c.tts.api_key = Some("sk-live-tts-456".into());
        c.asterisk.password = Some("ari-pass-789".into());
        c.asterisk.websocket_client_password = Some("media-pass-000".into());
        let shown = format!("{c:?} {c:#?}");
        for s in [
            "sk-live-asr-123",
            "sk-live-tts-456",
            "ari-pass-789",
            "media-pass-000",
        ] {
            assert!(!shown.contains(s), "{s} printed");
        }
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn freeswitch_settings_are_checked() {
        let flows = format!("{}/examples/flows", env!("CARGO_MANIFEST_DIR"));
        let check = |text: &str| {
            let text = format!("[dialog]\nflows_dir = \"{flows}\"\n{text}");
            let path = Path::new("/tmp/sidecall-test.toml");
            Config::parse(path, &text).and_then(|c| c.validate(path, &text).map(|_| c))
        };
        let base = "[transfers.agent]\ncontext = \"agents\"\nextension = \"support\"\n[freeswitch]\nenabled = true\n";
        if let Err(e) = check(base) {
            panic!("{e}");
        }
        // A comma would split FreeSWITCH's inline application list (`bridge:a,b`).
        let comma =
            "[transfers.agent]\nendpoint = \"user/1000,user/1001\"\n[freeswitch]\nenabled = true\n";
        let e = check(comma).unwrap_err().to_string();
        assert!(e.contains("commas") && e.contains("transfers.agent"), "{e}");
        let both = format!("{base}[asterisk]\nenabled = true\n");
        assert!(
            check(&both)
                .unwrap_err()
                .to_string()
                .contains("one PBX per process")
        );
        let mode = format!("{base}playback = \"fancy\"\n");
        assert!(check(&mode).unwrap_err().to_string().contains("audio_fork"));
        let rate = format!("{base}stream_rate = 11025\n");
        assert!(
            check(&rate)
                .unwrap_err()
                .to_string()
                .contains("8000 or 16000")
        );
        let overflow = format!("{base}overflow_target = \"nobody\"\n");
        assert!(
            check(&overflow)
                .unwrap_err()
                .to_string()
                .contains("[transfers]")
        );
    }

    #[test]
    fn errors_name_the_line_of_the_key_in_its_own_section() {
        let text = "[asr]\nurl = \"http://127.0.0.1:8765/v1\"\n\n[asterisk]\nenabled = true\nurl = \"not a url\"\n";
        assert_eq!(key_line(text, "asterisk.url"), 6);
        assert_eq!(key_line(text, "asr.url"), 2);
        assert_eq!(key_line(text, "asterisk.max_calls"), 0, "not in the file");
        let dotted = "asterisk.url = \"x\"\n[transfers.agent]\ncontext = \"a\"\n";
        assert_eq!(key_line(dotted, "asterisk.url"), 1);
        assert_eq!(key_line(dotted, "transfers.agent"), 2);
        assert_eq!(key_line("not toml [", "asr.url"), 0);
    }

    #[test]
    fn the_streaming_protocols_and_their_rates_are_checked() {
        let flows = format!("{}/examples/flows", env!("CARGO_MANIFEST_DIR"));
        let check = |stream: &str| {
            let text = format!(
                "[dialog]\nflows_dir = \"{flows}\"\n[transfers.agent]\ncontext = \"a\"\n\
                 [asr.stream]\nurl = \"ws://127.0.0.1:8000/v1/realtime\"\n{stream}"
            );
            let path = Path::new("/tmp/sidecall-test.toml");
            Config::parse(path, &text).and_then(|c| c.validate(path, &text).map(|_| c))
        };
        let c = check("protocol = \"vllm\"\nrate = 16000\nmodel = \"voxtral\"\n").expect("valid");
        assert_eq!(c.asr.stream.protocol, "vllm");
        assert!(check("protocol = \"ga\"\n").is_ok());
        for (text, why) in [
            ("protocol = \"vllm\"\n", "16000"),
            ("protocol = \"beta\"\nrate = 16000\n", "24000"),
            ("protocol = \"speaches\"\n", "\"vllm\""),
        ] {
            let e = check(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn echo_settings_are_checked() {
        let flows = format!("{}/examples/flows", env!("CARGO_MANIFEST_DIR"));
        let check = |text: &str| {
            let text = format!(
                "[dialog]\nflows_dir = \"{flows}\"\n[transfers.agent]\ncontext = \"a\"\n{text}"
            );
            let path = Path::new("/tmp/sidecall-test.toml");
            Config::parse(path, &text).and_then(|c| c.validate(path, &text).map(|_| c))
        };
        let c = check("[vad.echo]\nmargin_db = 4.5\nmax_delay_ms = 300\n").expect("valid");
        assert_eq!(c.vad.echo.margin_db, 4.5);
        assert_eq!(c.vad.echo.max_delay_ms, 300);
        assert!(c.vad.echo.enabled, "on unless turned off");
        assert_eq!(c.vad.echo.default_erl_db, 6.0);
        for (text, key) in [
            ("[vad.echo]\nmargin_db = 50.0\n", "vad.echo.margin_db"),
            ("[vad.echo]\nmargin_db = nan\n", "vad.echo.margin_db"),
            (
                "[vad.echo]\ndefault_erl_db = -3.0\n",
                "vad.echo.default_erl_db",
            ),
            ("[vad.echo]\nmax_delay_ms = 5\n", "vad.echo.max_delay_ms"),
            (
                "[vad]\necho.max_delay_ms = 100000\n",
                "vad.echo.max_delay_ms",
            ),
        ] {
            let e = check(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(":6:"), "{text}: {e}");
        }
        assert!(
            check("[vad.echo]\nlevel = 3\n")
                .unwrap_err()
                .to_string()
                .contains("level")
        );
    }
}
