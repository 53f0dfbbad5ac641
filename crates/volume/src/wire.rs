//! The replica protocol: length-prefixed binary frames between a primary
//! and replica servers. Every request carries an id (replies come back out
//! of order, matched by id), the volume id and the sender's epoch.
//!
//! Request frame: `u32 len | u8 kind | u64 id | u64 epoch | u8 vlen | volume | body`.
//! Response frame: `u32 len | u64 id | u8 status | body`.
//!
//! Decoding is total: any byte string yields a value or an error, never a
//! panic, and no allocation larger than the frame itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::ids::{NodeId, VolumeId};

/// Largest frame accepted (payload of 32 MiB plus headers).
pub const MAX_FRAME: usize = 33 * 1024 * 1024;

/// What a replica's data is, as it knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskState {
    /// Created and never synced: content meaningless.
    New,
    /// Up to date as of its epoch.
    Consistent,
    /// Told it missed writes; content is an older consistent version.
    Outdated,
    /// Being resynced: content is a mix, never to be read.
    Inconsistent,
}

/// The role a primary assigns to a replica with [`Request::SetEpoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// In the in-sync set.
    InSync,
    /// Out of the in-sync set.
    OutOfSync,
    /// Out of the in-sync set and about to receive a resync.
    ResyncTarget,
}

/// A replica's description of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// The node.
    pub node: NodeId,
    /// Size in bytes.
    pub size: u64,
    /// Dirty tracking granularity.
    pub region_size: u32,
    /// Activity log granularity.
    pub extent_size: u32,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Data state.
    pub disk: DiskState,
    /// Peers it tracks dirty regions for.
    pub tracking: Vec<NodeId>,
}

/// A request to a replica server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Identify the server; fails if it is not `node`.
    Hello {
        /// The node the caller expects.
        node: NodeId,
    },
    /// Create the replica (idempotent with the same geometry).
    Create {
        /// Size in bytes.
        size: u64,
        /// Dirty tracking granularity.
        region_size: u32,
        /// Activity log granularity.
        extent_size: u32,
    },
    /// Delete the replica and its snapshots.
    Delete,
    /// Describe the replica.
    GetState,
    /// Raise the epoch and set role and tracking (the header epoch is the new one).
    SetEpoch {
        /// The role.
        role: Role,
        /// Peers to track dirty regions for (others' bitmaps are dropped).
        out_of_sync: Vec<NodeId>,
        /// Keep an activity log (needed with more than one in-sync replica).
        track_activity: bool,
    },
    /// OR a region bitmap into the dirty bitmap of `peer`.
    MarkDirty {
        /// The peer.
        peer: NodeId,
        /// Region bitmap bytes.
        bitmap: Bytes,
    },
    /// The dirty bitmap of `peer` (`None` if not tracked).
    GetDirty {
        /// The peer.
        peer: NodeId,
    },
    /// The activity log as an extent bitmap.
    GetActivity,
    /// Forget activity of writes with sequence at most `watermark` that
    /// have been idle; with `clear_legacy`, also of older writes.
    Checkpoint {
        /// All writes with seq at most this are complete everywhere.
        watermark: u64,
        /// The primary resynced every region of older activity.
        clear_legacy: bool,
    },
    /// Write data.
    Write {
        /// Offset.
        offset: u64,
        /// The primary's sequence number of the write.
        seq: u64,
        /// Durable on return.
        fua: bool,
        /// The data.
        data: Bytes,
    },
    /// Read data.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Sequence number.
        seq: u64,
        /// Durable on return.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Sequence number.
        seq: u64,
        /// A hole may be punched.
        may_trim: bool,
        /// Durable on return.
        fua: bool,
    },
    /// Take a crash-consistent copy of the replica named `name`.
    Snapshot {
        /// Snapshot name.
        name: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Snapshot name.
        name: String,
    },
    /// List snapshots.
    ListSnapshots,
    /// Grow the replica to `size` bytes (idempotent; never shrinks). Only
    /// while no primary serves the volume.
    Resize {
        /// The new size in bytes (a multiple of 4096).
        size: u64,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done.
    Ok,
    /// Identity.
    Hello {
        /// The server's node.
        node: NodeId,
    },
    /// Replica description.
    State(ReplicaState),
    /// Read data.
    Data(Bytes),
    /// A bitmap, if tracked.
    Bitmap(Option<Bytes>),
    /// Snapshot names.
    Snapshots(Vec<String>),
}

