//! AdamW, clipping, accumulation and LR schedules against values worked out by hand.

use bfpo_lite::optim::*;
use bfpo_lite::util::Rng;

fn cfg(wd: f64) -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
    }
}

#[test]
fn adamw_two_steps_match_hand_computation() {
    // p = 1, lr 0.1, wd 0.01, grads 0.5 then −0.25. Textbook form p −= lr·m̂/(√v̂ + eps):
    // t=1: p = 1·(1 − 0.001) = 0.999; m = 0.05, v = 0.00025; m̂ = 0.5, √v̂ = 0.5;
    //      p = 0.999 − 0.1·0.5/(0.5 + 1e-8) = 0.899000002
    // t=2: p = 0.899·0.999 = 0.898101; m = 0.045 − 0.025 = 0.02; v = 0.00024975 + 0.0000625
    //      = 0.00031225; m̂ = 0.02/0.19, v̂ = 0.00031225/0.001999;
    //      p = 0.898101 − 0.1·m̂/(√v̂ + 1e-8) = 0.8714672987
    let mut opt = AdamW::new(cfg(0.01), 1).unwrap();
    let mut p = [1.0f32];
    opt.step(&mut p, &[0.5], 0.1, 1.0).unwrap();
    assert!((p[0] as f64 - 0.899000002).abs() < 1e-7, "{}", p[0]);
    assert!((opt.m[0] as f64 - 0.05).abs() < 1e-9);
    assert!((opt.v[0] as f64 - 0.00025).abs() < 1e-10);
    opt.step(&mut p, &[-0.25], 0.1, 1.0).unwrap();
    assert!((p[0] as f64 - 0.8714672987).abs() < 1e-6, "{}", p[0]);
    assert!((opt.m[0] as f64 - 0.02).abs() < 1e-8);
    assert!((opt.v[0] as f64 - 0.00031225).abs() < 1e-10);
    assert_eq!(opt.step, 2);
}

#[test]
fn first_adam_step_moves_each_parameter_by_about_lr() {
    // With bias correction, m̂ = g and √v̂ = |g| at t = 1, so the update is lr·sign(g).
    let mut r = Rng::new(3);
    let n = 37;
    let g: Vec<f32> = r.normal_vec(n, 2.0);
    let mut p: Vec<f32> = r.normal_vec(n, 1.0);
    let p0 = p.clone();
    let mut opt = AdamW::new(AdamWConfig::default(), n).unwrap();
    opt.step(&mut p, &g, 1e-3, 1.0).unwrap();
    for i in 0..n {
        let want = p0[i] as f64 - 1e-3 * (g[i] as f64).signum();
        assert!(
            (p[i] as f64 - want).abs() < 1e-6,
            "i {i}: {} vs {want}",
            p[i]
        );
    }
}

#[test]
fn weight_decay_is_decoupled() {
    // A zero gradient leaves m = v = 0, so only p ← p·(1 − lr·wd) acts.
    let mut opt = AdamW::new(cfg(0.1), 2).unwrap();
    let mut p = [2.0f32, -4.0];
    opt.step(&mut p, &[0.0, 0.0], 0.5, 1.0).unwrap();
    assert_eq!(p, [1.9, -3.8]);
}

#[test]
fn grad_scale_equals_prescaled_gradients() {
    let mut r = Rng::new(4);
    let n = 19;
    let g: Vec<f32> = r.normal_vec(n, 1.0);
    let p0: Vec<f32> = r.normal_vec(n, 1.0);
    let (mut a, mut b) = (p0.clone(), p0.clone());
    let mut oa = AdamW::new(cfg(0.01), n).unwrap();
    let mut ob = oa.clone();
    for _ in 0..3 {
        oa.step(&mut a, &g, 1e-2, 0.25).unwrap();
        let gs: Vec<f32> = g.iter().map(|x| x * 0.25).collect();
        ob.step(&mut b, &gs, 1e-2, 1.0).unwrap();
    }
    assert_eq!(a, b);
}

#[test]
fn resume_from_serialized_state_is_bit_exact() {
    let mut r = Rng::new(5);
    let n = 23;
    let grads: Vec<Vec<f32>> = (0..6).map(|_| r.normal_vec(n, 1.0)).collect();
    let p0: Vec<f32> = r.normal_vec(n, 1.0);
    let mut straight = p0.clone();
    let mut opt = AdamW::new(cfg(0.05), n).unwrap();
    for g in &grads {
        opt.step(&mut straight, g, 3e-3, 0.7).unwrap();
    }
    let mut resumed = p0;
    let mut o1 = AdamW::new(cfg(0.05), n).unwrap();
    for g in &grads[..3] {
        o1.step(&mut resumed, g, 3e-3, 0.7).unwrap();
    }
    let json = serde_json::to_string(&o1).unwrap();
    let mut o2: AdamW = serde_json::from_str(&json).unwrap();
    for g in &grads[3..] {
        o2.step(&mut resumed, g, 3e-3, 0.7).unwrap();
    }
    assert_eq!(straight, resumed);
    assert_eq!(opt, o2);
}

