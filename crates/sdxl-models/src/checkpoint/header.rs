//! The safetensors format: an 8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the data.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use candle_core::{Device, Tensor};

/// One tensor's place in a file.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) file: usize,
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub(super) start: u64,
    pub(super) len: usize,
}

pub(super) struct Header {
    pub(super) tensors: Vec<(String, Entry)>,
    pub(super) metadata: BTreeMap<String, String>,
}

/// Parses a safetensors header: an 8-byte little-endian length, then JSON naming each tensor's
/// dtype, shape and byte range (relative to the end of the header).
pub(super) fn read_header(file: &File) -> std::result::Result<Header, String> {
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|_| "not a safetensors file (too short)".to_string())?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err("not a safetensors file (bad header length)".into());
    }
    let mut bytes = vec![0u8; header_len as usize];
    file.read_exact_at(&mut bytes, 8).map_err(|e| e.to_string())?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a safetensors file (header: {e})"))?;
    let data_start = 8 + header_len;
    let mut header = Header { tensors: Vec::new(), metadata: BTreeMap::new() };
    for (name, value) in json {
        if name == "__metadata__" {
            let strings: BTreeMap<String, String> =
                serde_json::from_value(value).map_err(|e| format!("header `__metadata__`: {e}"))?;
            header.metadata = strings;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let info: Info = serde_json::from_value(value).map_err(|e| format!("header entry `{name}`: {e}"))?;
        let (begin, end) = info.data_offsets;
        let elements = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let size = dtype_size(&info.dtype).and_then(|s| elements.and_then(|n| n.checked_mul(s)));
        if begin > end || data_start + end > file_len || size.is_some_and(|s| s as u64 != end - begin) {
            return Err(format!("header entry `{name}` does not fit the file"));
        }
        let entry = Entry {
            file: 0,
            dtype: info.dtype,
            shape: info.shape,
            start: data_start + begin,
            len: (end - begin) as usize,
        };
        header.tensors.push((name, entry));
    }
    Ok(header)
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => Some(1),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "F32" | "I32" | "U32" => Some(4),
        "F64" | "I64" | "U64" => Some(8),
        _ => None,
    }
}

/// Reads one tensor's little-endian data directly into a typed buffer (one copy in memory).
pub(super) fn read_as<T: candle_core::WithDType + bytemuck::Pod>(
    file: &File,
    entry: &Entry,
    name: &str,
) -> candle_core::Result<Tensor> {
    const { assert!(cfg!(target_endian = "little"), "safetensors data is little-endian") };
    let mut data = vec![T::zeroed(); entry.len / std::mem::size_of::<T>()];
    file.read_exact_at(bytemuck::cast_slice_mut(&mut data), entry.start)
        .map_err(|e| candle_core::Error::Msg(format!("reading tensor `{name}`: {e}")))?;
    Tensor::from_vec(data, entry.shape.as_slice(), &Device::Cpu)
}
