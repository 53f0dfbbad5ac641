//! Skyvisor's NBD server: serves [`BlockDevice`]s to QEMU (`-blockdev
//! driver=nbd`), qemu-img, qemu-io, nbdinfo, nbdcopy and any other standard
//! NBD client.
//!
//! It speaks the fixed-newstyle handshake (NBD_OPT_GO/INFO/LIST/ABORT,
//! NBD_OPT_EXPORT_NAME, structured replies, `base:allocation`), and in
//! transmission READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES and
//! BLOCK_STATUS, with many requests in flight per connection and replies out
//! of order. Bad input gets NBD errors or a closed connection; the server
//! never panics on anything a client sends.
//!
//! Modules:
//! - [`proto`]: the wire format (pure functions);
//! - [`device`]: the [`BlockDevice`] trait a device implements;
//! - [`file`]: [`FileDevice`], a device on a sparse file;
//! - [`memory`]: [`MemoryDevice`], a device in RAM for tests;
//! - [`server`]: [`NbdServer`], exports, listeners and shutdown;
//! - [`io`]: a stream shared by many writers, and running a request in
//!   place unless it waits (shared with the replica protocol);
//! - [`client`]: [`NbdClient`], a small client for tests and tools.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use skyvisor_nbd::{Export, FileDevice, FileDeviceOptions, NbdServer, ServerConfig};
//! let dev = FileDevice::open("/var/lib/disk.img".as_ref(), FileDeviceOptions {
//!     create_size: Some(1 << 30), ..Default::default() })?;
//! let server = NbdServer::new(ServerConfig::default());
//! server.add_export(Export::new("disk", Arc::new(dev)))?;
//! let addr = server.listen_tcp("127.0.0.1:10809".parse()?).await?;
//! // qemu-io -f raw nbd://127.0.0.1:10809/disk ...
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod client;
pub mod device;
pub mod file;
mod handshake;
pub mod io;
pub mod memory;
pub mod proto;
pub mod server;
mod transmission;

pub use client::{ClientError, ConnectOptions, NbdClient};
pub use device::{BlockDevice, BlockSizeConstraints, DeviceError, Extent, MAX_PAYLOAD};
pub use file::{FileDevice, FileDeviceError, FileDeviceOptions, SyncBatcher};
pub use memory::MemoryDevice;
pub use server::{Export, NbdServer, ServerConfig, ServerError};
