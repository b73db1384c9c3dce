//! GPU LoRA forward/backward (`bfpo_lite::gpu::ops::lora`) against the f64 CPU references (which
//! are themselves checked against finite differences in the library's unit tests).

#[path = "common/gpu.rs"]
mod common;

use bfpo_lite::gpu::GpuBuf;
use bfpo_lite::gpu::ops::lora::{
    GpuLora, LoraShape, lora_backward, lora_backward_ref, lora_forward, lora_forward_ref,
};
use bfpo_lite::model::lora::{LoraTensor, LoraWeights, Target};
use bfpo_lite::util::{Rng, Tol, assert_close};

/// f32 GPU sums of O(1) values over ≤ a few hundred terms vs f64.
const TOL_LORA: Tol = Tol::new(2e-5, 2e-5);

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `dy_std`: the spread of dy, small enough at larger shapes that the gradients' f32 sums stay
/// O(1) (what [`TOL_LORA`] is for).
fn check(n_tokens: usize, n_in: usize, n_out: usize, rank: usize, seed: u64) {
    check_with(n_tokens, n_in, n_out, rank, seed, 1.0)
}

fn check_with(n_tokens: usize, n_in: usize, n_out: usize, rank: usize, seed: u64, dy_std: f32) {
    let gpu = common::gpu();
    let mut rng = Rng::new(seed);
    let alpha = 2.0 * rank as f32 + 1.0;
    let scale = alpha / rank as f32;
    let lw = LoraWeights {
        rank,
        alpha,
        tensors: vec![
            LoraTensor {
                layer: 0,
                target: Target::AttnQ,
                n_in: 8,
                n_out: 8,
                a: rng.normal_vec(rank * 8, 1.0),
                b: rng.normal_vec(8 * rank, 1.0),
            },
            LoraTensor {
                layer: 1,
                target: Target::FfnDown,
                n_in,
                n_out,
                a: rng.normal_vec(rank * n_in, 1.0 / (n_in as f32).sqrt()),
                b: rng.normal_vec(n_out * rank, 1.0 / (rank as f32).sqrt()),
            },
        ],
    };
    let gl = GpuLora::upload(&gpu, &lw).unwrap();
    assert_eq!(gl.scale(), scale);
    assert_eq!(gl.download(&gpu).unwrap(), lw, "upload/download round trip");
    let t = gl.get(1, Target::FfnDown).unwrap();
    let lt = &lw.tensors[1];
    let what = format!("T={n_tokens} [{n_out}x{n_in}] r={rank}");

    let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let dy0 = rng.normal_vec(n_tokens * n_out, dy_std);
    let dx0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let x = gpu.upload("x", &x0).unwrap();
    let y = gpu.upload("y", &y0).unwrap();
    let dy = gpu.upload("dy", &dy0).unwrap();
    let dx = gpu.upload("dx", &dx0).unwrap();
    let u = gpu.alloc("u", (n_tokens * rank * 4) as u64).unwrap();
    let du = gpu.alloc("du", (n_tokens * rank * 4) as u64).unwrap();
    // Gradients accumulate: start them at garbage, zero them, then run backward twice.
    gpu.write(&t.grad_a, 0, &vec![7.0f32; rank * n_in]);
    gpu.write(&t.grad_b, 0, &vec![7.0f32; n_out * rank]);
    let mut rec = gpu.recorder();
    gl.zero_grads(&mut rec);
    lora_forward(&gpu, &mut rec, t, rank, scale, &x, &u, &y, n_tokens).unwrap();
    lora_backward(
        &gpu, &mut rec, t, rank, scale, &x, &u, &dy, &du, &dx, n_tokens,
    )
    .unwrap();
    lora_backward(
        &gpu, &mut rec, t, rank, scale, &x, &u, &dy, &du, &dx, n_tokens,
    )
    .unwrap();
    rec.run("lora test").unwrap();

    let sh = LoraShape {
        n_tokens,
        n_in,
        n_out,
        rank,
    };
    let (a, b, xd) = (f64s(&lt.a), f64s(&lt.b), f64s(&x0));
    let (want_u, want_dy) = lora_forward_ref(sh, &a, &b, &xd, scale as f64);
    let g = lora_backward_ref(sh, &a, &b, &xd, &f64s(&dy0), scale as f64);
    let rd = |buf, n: usize| -> Vec<f32> { gpu.read_range(buf, 0, (n * 4) as u64).unwrap() };
    assert_close(
        &format!("u {what}"),
        &rd(&u, n_tokens * rank),
        &f32s(&want_u),
        TOL_LORA,
    );
    let want_y: Vec<f64> = y0
        .iter()
        .zip(&want_dy)
        .map(|(&a, b)| a as f64 + b)
        .collect();
    assert_close(
        &format!("y {what}"),
        &rd(&y, n_tokens * n_out),
        &want_y,
        TOL_LORA,
    );
    assert_close(
        &format!("du {what}"),
        &rd(&du, n_tokens * rank),
        &g.du,
        TOL_LORA,
    );
    let twice = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| 2.0 * x).collect() };
    assert_close(
        &format!("grad_a {what}"),
        &rd(&t.grad_a, rank * n_in),
        &twice(&g.grad_a),
        TOL_LORA,
    );
    assert_close(
        &format!("grad_b {what}"),
        &rd(&t.grad_b, n_out * rank),
        &twice(&g.grad_b),
        TOL_LORA,
    );
    let want_dx: Vec<f64> = dx0
        .iter()
        .zip(&g.dx)
        .map(|(&a, b)| a as f64 + 2.0 * b)
        .collect();
    assert_close(
        &format!("dx {what}"),
        &rd(&dx, n_tokens * n_in),
        &want_dx,
        TOL_LORA,
    );
    // The other tensor's gradients were zeroed and left alone.
    let other = gl.get(0, Target::AttnQ).unwrap();
    assert!(rd(&other.grad_a, rank * 8).iter().all(|&v| v == 0.0));
}

