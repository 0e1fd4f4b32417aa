//! Stacking requests' tensors along dimension 0 into one batch, and splitting the batch's
//! outputs back per request. Both are byte operations thanks to the OIP layout.

use crate::tensor::{BytesElements, Tensor};
use bytes::{Bytes, BytesMut};

/// A batch output that cannot be split back into per-request rows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("output '{name}' has shape {shape:?}, which cannot be split into the batch's {rows} rows")]
pub struct SplitError {
    /// The output's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Rows the batch had.
    pub rows: usize,
}

/// Concatenates same-named, same-typed tensors along dimension 0. The caller guarantees
/// matching non-batch dimensions (the batcher only groups compatible requests).
pub fn stack(parts: &[&Tensor]) -> Tensor {
    let first = parts[0];
    if parts.len() == 1 {
        return first.clone();
    }
    let rows: i64 = parts
        .iter()
        .map(|t| t.shape.first().copied().unwrap_or(1))
        .sum();
    let mut data = BytesMut::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for part in parts {
        data.extend_from_slice(&part.data);
    }
    let mut shape = first.shape.clone();
    if let Some(d0) = shape.first_mut() {
        *d0 = rows;
    }
    Tensor {
        name: first.name.clone(),
        datatype: first.datatype,
        shape,
        data: data.freeze(),
    }
}

/// Splits `tensor` along dimension 0 into pieces of `rows[i]` rows each.
pub fn split(tensor: &Tensor, rows: &[usize]) -> Result<Vec<Tensor>, SplitError> {
    let total: usize = rows.iter().sum();
    let error = || SplitError {
        name: tensor.name.clone(),
        shape: tensor.shape.clone(),
        rows: total,
    };
    if rows.len() == 1 {
        return Ok(vec![tensor.clone()]);
    }
    let Some((&d0, inner)) = tensor.shape.split_first() else {
        return Err(error());
    };
    if usize::try_from(d0).ok() != Some(total) {
        return Err(error());
    }
    let per_row = Tensor::element_count_of(inner).ok_or_else(error)?;
    let offsets = row_offsets(tensor, per_row, total).ok_or_else(error)?;
    let mut pieces = Vec::with_capacity(rows.len());
    let mut row = 0;
    for &n in rows {
        let mut shape = tensor.shape.clone();
        shape[0] = n as i64;
        pieces.push(Tensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype,
            shape,
            data: tensor.data.slice(offsets[row]..offsets[row + n]),
        });
        row += n;
    }
    Ok(pieces)
}

/// Byte offset where each row starts, plus the end: `rows + 1` entries.
fn row_offsets(tensor: &Tensor, per_row: usize, rows: usize) -> Option<Vec<usize>> {
    match tensor.datatype.element_size() {
        Some(size) => {
            let row_bytes = per_row.checked_mul(size)?;
            (row_bytes.checked_mul(rows)? == tensor.data.len())
                .then(|| (0..=rows).map(|r| r * row_bytes).collect())
        }
        None => bytes_row_offsets(&tensor.data, per_row, rows),
    }
}

fn bytes_row_offsets(data: &Bytes, per_row: usize, rows: usize) -> Option<Vec<usize>> {
    let mut offsets = Vec::with_capacity(rows + 1);
    let mut position = 0;
    let mut elements = BytesElements::new(data);
    offsets.push(0);
    for _ in 0..rows {
        for _ in 0..per_row {
            position += 4 + elements.next()?.len();
        }
        offsets.push(position);
    }
    (position == data.len()).then_some(offsets)
}

/// Whether two requests' inputs can share a batch: same datatypes and same dimensions after
/// the first, input by input.
pub fn same_inner_shapes(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.datatype == y.datatype && x.shape.get(1..) == y.shape.get(1..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, push_bytes_element};

    fn f32_tensor(rows: i64, values: &[f32]) -> Tensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new("x", DataType::Fp32, vec![rows, 2], Bytes::from(data)).unwrap()
    }

    #[test]
    fn stack_then_split_gives_back_each_request() {
        let a = f32_tensor(1, &[1.0, 2.0]);
        let b = f32_tensor(2, &[3.0, 4.0, 5.0, 6.0]);
        let stacked = stack(&[&a, &b]);
        assert_eq!(stacked.shape, vec![3, 2]);
        stacked.validate().unwrap();
        let pieces = split(&stacked, &[1, 2]).unwrap();
        assert_eq!(pieces, vec![a, b]);
    }

    #[test]
    fn bytes_tensors_split_on_element_boundaries() {
        let make = |words: &[&str]| {
            let mut data = Vec::new();
            for w in words {
                push_bytes_element(&mut data, w.as_bytes());
            }
            Tensor::new(
                "s",
                DataType::Bytes,
                vec![words.len() as i64 / 2, 2],
                Bytes::from(data),
            )
            .unwrap()
        };
        let a = make(&["a", "bb"]);
        let b = make(&["", "dddd", "e", "ffffff"]);
        let stacked = stack(&[&a, &b]);
        stacked.validate().unwrap();
        assert_eq!(split(&stacked, &[1, 2]).unwrap(), vec![a, b]);
    }

    #[test]
    fn an_output_without_the_batch_rows_is_an_error() {
        let t = f32_tensor(1, &[1.0, 2.0]);
        let err = split(&t, &[1, 1]).unwrap_err();
        assert_eq!(err.rows, 2);
    }

    #[test]
    fn compatibility_ignores_dimension_zero_only() {
        let a = [f32_tensor(1, &[0.0; 2])];
        let b = [f32_tensor(3, &[0.0; 6])];
        assert!(same_inner_shapes(&a, &b));
        let c = [Tensor::new("x", DataType::Fp32, vec![1, 1], Bytes::from(vec![0u8; 4])).unwrap()];
        assert!(!same_inner_shapes(&a, &c));
    }
}
