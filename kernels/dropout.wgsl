// LoRA dropout (PEFT semantics): the LoRA branch reads drop(x) = mask ⊙ x / (1 − p).
//   out[t, i] = (accumulate ? out[t, i] : 0) + (keep(t, i) ? x[t, i]·inv_keep : 0)
// for t < n_rows, i < n_cols, where keep(t, i) = hash(seed, counter, tag, row0 + t, i) >= threshold
// (threshold = p·2³², so P(keep) = 1 − p). The hash is counter based (no RNG state), written
// identically in src/gpu/ops/dropout.rs (`dropout_hash`): a recompute reproduces the mask exactly.
// The backward uses the same kernel with accumulate = 1 to add mask ⊙ g / (1 − p) to dx.

struct Params {
    n_rows: u32,    // token rows in this window
    n_cols: u32,    // elements per row
    row0: u32,      // global index of the window's first row (the hash uses global rows)
    seed: u32,
    counter: u32,   // step/micro-step counter
    tag: u32,       // layer·16 + target
    threshold: u32, // keep iff hash >= threshold
    inv_keep: f32,  // 1 / (1 − p)
    flags: u32,     // bit 0: accumulate into out
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;          // [n_rows, n_cols]
@group(0) @binding(1) var<storage, read_write> o: array<f32>;    // [n_rows, n_cols]
@group(0) @binding(2) var<uniform> p: Params;

// A 32-bit integer mix (xorshift-multiply, "lowbias32").
fn mix32(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

fn dropout_hash(seed: u32, counter: u32, tag: u32, row: u32, col: u32) -> u32 {
    var h = mix32(seed ^ 0x9e3779b9u);
    h = mix32(h ^ counter);
    h = mix32(h ^ tag);
    h = mix32(h ^ row);
    h = mix32(h ^ col);
    return h;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (col >= p.n_cols || row >= p.n_rows) {
        return;
    }
    let i = row * p.n_cols + col;
    var v = 0.0;
    if (dropout_hash(p.seed, p.counter, p.tag, p.row0 + row, col) >= p.threshold) {
        v = x[i] * p.inv_keep;
    }
    if ((p.flags & 1u) != 0u) {
        v += o[i];
    }
    o[i] = v;
}
