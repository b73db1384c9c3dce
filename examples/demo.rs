//! The built-in demo through the library API: write the tiny demo model and its synthetic safety
//! pairs, train a BFPO LoRA adapter on them, and print a few of the run's events.
//!
//! `cargo run --release --example demo -- [OUT] [cpu|gpu]` (default: runs/demo-example, gpu).

use bfpo_lite::run::{Event, TuneJob, demo};
use bfpo_lite::train::config::EngineKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "runs/demo-example".into());
    let mut cfg = demo::demo(out.as_ref())?; // writes demo-model.gguf and demo-data/ in OUT
    if args.next().as_deref() == Some("cpu") {
        cfg.engine = EngineKind::Cpu;
    }
    let job = TuneJob::from_config(cfg)?.force(true);
    let cancel = job.cancel_token(); // cancel() from any thread: stops with a checkpoint
    let mut show = |e: &Event| match e {
        Event::DataLoaded(d) => {
            println!("{} pairs; safety cases {:?}", d.train_pairs, d.safety.train)
        }
        Event::Step(m) if m.step % 10 == 0 => println!("step {:>3}  loss {:.3e}", m.step, m.loss),
        Event::Eval(m) => println!(
            "eval: BFPO-ranking accuracy {:.3}",
            m.accuracy_bfpo.unwrap_or(0.0)
        ),
        Event::Warning { message } => println!("warning: {message}"),
        _ => {}
    };
    let mut run = job.prepare(&mut show)?;
    run.train(&mut show)?;
    let s = run.finish(&mut show)?;
    let acc = |r: Option<bfpo_lite::train::trainer::RankingEval>| {
        r.map_or(0.0, |r| r.safety_ranking_accuracy)
    };
    println!(
        "{} steps (cancelled: {}); held-out safety ranking {:.2} -> {:.2}; adapter {}",
        s.steps,
        cancel.is_cancelled(),
        acc(s.heldout_before),
        acc(s.heldout_after),
        s.adapter
    );
    Ok(())
}