#[test]
fn lora_matches_reference_at_awkward_sizes() {
    check(1, 8, 5, 1, 1);
    check(3, 40, 67, 4, 2);
    check(17, 72, 35, 8, 3);
    check(37, 33, 9, 3, 4);
}

/// Several workgroups of every kernel, ranks past one 16-column block and not a multiple of 8,
/// and enough tokens for the weight gradients to go through chunked partials (chunks of ≥ 64
/// tokens) and the chunk-order sum.
#[test]
fn lora_matches_reference_across_workgroups_and_chunks() {
    check_with(200, 100, 150, 20, 5, 0.02);
    check_with(130, 264, 40, 16, 6, 0.02);
    check_with(70, 40, 129, 33, 7, 0.02);
}

/// A token's forward output (u and y) is bit for bit the same whether it is alone or in a batch
/// at another row; backward results are bit for bit the same from run to run.
#[test]
fn lora_is_batch_invariant_and_deterministic() {
    let gpu = common::gpu();
    let (n_tokens, n_in, n_out, rank) = (150, 96, 72, 12);
    let mut rng = Rng::new(9);
    let lw = LoraWeights {
        rank,
        alpha: 8.0,
        tensors: vec![LoraTensor {
            layer: 0,
            target: Target::FfnUp,
            n_in,
            n_out,
            a: rng.normal_vec(rank * n_in, 0.1),
            b: rng.normal_vec(n_out * rank, 0.3),
        }],
    };
    let gl = GpuLora::upload(&gpu, &lw).unwrap();
    let t = &gl.tensors[0];
    let s = gl.scale();
    let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
    let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let dy0 = rng.normal_vec(n_tokens * n_out, 1.0);
    let rd = |buf: &GpuBuf, n: usize| -> Vec<u32> {
        let v: Vec<f32> = gpu.read_range(buf, 0, (n * 4) as u64).unwrap();
        v.iter().map(|f| f.to_bits()).collect()
    };
    // The whole batch.
    let x = gpu.upload("x", &x0).unwrap();
    let y = gpu.upload("y", &y0).unwrap();
    let u = gpu.alloc("u", (n_tokens * rank * 4) as u64).unwrap();
    let mut rec = gpu.recorder();
    lora_forward(&gpu, &mut rec, t, rank, s, &x, &u, &y, n_tokens).unwrap();
    rec.run("batch").unwrap();
    let (ub, yb) = (rd(&u, n_tokens * rank), rd(&y, n_tokens * n_out));
    // Token 101 alone.
    let tok = 101;
    let x1 = gpu.upload("x1", &x0[tok * n_in..(tok + 1) * n_in]).unwrap();
    let y1 = gpu
        .upload("y1", &y0[tok * n_out..(tok + 1) * n_out])
        .unwrap();
    let u1 = gpu.alloc("u1", (rank * 4) as u64).unwrap();
    let mut rec = gpu.recorder();
    lora_forward(&gpu, &mut rec, t, rank, s, &x1, &u1, &y1, 1).unwrap();
    rec.run("alone").unwrap();
    assert_eq!(rd(&u1, rank), ub[tok * rank..(tok + 1) * rank], "u bits");
    assert_eq!(rd(&y1, n_out), yb[tok * n_out..(tok + 1) * n_out], "y bits");

    // Backward twice from zero: identical bits.
    let dy = gpu.upload("dy", &dy0).unwrap();
    let du = gpu.alloc("du", (n_tokens * rank * 4) as u64).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dx = gpu.alloc("dx", (n_tokens * n_in * 4) as u64).unwrap();
        let mut rec = gpu.recorder();
        gl.zero_grads(&mut rec);
        lora_backward(&gpu, &mut rec, t, rank, s, &x, &u, &dy, &du, &dx, n_tokens).unwrap();
        rec.run("backward").unwrap();
        runs.push((
            rd(&t.grad_a, rank * n_in),
            rd(&t.grad_b, n_out * rank),
            rd(&du, n_tokens * rank),
            rd(&dx, n_tokens * n_in),
        ));
    }
    assert!(runs[0] == runs[1], "backward bits differ between runs");
    assert!(runs[0].0.iter().any(|&b| b != 0), "grad_a is all zero");
}

