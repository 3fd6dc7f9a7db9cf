//! Linear 16-bit PCM to and from bytes: little-endian (WebSocket, AudioSocket, mod_audio_stream)
//! and big-endian (L16 over RTP, RFC 3551).

/// Decodes little-endian 16-bit samples; a trailing odd byte is ignored.
pub fn decode_le(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Decodes big-endian 16-bit samples; a trailing odd byte is ignored.
pub fn decode_be(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// Encodes samples as little-endian bytes.
pub fn encode_le(samples: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// Encodes samples as big-endian bytes.
pub fn encode_be(samples: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_orders() {
        let s = [0x1234i16, -2, 0];
        assert_eq!(encode_le(&s), vec![0x34, 0x12, 0xfe, 0xff, 0, 0]);
        assert_eq!(encode_be(&s), vec![0x12, 0x34, 0xff, 0xfe, 0, 0]);
        assert_eq!(decode_le(&encode_le(&s)), s);
        assert_eq!(decode_be(&encode_be(&s)), s);
    }

    #[test]
    fn odd_length_is_truncated_not_panicking() {
        assert_eq!(decode_le(&[1, 0, 7]), vec![1]);
        assert_eq!(decode_be(&[7]), Vec::<i16>::new());
    }
}
