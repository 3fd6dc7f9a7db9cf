//! Wire formats of PBX media and the conversion between them and a call's internal rate:
//! decode + resample inbound, resample + encode outbound, with stateful resamplers per stream.

use crate::audio::{AudioError, StreamResampler, g711, l16};

/// A PBX media format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Ulaw,
    Alaw,
    /// Signed 16-bit linear at `rate`, little-endian (WebSocket, AudioSocket, mod_audio_stream).
    SlinLe(u32),
    /// Signed 16-bit linear at `rate`, big-endian (L16 over RTP).
    SlinBe(u32),
}

impl WireFormat {
    /// Asterisk format names (`ulaw`, `alaw`, `slin`, `slin16`, ...), little-endian linear.
    pub fn from_asterisk(name: &str) -> Option<Self> {
        Some(match name {
            "ulaw" => WireFormat::Ulaw,
            "alaw" => WireFormat::Alaw,
            "slin" => WireFormat::SlinLe(8_000),
            "slin12" => WireFormat::SlinLe(12_000),
            "slin16" => WireFormat::SlinLe(16_000),
            "slin24" => WireFormat::SlinLe(24_000),
            "slin32" => WireFormat::SlinLe(32_000),
            "slin44" => WireFormat::SlinLe(44_100),
            "slin48" => WireFormat::SlinLe(48_000),
            "slin96" => WireFormat::SlinLe(96_000),
            "slin192" => WireFormat::SlinLe(192_000),
            _ => return None,
        })
    }

    pub fn rate(&self) -> u32 {
        match self {
            WireFormat::Ulaw | WireFormat::Alaw => 8_000,
            WireFormat::SlinLe(r) | WireFormat::SlinBe(r) => *r,
        }
    }

    /// Bytes per sample.
    pub fn width(&self) -> usize {
        match self {
            WireFormat::Ulaw | WireFormat::Alaw => 1,
            _ => 2,
        }
    }

    /// Bytes in one 20 ms frame.
    pub fn frame_bytes(&self) -> usize {
        (self.rate() / 50) as usize * self.width()
    }

    pub fn decode(&self, bytes: &[u8]) -> Vec<i16> {
        match self {
            WireFormat::Ulaw => g711::decode_ulaw(bytes),
            WireFormat::Alaw => g711::decode_alaw(bytes),
            WireFormat::SlinLe(_) => l16::decode_le(bytes),
            WireFormat::SlinBe(_) => l16::decode_be(bytes),
        }
    }

    pub fn encode(&self, samples: &[i16]) -> Vec<u8> {
        match self {
            WireFormat::Ulaw => g711::encode_ulaw(samples),
            WireFormat::Alaw => g711::encode_alaw(samples),
            WireFormat::SlinLe(_) => l16::encode_le(samples),
            WireFormat::SlinBe(_) => l16::encode_be(samples),
        }
    }

    /// The encoding of silence, for padding.
    pub fn silence(&self, bytes: usize) -> Vec<u8> {
        match self {
            WireFormat::Ulaw => vec![0xff; bytes],
            WireFormat::Alaw => vec![0xd5; bytes],
            _ => vec![0; bytes],
        }
    }
}

/// Converts one call's audio between its internal rate and the wire format, both ways.
pub struct Transcoder {
    pub wire: WireFormat,
    up: StreamResampler,
    down: StreamResampler,
    scratch: Vec<i16>,
}

impl Transcoder {
    pub fn new(wire: WireFormat, internal_rate: u32) -> Result<Self, AudioError> {
        Ok(Self {
            wire,
            up: StreamResampler::new(wire.rate(), internal_rate)?,
            down: StreamResampler::new(internal_rate, wire.rate())?,
            scratch: Vec::new(),
        })
    }

    /// Wire bytes from the PBX to samples at the internal rate.
    pub fn inbound(&mut self, bytes: &[u8]) -> Result<Vec<i16>, AudioError> {
        let pcm = self.wire.decode(bytes);
        let mut out = Vec::with_capacity(pcm.len() * 2);
        self.up.process(&pcm, &mut out)?;
        Ok(out)
    }

