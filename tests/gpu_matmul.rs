//! GPU matmul family (`bfpo_lite::gpu::ops::matmul`) against f64 CPU references, for every weight
//! type, at awkward sizes, with the forward both in one pass and split over n_in (split-K); plus
//! hand-checkable fixed cases built byte by byte.

#[path = "common/gpu.rs"]
mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::matmul::{
    GpuWeight, SplitK, matmul, matmul_back_input, matmul_back_input_ref, matmul_ref, matmul_rows,
    matmul_rows_back_input, matmul_split,
};
use bfpo_lite::gpu::{Gpu, GpuBuf};
use bfpo_lite::model::TensorRef;
use bfpo_lite::util::{Rng, Tol, assert_close};

/// The GPU sums in f32, the reference in f64, both over exactly the same dequantized weights, so
/// the tolerance only covers f32 accumulation (outputs here are O(1); one mis-decoded weight would
/// be off by ~1e-2). Quantized types also differ from the CPU dequantizer by the rounding of the
/// `d·scale` products (a few ulps per weight).
fn tol(ty: GgmlType) -> Tol {
    match ty {
        GgmlType::F32 => TOL_F32,
        GgmlType::F16 | GgmlType::BF16 => TOL_HALF,
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            TOL_LEGACY
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => TOL_K,
    }
}
const TOL_F32: Tol = Tol::new(2e-5, 2e-5);
const TOL_HALF: Tol = Tol::new(2e-5, 2e-5);
const TOL_LEGACY: Tol = Tol::new(5e-5, 5e-5);
const TOL_K: Tol = Tol::new(5e-5, 5e-5);

/// A random `[n_out, n_in]` weight of type `ty` with O(1/√n_in) entries: (GGUF bytes, dequantized).
fn random_weight(ty: GgmlType, n_in: usize, n_out: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let vals = rng.normal_vec(n_in * n_out, 1.0 / (n_in as f32).sqrt());
    encode(ty, &vals)
}

