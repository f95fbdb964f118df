//! Softmax regression: `classes × features` weights plus a bias per class, trained with SGD
//! on the mean cross-entropy of a batch. Every loop runs in a fixed order, so the same inputs
//! give bit-identical results.

use super::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub classes: usize,
    pub features: usize,
    /// Row-major weights (`classes × features`), then `classes` biases.
    pub params: Vec<f64>,
}

/// One training example.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Example {
    pub x: Vec<f64>,
    pub y: usize,
}

impl Model {
    /// Small random weights from `seed` (the same on every rank), zero biases.
    pub fn init(classes: usize, features: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x6d6f_6465_6c00);
        let mut params: Vec<f64> = (0..classes * features)
            .map(|_| rng.normal() * 0.01)
            .collect();
        params.extend(std::iter::repeat_n(0.0, classes));
        Model {
            classes,
            features,
            params,
        }
    }

    fn logits(&self, x: &[f64], out: &mut [f64]) {
        let (c, f) = (self.classes, self.features);
        for (k, o) in out.iter_mut().enumerate().take(c) {
            let w = &self.params[k * f..(k + 1) * f];
            let mut z = self.params[c * f + k];
            for (wi, xi) in w.iter().zip(x) {
                z += wi * xi;
            }
            *o = z;
        }
    }

    fn softmax(z: &mut [f64]) {
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in z.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in z.iter_mut() {
            *v /= sum;
        }
    }

    /// Gradient of the mean cross-entropy over `batch`, and that loss.
    pub fn gradient(&self, batch: &[&Example]) -> (Vec<f64>, f64) {
        let (c, f) = (self.classes, self.features);
        let mut grad = vec![0.0; self.params.len()];
        let mut p = vec![0.0; c];
        let mut loss = 0.0;
        for ex in batch {
            self.logits(&ex.x, &mut p);
            Self::softmax(&mut p);
            loss -= p[ex.y].max(1e-300).ln();
            for k in 0..c {
                let d = p[k] - if k == ex.y { 1.0 } else { 0.0 };
                let g = &mut grad[k * f..(k + 1) * f];
                for (gi, xi) in g.iter_mut().zip(&ex.x) {
                    *gi += d * xi;
                }
                grad[c * f + k] += d;
            }
        }
        let n = batch.len().max(1) as f64;
        for g in &mut grad {
            *g /= n;
        }
        (grad, loss / n)
    }

    pub fn apply(&mut self, grad: &[f64], lr: f64) {
        for (p, g) in self.params.iter_mut().zip(grad) {
            *p -= lr * g;
        }
    }

    pub fn predict(&self, x: &[f64]) -> usize {
        let mut z = vec![0.0; self.classes];
        self.logits(x, &mut z);
        z.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, _)| k)
            .unwrap_or(0)
    }

    pub fn accuracy(&self, data: &[Example]) -> f64 {
        let right = data.iter().filter(|e| self.predict(&e.x) == e.y).count();
        right as f64 / data.len().max(1) as f64
    }

    /// `{"classes":C,"features":F}\n` followed by the parameters as little-endian f64.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{{\"classes\":{},\"features\":{}}}\n",
            self.classes, self.features
        )
        .into_bytes();
        for p in &self.params {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(data: &[u8]) -> anyhow::Result<Self> {
        let nl = data
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow::anyhow!("model has no header line"))?;
        #[derive(serde::Deserialize)]
        struct Header {
            classes: usize,
            features: usize,
        }
        let h: Header = serde_json::from_slice(&data[..nl])?;
        let body = &data[nl + 1..];
        let n = h.classes * h.features + h.classes;
        if body.len() != n * 8 {
            anyhow::bail!("model body has {} bytes, expected {}", body.len(), n * 8);
        }
        let params = body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Model {
            classes: h.classes,
            features: h.features,
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_exactly() {
        let m = Model::init(4, 3, 7);
        assert_eq!(Model::from_bytes(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn sgd_lowers_the_loss() {
        let mut m = Model::init(2, 2, 1);
        let data = [
            Example {
                x: vec![1.0, 0.0],
                y: 0,
            },
            Example {
                x: vec![0.0, 1.0],
                y: 1,
            },
        ];
        let batch: Vec<&Example> = data.iter().collect();
        let (_, before) = m.gradient(&batch);
        for _ in 0..100 {
            let (g, _) = m.gradient(&batch);
            m.apply(&g, 0.5);
        }
        let (_, after) = m.gradient(&batch);
        assert!(after < before / 2.0);
        assert_eq!(m.accuracy(&data), 1.0);
    }
}
