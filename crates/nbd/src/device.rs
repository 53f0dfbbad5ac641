//! The block device abstraction the server exports: [`BlockDevice`].
//!
//! A device only stores and returns bytes; it never sees the wire. The server
//! validates every request (range, alignment, size) before calling a device,
//! but devices must still refuse out-of-range requests instead of panicking.

use async_trait::async_trait;
use bytes::Bytes;

use crate::proto::errno;

/// The block sizes an export advertises through NBD_INFO_BLOCK_SIZE.
///
/// Clients that asked for them must align offsets and lengths to `minimum`
/// and keep READ/WRITE payloads at or below `maximum`; the server refuses
/// requests that do not, with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeConstraints {
    /// Minimum block size: a power of two between 1 and 65536.
    pub minimum: u32,
    /// Preferred block size: a power of two, at least `minimum`.
    pub preferred: u32,
    /// Maximum payload of one request: a multiple of `minimum`.
    pub maximum: u32,
}

/// The largest READ/WRITE payload this server ever accepts (32 MiB), whatever
/// a device advertises; it bounds the memory one request may take.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

impl Default for BlockSizeConstraints {
    fn default() -> Self {
        Self {
            minimum: 512,
            preferred: 4096,
            maximum: MAX_PAYLOAD,
        }
    }
}

impl BlockSizeConstraints {
    /// Returns the constraints with every field forced into the ranges the
    /// protocol allows (so a device cannot make the server advertise garbage).
    pub fn sanitized(self) -> Self {
        let minimum = if self.minimum.is_power_of_two() && self.minimum <= 65536 {
            self.minimum
        } else {
            512
        };
        let preferred = if self.preferred.is_power_of_two() && self.preferred >= minimum {
            self.preferred
        } else {
            minimum.max(4096)
        };
        let maximum = self.maximum.clamp(minimum, MAX_PAYLOAD);
        let maximum = maximum - maximum % minimum;
        Self {
            minimum,
            preferred,
            maximum,
        }
    }
}

/// What went wrong in a device; each kind maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The underlying storage failed.
    #[error("I/O error while {op}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The error from the OS.
        #[source]
        source: std::io::Error,
    },
    /// The underlying storage is full.
    #[error("no space left while {op}")]
    NoSpace {
        /// The operation that failed.
        op: &'static str,
    },
    /// The request is not valid for this device (range, alignment, size).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device is read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// The device cannot serve I/O right now (e.g. too few replicas, fenced).
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// The operation is not supported by this device.
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The device is shutting down.
    #[error("the device is shutting down")]
    ShuttingDown,
}

impl DeviceError {
    /// Wraps an OS error, recognising "no space left".
    pub fn from_io(op: &'static str, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            DeviceError::NoSpace { op }
        } else {
            DeviceError::Io { op, source }
        }
    }

    /// The NBD error value sent to the client.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            DeviceError::Io { .. } | DeviceError::Unavailable(_) => errno::EIO,
            DeviceError::NoSpace { .. } => errno::ENOSPC,
            DeviceError::Invalid(_) => errno::EINVAL,
            DeviceError::ReadOnly => errno::EPERM,
            DeviceError::NotSupported(_) => errno::ENOTSUP,
            DeviceError::ShuttingDown => errno::ESHUTDOWN,
        }
    }
}

/// One extent of a block status answer for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero).
    pub length: u64,
    /// The range is a hole (not allocated).
    pub hole: bool,
    /// The range reads as zeroes.
    pub zero: bool,
}

/// A block device served over NBD.
///
/// Offsets and lengths handed to a device are already checked against
/// [`BlockDevice::size`] by the server; they are aligned to the advertised
/// minimum only for clients that negotiated block sizes, so devices must
/// accept any alignment.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The block sizes to advertise.
    fn block_size(&self) -> BlockSizeConstraints {
        BlockSizeConstraints::default()
    }

    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Whether the device can discard (TRIM); the server advertises
    /// NBD_FLAG_SEND_TRIM only then.
    fn can_trim(&self) -> bool {
        true
    }

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError>;

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), DeviceError>;

    /// Discards a range; afterwards it reads as zeroes or as before.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError>;

    /// Makes a range read as zeroes; `may_trim` allows punching a hole.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;

    /// Allocation status of a range, for `base:allocation`. The extents
    /// cover the range from `offset` (at least one, at most `len` bytes in
    /// total). The default says "all data".
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let _ = offset;
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

/// Checks `offset + len <= size` without overflow.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::Invalid(format!(
            "range {offset}+{len} is beyond the end of the device ({size} bytes)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_fixes_bad_constraints() {
        let c = BlockSizeConstraints {
            minimum: 3,
            preferred: 5,
            maximum: u32::MAX,
        }
        .sanitized();
        assert_eq!(c.minimum, 512);
        assert_eq!(c.preferred, 4096);
        assert_eq!(c.maximum, MAX_PAYLOAD);
        let d = BlockSizeConstraints::default();
        assert_eq!(d.sanitized(), d);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            DeviceError::from_io("w", std::io::Error::from_raw_os_error(libc::ENOSPC)).nbd_errno(),
            errno::ENOSPC
        );
        assert_eq!(
            DeviceError::from_io("w", std::io::Error::from_raw_os_error(libc::EIO)).nbd_errno(),
            errno::EIO
        );
        assert_eq!(DeviceError::ReadOnly.nbd_errno(), errno::EPERM);
    }

    #[test]
    fn range_checks_do_not_overflow() {
        assert!(check_range(u64::MAX, 2, 10).is_err());
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
    }
}