fn encode(ty: GgmlType, vals: &[f32]) -> (Vec<u8>, Vec<f32>) {
    match ty {
        GgmlType::F32 => (bytemuck::cast_slice(vals).to_vec(), vals.to_vec()),
        GgmlType::F16 => {
            let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        GgmlType::BF16 => {
            let h: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
            (
                bytemuck::cast_slice(&h).to_vec(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        _ => {
            let bytes = bfpo_lite::gguf::quant::quantize(ty, vals).expect("quantize");
            let deq =
                bfpo_lite::gguf::quant::dequantize_vec(ty, &bytes, vals.len()).expect("dequantize");
            (bytes, deq)
        }
    }
}

fn read(gpu: &Gpu, b: &GpuBuf, n: usize) -> Vec<f32> {
    gpu.read_range(b, 0, (n * 4) as u64).unwrap()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Every entry point for one type and shape, with weights in `max_rows`-row chunks.
fn check_type(
    ty: GgmlType,
    n_in: usize,
    n_out: usize,
    n_tokens: usize,
    max_rows: usize,
    seed: u64,
) {
    let gpu = common::gpu();
    let tol = tol(ty);
    let what = |op: &str| format!("{op} {ty} [{n_out}x{n_in}] T={n_tokens} chunk={max_rows}");
    let (bytes, wf) = random_weight(ty, n_in, n_out, seed);
    let w = GpuWeight::upload_chunked(&gpu, "w", ty, n_in, n_out, &bytes, max_rows).unwrap();
    assert_eq!(w.chunks.len(), n_out.div_ceil(max_rows.min(n_out)));
    let mut rng = Rng::new(seed ^ 0xABCD);
    let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let b0 = rng.normal_vec(n_out, 1.0);
    let dy0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let dx0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let x = gpu.upload("x", &x0).unwrap();
    let bias = gpu.upload("bias", &b0).unwrap();
    let dy = gpu.upload("dy", &dy0).unwrap();
    let want = matmul_ref(&x0, &wf, None, n_tokens, n_in, n_out);
    let want_b = matmul_ref(&x0, &wf, Some(&b0), n_tokens, n_in, n_out);
    let want_dx = matmul_back_input_ref(&dy0, &wf, n_tokens, n_in, n_out);

    // Forward: plain; with bias and accumulate (y starts at y0).
    let y = gpu.upload("y", &y0).unwrap();
    let y_acc = gpu.upload("y_acc", &y0).unwrap();
    let mut rec = gpu.recorder();
    matmul(&gpu, &mut rec, &x, &w, None, &y, n_tokens, false).unwrap();
    matmul(&gpu, &mut rec, &x, &w, Some(&bias), &y_acc, n_tokens, true).unwrap();
    rec.run("matmul test").unwrap();
    let got = read(&gpu, &y, n_tokens * n_out);
    assert_close(&what("matmul"), &got, &want, tol);
    assert_close(
        &what("matmul+bias+acc"),
        &read(&gpu, &y_acc, n_tokens * n_out),
        &add(&y0, &want_b),
        tol,
    );

    // Forward split over n_in in 3-group (24-element) K chunks, the last one shorter when the
    // groups do not divide evenly: same references, same tolerances.
    let ys = gpu.upload("ys", &y0).unwrap();
    let ys_acc = gpu.upload("ys_acc", &y0).unwrap();
    let split = SplitK::Chunk(24);
    let mut rec = gpu.recorder();
    matmul_split(&gpu, &mut rec, &x, &w, None, &ys, n_tokens, false, split).unwrap();
    matmul_split(
        &gpu,
        &mut rec,
        &x,
        &w,
        Some(&bias),
        &ys_acc,
        n_tokens,
        true,
        split,
    )
    .unwrap();
    rec.run("split-K matmul test").unwrap();
    assert_close(
        &what("split-K matmul"),
        &read(&gpu, &ys, n_tokens * n_out),
        &want,
        tol,
    );
    assert_close(
        &what("split-K matmul+bias+acc"),
        &read(&gpu, &ys_acc, n_tokens * n_out),
        &add(&y0, &want_b),
        tol,
    );

    // Rows: a middle range that (with small chunks) crosses chunk boundaries.
    let rows = n_out / 5..n_out - n_out / 7;
    let nr = rows.len();
    let yr = gpu.alloc("yr", (n_tokens * nr * 4) as u64).unwrap();
    let dyr0: Vec<f32> = (0..n_tokens)
        .flat_map(|t| dy0[t * n_out + rows.start..t * n_out + rows.end].to_vec())
        .collect();
    let dyr = gpu.upload("dyr", &dyr0).unwrap();
    let dxr = gpu.upload("dxr", &dx0).unwrap();
    let mut rec = gpu.recorder();
    matmul_rows(&gpu, &mut rec, &x, &w, rows.clone(), &yr, n_tokens).unwrap();
    matmul_rows_back_input(&gpu, &mut rec, &dyr, &w, rows.clone(), &dxr, n_tokens, true).unwrap();
    rec.run("matmul rows test").unwrap();
    let want_r: Vec<f32> = (0..n_tokens)
        .flat_map(|t| want[t * n_out + rows.start..t * n_out + rows.end].to_vec())
        .collect();
    assert_close(
        &what("matmul_rows"),
        &read(&gpu, &yr, n_tokens * nr),
        &want_r,
        tol,
    );
    let w_rows = &wf[rows.start * n_in..rows.end * n_in];
    let want_dxr = matmul_back_input_ref(&dyr0, w_rows, n_tokens, n_in, nr);
    assert_close(
        &what("matmul_rows_back_input+acc"),
        &read(&gpu, &dxr, n_tokens * n_in),
        &add(&dx0, &want_dxr),
        tol,
    );

    // Backward input: overwrite (dx starts as garbage) and accumulate.
    let dx = gpu.upload("dx", &dx0).unwrap();
    let dx_acc = gpu.upload("dx_acc", &dx0).unwrap();
    let mut rec = gpu.recorder();
    matmul_back_input(&gpu, &mut rec, &dy, &w, &dx, n_tokens, false).unwrap();
    matmul_back_input(&gpu, &mut rec, &dy, &w, &dx_acc, n_tokens, true).unwrap();
    rec.run("matmul back test").unwrap();
    let got_dx = read(&gpu, &dx, n_tokens * n_in);
    assert_close(&what("matmul_back_input"), &got_dx, &want_dx, tol);
    assert_close(
        &what("matmul_back_input+acc"),
        &read(&gpu, &dx_acc, n_tokens * n_in),
        &add(&dx0, &want_dx),
        tol,
    );

    // Transpose identity ⟨dy, x·Wᵀ⟩ = ⟨dy·W, x⟩ on the GPU results.
    let lhs = dot(&dy0, &got);
    let rhs = dot(&got_dx, &x0);
    let scale = dy0.len() as f64;
    assert!(
        (lhs - rhs).abs() <= 1e-5 * scale.sqrt() * (1.0 + lhs.abs()),
        "{}: <dy, xW^T> = {lhs} but <dyW, x> = {rhs}",
        what("transpose identity")
    );
}

fn check_all_shapes(ty: GgmlType, n_ins: &[usize]) {
    let mut seed = ty.id() as u64 * 1000;
    for &n_in in n_ins {
        for (n_tokens, n_out, max_rows) in [(1, 67, usize::MAX), (3, 67, 16), (17, 131, 50)] {
            seed += 1;
            check_type(ty, n_in, n_out, n_tokens, max_rows, seed);
        }
    }
}

#[test]
fn matmul_f32() {
    check_all_shapes(GgmlType::F32, &[8, 40]);
}

#[test]
fn matmul_f16() {
    check_all_shapes(GgmlType::F16, &[8, 72]);
}

#[test]
fn matmul_bf16() {
    check_all_shapes(GgmlType::BF16, &[16, 72]);
}

#[test]
fn matmul_q8_0() {
    check_all_shapes(GgmlType::Q8_0, &[32, 96]);
}

#[test]
fn matmul_q4_0() {
    check_all_shapes(GgmlType::Q4_0, &[32, 96]);
}

#[test]
fn matmul_q4_1() {
    check_all_shapes(GgmlType::Q4_1, &[32, 96]);
}

#[test]
fn matmul_q5_0() {
    check_all_shapes(GgmlType::Q5_0, &[32, 96]);
}

#[test]
fn matmul_q5_1() {
    check_all_shapes(GgmlType::Q5_1, &[32, 96]);
}

#[test]
fn matmul_q4_k() {
    check_all_shapes(GgmlType::Q4_K, &[256, 512]);
}

#[test]
fn matmul_q5_k() {
    check_all_shapes(GgmlType::Q5_K, &[256, 512]);
}

#[test]
fn matmul_q6_k() {
    check_all_shapes(GgmlType::Q6_K, &[256, 512]);
}

/// The shape split-K is for (n_in large, n_out small: ffn_down), every weight type: one pass,
/// split in 256-element chunks and the device's own choice all match the f64 reference (odd T,
/// bias and accumulate), and a token's outputs do not depend on the other tokens in the batch:
/// the first 5 tokens alone give the same bits as inside the batch of 13.
#[test]
fn split_k_large_n_in_small_n_out_every_type() {
    let gpu = common::gpu();
    let (n_in, n_out, n_tokens) = (1280, 70, 13);
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ]
    .into_iter()
    .enumerate()
    {
        let (bytes, wf) = random_weight(ty, n_in, n_out, 900 + i as u64);
        let w = GpuWeight::upload_raw(&gpu, "w", ty, n_in, n_out, &bytes).unwrap();
        let mut rng = Rng::new(77 + i as u64);
        let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
        let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
        let b0 = rng.normal_vec(n_out, 1.0);
        let x = gpu.upload("x", &x0).unwrap();
        let bias = gpu.upload("bias", &b0).unwrap();
        let want = add(&y0, &matmul_ref(&x0, &wf, Some(&b0), n_tokens, n_in, n_out));
        for split in [SplitK::Never, SplitK::Chunk(256), SplitK::Auto] {
            let what = format!("{ty} [{n_out}x{n_in}] T={n_tokens} {split:?}");
            let y = gpu.upload("y", &y0).unwrap();
            let y5 = gpu.upload("y5", &y0[..5 * n_out]).unwrap();
            let mut rec = gpu.recorder();
            matmul_split(
                &gpu,
                &mut rec,
                &x,
                &w,
                Some(&bias),
                &y,
                n_tokens,
                true,
                split,
            )
            .unwrap();
            matmul_split(&gpu, &mut rec, &x, &w, Some(&bias), &y5, 5, true, split).unwrap();
            rec.run("split-K every type").unwrap();
            let got = read(&gpu, &y, n_tokens * n_out);
            assert_close(&what, &got, &want, tol(ty));
            assert!(
                read(&gpu, &y5, 5 * n_out) == got[..5 * n_out],
                "{what}: the first 5 tokens alone differ from the same tokens in the batch"
            );
        }
    }
}

/// Hand-checkable: W = [[1..8], [1,-1,1,-1,...]] (F32 and F16), x = ones and x = e_3, bias.
#[test]
fn matmul_fixed_float_case() {
    let gpu = common::gpu();
    let w: Vec<f32> = (1..=8)
        .map(|v| v as f32)
        .chain((0..8).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }))
        .collect();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let (bytes, _) = encode(ty, &w);
        let t = TensorRef {
            name: "fixed",
            ty,
            ne: [8, 2],
            data: &bytes,
        };
        let gw = GpuWeight::upload(&gpu, &t).unwrap();
        assert_eq!((gw.n_in, gw.n_out, gw.ty, gw.chunks.len()), (8, 2, ty, 1));
        assert_eq!(gw.bytes(), bytes.len() as u64);
        let mut x0 = vec![1.0f32; 8];
        x0.extend((0..8).map(|i| if i == 3 { 1.0 } else { 0.0 }));
        let x = gpu.upload("x", &x0).unwrap();
        let bias = gpu.upload("b", &[0.5f32, -1.0]).unwrap();
        let y = gpu.alloc("y", 16).unwrap();
        let dy = gpu.upload("dy", &[1.0f32, 2.0, 0.0, -1.0]).unwrap();
        let dx = gpu.alloc("dx", 64).unwrap();
        let mut rec = gpu.recorder();
        matmul(&gpu, &mut rec, &x, &gw, Some(&bias), &y, 2, false).unwrap();
        matmul_back_input(&gpu, &mut rec, &dy, &gw, &dx, 2, false).unwrap();
        rec.run("fixed").unwrap();
        // Row sums: 1+…+8 = 36 and 0; x = e_3 picks column 3: 4 and -1.
        assert_close(
            &format!("fixed matmul {ty}"),
            &read(&gpu, &y, 4),
            &[36.5f32, -1.0, 4.5, -2.0],
            Tol::new(0.0, 0.0),
        );
        // dx[0] = 1·row0 + 2·row1; dx[1] = −row1.
        let want: Vec<f32> = (0..8)
            .map(|i| (i + 1) as f32 + 2.0 * w[8 + i])
            .chain((0..8).map(|i| -w[8 + i]))
            .collect();
        assert_close(
            &format!("fixed back {ty}"),
            &read(&gpu, &dx, 16),
            &want,
            Tol::new(0.0, 0.0),
        );
    }
}

/// Bad shapes and short buffers are clear errors, not panics.
#[test]
fn matmul_rejects_bad_input() {
    let gpu = common::gpu();
    let e = GpuWeight::upload_raw(&gpu, "w", GgmlType::F32, 8, 2, &[0u8; 60]).unwrap_err();
    assert!(
        e.to_string().contains("60 bytes") && e.to_string().contains("64"),
        "{e}"
    );
    let e = GpuWeight::upload_raw(&gpu, "w", GgmlType::Q8_0, 40, 2, &[0u8; 80]).unwrap_err();
    assert!(e.to_string().contains("32-element"), "{e}");
    let e = GpuWeight::upload_raw(&gpu, "w", GgmlType::F32, 6, 1, &[0u8; 24]).unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
    let w = GpuWeight::upload_raw(&gpu, "w", GgmlType::F32, 8, 2, &[0u8; 64]).unwrap();
    let x = gpu.alloc("x", 32).unwrap();
    let y = gpu.alloc("y", 8).unwrap();
    let mut rec = gpu.recorder();
    let e = matmul(&gpu, &mut rec, &x, &w, None, &y, 2, false).unwrap_err();
    assert!(e.to_string().contains("64 bytes"), "{e}");
    let e = matmul_rows(&gpu, &mut rec, &x, &w, 1..3, &y, 1).unwrap_err();
    assert!(e.to_string().contains("1..3"), "{e}");
}

/// Runs `y = x·Wᵀ` for raw bytes and returns y.
fn run_raw(ty: GgmlType, n_in: usize, n_out: usize, bytes: &[u8], x0: &[f32]) -> Vec<f32> {
    let gpu = common::gpu();
    let n_tokens = x0.len() / n_in;
    let w = GpuWeight::upload_raw(&gpu, "fixed", ty, n_in, n_out, bytes).unwrap();
    let x = gpu.upload("x", x0).unwrap();
    let y = gpu.alloc("y", (n_tokens * n_out * 4) as u64).unwrap();
    let mut rec = gpu.recorder();
    matmul(&gpu, &mut rec, &x, &w, None, &y, n_tokens, false).unwrap();
    rec.run("fixed quant").unwrap();
    read(&gpu, &y, n_tokens * n_out)
}

/// Tokens: all ones, then one-hot at each index of `picks`.
fn ones_and_picks(n_in: usize, picks: &[usize]) -> Vec<f32> {
    let mut x = vec![1.0f32; n_in];
    for &k in picks {
        x.extend((0..n_in).map(|i| if i == k { 1.0 } else { 0.0 }));
    }
    x
}

/// Q8_0 built by hand. Row 0: d = 0.5, qs = [−128, −15, −14, …, 15] (qs[j] = j − 16 for j ≥ 1);
/// row 1 (starting at byte 34, only 2-byte aligned): d = 2, qs = 1.
/// Σ row 0 = 0.5·(−128 + Σ_{j=1..31}(j − 16)) = 0.5·(−128 + 0) = −64; element 5 = 0.5·(5 − 16).
#[test]
fn matmul_fixed_q8_0() {
    let mut b = Vec::new();
    b.extend(half::f16::from_f32(0.5).to_le_bytes());
    b.push(0x80);
    b.extend((1..32).map(|j| (j - 16) as i8 as u8));
    b.extend(half::f16::from_f32(2.0).to_le_bytes());
    b.extend([1u8; 32]);
    let y = run_raw(GgmlType::Q8_0, 32, 2, &b, &ones_and_picks(32, &[0, 5]));
    assert_close(
        "fixed Q8_0",
        &y,
        &[-64.0f32, 64.0, -64.0, 2.0, -5.5, 2.0],
        Tol::new(0.0, 0.0),
    );
}

/// Q4_0 built by hand: d = 0.25, qs[j] = j | (15 − j) << 4, so y[j] = (j − 8)/4 and
/// y[16 + j] = (7 − j)/4. Σ = (−8 − 8)/4 = −4; y[3] = −1.25; y[17] = 1.5. Two rows, the second
/// (at byte 18, 2-byte aligned) with d = −1 and all nibbles 8 (so all zeros) except qs[0] = 9|8<<4 (y[0] = −1).
#[test]
fn matmul_fixed_q4_0() {
    let mut b = Vec::new();
    b.extend(half::f16::from_f32(0.25).to_le_bytes());
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    b.extend(half::f16::from_f32(-1.0).to_le_bytes());
    b.push(9 | (8 << 4));
    b.extend([0x88u8; 15]);
    let y = run_raw(GgmlType::Q4_0, 32, 2, &b, &ones_and_picks(32, &[3, 17, 0]));
    assert_close(
        "fixed Q4_0",
        &y,
        &[-4.0f32, -1.0, -1.25, 0.0, 1.5, 0.0, -2.0, -1.0],
        Tol::new(0.0, 0.0),
    );
}

/// Q4_K built by hand: d = 1, dmin = 0.5, every 4-bit quant 1, sub-block s with scale
/// sc_s = [1, 2, 3, 4, 17, 33, 49, 63][s] and min m_s = [0, 1, 2, 3, 16, 32, 48, 5][s] (s ≥ 4 use
/// the 2 high bits stored in the top of bytes s−4 and s). y[e] = sc_s − 0.5·m_s with s = e / 32,
/// so Σ = 32·Σ_s (sc_s − m_s/2) = 32·(172 − 53.5) = 3792; y[0] = 1; y[200] = 49 − 24 = 25.
#[test]
fn matmul_fixed_q4_k() {
    let sc = [1u8, 2, 3, 4, 17, 33, 49, 63];
    let m = [0u8, 1, 2, 3, 16, 32, 48, 5];
    let mut q = [0u8; 12];
    for s in 0..4 {
        q[s] = sc[s] | ((sc[s + 4] >> 4) << 6);
        q[s + 4] = m[s] | ((m[s + 4] >> 4) << 6);
        q[s + 8] = (sc[s + 4] & 0xF) | ((m[s + 4] & 0xF) << 4);
    }
    let mut b = Vec::new();
    b.extend(half::f16::from_f32(1.0).to_le_bytes());
    b.extend(half::f16::from_f32(0.5).to_le_bytes());
    b.extend(q);
    b.extend([0x11u8; 128]);
    let y = run_raw(GgmlType::Q4_K, 256, 1, &b, &ones_and_picks(256, &[0, 200]));
    assert_close(
        "fixed Q4_K",
        &y,
        &[3792.0f32, 1.0, 25.0],
        Tol::new(0.0, 0.0),
    );
}