#[test]
fn optimizer_errors_name_the_numbers() {
    let mut opt = AdamW::new(AdamWConfig::default(), 3).unwrap();
    let e = opt.step(&mut [0.0; 3], &[0.0; 2], 1e-3, 1.0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "grads has 2 values, expected 3 (one per trainable parameter)"
    );
    let bad = AdamWConfig {
        beta2: 1.0,
        ..Default::default()
    };
    assert!(
        AdamW::new(bad, 1)
            .unwrap_err()
            .to_string()
            .contains("betas")
    );
}

#[test]
fn clipping_follows_torch_and_reports_the_pre_clip_norm() {
    // ‖[3, 4]‖ = 5; max 1 → factor 1/(5 + 1e-6).
    let c = clip_grad_norm(&[3.0, 4.0], Some(1.0)).unwrap();
    assert_eq!(c.pre_clip_norm, 5.0);
    assert!((c.factor - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
    // Below the threshold: untouched.
    let c = clip_grad_norm(&[0.3, 0.4], Some(1.0)).unwrap();
    assert_eq!(c.factor, 1.0);
    assert!((c.pre_clip_norm - 0.5).abs() < 1e-7);
    // Disabled.
    assert_eq!(clip_grad_norm(&[30.0, 40.0], None).unwrap().factor, 1.0);
    // Non-finite gradients are refused.
    let e = clip_grad_norm(&[1.0, f32::NAN], Some(1.0)).unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
    let e = clip_grad_norm(&[f32::INFINITY], None).unwrap_err();
    assert!(matches!(e, OptimError::NonFiniteGradient { .. }));
}

#[test]
fn accumulator_sums_or_averages_and_resets() {
    let mut acc = GradAccumulator::new(2);
    acc.add(&[1.0, 2.0]).unwrap();
    acc.add(&[3.0, 4.0]).unwrap();
    assert_eq!(acc.n_micro(), 2);
    assert_eq!(acc.clone().take(Reduction::Sum), vec![4.0, 6.0]);
    assert_eq!(acc.take(Reduction::Mean), vec![2.0, 3.0]);
    assert_eq!(acc.n_micro(), 0);
    acc.add(&[5.0, 5.0]).unwrap();
    assert_eq!(acc.take(Reduction::Mean), vec![5.0, 5.0]);
    let e = acc.add(&[1.0]).unwrap_err();
    assert!(e.to_string().contains("1 values, expected 2"), "{e}");
}

fn sched(kind: ScheduleKind, warmup: Warmup) -> LrSchedule {
    LrSchedule {
        kind,
        peak_lr: 2.0,
        warmup,
        total_steps: 10,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn linear_schedule_hand_values() {
    // warmup 2 of 10: k/2 for k < 2, then (10 − k)/8.
    let s = sched(ScheduleKind::Linear, Warmup::Steps(2));
    let want = [
        0.0,
        0.5,
        1.0,
        7.0 / 8.0,
        0.75,
        5.0 / 8.0,
        0.5,
        0.375,
        0.25,
        0.125,
        0.0,
    ];
    for (k, w) in want.iter().enumerate() {
        assert!(
            close(s.lr_at(k as u64), 2.0 * w),
            "k {k}: {}",
            s.lr_at(k as u64)
        );
    }
}

#[test]
fn cosine_schedule_hand_values() {
    // warmup 2 of 10, then 0.5·(1 + cos(π·(k − 2)/8)).
    let s = sched(ScheduleKind::Cosine, Warmup::Steps(2));
    assert!(close(s.lr_at(1), 1.0));
    assert!(close(s.lr_at(2), 2.0));
    assert!(close(s.lr_at(4), 2.0 * 0.8535533905932737)); // 0.5·(1 + cos(π/4))
    assert!(close(s.lr_at(6), 1.0)); // cos(π/2) = 0
    assert!(close(s.lr_at(10), 0.0));
    assert!(close(s.lr_at(12), 0.0)); // stays at 0 past the end
}

#[test]
fn constant_schedule_with_warmup_ratio() {
    // ratio 0.25 of 10 steps → ceil(2.5) = 3 warmup steps.
    let s = sched(ScheduleKind::Constant, Warmup::Ratio(0.25));
    assert_eq!(s.warmup_steps(), 3);
    assert!(close(s.lr_at(0), 0.0));
    assert!(close(s.lr_at(1), 2.0 / 3.0));
    assert!(close(s.lr_at(3), 2.0));
    assert!(close(s.lr_at(9), 2.0));
    let none = sched(ScheduleKind::Constant, Warmup::Steps(0));
    assert!(close(none.lr_at(0), 2.0));
    let mut bad = sched(ScheduleKind::Cosine, Warmup::Ratio(1.5));
    assert!(bad.validate().unwrap_err().to_string().contains("1.5"));
    bad.warmup = Warmup::Steps(1);
    bad.total_steps = 0;
    assert!(bad.validate().is_err());
    assert_eq!(ScheduleKind::parse("Cosine"), Some(ScheduleKind::Cosine));
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
}
