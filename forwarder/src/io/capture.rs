//! `-p/--pcap FILE`: every frame read from and written to the tap, in pcap format
//! (Ethernet link type, microsecond timestamps; the `pcap-file` crate writes the records).
//! The file is created (truncated) at start-up, so a bad path stops it; frames go through a
//! buffer flushed after each loop iteration, so `tcpdump -r` or `tail -f | tcpdump -r -`
//! sees them as they pass. A write error is logged once and ends the capture, never the
//! forwarding.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};
use tracing::warn;

/// Longest frame kept whole; longer ones are cut (their original length is recorded).
const SNAPLEN: u32 = 262_144;

/// Where the pcap writer puts its records: a buffer the capture drains into the file.
#[derive(Debug, Clone, Default)]
struct Pending(Arc<Mutex<Vec<u8>>>);

impl Write for Pending {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("capture buffer poisoned"))?
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An open capture.
pub(super) struct Capture {
    writer: Option<PcapWriter<Pending>>,
    pending: Pending,
    file: std::fs::File,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("open", &self.writer.is_some())
            .finish()
    }
}

impl Capture {
    /// Creates `path` and writes the pcap header.
    pub(super) fn create(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::create(path).with_context(|| format!("--pcap {}", path.display()))?;
        let header = PcapHeader {
            snaplen: SNAPLEN,
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::MicroSecond,
            endianness: Endianness::native(),
            ..PcapHeader::default()
        };
        let pending = Pending::default();
        let writer = PcapWriter::with_header(pending.clone(), header)
            .with_context(|| format!("--pcap {}: write the header", path.display()))?;
        let mut capture = Self {
            writer: Some(writer),
            pending,
            file,
        };
        capture.flush();
        Ok(capture)
    }

    /// Records one frame.
    pub(super) fn frame(&mut self, data: &[u8]) {
        let Some(w) = &mut self.writer else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let orig = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let kept = data.get(..data.len().min(SNAPLEN as usize)).unwrap_or(data);
        if let Err(err) = w.write_packet(&PcapPacket::new(now, orig, kept)) {
            warn!(%err, "--pcap: writing failed, capture stopped");
            self.writer = None;
        }
    }

    /// Pushes buffered records to the file.
    pub(super) fn flush(&mut self) {
        if self.writer.is_none() {
            return;
        }
        let Ok(mut pending) = self.pending.0.lock() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        let written = self.file.write_all(&pending);
        pending.clear();
        drop(pending);
        if let Err(err) = written {
            warn!(%err, "--pcap: writing failed, capture stopped");
            self.writer = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("fwd-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.pcap");
        let mut c = Capture::create(&path).unwrap();
        c.frame(&[1, 2, 3]);
        c.frame(&vec![7u8; SNAPLEN as usize + 10]);
        c.flush();
        let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(r.header().datalink, DataLink::ETHERNET);
        let p = r.next_packet().unwrap().unwrap();
        assert_eq!(&p.data[..], &[1, 2, 3]);
        // (The crate's checked reader refuses a cut frame; tcpdump reads it. Raw: as written.)
        let p = r.next_raw_packet().unwrap().unwrap();
        assert_eq!(
            (p.data.len(), p.incl_len, p.orig_len),
            (SNAPLEN as usize, SNAPLEN, SNAPLEN + 10)
        );
        assert!(r.next_raw_packet().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
