//! The LoRA dropout mask (PEFT semantics, training only): the LoRA branch of an adapted projection
//! reads `drop(x) = mask ⊙ x / (1 − p)` instead of `x`. The mask is a counter-based hash with no
//! RNG state, mirrored bit for bit by `kernels/dropout.wgsl` (launched by `gpu::ops::dropout`) and
//! used as is by the CPU reference (`model::reference`).

use super::Target;

/// Dropout of one training forward/backward: probability `p` in `[0, 1)`, a run seed and a
/// counter that changes every micro-step (derived from the step and micro index).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u32,
    pub counter: u32,
}

impl Dropout {
    /// `⌊p·2³²⌋` (saturating): an element is kept iff its hash is at least this.
    pub fn threshold(&self) -> u32 {
        let t = (self.p.clamp(0.0, 1.0) as f64 * 4_294_967_296.0).floor();
        t.min(u32::MAX as f64) as u32
    }

    /// `1 / (1 − p)`, the scale of kept elements.
    pub fn inv_keep(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether this dropout changes anything (p > 0).
    pub fn active(&self) -> bool {
        self.p > 0.0
    }

    /// Whether element `(row, col)` of the input of `(layer, target)` is kept.
    pub fn keep(&self, layer: usize, target: Target, row: usize, col: usize) -> bool {
        dropout_hash(
            self.seed,
            self.counter,
            tag(layer, target),
            row as u32,
            col as u32,
        ) >= self.threshold()
    }
}

/// The hash's tensor tag: `layer·16 + target index`.
pub fn tag(layer: usize, target: Target) -> u32 {
    let ti = Target::ALL.iter().position(|&t| t == target).unwrap_or(0);
    (layer as u32).wrapping_mul(16).wrapping_add(ti as u32)
}

/// The 32-bit integer mix of `kernels/dropout.wgsl` (xorshift-multiply, "lowbias32").
pub fn mix32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The mask hash, identical to `dropout_hash` in `kernels/dropout.wgsl`.
pub fn dropout_hash(seed: u32, counter: u32, tag: u32, row: u32, col: u32) -> u32 {
    let mut h = mix32(seed ^ 0x9e37_79b9);
    h = mix32(h ^ counter);
    h = mix32(h ^ tag);
    h = mix32(h ^ row);
    mix32(h ^ col)
}