/// An error answered by a replica server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The request's epoch is not the replica's current epoch.
    #[error("stale epoch: request has {request}, replica is at {current}")]
    StaleEpoch {
        /// The request's epoch.
        request: u64,
        /// The replica's epoch.
        current: u64,
    },
    /// No such replica on this node.
    #[error("no replica of this volume here")]
    NotFound,
    /// The replica is not consistent and may not be read.
    #[error("replica is not consistent ({0:?})")]
    NotConsistent(String),
    /// The request is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The replica's disk is full.
    #[error("no space left on the replica")]
    NoSpace,
    /// The replica's storage failed.
    #[error("replica i/o error: {0}")]
    Io(String),
    /// The server is not the node the caller expected.
    #[error("wrong node: this is {0}")]
    WrongNode(String),
}

/// A decoding failure: the peer is broken or hostile; close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct DecodeError(pub &'static str);

/// A request with its routing header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    /// Id echoed in the response.
    pub id: u64,
    /// The sender's epoch.
    pub epoch: u64,
    /// The volume.
    pub volume: VolumeId,
    /// The request.
    pub request: Request,
}

struct Dec {
    b: Bytes,
}

impl Dec {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.b.remaining() < n {
            Err(DecodeError("truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.u8()? != 0)
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.b.split_to(n))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string not utf-8"))
    }
    fn node(&mut self) -> Result<NodeId, DecodeError> {
        NodeId::new(self.string()?).map_err(|_| DecodeError("bad node id"))
    }
    fn nodes(&mut self) -> Result<Vec<NodeId>, DecodeError> {
        let n = self.u32()? as usize;
        if n > 1024 {
            return Err(DecodeError("too many nodes"));
        }
        (0..n).map(|_| self.node()).collect()
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.b.has_remaining() {
            Err(DecodeError("trailing bytes"))
        } else {
            Ok(())
        }
    }
}

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}
fn put_nodes(b: &mut BytesMut, v: &[NodeId]) {
    b.put_u32(v.len() as u32);
    for n in v {
        put_bytes(b, n.as_str().as_bytes());
    }
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::InSync => 0,
        Role::OutOfSync => 1,
        Role::ResyncTarget => 2,
    }
}
fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::New => 0,
        DiskState::Consistent => 1,
        DiskState::Outdated => 2,
        DiskState::Inconsistent => 3,
    }
}

