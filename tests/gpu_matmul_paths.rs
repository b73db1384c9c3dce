//! Each matmul direction has two kernels: `matmul_sg.wgsl` / `matmul_back_sg.wgsl` (x or dy
//! through subgroup broadcasts, used when the device has subgroups of ≥ 8 lanes, as lavapipe
//! does) and `matmul.wgsl` / `matmul_back.wgsl` (the fallbacks). They must give bit-identical
//! results (same sums in the same order), and the fallbacks must match the f64 reference like
//! the subgroup paths do in gpu_matmul.rs. The forward is checked both in one pass and split over
//! n_in (split-K: the same kernels with K chunks, then `matmul_reduce.wgsl`). The forward kernels
//! have two tiles (`FwdTile`: GPUs' wide one, CPU adapters' narrow one); every combination must
//! give the same bits.

#[path = "common/gpu.rs"]
mod common;

use bfpo_lite::gguf::GgmlType;
use bfpo_lite::gpu::ops::matmul::{
    GpuWeight, SplitK, TEST_FWD_TILE, TEST_NO_SUBGROUPS, matmul, matmul_back_input,
    matmul_back_input_ref, matmul_ref, matmul_split,
};
use bfpo_lite::util::{Rng, Tol, assert_close};
use std::sync::atomic::Ordering;

#[test]
fn subgroup_and_fallback_kernels_agree_bit_for_bit() {
    let gpu = common::gpu();
    // Awkward sizes: rows not a multiple of the 256- or 128-row workgroups, tokens not of 8 or 16.
    let (n_in, n_out, n_tokens) = (256, 300, 13);
    for (i, ty) in [
        // One per decoder family (legacy 4-bit, 8-bit, K-quant, half); each adds four
        // pipelines to compile, which is most of this test's time on lavapipe.
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::F16,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(40 + i as u64);
        let vals = rng.normal_vec(n_in * n_out, 1.0 / (n_in as f32).sqrt());
        let (bytes, wf) = match ty {
            GgmlType::F16 => {
                let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
                let f = h.iter().map(|v| v.to_f32()).collect();
                (bytemuck::cast_slice(&h).to_vec(), f)
            }
            _ => {
                let b = bfpo_lite::gguf::quant::quantize(ty, &vals).unwrap();
                let f = bfpo_lite::gguf::quant::dequantize_vec(ty, &b, vals.len()).unwrap();
                (b, f)
            }
        };
        let w = GpuWeight::upload_raw(&gpu, "w", ty, n_in, n_out, &bytes).unwrap();
        let x0 = rng.normal_vec(n_tokens * n_in, 1.0);
        let x = gpu.upload("x", &x0).unwrap();
        let dy0 = rng.normal_vec(n_tokens * n_out, 1.0);
        let dy = gpu.upload("dy", &dy0).unwrap();
        let y0 = rng.normal_vec(n_tokens * n_out, 1.0);
        let b0 = rng.normal_vec(n_out, 1.0);
        let bias = gpu.upload("bias", &b0).unwrap();
        let (mut out, mut back, mut split) = (Vec::new(), Vec::new(), Vec::new());
        // (subgroups off, forward tile): the first two use the device's tile, then each tile is
        // forced with and without subgroups.
        for (plain, tile) in [
            (false, 0),
            (true, 0),
            (false, 1),
            (false, 2),
            (true, 1),
            (true, 2),
        ] {
            TEST_NO_SUBGROUPS.store(plain, Ordering::SeqCst);
            TEST_FWD_TILE.store(tile, Ordering::SeqCst);
            let y = gpu.alloc("y", (n_tokens * n_out * 4) as u64).unwrap();
            let ys = gpu.upload("ys", &y0).unwrap();
            let dx = gpu.alloc("dx", (n_tokens * n_in * 4) as u64).unwrap();
            let mut rec = gpu.recorder();
            matmul(&gpu, &mut rec, &x, &w, None, &y, n_tokens, false).unwrap();
            matmul_back_input(&gpu, &mut rec, &dy, &w, &dx, n_tokens, false).unwrap();
            // Split-K in 72-element chunks (4 chunks, the last one 40), bias, accumulate.
            let chunk = SplitK::Chunk(72);
            matmul_split(
                &gpu,
                &mut rec,
                &x,
                &w,
                Some(&bias),
                &ys,
                n_tokens,
                true,
                chunk,
            )
            .unwrap();
            rec.run("matmul paths").unwrap();
            out.push(gpu.read::<f32>(&y).unwrap());
            back.push(gpu.read::<f32>(&dx).unwrap());
            split.push(gpu.read::<f32>(&ys).unwrap());
        }
        TEST_NO_SUBGROUPS.store(false, Ordering::SeqCst);
        TEST_FWD_TILE.store(0, Ordering::SeqCst);
        for i in 2..out.len() {
            assert!(
                out[i] == out[0] && split[i] == split[0] && back[i] == back[0],
                "{ty}: forward tile / kernel combination {i} differs from the device's choice"
            );
        }
        // gpu_matmul.rs's tolerances: half types 2e-5, quantized 5e-5.
        let tol = if ty == GgmlType::F16 {
            Tol::new(2e-5, 2e-5)
        } else {
            Tol::new(5e-5, 5e-5)
        };
        let want = matmul_ref(&x0, &wf, None, n_tokens, n_in, n_out);
        assert_close(&format!("fallback matmul {ty}"), &out[1], &want, tol);
        assert!(
            out[0] == out[1],
            "{ty}: subgroup and fallback forward kernels differ"
        );
        let want_s: Vec<f32> = matmul_ref(&x0, &wf, Some(&b0), n_tokens, n_in, n_out)
            .iter()
            .zip(&y0)
            .map(|(a, b)| a + b)
            .collect();
        assert_close(&format!("fallback split-K {ty}"), &split[1], &want_s, tol);
        assert!(
            split[0] == split[1],
            "{ty}: subgroup and fallback split-K forward kernels differ"
        );
        let want_dx = matmul_back_input_ref(&dy0, &wf, n_tokens, n_in, n_out);
        assert_close(
            &format!("fallback matmul backward {ty}"),
            &back[1],
            &want_dx,
            tol,
        );
        assert!(
            back[0] == back[1],
            "{ty}: subgroup and fallback backward kernels differ"
        );
    }
}