/// Hand-checkable: rank 1, A = [1, 2], B = [[3], [−1]], scale 0.5, x = [1, 1]:
/// u = 3, y += 0.5·[9, −3]; dy = [1, 1] → grad_b = 0.5·[3, 3], du = 0.5·(3 − 1) = 1,
/// grad_a = [1, 1], dx += [1, 2].
#[test]
fn lora_fixed_case() {
    let gpu = common::gpu();
    let lw = LoraWeights {
        rank: 1,
        alpha: 0.5,
        tensors: vec![LoraTensor {
            layer: 0,
            target: Target::AttnV,
            n_in: 2,
            n_out: 2,
            a: vec![1.0, 2.0],
            b: vec![3.0, -1.0],
        }],
    };
    let gl = GpuLora::upload(&gpu, &lw).unwrap();
    let t = &gl.tensors[0];
    let x = gpu.upload("x", &[1.0f32, 1.0]).unwrap();
    let y = gpu.upload("y", &[10.0f32, 20.0]).unwrap();
    let dy = gpu.upload("dy", &[1.0f32, 1.0]).unwrap();
    let dx = gpu.upload("dx", &[0.0f32, 0.0]).unwrap();
    let u = gpu.alloc("u", 4).unwrap();
    let du = gpu.alloc("du", 4).unwrap();
    let mut rec = gpu.recorder();
    gl.zero_grads(&mut rec);
    lora_forward(&gpu, &mut rec, t, 1, gl.scale(), &x, &u, &y, 1).unwrap();
    lora_backward(&gpu, &mut rec, t, 1, gl.scale(), &x, &u, &dy, &du, &dx, 1).unwrap();
    rec.run("lora fixed").unwrap();
    let exact = Tol::new(0.0, 0.0);
    let rd = |b| -> Vec<f32> { gpu.read(b).unwrap() };
    assert_close("u", &rd(&u), &[3.0f32], exact);
    assert_close("y", &rd(&y), &[14.5f32, 18.5], exact);
    assert_close("grad_b", &rd(&t.grad_b), &[1.5f32, 1.5], exact);
    assert_close("du", &rd(&du), &[1.0f32], exact);
    assert_close("grad_a", &rd(&t.grad_a), &[1.0f32, 1.0], exact);
    assert_close("dx", &rd(&dx), &[1.0f32, 2.0], exact);
}
