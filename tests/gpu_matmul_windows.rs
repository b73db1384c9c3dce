//! Token windows: with the binding limit lowered (as if x, y, dy or dx were larger than one
//! storage binding), the matmul family binds aligned token windows and still matches the CPU
//! reference. Separate test binary because the limit is a process-wide setting.

#[path = "common/gpu.rs"]
mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gguf::quant::{dequantize_vec, quantize};
use bfpo_lite::gpu::ops::lora::{
    GpuLora, LoraShape, lora_backward, lora_backward_ref, lora_forward, lora_forward_ref,
};
use bfpo_lite::gpu::ops::matmul::{
    GpuWeight, SplitK, TEST_BINDING_LIMIT, matmul, matmul_back_input, matmul_back_input_ref,
    matmul_ref, matmul_rows_back_input, matmul_split,
};
use bfpo_lite::model::lora::{LoraTensor, LoraWeights, Target};
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::sync::atomic::Ordering;

const TOL_WINDOWS: Tol = Tol::new(5e-5, 5e-5);

/// Serializes the tests of this binary: each sets the process-wide limit.
static LIMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn token_windows_match_reference() {
    let _guard = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = common::gpu();
    // Widest token row here is 40 f32 = 160 B: 64 tokens per window → windows of 64, 64, 22.
    TEST_BINDING_LIMIT.store(64 * 160 + 100, Ordering::Relaxed);
    let (n_tokens, n_in, n_out) = (150, 32, 40);
    let mut rng = Rng::new(5);
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let vals = rng.normal_vec(n_in * n_out, 0.2);
        let (bytes, wf) = match ty {
            GgmlType::F32 => (bytemuck::cast_slice(&vals).to_vec(), vals.clone()),
            _ => {
                let b = quantize(ty, &vals).unwrap();
                let d = dequantize_vec(ty, &b, vals.len()).unwrap();
                (b, d)
            }
        };
        let w = GpuWeight::upload_chunked(&gpu, "w", ty, n_in, n_out, &bytes, 16).unwrap();
        let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
        let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
        let b0 = rng.normal_vec(n_out, 1.0);
        let dy0 = rng.normal_vec(n_tokens * n_out, 1.0);
        let x = gpu.upload("x", &x0).unwrap();
        let y = gpu.upload("y", &y0).unwrap();
        let bias = gpu.upload("b", &b0).unwrap();
        let dy = gpu.upload("dy", &dy0).unwrap();
        let dx = gpu.upload("dx", &x0).unwrap();
        let dx2 = gpu.upload("dx2", &x0).unwrap();
        let mut rec = gpu.recorder();
        matmul(&gpu, &mut rec, &x, &w, Some(&bias), &y, n_tokens, true).unwrap();
        matmul_back_input(&gpu, &mut rec, &dy, &w, &dx, n_tokens, false).unwrap();
        matmul_rows_back_input(&gpu, &mut rec, &dy, &w, 0..n_out, &dx2, n_tokens, false).unwrap();
        rec.run("windows").unwrap();
        let want_y: Vec<f32> = matmul_ref(&x0, &wf, Some(&b0), n_tokens, n_in, n_out)
            .iter()
            .zip(&y0)
            .map(|(a, b)| a + b)
            .collect();
        let got_y: Vec<f32> = gpu.read(&y).unwrap();
        assert_close(
            &format!("windowed matmul {ty}"),
            &got_y,
            &want_y,
            TOL_WINDOWS,
        );
        let want_dx = matmul_back_input_ref(&dy0, &wf, n_tokens, n_in, n_out);
        let got_dx: Vec<f32> = gpu.read(&dx).unwrap();
        assert_close(
            &format!("windowed back {ty}"),
            &got_dx,
            &want_dx,
            TOL_WINDOWS,
        );
        let got_dx2: Vec<f32> = gpu.read(&dx2).unwrap();
        assert_close(
            &format!("windowed rows back {ty}"),
            &got_dx2,
            &want_dx,
            TOL_WINDOWS,
        );
    }
    // A single token row over the limit is a clear error.
    TEST_BINDING_LIMIT.store(64, Ordering::Relaxed);
    let w = GpuWeight::upload_raw(&gpu, "w", GgmlType::F32, 32, 1, &[0u8; 128]).unwrap();
    let x = gpu.alloc("x", 128 * 100).unwrap();
    let y = gpu.alloc("y", 4 * 100).unwrap();
    let mut rec = gpu.recorder();
    let e = matmul(&gpu, &mut rec, &x, &w, None, &y, 100, false).unwrap_err();
    assert!(e.to_string().contains("over this device's limit"), "{e}");
    TEST_BINDING_LIMIT.store(0, Ordering::Relaxed);
}

