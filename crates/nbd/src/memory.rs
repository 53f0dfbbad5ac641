//! [`MemoryDevice`]: a block device in RAM, for tests and examples.
//!
//! It must never be used for data that has to survive the process.

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, BlockSizeConstraints, DeviceError, check_range};

/// A block device held in memory.
#[derive(Debug)]
pub struct MemoryDevice {
    data: Mutex<Vec<u8>>,
    size: u64,
    block_size: BlockSizeConstraints,
}

impl MemoryDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::with_block_size(size, BlockSizeConstraints::default())
    }

    /// A zero-filled device advertising the given block sizes.
    pub fn with_block_size(size: usize, block_size: BlockSizeConstraints) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            size: size as u64,
            block_size,
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), DeviceError> {
        check_range(offset, len, self.size)?;
        let (o, l) = (offset as usize, len as usize);
        self.lock()[o..o + l].fill(byte);
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> BlockSizeConstraints {
        self.block_size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        check_range(offset, len as u64, self.size)?;
        let o = offset as usize;
        Ok(Bytes::copy_from_slice(&self.lock()[o..o + len]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        check_range(offset, data.len() as u64, self.size)?;
        let o = offset as usize;
        self.lock()[o..o + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        self.fill(offset, len, 0)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.fill(offset, len, 0)
    }
}
