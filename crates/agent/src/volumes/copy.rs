//! Whole-volume copies between a volume and a local raw file, for the
//! checkpoints of VMs whose root disk is a volume: a disk-only snapshot
//! reads the volume into a sparse file; a restore or a clone writes a
//! file over the volume.
//!
//! Writing keeps one rule that callers rely on: the volume's first chunk
//! is written last. A volume whose start still reads as zeroes was
//! therefore never completely written (a clone is copied again, and a
//! blank volume is never mistaken for a restored one).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use bytes::Bytes;
use skyvisor_nbd::device::BlockDevice;

/// Copy granularity.
const CHUNK: u64 = 1 << 20;
/// Largest single write-zeroes request.
const ZERO_RUN: u64 = 64 << 20;

/// Reads all of `device` into `file`, a new sparse file of the same size:
/// ranges the device reports as holes or zeroes, and chunks that read as
/// zeroes, stay holes. Returns the bytes of data.
pub async fn read_to_file(device: &dyn BlockDevice, file: &Path) -> Result<u64, String> {
    let size = device.size();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| format!("creating {}: {e}", file.display()))?;
    out.set_len(size)
        .map_err(|e| format!("sizing {}: {e}", file.display()))?;
    let mut data = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(64 * CHUNK);
        let extents = device
            .block_status(offset, len)
            .await
            .map_err(|e| format!("reading the volume's layout at {offset}: {e}"))?;
        let mut at = offset;
        for e in extents {
            let end = (at + e.length).min(offset + len);
            if !(e.hole || e.zero) {
                let mut pos = at;
                while pos < end {
                    let n = (end - pos).min(CHUNK);
                    let buf = device
                        .read(pos, n as usize)
                        .await
                        .map_err(|e| format!("reading the volume at {pos}: {e}"))?;
                    if buf.iter().any(|b| *b != 0) {
                        out.seek(SeekFrom::Start(pos))
                            .and_then(|_| out.write_all(&buf))
                            .map_err(|e| format!("writing {}: {e}", file.display()))?;
                        data += n;
                    }
                    pos += n;
                }
            }
            at = end;
            if at >= offset + len {
                break;
            }
        }
        // A device that answers a shorter range than asked moves on by
        // what it answered (at least one byte, so this ends).
        offset = at.max(offset + 1);
    }
    out.sync_all()
        .map_err(|e| format!("syncing {}: {e}", file.display()))?;
    Ok(data)
}

/// Makes `device` read exactly as raw `file`: its data is written,
/// everything else zeroed (beyond the file's end too). The first chunk
/// goes last (see the module's rule). Returns the bytes of data written.
pub async fn write_from_file(device: &dyn BlockDevice, file: &Path) -> Result<u64, String> {
    let size = device.size();
    let mut src =
        std::fs::File::open(file).map_err(|e| format!("opening {}: {e}", file.display()))?;
    let len = src
        .metadata()
        .map_err(|e| format!("reading {}: {e}", file.display()))?
        .len();
    if len > size {
        return Err(format!(
            "the disk image holds {len} bytes; the volume only {size}"
        ));
    }
    let ranges = data_ranges(&src, len);
    // Every chunk-aligned piece of the device, in order, first chunk last.
    let first = CHUNK.min(size);
    let mut data = 0u64;
    for (start, end) in [(first, size), (0, first)] {
        let mut pos = start;
        let mut buf = vec![0u8; CHUNK as usize];
        while pos < end {
            // The next stretch that is all data or all hole.
            let (is_data, stretch_end) = classify(&ranges, pos, end);
            if is_data {
                let n = (stretch_end - pos).min(CHUNK);
                let b = &mut buf[..n as usize];
                src.seek(SeekFrom::Start(pos))
                    .and_then(|_| src.read_exact(b))
                    .map_err(|e| format!("reading {}: {e}", file.display()))?;
                if b.iter().any(|x| *x != 0) {
                    device
                        .write(pos, Bytes::copy_from_slice(b), false)
                        .await
                        .map_err(|e| format!("writing the volume at {pos}: {e}"))?;
                    data += n;
                } else {
                    zero(device, pos, n).await?;
                }
                pos += n;
            } else {
                let n = (stretch_end - pos).min(ZERO_RUN);
                zero(device, pos, n).await?;
                pos += n;
            }
        }
    }
    device
        .flush()
        .await
        .map_err(|e| format!("flushing the volume: {e}"))?;
    Ok(data)
}

async fn zero(device: &dyn BlockDevice, at: u64, len: u64) -> Result<(), String> {
    device
        .write_zeroes(at, len, true, false)
        .await
        .map_err(|e| format!("zeroing the volume at {at}: {e}"))
}

