//! The framing of log records, with a checksum each, and the reader that tells a torn tail (a
//! write cut short by a crash, harmless) from corruption (bytes changed after they were written).
//!
//! A log segment file is the 8-byte magic [`MAGIC`] followed by records, each:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | payload length, little-endian `u64` (an import of a large table is one record) |
//! | 8 | sequence number, little-endian `u64`, one more than the record before |
//! | 4 | CRC-32 (IEEE) of the 16 bytes above, little-endian |
//! | 4 | CRC-32 of the sequence number's 8 bytes and the payload, little-endian |
//! | n | payload |
//!
//! The header has a checksum of its own, so that a damaged length is found as damage instead
//! of being read as a record cut short (which would drop every record after it).

use std::path::Path;

use super::{PersistError, Result};

/// The first bytes of every log segment: format name and version.
pub const MAGIC: &[u8; 8] = b"AUDLOG03";

/// Bytes before a record's payload.
pub const HEADER_BYTES: usize = 24;

/// Appends one framed record to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_BYTES + payload.len());
    encode_header(seq, payload, out);
    out.extend_from_slice(payload);
}

/// Appends the header of a record to `out`, for a payload written after it without a copy.
pub fn encode_header(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    /// Where the record's header starts in the file.
    pub offset: u64,
    pub payload: &'a [u8],
}

/// How a segment's bytes end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// After the last whole record.
    Clean,
    /// A record cut short at `offset` (the process died mid-write): everything from there on
    /// is dropped.
    Torn { offset: u64 },
    /// Bytes at `offset` that no crash can explain.
    Corrupt { offset: u64, reason: String },
}

/// The whole records of a segment's bytes, and how the bytes end.
///
/// A record is torn when its header or payload runs past the end of the file, or when it and
/// everything after it is zeros (a file extended but not written before a crash). A record whose
/// checksum fails while more bytes follow it, or whose sequence number breaks the order, is
/// corruption.
pub fn read_segment(bytes: &[u8]) -> (Vec<Record<'_>>, Ending) {
    let mut records = Vec::new();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let ending = if bytes.iter().all(|&b| b == 0) || MAGIC.starts_with(bytes) {
            Ending::Torn { offset: 0 }
        } else {
            Ending::Corrupt {
                offset: 0,
                reason: "not an audience log segment (bad magic)".into(),
            }
        };
        return (records, ending);
    }
    let mut at = MAGIC.len();
    let mut expected_seq = None;
    while at < bytes.len() {
        let offset = at as u64;
        let rest = &bytes[at..];
        if rest.iter().all(|&b| b == 0) {
            return (records, Ending::Torn { offset });
        }
        if rest.len() < HEADER_BYTES {
            return (records, Ending::Torn { offset });
        }
        let word = |range: std::ops::Range<usize>| {
            let mut bytes = [0u8; 8];
            bytes[..range.len()].copy_from_slice(&rest[range]);
            u64::from_le_bytes(bytes)
        };
        let (len, seq) = (word(0..8), word(8..16));
        let (header_crc, crc) = (word(16..20) as u32, word(20..24) as u32);
        if crc32fast::hash(&rest[..16]) != header_crc {
            let reason = "the record's header fails its checksum".into();
            return (records, Ending::Corrupt { offset, reason });
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| HEADER_BYTES.checked_add(len))
            .filter(|&size| size <= rest.len());
        let Some(size) = end else {
            return (records, Ending::Torn { offset });
        };
        let payload = &rest[HEADER_BYTES..size];
        let end = at + size;
        if checksum(seq, payload) != crc {
            let ending = if end == bytes.len() {
                Ending::Torn { offset }
            } else {
                Ending::Corrupt {
                    offset,
                    reason: "the record fails its checksum".into(),
                }
            };
            return (records, ending);
        }
        if expected_seq.is_some_and(|e| e != seq) {
            let reason = format!(
                "record {seq} follows record {}: the sequence is broken",
                expected_seq.unwrap_or(0).saturating_sub(1)
            );
            return (records, Ending::Corrupt { offset, reason });
        }
        expected_seq = Some(seq + 1);
        records.push(Record {
            seq,
            offset,
            payload,
        });
        at = end;
    }
    (records, Ending::Clean)
}

/// Reads a whole file.
///
/// # Errors
/// The file cannot be read.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| PersistError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (seq, payload) in records {
            encode(*seq, payload, &mut out);
        }
        out
    }

    #[test]
    fn records_round_trip_in_order() {
        let bytes = segment(&[(1, b"one"), (2, b""), (3, b"three")]);
        let (records, ending) = read_segment(&bytes);
        assert_eq!(ending, Ending::Clean);
        let seen: Vec<(u64, &[u8])> = records.iter().map(|r| (r.seq, r.payload)).collect();
        assert_eq!(
            seen,
            vec![(1, &b"one"[..]), (2, &b""[..]), (3, &b"three"[..])]
        );
        assert_eq!(records[0].offset, MAGIC.len() as u64);
    }

    #[test]
    fn a_record_cut_anywhere_is_a_torn_tail() {
        let whole = segment(&[(1, b"first"), (2, b"second record")]);
        let second = (MAGIC.len() + HEADER_BYTES + 5) as u64;
        for cut in second as usize + 1..whole.len() {
            let (records, ending) = read_segment(&whole[..cut]);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert_eq!(ending, Ending::Torn { offset: second }, "cut at {cut}");
        }
        let mut zeros = whole[..second as usize].to_vec();
        zeros.extend([0u8; 40]);
        assert_eq!(read_segment(&zeros).1, Ending::Torn { offset: second });
    }

    #[test]
    fn a_flipped_byte_before_the_tail_is_corruption_at_its_record() {
        let whole = segment(&[(1, b"first"), (2, b"second"), (3, b"third")]);
        let second = MAGIC.len() + HEADER_BYTES + 5;
        // Any byte of the second record, its length included: never mistaken for a torn tail.
        for at in second..second + HEADER_BYTES + 6 {
            let mut bytes = whole.clone();
            bytes[at] ^= 0x40;
            let (records, ending) = read_segment(&bytes);
            assert_eq!(records.len(), 1, "flip at {at}");
            match ending {
                Ending::Corrupt { offset, .. } => assert_eq!(offset, second as u64, "flip at {at}"),
                other => panic!("flip at {at} read as {other:?}"),
            }
        }
        // A damaged header of the last record is damage too; a payload cut short there is not.
        let last = second + HEADER_BYTES + 6;
        let mut bytes = whole.clone();
        bytes[last] ^= 0x80;
        assert!(matches!(read_segment(&bytes).1, Ending::Corrupt { .. }));
    }

    #[test]
    fn a_gap_in_the_sequence_is_corruption() {
        let bytes = segment(&[(1, b"a"), (3, b"b")]);
        assert!(matches!(read_segment(&bytes).1, Ending::Corrupt { .. }));
        assert!(matches!(
            read_segment(b"NOTALOG!xxxx").1,
            Ending::Corrupt { offset: 0, .. }
        ));
    }
}