/// Split-K with the scratch for partial sums over the (lowered) binding limit: the forward
/// works in token windows and gives the same bits as without windows, within the f64
/// reference's tolerance.
#[test]
fn split_k_scratch_token_windows() {
    let _guard = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = common::gpu();
    // 4 K chunks × 24 rows × 4 B = 384 B of partial sums per token (x rows: 256 B): the limit
    // holds 64 tokens of them → windows of 64, 64, 22 tokens.
    let (n_tokens, n_in, n_out) = (150, 64, 24);
    let split = SplitK::Chunk(16);
    let mut rng = Rng::new(9);
    let vals = rng.normal_vec(n_in * n_out, 0.2);
    let b = quantize(GgmlType::Q8_0, &vals).unwrap();
    let wf = dequantize_vec(GgmlType::Q8_0, &b, vals.len()).unwrap();
    let w = GpuWeight::upload_raw(&gpu, "w", GgmlType::Q8_0, n_in, n_out, &b).unwrap();
    let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let b0 = rng.normal_vec(n_out, 1.0);
    let x = gpu.upload("x", &x0).unwrap();
    let bias = gpu.upload("b", &b0).unwrap();
    let mut got = Vec::new();
    for limit in [0, 64 * 384 + 100] {
        TEST_BINDING_LIMIT.store(limit, Ordering::Relaxed);
        let y = gpu.upload("y", &y0).unwrap();
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
        rec.run("split-K windows").unwrap();
        got.push(gpu.read::<f32>(&y).unwrap());
    }
    TEST_BINDING_LIMIT.store(0, Ordering::Relaxed);
    let want: Vec<f32> = matmul_ref(&x0, &wf, Some(&b0), n_tokens, n_in, n_out)
        .iter()
        .zip(&y0)
        .map(|(a, b)| a + b)
        .collect();
    assert_close("windowed split-K matmul", &got[1], &want, TOL_WINDOWS);
    assert!(
        got[0] == got[1],
        "split-K with token windows differs from one window"
    );
}

#[test]
fn lora_token_windows_match_reference() {
    let _guard = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = common::gpu();
    let (n_tokens, n_in, n_out, rank) = (150, 40, 24, 3);
    // Widest token row: 40 f32 = 160 B → windows of 64, 64, 22 tokens.
    TEST_BINDING_LIMIT.store(64 * 160 + 100, Ordering::Relaxed);
    let mut rng = Rng::new(9);
    let lw = LoraWeights {
        rank,
        alpha: 6.0,
        tensors: vec![LoraTensor {
            layer: 0,
            target: Target::AttnOutput,
            n_in,
            n_out,
            a: rng.normal_vec(rank * n_in, 0.2),
            b: rng.normal_vec(n_out * rank, 0.5),
        }],
    };
    let scale = lw.scale();
    let gl = GpuLora::upload(&gpu, &lw).unwrap();
    let t = &gl.tensors[0];
    let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let dy0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let x = gpu.upload("x", &x0).unwrap();
    let y = gpu.alloc("y", (n_tokens * n_out * 4) as u64).unwrap();
    let dy = gpu.upload("dy", &dy0).unwrap();
    let dx = gpu.alloc("dx", (n_tokens * n_in * 4) as u64).unwrap();
    let u = gpu.alloc("u", (n_tokens * rank * 4) as u64).unwrap();
    let du = gpu.alloc("du", (n_tokens * rank * 4) as u64).unwrap();
    let mut rec = gpu.recorder();
    gl.zero_grads(&mut rec);
    lora_forward(&gpu, &mut rec, t, rank, scale, &x, &u, &y, n_tokens).unwrap();
    lora_backward(
        &gpu, &mut rec, t, rank, scale, &x, &u, &dy, &du, &dx, n_tokens,
    )
    .unwrap();
    rec.run("lora windows").unwrap();
    TEST_BINDING_LIMIT.store(0, Ordering::Relaxed);
    let sh = LoraShape {
        n_tokens,
        n_in,
        n_out,
        rank,
    };
    let f = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let (a, b, xd) = (f(&lw.tensors[0].a), f(&lw.tensors[0].b), f(&x0));
    let (_, want_y) = lora_forward_ref(sh, &a, &b, &xd, scale as f64);
    let g = lora_backward_ref(sh, &a, &b, &xd, &f(&dy0), scale as f64);
    let rd = |buf: &bfpo_lite::gpu::GpuBuf| -> Vec<f32> { gpu.read(buf).unwrap() };
    assert_close("windowed lora y", &rd(&y), &want_y, TOL_WINDOWS);
    assert_close(
        "windowed lora grad_a",
        &rd(&t.grad_a),
        &g.grad_a,
        TOL_WINDOWS,
    );
    assert_close(
        "windowed lora grad_b",
        &rd(&t.grad_b),
        &g.grad_b,
        TOL_WINDOWS,
    );
    assert_close("windowed lora dx", &rd(&dx), &g.dx, TOL_WINDOWS);
}