/// Whether `pos` lies in a data range, and where that stretch (of data,
/// or of hole) ends, at most `end`.
fn classify(ranges: &[(u64, u64)], pos: u64, end: u64) -> (bool, u64) {
    for (s, e) in ranges {
        if *e <= pos {
            continue;
        }
        if *s <= pos {
            return (true, (*e).min(end));
        }
        return (false, (*s).min(end));
    }
    (false, end)
}

/// A new scratch file in `dir` (made if missing), named `prefix`...,
/// removed when dropped.
pub async fn scratch_file(dir: &Path, prefix: &str) -> Result<tempfile::NamedTempFile, String> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .map_err(|e| format!("creating a scratch file in {}: {e}", dir.display()))
}

/// How much of a device's start is read to tell whether it is blank.
const PROBE: u64 = 64 * 1024;

/// Whether the start of `device` reads as zeroes.
pub async fn is_blank(device: &dyn BlockDevice) -> Result<bool, String> {
    let probe = device
        .read(0, PROBE.min(device.size()) as usize)
        .await
        .map_err(|e| format!("reading the volume's start: {e}"))?;
    Ok(probe.iter().all(|b| *b == 0))
}

/// The `[start, end)` ranges of `f` (of `size` bytes) that hold data (see
/// [`skyvisor_nbd::file::file_extents`]; on any error the rest counts as
/// data: correct, only slower).
pub fn data_ranges(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let extents = skyvisor_nbd::file::file_extents(f, pos, size - pos, size);
        if extents.is_empty() {
            break;
        }
        for e in extents {
            if !e.hole {
                match out.last_mut() {
                    Some(last) if last.1 == pos => last.1 = pos + e.length,
                    _ => out.push((pos, pos + e.length)),
                }
            }
            pos += e.length;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use skyvisor_nbd::memory::MemoryDevice;

    use super::*;

    #[test]
    fn data_ranges_skip_holes_and_cover_every_written_byte() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let size = 64u64 << 20;
        f.set_len(size).expect("size");
        for at in [3u64 << 20, 40 << 20] {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(&[7u8; 5000]).expect("write");
        }
        f.sync_all().expect("sync");
        let ranges = data_ranges(&f, size);
        assert!(!ranges.is_empty());
        for at in [3u64 << 20, 40 << 20] {
            assert!(
                ranges.iter().any(|(s, e)| *s <= at && at + 5000 <= *e),
                "{ranges:?} misses {at}"
            );
        }
        let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        assert!(covered < size / 4, "holes were not skipped: {ranges:?}");
    }

    #[test]
    fn classify_walks_data_and_holes() {
        let r = [(10, 20), (30, 40)];
        assert_eq!(classify(&r, 0, 100), (false, 10));
        assert_eq!(classify(&r, 12, 100), (true, 20));
        assert_eq!(classify(&r, 20, 100), (false, 30));
        assert_eq!(classify(&r, 35, 38), (true, 38));
        assert_eq!(classify(&r, 40, 100), (false, 100));
    }

    #[tokio::test]
    async fn a_volume_round_trips_through_a_file_and_old_data_is_overwritten() {
        let size = 8u64 << 20;
        let dev = MemoryDevice::new(size as usize);
        assert!(is_blank(&dev).await.expect("probe"));
        // The volume's contents to keep: data at the start, in the middle
        // and at the very end.
        for (at, byte) in [(0u64, 1u8), (3 << 20, 2), (size - 4096, 3)] {
            dev.write(at, Bytes::from(vec![byte; 4096]), false)
                .await
                .expect("write");
        }
        let dir = tempfile::tempdir().expect("dir");
        let saved = dir.path().join("saved.raw");
        let n = read_to_file(&dev, &saved).await.expect("read");
        assert_eq!(n, 3 << 20, "three chunks hold data");

        // Later writes, also where the saved copy has holes.
        for (at, byte) in [(0u64, 9u8), (5 << 20, 9), (size - 4096, 9)] {
            dev.write(at, Bytes::from(vec![byte; 4096]), false)
                .await
                .expect("write");
        }
        write_from_file(&dev, &saved).await.expect("restore");
        for (at, byte) in [(0u64, 1u8), (3 << 20, 2), (5 << 20, 0), (size - 4096, 3)] {
            let got = dev.read(at, 4096).await.expect("read");
            assert!(got.iter().all(|b| *b == byte), "at {at}: want {byte}");
        }
        assert!(!is_blank(&dev).await.expect("probe"));

        // An image bigger than the volume is refused before any write.
        let big = dir.path().join("big.raw");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(size + 1))
            .expect("big");
        let e = write_from_file(&dev, &big).await.expect_err("too big");
        assert!(e.contains("only"), "{e}");
    }
}
