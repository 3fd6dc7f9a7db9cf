//! G.711 mu-law and A-law, sample by sample (ITU-T G.711, the tables Asterisk and FreeSWITCH use).

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Encodes one linear 16-bit sample to mu-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut pcm = sample as i32;
    let sign = if pcm < 0 {
        pcm = -pcm;
        0x80
    } else {
        0
    };
    if pcm > CLIP {
        pcm = CLIP;
    }
    pcm += BIAS;
    // The segment is the position of the highest set bit above bit 7.
    let highest = 15 - (pcm as u16).leading_zeros() as i32;
    let exponent = (highest - 7).clamp(0, 7);
    let mantissa = (pcm >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// Decodes one mu-law byte to a linear 16-bit sample.
pub fn ulaw_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let sign = u & 0x80;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0f) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    if sign != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Encodes one linear 16-bit sample to A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    const SEG_END: [i32; 8] = [0x1f, 0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff];
    let mut pcm = (sample as i32) >> 3;
    let mask = if pcm >= 0 {
        0xd5
    } else {
        pcm = -pcm - 1;
        0x55
    };
    let Some(seg) = SEG_END.iter().position(|&end| pcm <= end) else {
        return 0x7f ^ mask;
    };
    let quant = if seg < 2 {
        (pcm >> 1) & 0x0f
    } else {
        (pcm >> seg) & 0x0f
    };
    (((seg as i32) << 4) | quant) as u8 ^ mask
}

/// Decodes one A-law byte to a linear 16-bit sample.
pub fn alaw_to_linear(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let seg = ((a & 0x70) >> 4) as i32;
    let mut t = ((a & 0x0f) as i32) << 4;
    t = match seg {
        0 => t + 8,
        1 => t + 0x108,
        _ => (t + 0x108) << (seg - 1),
    };
    if a & 0x80 != 0 { t as i16 } else { -t as i16 }
}

/// Encodes a buffer of linear samples to mu-law bytes.
pub fn encode_ulaw(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|&s| linear_to_ulaw(s)).collect()
}

/// Decodes mu-law bytes to linear samples.
pub fn decode_ulaw(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|&b| ulaw_to_linear(b)).collect()
}

/// Encodes a buffer of linear samples to A-law bytes.
pub fn encode_alaw(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|&s| linear_to_alaw(s)).collect()
}

/// Decodes A-law bytes to linear samples.
pub fn decode_alaw(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|&b| alaw_to_linear(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        // Silence and full scale as the ITU tables give them.
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(linear_to_ulaw(-1), 0x7f);
        assert_eq!(linear_to_ulaw(32767), 0x80);
        assert_eq!(linear_to_ulaw(-32768), 0x00);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0x00), -32124);
    }

    #[test]
    fn alaw_known_values() {
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(linear_to_alaw(-1), 0x55);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xaa), 32256);
        assert_eq!(alaw_to_linear(0x2a), -32256);
    }

    #[test]
    fn every_code_round_trips() {
        for b in 0..=255u8 {
            let u = ulaw_to_linear(b);
            // 0x7f and 0xff both mean zero in mu-law.
            let back = linear_to_ulaw(u);
            assert_eq!(ulaw_to_linear(back), u, "ulaw code {b:#x}");
            let a = alaw_to_linear(b);
            assert_eq!(linear_to_alaw(a), b, "alaw code {b:#x}");
        }
    }

    #[test]
    fn quantisation_error_is_bounded() {
        // G.711 keeps a relative error under ~1/16 of the value above the first segment.
        for s in (-32000i32..32000).step_by(37) {
            let s = s as i16;
            for (enc, dec) in [
                (
                    linear_to_ulaw as fn(i16) -> u8,
                    ulaw_to_linear as fn(u8) -> i16,
                ),
                (linear_to_alaw, alaw_to_linear),
            ] {
                let back = dec(enc(s)) as i32;
                let err = (back - s as i32).abs();
                let allowed = ((s as i32).abs() / 16).max(64);
                assert!(err <= allowed, "sample {s} came back {back}");
            }
        }
    }
}