impl RequestFrame {
    /// Encodes the frame as (header, optional payload) so write data is not copied.
    pub fn encode(&self) -> (Bytes, Option<Bytes>) {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0); // length, patched below
        let (kind, payload): (u8, Option<Bytes>) = match &self.request {
            Request::Hello { .. } => (1, None),
            Request::Create { .. } => (2, None),
            Request::Delete => (3, None),
            Request::GetState => (4, None),
            Request::SetEpoch { .. } => (5, None),
            Request::MarkDirty { .. } => (6, None),
            Request::GetDirty { .. } => (7, None),
            Request::GetActivity => (8, None),
            Request::Checkpoint { .. } => (9, None),
            Request::Write { data, .. } => (10, Some(data.clone())),
            Request::Read { .. } => (11, None),
            Request::Flush => (12, None),
            Request::Trim { .. } => (13, None),
            Request::WriteZeroes { .. } => (14, None),
            Request::Snapshot { .. } => (15, None),
            Request::DeleteSnapshot { .. } => (16, None),
            Request::ListSnapshots => (17, None),
            Request::Resize { .. } => (18, None),
        };
        b.put_u8(kind);
        b.put_u64(self.id);
        b.put_u64(self.epoch);
        let v = self.volume.as_str().as_bytes();
        b.put_u8(v.len() as u8);
        b.put_slice(v);
        match &self.request {
            Request::Hello { node } => put_bytes(&mut b, node.as_str().as_bytes()),
            Request::Create {
                size,
                region_size,
                extent_size,
            } => {
                b.put_u64(*size);
                b.put_u32(*region_size);
                b.put_u32(*extent_size);
            }
            Request::Delete | Request::GetState | Request::GetActivity | Request::Flush => {}
            Request::ListSnapshots => {}
            Request::SetEpoch {
                role,
                out_of_sync,
                track_activity,
            } => {
                b.put_u8(role_code(*role));
                put_nodes(&mut b, out_of_sync);
                b.put_u8(u8::from(*track_activity));
            }
            Request::MarkDirty { peer, bitmap } => {
                put_bytes(&mut b, peer.as_str().as_bytes());
                put_bytes(&mut b, bitmap);
            }
            Request::GetDirty { peer } => put_bytes(&mut b, peer.as_str().as_bytes()),
            Request::Checkpoint {
                watermark,
                clear_legacy,
            } => {
                b.put_u64(*watermark);
                b.put_u8(u8::from(*clear_legacy));
            }
            Request::Write {
                offset, seq, fua, ..
            } => {
                b.put_u64(*offset);
                b.put_u64(*seq);
                b.put_u8(u8::from(*fua));
            }
            Request::Read { offset, len } => {
                b.put_u64(*offset);
                b.put_u32(*len);
            }
            Request::Trim {
                offset,
                len,
                seq,
                fua,
            } => {
                b.put_u64(*offset);
                b.put_u64(*len);
                b.put_u64(*seq);
                b.put_u8(u8::from(*fua));
            }
            Request::WriteZeroes {
                offset,
                len,
                seq,
                may_trim,
                fua,
            } => {
                b.put_u64(*offset);
                b.put_u64(*len);
                b.put_u64(*seq);
                b.put_u8(u8::from(*may_trim));
                b.put_u8(u8::from(*fua));
            }
            Request::Snapshot { name } | Request::DeleteSnapshot { name } => {
                put_bytes(&mut b, name.as_bytes())
            }
            Request::Resize { size } => b.put_u64(*size),
        }
        let total = b.len() - 4 + payload.as_ref().map_or(0, |p| p.len());
        b[0..4].copy_from_slice(&(total as u32).to_be_bytes());
        (b.freeze(), payload)
    }

    /// Decodes a frame body (without the length prefix).
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut d = Dec { b: body };
        let kind = d.u8()?;
        let id = d.u64()?;
        let epoch = d.u64()?;
        let vlen = d.u8()? as usize;
        d.need(vlen)?;
        let v = d.b.split_to(vlen);
        let volume = std::str::from_utf8(&v)
            .ok()
            .and_then(|s| VolumeId::new(s).ok())
            .ok_or(DecodeError("bad volume id"))?;
        let request = match kind {
            1 => Request::Hello { node: d.node()? },
            2 => Request::Create {
                size: d.u64()?,
                region_size: d.u32()?,
                extent_size: d.u32()?,
            },
            3 => Request::Delete,
            4 => Request::GetState,
            5 => Request::SetEpoch {
                role: match d.u8()? {
                    0 => Role::InSync,
                    1 => Role::OutOfSync,
                    2 => Role::ResyncTarget,
                    _ => return Err(DecodeError("bad role")),
                },
                out_of_sync: d.nodes()?,
                track_activity: d.bool()?,
            },
            6 => Request::MarkDirty {
                peer: d.node()?,
                bitmap: d.bytes()?,
            },
            7 => Request::GetDirty { peer: d.node()? },
            8 => Request::GetActivity,
            9 => Request::Checkpoint {
                watermark: d.u64()?,
                clear_legacy: d.bool()?,
            },
            10 => {
                let offset = d.u64()?;
                let seq = d.u64()?;
                let fua = d.bool()?;
                let data = d.rest();
                Request::Write {
                    offset,
                    seq,
                    fua,
                    data,
                }
            }
            11 => Request::Read {
                offset: d.u64()?,
                len: d.u32()?,
            },
            12 => Request::Flush,
            13 => Request::Trim {
                offset: d.u64()?,
                len: d.u64()?,
                seq: d.u64()?,
                fua: d.bool()?,
            },
            14 => Request::WriteZeroes {
                offset: d.u64()?,
                len: d.u64()?,
                seq: d.u64()?,
                may_trim: d.bool()?,
                fua: d.bool()?,
            },
            15 => Request::Snapshot { name: d.string()? },
            16 => Request::DeleteSnapshot { name: d.string()? },
            17 => Request::ListSnapshots,
            18 => Request::Resize { size: d.u64()? },
            _ => return Err(DecodeError("unknown request kind")),
        };
        d.end()?;
        Ok(Self {
            id,
            epoch,
            volume,
            request,
        })
    }
}

