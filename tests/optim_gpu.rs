//! GPU AdamW and global gradient norm against the CPU reference (`optim`), on lavapipe
//! or any adapter: awkward sizes (1, 257, 5000 > one 4096-element norm chunk), clipping active,
//! weight decay, a cosine schedule; a hand-computed fixed case; non-finite gradients.

use bfpo_lite::gpu::ops::adamw::*;
use bfpo_lite::gpu::test_device;
use bfpo_lite::optim::*;
use bfpo_lite::util::Rng;
use bfpo_lite::util::close::{Tol, assert_close};

/// GPU f32 vs CPU f32 in the same operation order; differences come from fused multiply-adds
/// and the GPU's sqrt/division rounding.
const ADAM_TOL: Tol = Tol::new(1e-7, 1e-6);
/// GPU f32 fixed-order sum of squares vs CPU f64.
const NORM_TOL: Tol = Tol::new(0.0, 1e-6);

#[test]
fn params_layout() {
    assert_eq!(std::mem::size_of::<AdamWParams>(), 48);
    assert_eq!(std::mem::align_of::<AdamWParams>(), 4);
    assert_eq!(std::mem::size_of::<GradNormParams>(), 16);
}

#[test]
fn gpu_adamw_steps_match_cpu_reference() {
    let gpu = test_device();
    let mut r = Rng::new(21);
    let sizes = [1usize, 257, 5000];
    let total: usize = sizes.iter().sum();
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let sched = LrSchedule {
        kind: ScheduleKind::Cosine,
        peak_lr: 1e-2,
        warmup: Warmup::Steps(1),
        total_steps: 5,
    };
    let p0: Vec<f32> = r.normal_vec(total, 1.0);
    let params: Vec<_> = split(&p0, &sizes)
        .iter()
        .map(|p| gpu.upload("param", p).unwrap())
        .collect();
    let grad_bufs: Vec<_> = sizes
        .iter()
        .map(|&n| gpu.alloc("grad", (n * 4) as u64).unwrap())
        .collect();
    let mut gopt = GpuAdamW::new(&gpu, cfg, &sizes).unwrap();
    let mut copt = AdamW::new(cfg, total).unwrap();
    let mut cp = p0.clone();
    for k in 0..5u64 {
        // Gradients of norm ≈ 2·√5258 ≈ 145: clipping to 1.0 is active.
        let g: Vec<f32> = r.normal_vec(total, 2.0);
        for (b, gs) in grad_bufs.iter().zip(split(&g, &sizes)) {
            gpu.write(b, 0, &gs);
        }
        let lr = sched.lr_at(k + 1); // skip the zero-rate first warmup step
        let pr: Vec<&_> = params.iter().collect();
        let gr: Vec<&_> = grad_bufs.iter().collect();
        let mut rec = gpu.recorder();
        gopt.record_step(&gpu, &mut rec, &pr, &gr, lr, 0.5, Some(1.0))
            .unwrap();
        rec.run("adamw test").unwrap();
        let clip = gopt.finish_step(&gpu).unwrap();

        // CPU: f64 norm, factor, then the same update.
        let cclip = clip_grad_norm(&g, Some(1.0)).unwrap();
        assert_close(
            "pre-clip norm",
            &[clip.pre_clip_norm],
            &[cclip.pre_clip_norm],
            NORM_TOL,
        );
        assert!(cclip.factor < 0.01, "clipping should be active");
        assert_close("clip factor", &[clip.factor], &[cclip.factor], NORM_TOL);
        copt.step(&mut cp, &g, lr, cclip.factor * 0.5).unwrap();

        let got: Vec<f32> = params
            .iter()
            .zip(&sizes)
            .flat_map(|(b, &n)| gpu.read_range::<f32>(b, 0, (n * 4) as u64).unwrap())
            .collect();
        assert_close(&format!("params after step {}", k + 1), &got, &cp, ADAM_TOL);
        let st = gopt.state(&gpu).unwrap();
        assert_close("m", &st.m, &copt.m, ADAM_TOL);
        assert_close("v", &st.v, &copt.v, ADAM_TOL);
        assert_eq!(st.step, copt.step);
    }
    // The parameters moved: the comparison is not vacuous.
    assert!(cp.iter().zip(&p0).all(|(a, b)| a != b));
}