    /// Samples at the internal rate to wire bytes for the PBX (any length; callers re-cut).
    pub fn outbound(&mut self, samples: &[i16]) -> Result<Vec<u8>, AudioError> {
        self.scratch.clear();
        self.down.process(samples, &mut self.scratch)?;
        Ok(self.wire.encode(&self.scratch))
    }
}

/// Cuts encoded agent audio into whole wire frames (PBXes drop or mangle short tails) and pads
/// the last partial frame with silence when a segment ends, so it is played, not dropped.
pub struct FrameCutter {
    frame_bytes: usize,
    pending: Vec<u8>,
}

impl FrameCutter {
    pub fn new(frame_bytes: usize) -> Self {
        Self {
            frame_bytes: frame_bytes.max(1),
            pending: Vec::with_capacity(frame_bytes * 2),
        }
    }

    /// Encodes `samples` and hands each complete frame to `out`.
    pub fn push(
        &mut self,
        tc: &mut Transcoder,
        samples: &[i16],
        mut out: impl FnMut(Vec<u8>),
    ) -> Result<(), AudioError> {
        let bytes = tc.outbound(samples)?;
        self.pending.extend_from_slice(&bytes);
        while self.pending.len() >= self.frame_bytes {
            out(self.pending.drain(..self.frame_bytes).collect());
        }
        Ok(())
    }

    /// The partial frame, padded with silence, if there is one.
    pub fn finish(&mut self, wire: WireFormat) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            return None;
        }
        let mut f = std::mem::take(&mut self.pending);
        f.extend(wire.silence(self.frame_bytes - f.len()));
        Some(f)
    }

    /// Drops what is pending (barge-in).
    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_frame_sizes_match_asterisk() {
        assert_eq!(
            WireFormat::from_asterisk("ulaw").unwrap().frame_bytes(),
            160
        );
        assert_eq!(
            WireFormat::from_asterisk("slin").unwrap().frame_bytes(),
            320
        );
        assert_eq!(
            WireFormat::from_asterisk("slin16").unwrap().frame_bytes(),
            640
        );
        assert_eq!(WireFormat::from_asterisk("g729"), None);
        assert_eq!(WireFormat::SlinBe(16_000).encode(&[1]), vec![0, 1]);
        assert_eq!(WireFormat::Ulaw.silence(2), vec![0xff, 0xff]);
    }

    #[test]
    fn cutter_gives_whole_frames_and_pads_the_tail() {
        let mut tc = Transcoder::new(WireFormat::SlinLe(8_000), 8_000).unwrap();
        let mut cut = FrameCutter::new(320);
        let mut frames = Vec::new();
        cut.push(&mut tc, &[7i16; 250], |f| frames.push(f)).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(frames.iter().all(|f| f.len() == 320));
        let tail = cut.finish(tc.wire).unwrap();
        assert_eq!(tail.len(), 320);
        assert_eq!(
            &tail[180..],
            &[0u8; 140][..],
            "90 samples of audio, then silence"
        );
        assert_eq!(cut.finish(tc.wire), None);
    }

    #[test]
    fn round_trip_through_ulaw_keeps_length() {
        let mut t = Transcoder::new(WireFormat::Ulaw, 16_000).unwrap();
        let mut wire = Vec::new();
        for _ in 0..50 {
            wire.extend(t.outbound(&[1000i16; 320]).unwrap());
        }
        // A live stream holds back its filter delay (a few ms), never more than a frame or two.
        assert!(
            (8_000 - wire.len() as i64) <= 160 && wire.len() <= 8_000,
            "{}",
            wire.len()
        );
        let back = t.inbound(&wire).unwrap();
        assert!(
            (15_840 - back.len() as i64) <= 640 && back.len() <= 15_840,
            "{} {}",
            wire.len(),
            back.len()
        );
    }
}