/// Encodes a response as (header, optional payload).
pub fn encode_response(id: u64, result: &Result<Response, WireError>) -> (Bytes, Option<Bytes>) {
    let mut b = BytesMut::with_capacity(32);
    b.put_u32(0);
    b.put_u64(id);
    let mut payload = None;
    match result {
        Ok(r) => {
            b.put_u8(0);
            match r {
                Response::Ok => b.put_u8(0),
                Response::Hello { node } => {
                    b.put_u8(1);
                    put_bytes(&mut b, node.as_str().as_bytes());
                }
                Response::State(s) => {
                    b.put_u8(2);
                    put_bytes(&mut b, s.node.as_str().as_bytes());
                    b.put_u64(s.size);
                    b.put_u32(s.region_size);
                    b.put_u32(s.extent_size);
                    b.put_u64(s.epoch);
                    b.put_u8(disk_code(s.disk));
                    put_nodes(&mut b, &s.tracking);
                }
                Response::Data(d) => {
                    b.put_u8(3);
                    payload = Some(d.clone());
                }
                Response::Bitmap(bm) => {
                    b.put_u8(4);
                    match bm {
                        Some(bm) => {
                            b.put_u8(1);
                            put_bytes(&mut b, bm);
                        }
                        None => b.put_u8(0),
                    }
                }
                Response::Snapshots(names) => {
                    b.put_u8(5);
                    b.put_u32(names.len() as u32);
                    for n in names {
                        put_bytes(&mut b, n.as_bytes());
                    }
                }
            }
        }
        Err(e) => {
            b.put_u8(1);
            match e {
                WireError::StaleEpoch { request, current } => {
                    b.put_u8(1);
                    b.put_u64(*request);
                    b.put_u64(*current);
                }
                WireError::NotFound => b.put_u8(2),
                WireError::NotConsistent(m) => {
                    b.put_u8(3);
                    put_bytes(&mut b, m.as_bytes());
                }
                WireError::Invalid(m) => {
                    b.put_u8(4);
                    put_bytes(&mut b, m.as_bytes());
                }
                WireError::NoSpace => b.put_u8(5),
                WireError::Io(m) => {
                    b.put_u8(6);
                    put_bytes(&mut b, m.as_bytes());
                }
                WireError::WrongNode(m) => {
                    b.put_u8(7);
                    put_bytes(&mut b, m.as_bytes());
                }
            }
        }
    }
    let total = b.len() - 4 + payload.as_ref().map_or(0, |p| p.len());
    b[0..4].copy_from_slice(&(total as u32).to_be_bytes());
    (b.freeze(), payload)
}