#[test]
fn gpu_adamw_fixed_case_and_kernel_level_reference() {
    // Same hand computation as tests/optim.rs: p = 1, g = 0.5, lr 0.1, wd 0.01 → 0.899000002.
    let gpu = test_device();
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let p = gpu.upload("p", &[1.0f32]).unwrap();
    let g = gpu.upload("g", &[0.5f32]).unwrap();
    let mut opt = GpuAdamW::new(&gpu, cfg, &[1]).unwrap();
    let mut rec = gpu.recorder();
    opt.record_step(&gpu, &mut rec, &[&p], &[&g], 0.1, 1.0, None)
        .unwrap();
    rec.run("adamw fixed").unwrap();
    let clip = opt.finish_step(&gpu).unwrap();
    assert_eq!(clip.factor, 1.0);
    assert_eq!(clip.pre_clip_norm, 0.5);
    let got: Vec<f32> = gpu.read(&p).unwrap();
    assert!((got[0] as f64 - 0.899000002).abs() < 1e-7, "{}", got[0]);

    // The bare kernel with a caller-written clip buffer, vs `adamw_ref`, odd size.
    let mut r = Rng::new(22);
    let n = 1001;
    let (p0, g0) = (r.normal_vec(n, 1.0), r.normal_vec(n, 1.0));
    let m0: Vec<f32> = r.normal_vec(n, 0.1);
    let v0: Vec<f32> = r.normal_vec(n, 0.1).iter().map(|x| x * x).collect();
    let clip = [3.0f32, 0.25];
    let s = AdamWScalars::new(&cfg, 7, 3e-3, 0.5);
    let bufs = [&p0, &g0, &m0, &v0].map(|d| gpu.upload("x", d).unwrap());
    let cb = gpu.upload("clip", &clip).unwrap();
    let mut rec = gpu.recorder();
    adamw_step(
        &gpu, &mut rec, &bufs[1], &cb, &bufs[0], &bufs[2], &bufs[3], n, &s,
    )
    .unwrap();
    rec.run("adamw kernel").unwrap();
    let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
    adamw_ref(&mut p1, &mut m1, &mut v1, &g0, clip, &s);
    assert_close("p", &gpu.read::<f32>(&bufs[0]).unwrap(), &p1, ADAM_TOL);
    assert_close("m", &gpu.read::<f32>(&bufs[2]).unwrap(), &m1, ADAM_TOL);
    assert_close("v", &gpu.read::<f32>(&bufs[3]).unwrap(), &v1, ADAM_TOL);
}

#[test]
fn grad_norm_is_deterministic_and_matches_f64() {
    let gpu = test_device();
    let mut r = Rng::new(23);
    let sizes = [4096usize, 4097, 3, 12289];
    let bufs: Vec<_> = sizes
        .iter()
        .map(|&n| gpu.upload("g", &r.normal_vec(n, 1.0)).unwrap())
        .collect();
    let all: Vec<f32> = bufs
        .iter()
        .flat_map(|b| gpu.read::<f32>(b).unwrap())
        .collect();
    let gn = GradNorm::new(&gpu, &sizes).unwrap();
    let refs: Vec<&_> = bufs.iter().collect();
    let mut outs = Vec::new();
    for _ in 0..2 {
        let mut rec = gpu.recorder();
        gn.record(&gpu, &mut rec, &refs, Some(10.0)).unwrap();
        rec.run("norm").unwrap();
        outs.push(gn.read(&gpu).unwrap());
    }
    assert_eq!(
        outs[0].0.to_bits(),
        outs[1].0.to_bits(),
        "norm not deterministic"
    );
    let want = global_norm(&all);
    assert_close(
        "sum of squares",
        &[outs[0].0 as f64],
        &[want * want],
        NORM_TOL,
    );
    let cf = clip_factor(want, Some(10.0)).unwrap().factor;
    assert_close("factor", &[outs[0].1 as f64], &[cf], NORM_TOL);
}

#[test]
fn non_finite_gradient_skips_the_update() {
    let gpu = test_device();
    let sizes = [5usize, 300];
    let p0 = [vec![1.0f32; 5], vec![2.0f32; 300]];
    let params: Vec<_> = p0.iter().map(|p| gpu.upload("p", p).unwrap()).collect();
    let mut g1 = vec![0.1f32; 300];
    g1[123] = f32::NAN;
    let grads = [
        gpu.upload("g", &[0.1f32; 5]).unwrap(),
        gpu.upload("g", &g1).unwrap(),
    ];
    let mut opt = GpuAdamW::new(&gpu, AdamWConfig::default(), &sizes).unwrap();
    let mut rec = gpu.recorder();
    opt.record_step(
        &gpu,
        &mut rec,
        &[&params[0], &params[1]],
        &[&grads[0], &grads[1]],
        1e-2,
        1.0,
        Some(1.0),
    )
    .unwrap();
    rec.run("nan step").unwrap();
    let e = opt.finish_step(&gpu).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
    assert_eq!(opt.step, 0);
    for (b, want) in params.iter().zip(&p0) {
        assert_eq!(&gpu.read::<f32>(b).unwrap(), want);
    }
    let st = opt.state(&gpu).unwrap();
    assert!(st.m.iter().chain(&st.v).all(|&x| x == 0.0));
}

fn split(v: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut off = 0;
    sizes
        .iter()
        .map(|&n| {
            off += n;
            v[off - n..off].to_vec()
        })
        .collect()
}
