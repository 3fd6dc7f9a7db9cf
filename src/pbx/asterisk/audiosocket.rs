//! AudioSocket (Asterisk 18+): Asterisk connects over TCP to sidecall's listener; packets are
//! `kind:u8 | len:u16 BE | payload`. The first packet names the call (0x01, a 16-byte UUID that
//! sidecall passed as externalMedia `data`); then signed 16-bit little-endian audio (0x10 slin,
//! 0x11..0x18 higher rates), DTMF (0x03), hangup (0x00) and errors (0xff). Nothing re-times what
//! sidecall sends, so the outbound side is paced at 20 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::net::Gate;

use crate::pbx::codec::{Transcoder, WireFormat};
use crate::pbx::events::{CallEvents, DtmfSource};
use crate::pbx::paced::{self, FrameWriter};
use crate::pbx::queue_link::QueueLink;

pub const KIND_HANGUP: u8 = 0x00;
pub const KIND_UUID: u8 = 0x01;
pub const KIND_DTMF: u8 = 0x03;
pub const KIND_SLIN: u8 = 0x10;
pub const KIND_ERROR: u8 = 0xff;

/// Sample rate of an audio kind.
pub fn kind_rate(kind: u8) -> Option<u32> {
    Some(match kind {
        0x10 => 8_000,
        0x11 => 12_000,
        0x12 => 16_000,
        0x13 => 24_000,
        0x14 => 32_000,
        0x15 => 44_100,
        0x16 => 48_000,
        0x17 => 96_000,
        0x18 => 192_000,
        _ => return None,
    })
}

/// The audio kind for a rate.
pub fn rate_kind(rate: u32) -> u8 {
    match rate {
        16_000 => 0x12,
        _ => KIND_SLIN,
    }
}

/// Reads one packet; `None` at a clean end of stream.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 3];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u16::from_be_bytes([head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

/// Encodes one packet.
pub fn packet(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(u16::MAX as usize);
    let mut out = Vec::with_capacity(3 + len);
    out.push(kind);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&payload[..len]);
    out
}

pub use crate::net::uuid_string;

/// A fresh random UUID from the CSPRNG: the per-call credential Asterisk presents first.
pub fn new_uuid() -> String {
    crate::net::uuid_v4()
}

/// Calls waiting for their AudioSocket connection, by UUID.
pub type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<TcpStream>>>>;

/// Accepts AudioSocket connections and hands each to the call whose UUID it names. The UUID is
/// the per-call credential (from the CSPRNG, compared in constant time); a connection that does
/// not present a pending one within the gate's handshake time is closed with a log line, and
/// connections beyond the gate's cap are closed at once.
pub async fn accept(listener: TcpListener, waiting: Waiting, gate: Gate, stop: CancellationToken) {
    loop {
        let (mut sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "AudioSocket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(permit) = gate.enter() else {
            tracing::warn!(%peer, "too many AudioSocket connections in their handshake; closing this one");
            continue;
        };
        let _ = sock.set_nodelay(true);
        let waiting = waiting.clone();
        let handshake = gate.handshake;
        tokio::spawn(async move {
            let _permit = permit;
            let first = tokio::time::timeout(handshake, read_packet(&mut sock)).await;
            let uuid = match first {
                Ok(Ok(Some((KIND_UUID, p)))) if p.len() == 16 => uuid_string(&p),
                Ok(Ok(Some((kind, p)))) => {
                    tracing::warn!(%peer, kind, len = p.len(), "AudioSocket connection did not start with a UUID; closing");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "AudioSocket connection sent no UUID in time; closing");
                    return;
                }
                _ => {
                    tracing::warn!(%peer, "AudioSocket connection sent nothing usable; closing");
                    return;
                }
            };
            match waiting
                .lock()
                .ok()
                .and_then(|mut w| crate::net::claim(&mut w, &uuid))
            {
                Some(tx) => {
                    let _ = tx.send(sock);
                }
                None => {
                    tracing::warn!(%peer, "AudioSocket connection for no call of ours (unknown UUID); closing")
                }
            }
        });
    }
}