/// Decodes a response body (without the length prefix): (id, result).
pub fn decode_response(body: Bytes) -> Result<(u64, Result<Response, WireError>), DecodeError> {
    let mut d = Dec { b: body };
    let id = d.u64()?;
    let status = d.u8()?;
    let result = if status == 0 {
        Ok(match d.u8()? {
            0 => Response::Ok,
            1 => Response::Hello { node: d.node()? },
            2 => Response::State(ReplicaState {
                node: d.node()?,
                size: d.u64()?,
                region_size: d.u32()?,
                extent_size: d.u32()?,
                epoch: d.u64()?,
                disk: match d.u8()? {
                    0 => DiskState::New,
                    1 => DiskState::Consistent,
                    2 => DiskState::Outdated,
                    3 => DiskState::Inconsistent,
                    _ => return Err(DecodeError("bad disk state")),
                },
                tracking: d.nodes()?,
            }),
            3 => Response::Data(d.rest()),
            4 => Response::Bitmap(if d.bool()? { Some(d.bytes()?) } else { None }),
            5 => {
                let n = d.u32()? as usize;
                if n > 1 << 16 {
                    return Err(DecodeError("too many names"));
                }
                Response::Snapshots((0..n).map(|_| d.string()).collect::<Result<_, _>>()?)
            }
            _ => return Err(DecodeError("unknown response kind")),
        })
    } else {
        Err(match d.u8()? {
            1 => WireError::StaleEpoch {
                request: d.u64()?,
                current: d.u64()?,
            },
            2 => WireError::NotFound,
            3 => WireError::NotConsistent(d.string()?),
            4 => WireError::Invalid(d.string()?),
            5 => WireError::NoSpace,
            6 => WireError::Io(d.string()?),
            7 => WireError::WrongNode(d.string()?),
            _ => return Err(DecodeError("unknown error kind")),
        })
    };
    d.end()?;
    Ok((id, result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_body((head, payload): (Bytes, Option<Bytes>)) -> Bytes {
        let mut b = BytesMut::from(&head[4..]);
        if let Some(p) = payload {
            b.extend_from_slice(&p);
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4")) as usize;
        assert_eq!(len, b.len(), "length prefix covers the frame");
        b.freeze()
    }

    fn n(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    #[test]
    fn every_request_roundtrips() {
        let reqs = vec![
            Request::Hello { node: n("a") },
            Request::Create {
                size: 1 << 30,
                region_size: 1 << 20,
                extent_size: 4 << 20,
            },
            Request::Delete,
            Request::GetState,
            Request::SetEpoch {
                role: Role::ResyncTarget,
                out_of_sync: vec![n("b"), n("c")],
                track_activity: true,
            },
            Request::MarkDirty {
                peer: n("b"),
                bitmap: Bytes::from_static(&[1, 2, 3]),
            },
            Request::GetDirty { peer: n("b") },
            Request::GetActivity,
            Request::Checkpoint {
                watermark: 99,
                clear_legacy: true,
            },
            Request::Write {
                offset: 4096,
                seq: 7,
                fua: true,
                data: Bytes::from(vec![5u8; 4096]),
            },
            Request::Read {
                offset: 8192,
                len: 512,
            },
            Request::Flush,
            Request::Trim {
                offset: 1,
                len: 2,
                seq: 3,
                fua: false,
            },
            Request::WriteZeroes {
                offset: 1,
                len: 2,
                seq: 3,
                may_trim: true,
                fua: true,
            },
            Request::Snapshot { name: "s1".into() },
            Request::DeleteSnapshot { name: "s1".into() },
            Request::ListSnapshots,
            Request::Resize { size: 1 << 30 },
        ];
        for request in reqs {
            let f = RequestFrame {
                id: 42,
                epoch: 9,
                volume: VolumeId::new("vol").expect("id"),
                request,
            };
            assert_eq!(
                RequestFrame::decode(frame_body(f.encode())).expect("decodes"),
                f
            );
        }
    }

    #[test]
    fn every_response_roundtrips() {
        let rs: Vec<Result<Response, WireError>> = vec![
            Ok(Response::Ok),
            Ok(Response::Hello { node: n("x") }),
            Ok(Response::State(ReplicaState {
                node: n("x"),
                size: 5,
                region_size: 6,
                extent_size: 7,
                epoch: 8,
                disk: DiskState::Outdated,
                tracking: vec![n("y")],
            })),
            Ok(Response::Data(Bytes::from_static(b"hello"))),
            Ok(Response::Bitmap(None)),
            Ok(Response::Bitmap(Some(Bytes::from_static(&[0xff])))),
            Ok(Response::Snapshots(vec!["a".into(), "b".into()])),
            Err(WireError::StaleEpoch {
                request: 1,
                current: 2,
            }),
            Err(WireError::NotFound),
            Err(WireError::NotConsistent("x".into())),
            Err(WireError::Invalid("y".into())),
            Err(WireError::NoSpace),
            Err(WireError::Io("z".into())),
            Err(WireError::WrongNode("w".into())),
        ];
        for r in rs {
            let (id, got) = decode_response(frame_body(encode_response(77, &r))).expect("decodes");
            assert_eq!(id, 77);
            assert_eq!(got, r);
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = RequestFrame::decode(Bytes::from(data.clone()));
            let _ = decode_response(Bytes::from(data));
        }
    }
}
