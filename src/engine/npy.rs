//! Reading and writing NumPy `.npy` float32 arrays: how clients hand over exact initial latents.

use ndarray::{ArrayD, IxDyn};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Why an `.npy` payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NpyError {
    /// Not an `.npy` file.
    #[error("not a .npy file (bad magic)")]
    BadMagic,
    /// The header is malformed or truncated.
    #[error("malformed .npy header: {0}")]
    BadHeader(String),
    /// The array is not little-endian float32 in C order.
    #[error("unsupported array: {0} (need little-endian float32 '<f4', C order)")]
    Unsupported(String),
    /// The data length does not match the shape.
    #[error("data holds {actual} bytes, shape needs {expected}")]
    Length {
        /// Bytes the shape requires.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
}

/// Parses a little-endian float32, C-order `.npy` array.
pub fn read_f32(bytes: &[u8]) -> Result<ArrayD<f32>, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::BadMagic);
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(NpyError::BadHeader("truncated".into()));
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(NpyError::BadHeader(format!("version {v}"))),
    };
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| NpyError::BadHeader("truncated".into()))?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| NpyError::BadHeader("not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| NpyError::BadHeader("no descr".into()))?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    if descr != "<f4" && descr != "f4" {
        return Err(NpyError::Unsupported(format!("dtype {descr}")));
    }
    let fortran = dict_value(header, "fortran_order").ok_or_else(|| NpyError::BadHeader("no fortran_order".into()))?;
    if fortran.trim() != "False" {
        return Err(NpyError::Unsupported("Fortran order".into()));
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| NpyError::BadHeader("no shape".into()))?;
    let shape: Vec<usize> = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| NpyError::BadHeader(format!("shape {shape_text}"))))
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| NpyError::BadHeader("shape overflows".into()))?;
    let data = &bytes[end..];
    let expected = count.checked_mul(4).ok_or_else(|| NpyError::BadHeader("shape overflows".into()))?;
    if data.len() != expected {
        return Err(NpyError::Length { expected, actual: data.len() });
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| NpyError::BadHeader(e.to_string()))
}

/// Finds `'key': value` in the header dict; the value runs to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?;
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// Serialises a float32 array as `.npy` version 1.0.
pub fn write_f32(array: &ArrayD<f32>) -> Vec<u8> {
    let dims: Vec<String> = array.shape().iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in array.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a =
            ArrayD::from_shape_fn(IxDyn(&[2, 4, 3, 5]), |i| (i[0] * 100 + i[1] * 10 + i[2]) as f32 + 0.5 * i[3] as f32);
        let back = read_f32(&write_f32(&a)).unwrap();
        assert_eq!(a, back);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(read_f32(b"hello world"), Err(NpyError::BadMagic));
        let a = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 8, 8]));
        let mut bytes = write_f32(&a);
        bytes.pop();
        assert!(matches!(read_f32(&bytes), Err(NpyError::Length { .. })));
        let mut wrong = write_f32(&a);
        let pos = wrong.windows(3).position(|w| w == b"<f4").unwrap();
        wrong[pos + 2] = b'8';
        assert!(matches!(read_f32(&wrong), Err(NpyError::Unsupported(_))));
    }
}
