//! The byte stream of an interactive `vm exec -t`: after an HTTP upgrade to
//! [`UPGRADE_PROTOCOL`], the client, the server and the container's agent
//! exchange frames of `[kind: u8][length: u32, big-endian][payload]`. The
//! terminal's bytes go as [`Frame::Data`] both ways; the agent ends with
//! [`Frame::Exit`], the command's exit status, and closes.

/// The protocol name of the upgrade (`Upgrade: skyvisor-exec`).
pub const UPGRADE_PROTOCOL: &str = "skyvisor-exec";
/// The largest payload a frame may carry.
pub const MAX_FRAME: usize = 1 << 20;

const DATA: u8 = 0;
const EXIT: u8 = 1;
const HEADER: usize = 5;

/// One frame of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Terminal bytes: keystrokes to the command, its output back.
    Data(Vec<u8>),
    /// The command ended with this status (128 + N for signal N).
    Exit(i32),
}

/// What is wrong with a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A kind no side sends.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A payload larger than [`MAX_FRAME`].
    #[error("a frame of {0} bytes is larger than the {MAX_FRAME} allowed")]
    TooLarge(usize),
    /// An exit frame whose payload is not 4 bytes.
    #[error("an exit frame of {0} bytes (4 expected)")]
    BadExit(usize),
}

impl Frame {
    /// The frame's bytes on the stream.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, &[u8]) = match self {
            Frame::Data(d) => (DATA, d),
            Frame::Exit(code) => {
                let mut out = vec![EXIT, 0, 0, 0, 4];
                out.extend_from_slice(&code.to_be_bytes());
                return out;
            }
        };
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
}

/// Cuts a byte stream into frames, whatever the reads' sizes.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let payload: Vec<u8> = self.buf[HEADER..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        match kind {
            DATA => Ok(Some(Frame::Data(payload))),
            EXIT => {
                let b: [u8; 4] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| FrameError::BadExit(len))?;
                Ok(Some(Frame::Exit(i32::from_be_bytes(b))))
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_cut_of_the_stream() {
        let frames = vec![
            Frame::Data(b"echo hi\r".to_vec()),
            Frame::Data(vec![]),
            Frame::Data(vec![0, 255, 27, b'[']),
            Frame::Exit(-1),
            Frame::Exit(3),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for cut in 1..bytes.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                d.push(chunk);
                while let Some(f) = d.next_frame().expect("valid") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "cut every {cut} bytes");
        }
    }

    #[test]
    fn malformed_streams_are_refused() {
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
        let mut d = Decoder::default();
        d.push(&[1, 0, 0, 0, 2, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::BadExit(2)));
    }
}