struct Writer {
    half: OwnedWriteHalf,
    kind: u8,
}

impl FrameWriter for Writer {
    async fn write(&mut self, frame: Vec<u8>) -> std::io::Result<()> {
        self.half.write_all(&packet(self.kind, &frame)).await
    }
}

/// Runs one call's AudioSocket: a paced writer and a reader feeding the call.
pub fn start(
    sock: TcpStream,
    rate: u32,
    internal_rate: u32,
    events: CallEvents,
) -> Result<QueueLink, crate::audio::AudioError> {
    let (read, write) = sock.into_split();
    let wire = WireFormat::SlinLe(rate);
    let (link, _task) = paced::start(
        Writer {
            half: write,
            kind: rate_kind(rate),
        },
        Transcoder::new(wire, internal_rate)?,
        events.clone(),
    );
    let inbound = Transcoder::new(wire, internal_rate)?;
    tokio::spawn(read_loop(read, inbound, internal_rate, events));
    Ok(link)
}

async fn read_loop(
    mut read: OwnedReadHalf,
    mut tc: Transcoder,
    internal_rate: u32,
    events: CallEvents,
) {
    let cause = loop {
        match read_packet(&mut read).await {
            Ok(None) => break "AudioSocket closed".to_string(),
            Err(e) => break format!("AudioSocket read error: {e}"),
            Ok(Some((KIND_HANGUP, _))) => break "AudioSocket hangup".to_string(),
            Ok(Some((KIND_ERROR, p))) => {
                break format!("AudioSocket error from Asterisk ({} bytes)", p.len());
            }
            Ok(Some((KIND_DTMF, p))) => match p.first() {
                Some(&d) => events.dtmf(d as char, DtmfSource::Media),
                None => tracing::warn!("empty AudioSocket DTMF packet ignored"),
            },
            Ok(Some((kind, p))) => match kind_rate(kind) {
                Some(r) => {
                    if r != tc.wire.rate() {
                        // Asterisk changed (or mislabelled) the rate: follow what it says.
                        match Transcoder::new(WireFormat::SlinLe(r), internal_rate) {
                            Ok(t) => tc = t,
                            Err(e) => break format!("AudioSocket rate {r}: {e}"),
                        }
                    }
                    match tc.inbound(&p) {
                        Ok(s) if !s.is_empty() => events.audio(s),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "decoding AudioSocket audio"),
                    }
                }
                None => tracing::warn!(kind, "unknown AudioSocket packet kind ignored"),
            },
        }
    };
    tracing::debug!(%cause, "AudioSocket reader ends");
    events.hangup(&cause).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_truncated_input_is_an_error() {
        let mut bytes = packet(KIND_UUID, &[0xab; 16]);
        bytes.extend(packet(0x12, &[1, 0, 2, 0]));
        let mut r = &bytes[..];
        assert_eq!(
            read_packet(&mut r).await.unwrap(),
            Some((KIND_UUID, vec![0xab; 16]))
        );
        assert_eq!(
            read_packet(&mut r).await.unwrap(),
            Some((0x12, vec![1, 0, 2, 0]))
        );
        assert_eq!(read_packet(&mut r).await.unwrap(), None);
        let cut = [0x10u8, 0x00, 0x10, 1, 2];
        assert!(read_packet(&mut &cut[..]).await.is_err());
    }

    #[test]
    fn uuids_and_kinds() {
        assert_eq!(
            uuid_string(&[0x11; 16]),
            "11111111-1111-1111-1111-111111111111"
        );
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_ne!(u, new_uuid());
        assert_eq!(kind_rate(0x12), Some(16_000));
        assert_eq!(kind_rate(0x03), None);
        assert_eq!(rate_kind(8_000), 0x10);
    }
}
