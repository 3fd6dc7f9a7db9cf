//! RTP media (externalMedia encapsulation=rtp, transport=udp): one UDP socket per call, mu-law
//! (PT 0) or slin16 (PT 118, big-endian). Sidecall sends to the channel's
//! UNICASTRTP_LOCAL_ADDRESS:PORT with its own sequence, timestamp and SSRC, paced at 20 ms, and
//! takes inbound packets only from that address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::pbx::codec::{Transcoder, WireFormat};
use crate::pbx::events::CallEvents;
use crate::pbx::paced::{self, FrameWriter};
use crate::pbx::queue_link::QueueLink;

/// Why an RTP stream could not start.
#[derive(Debug, thiserror::Error)]
pub enum RtpError {
    #[error("RTP format `{0}` (use ulaw)")]
    Format(String),
    #[error(transparent)]
    Audio(#[from] crate::audio::AudioError),
}

/// An RTP packet's payload type and payload, from a datagram; None if it is not RTP v2.
pub fn parse(datagram: &[u8]) -> Option<(u8, &[u8])> {
    if datagram.len() < 12 || datagram[0] >> 6 != 2 {
        return None;
    }
    let csrc = (datagram[0] & 0x0f) as usize;
    let mut start = 12 + 4 * csrc;
    if datagram[0] & 0x10 != 0 {
        // Header extension: 4 bytes of profile/length, then length 32-bit words.
        let ext = datagram.get(start + 2..start + 4)?;
        start += 4 + 4 * u16::from_be_bytes([ext[0], ext[1]]) as usize;
    }
    let mut end = datagram.len();
    if datagram[0] & 0x20 != 0 {
        end = end.checked_sub(*datagram.last()? as usize)?;
    }
    if start > end {
        return None;
    }
    Some((datagram[1] & 0x7f, &datagram[start..end]))
}

/// RTP header state for one outbound stream.
pub struct RtpOut {
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub first: bool,
    pub samples_per_frame: u32,
}

impl RtpOut {
    pub fn packet(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(12 + payload.len());
        p.push(0x80);
        p.push(self.pt | if self.first { 0x80 } else { 0 });
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.ts.to_be_bytes());
        p.extend_from_slice(&self.ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        self.first = false;
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(self.samples_per_frame);
        p
    }
}

/// The payload type and wire format for an Asterisk format name.
pub fn format(name: &str) -> Option<(u8, WireFormat)> {
    match name {
        "ulaw" => Some((0, WireFormat::Ulaw)),
        "slin16" => Some((118, WireFormat::SlinBe(16_000))),
        _ => None,
    }
}

struct Writer {
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    rtp: RtpOut,
}

impl FrameWriter for Writer {
    async fn write(&mut self, frame: Vec<u8>) -> std::io::Result<()> {
        let p = self.rtp.packet(&frame);
        self.sock.send_to(&p, self.to).await.map(drop)
    }
}

/// Runs one call's RTP stream on `sock`, sending to `remote`.
pub fn start(
    sock: UdpSocket,
    remote: SocketAddr,
    format_name: &str,
    internal_rate: u32,
    events: CallEvents,
) -> Result<QueueLink, RtpError> {
    let (pt, wire) = format(format_name).ok_or_else(|| RtpError::Format(format_name.into()))?;
    let sock = Arc::new(sock);
    let rtp = RtpOut {
        pt,
        seq: crate::net::random_u64() as u16,
        ts: crate::net::random_u64() as u32,
        ssrc: crate::net::random_u64() as u32,
        first: true,
        samples_per_frame: wire.rate() / 50,
    };
    let out = Transcoder::new(wire, internal_rate)?;
    let (link, _task) = paced::start(
        Writer {
            sock: sock.clone(),
            to: remote,
            rtp,
        },
        out,
        events.clone(),
    );
    let inbound = Transcoder::new(wire, internal_rate)?;
    tokio::spawn(read_loop(sock, remote, pt, inbound, events));
    Ok(link)
}

/// The SSRC of an RTP packet (the caller of `parse` has checked it is RTP).
fn ssrc(datagram: &[u8]) -> Option<u32> {
    let b = datagram.get(8..12)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Packets in a row with a new SSRC, from Asterisk's own address and port, after which the new
/// source is taken (Asterisk changes SSRC when the media source changes).
const SSRC_CHANGE_AFTER: u32 = 25;

async fn read_loop(
    sock: Arc<UdpSocket>,
    remote: SocketAddr,
    pt: u8,
    mut tc: Transcoder,
    events: CallEvents,
) {
    let mut buf = vec![0u8; 2048];
    let mut strays = 0u64;
    let mut source: Option<u32> = None;
    let mut other_source = 0u32;
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "RTP socket error");
                    events.hangup("RTP socket error").await;
                    return;
                }
            },
            // The call is over when its event queue is closed: the socket goes with this task.
            _ = events.closed() => return,
        };
        // Only Asterisk's RTP address and port (where it told sidecall to send, and where it
        // sends from) are heard; anything else is a stranger.
        if from != remote {
            strays += 1;
            if strays % 100 == 1 {
                tracing::warn!(%from, expected = %remote, "RTP from an unexpected address ignored");
            }
            continue;
        }
        match parse(&buf[..n]) {
            Some((p, payload)) if p == pt => {
                let id = ssrc(&buf[..n]);
                match (source, id) {
                    (None, Some(id)) => source = Some(id),
                    (Some(s), Some(id)) if s != id => {
                        other_source += 1;
                        if other_source < SSRC_CHANGE_AFTER {
                            if other_source == 1 {
                                tracing::warn!(
                                    ssrc = id,
                                    learned = s,
                                    "RTP with another SSRC ignored"
                                );
                            }
                            continue;
                        }
                        tracing::info!(ssrc = id, "RTP source changed; following it");
                        source = Some(id);
                    }
                    _ => {}
                }
                other_source = 0;
                match tc.inbound(payload) {
                    Ok(s) if !s.is_empty() => events.audio(s),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "decoding RTP audio"),
                }
            }
            Some((p, _)) => tracing::debug!(pt = p, "RTP payload type not ours ignored"),
            None => tracing::debug!(len = n, "datagram that is not RTP ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_out_and_in() {
        let mut o = RtpOut {
            pt: 0,
            seq: 65_535,
            ts: 10,
            ssrc: 0xdeadbeef,
            first: true,
            samples_per_frame: 160,
        };
        let p = o.packet(&[0xff; 160]);
        assert_eq!(p.len(), 172);
        assert_eq!(
            &p[..12],
            &[0x80, 0x80, 0xff, 0xff, 0, 0, 0, 10, 0xde, 0xad, 0xbe, 0xef]
        );
        let q = o.packet(&[0xff; 160]);
        assert_eq!(
            &q[1..8],
            &[0x00, 0, 0, 0, 0, 0, 170],
            "marker only first; seq wraps; ts +160"
        );
        assert_eq!(parse(&p), Some((0, &[0xffu8; 160][..])));
        // CSRC, extension and padding are skipped.
        let mut x = vec![
            0xb1u8, 118, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9, 9, 9, 0xbe, 0xde, 0, 1, 7, 7, 7, 7, 1,
            2, 0, 2,
        ];
        assert_eq!(parse(&x), Some((118, &[1u8, 2][..])));
        x[0] = 0x40;
        assert_eq!(parse(&x), None, "RTP version 1");
        assert_eq!(parse(&[0x80, 0]), None);
        assert_eq!(
            parse(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 200]),
            None,
            "padding longer than the packet"
        );
    }
}
