//! Record batches as Arrow IPC stream bytes inside a serde encoding.

use arrow_array::RecordBatch;
use serde::{Deserialize, Deserializer, Serializer};

/// The IPC stream of one batch.
///
/// # Errors
/// A batch Arrow cannot write.
pub fn to_bytes(batch: &RecordBatch) -> Result<Vec<u8>, arrow_schema::ArrowError> {
    let mut bytes = Vec::new();
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// The one batch of an IPC stream.
///
/// # Errors
/// Bytes that are not a stream of exactly one batch.
pub fn from_bytes(bytes: &[u8]) -> Result<RecordBatch, String> {
    let mut reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| e.to_string())?;
    let batch = reader
        .next()
        .ok_or("the stream holds no batch")?
        .map_err(|e| e.to_string())?;
    if reader.next().is_some() {
        return Err("the stream holds more than one batch".into());
    }
    Ok(batch)
}

pub fn serialize<S: Serializer>(batch: &RecordBatch, serializer: S) -> Result<S::Ok, S::Error> {
    let bytes = to_bytes(batch).map_err(serde::ser::Error::custom)?;
    serializer.serialize_bytes(&bytes)
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<RecordBatch, D::Error> {
    let bytes = <std::borrow::Cow<'de, [u8]>>::deserialize(deserializer)?;
    from_bytes(&bytes).map_err(serde::de::Error::custom)
}
