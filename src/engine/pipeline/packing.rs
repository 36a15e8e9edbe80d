//! Flux's 2×2 latent packing and its position ids.
//!
//! The engine keeps latents unpacked, `[n, C, h, w]`, for every family; only the Flux transformer sees them
//! packed: token `i·(w/2) + j` holds feature `c·4 + dy·2 + dx` = `latents[c, 2i + dy, 2j + dx]`
//! (`[n, (h/2)(w/2), 4C]`). The flow-matching step is elementwise, so packing only around the transformer
//! call gives the same numbers as diffusers' packed loop.

use ndarray::{Array2, ArrayD, Ix4, IxDyn};

use crate::engine::error::EngineError;

fn shape_error(what: &str, shape: &[usize]) -> EngineError {
    EngineError::Inference { graph: "transformer", message: format!("cannot {what} latents of shape {shape:?}") }
}

/// `[n, C, h, w]` → `[n, (h/2)(w/2), 4C]`; `h` and `w` must be even.
pub fn pack(latents: &ArrayD<f32>) -> Result<ArrayD<f32>, EngineError> {
    let view = latents.view().into_dimensionality::<Ix4>().map_err(|_| shape_error("pack", latents.shape()))?;
    let (n, c, h, w) = view.dim();
    if h % 2 != 0 || w % 2 != 0 {
        return Err(shape_error("pack", latents.shape()));
    }
    let (h2, w2) = (h / 2, w / 2);
    Ok(ArrayD::from_shape_fn(IxDyn(&[n, h2 * w2, c * 4]), |index| {
        let (b, token, feature) = (index[0], index[1], index[2]);
        let (i, j) = (token / w2, token % w2);
        let (channel, dy, dx) = (feature / 4, (feature / 2) % 2, feature % 2);
        view[[b, channel, 2 * i + dy, 2 * j + dx]]
    }))
}

/// `[n, (h/2)(w/2), 4C]` → `[n, C, h, w]` for latents `h` × `w` (the inverse of [`pack`]).
pub fn unpack(packed: &ArrayD<f32>, h: usize, w: usize) -> Result<ArrayD<f32>, EngineError> {
    let (h2, w2) = (h / 2, w / 2);
    let ok =
        packed.ndim() == 3 && packed.shape()[1] == h2 * w2 && packed.shape()[2] % 4 == 0 && h % 2 == 0 && w % 2 == 0;
    if !ok {
        return Err(shape_error("unpack", packed.shape()));
    }
    let (n, c) = (packed.shape()[0], packed.shape()[2] / 4);
    Ok(ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |index| {
        let (b, channel, y, x) = (index[0], index[1], index[2], index[3]);
        packed[[b, (y / 2) * w2 + x / 2, channel * 4 + (y % 2) * 2 + x % 2]]
    }))
}

/// `img_ids` for latents `h` × `w`: one row `(0, i, j)` per packed token, `[(h/2)(w/2), 3]`.
pub fn image_ids(h: usize, w: usize) -> ArrayD<i64> {
    let w2 = w / 2;
    Array2::from_shape_fn((h / 2 * w2, 3), |(token, k)| match k {
        1 => (token / w2) as i64,
        2 => (token % w2) as i64,
        _ => 0,
    })
    .into_dyn()
}

/// `txt_ids`: zeros `[sequence, 3]`.
pub fn text_ids(sequence: usize) -> ArrayD<i64> {
    ArrayD::zeros(IxDyn(&[sequence, 3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_follows_diffusers_layout_and_round_trips() {
        let latents = ArrayD::from_shape_fn(IxDyn(&[1, 2, 4, 6]), |i| (i[1] * 100 + i[2] * 10 + i[3]) as f32);
        let packed = pack(&latents).unwrap();
        assert_eq!(packed.shape(), &[1, 6, 8]);
        // Token (i=1, j=2) = 1·3 + 2 = 5, feature c=1, dy=1, dx=0 → 1·4 + 2 = 6: latents[1, 3, 4].
        assert_eq!(packed[[0, 5, 6]], 134.0);
        assert_eq!(unpack(&packed, 4, 6).unwrap(), latents);
        assert!(pack(&ArrayD::zeros(IxDyn(&[1, 2, 3, 4]))).is_err());
    }

    #[test]
    fn image_ids_are_row_and_column() {
        let ids = image_ids(4, 6);
        assert_eq!(ids.shape(), &[6, 3]);
        assert_eq!(ids.row_vec(5), [0, 1, 2]);
        assert!(text_ids(4).iter().all(|v| *v == 0));
    }

    trait Row {
        fn row_vec(&self, r: usize) -> Vec<i64>;
    }

    impl Row for ArrayD<i64> {
        fn row_vec(&self, r: usize) -> Vec<i64> {
            (0..self.shape()[1]).map(|k| self[[r, k]]).collect()
        }
    }
}
