//! An opt-in profile of where GPU time goes, per kernel family and per phase.
//!
//! Off by default (one relaxed atomic load per recorded operation). When [`start`]ed, every
//! [`Recorder`](super::Recorder) submission is timed operation by operation:
//! * with `TIMESTAMP_QUERY` (most real GPUs), each dispatch runs in its own compute pass with
//!   begin/end timestamps, read back after the submission: device time per dispatch;
//! * without (lavapipe), each operation is submitted on its own and waited for: wall time per
//!   operation ("timed submissions"), which on a CPU driver is the time the work took.
//!
//! Either way the profile serialises the work, so a profiled run is slower than a plain one;
//! its shares are what matter. Readbacks (`Gpu::read_range`) are timed as family `readback`.
//! Phases are set by the code that knows them ([`set_phase`]: forward, recompute, backward,
//! optimizer, score); a scope ([`set_scope`], e.g. `lm_head`) prefixes the family of the
//! dispatches recorded inside it so the LM head's matmuls are not mixed with the layers'.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

struct State {
    started: Instant,
    phase: &'static str,
    scope: Option<&'static str>,
    method: Option<Method>,
    rows: BTreeMap<(&'static str, String), Cell>,
    submits: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    calls: u64,
    seconds: f64,
}

/// How operation times were taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Device timestamps around each dispatch (TIMESTAMP_QUERY).
    Timestamps,
    /// Each operation submitted alone and waited for (wall time).
    TimedSubmissions,
}

/// One (phase, family) line of a profile.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProfileRow {
    pub phase: String,
    pub family: String,
    pub calls: u64,
    pub seconds: f64,
}

/// A finished profile: per (phase, family) times, submissions per phase, wall time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProfileReport {
    pub method: Option<Method>,
    pub wall_seconds: f64,
    pub rows: Vec<ProfileRow>,
    pub submits: BTreeMap<String, u64>,
}

/// Starts (or restarts) profiling in this process.
pub fn start() {
    *STATE.lock().expect("profile lock") = Some(State {
        started: Instant::now(),
        phase: "other",
        scope: None,
        method: None,
        rows: BTreeMap::new(),
        submits: BTreeMap::new(),
    });
    ENABLED.store(true, Ordering::SeqCst);
}

/// Stops profiling and returns what was measured (`None` if it was not started).
pub fn take() -> Option<ProfileReport> {
    ENABLED.store(false, Ordering::SeqCst);
    let s = STATE.lock().expect("profile lock").take()?;
    Some(ProfileReport {
        method: s.method,
        wall_seconds: s.started.elapsed().as_secs_f64(),
        rows: s
            .rows
            .into_iter()
            .map(|((phase, family), c)| ProfileRow {
                phase: phase.to_string(),
                family,
                calls: c.calls,
                seconds: c.seconds,
            })
            .collect(),
        submits: s
            .submits
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    })
}

/// Whether a profile is being taken.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    if !enabled() {
        return None;
    }
    STATE.lock().ok()?.as_mut().map(f)
}

/// Sets the phase that subsequently recorded operations are charged to.
pub fn set_phase(phase: &'static str) {
    with(|s| s.phase = phase);
}

/// Sets (or clears) a scope that prefixes the family of subsequently recorded operations.
pub fn set_scope(scope: Option<&'static str>) {
    with(|s| s.scope = scope);
}

/// A recorded operation's (phase, family), or `None` when not profiling. `kernel` is a pipeline
/// key `name:entry:DEF=V,…`; the family is the kernel name plus the define values.
pub(crate) fn tag(kernel: &str) -> Option<(&'static str, String)> {
    with(|s| {
        let mut parts = kernel.split(':');
        let name = parts.next().unwrap_or(kernel);
        let _entry = parts.next();
        let defs: Vec<&str> = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.split('=').nth(1).unwrap_or(d))
            .collect();
        let mut fam = match s.scope {
            Some(sc) => format!("{sc}: {name}"),
            None => name.to_string(),
        };
        if !defs.is_empty() {
            fam = format!("{fam} {}", defs.join(","));
        }
        (s.phase, fam)
    })
}

/// Charges `seconds` to (phase, family).
pub(crate) fn add(phase: &'static str, family: String, seconds: f64, method: Option<Method>) {
    with(|s| {
        let c = s.rows.entry((phase, family)).or_default();
        c.calls += 1;
        c.seconds += seconds;
        if method.is_some() {
            s.method = method;
        }
    });
}

/// Charges a readback of `seconds` to the current phase.
pub(crate) fn add_readback(seconds: f64) {
    if let Some(phase) = with(|s| s.phase) {
        add(phase, "readback".to_string(), seconds, None);
    }
}

/// Counts one logical queue submission in the current phase.
pub(crate) fn count_submit() {
    with(|s| *s.submits.entry(s.phase).or_default() += 1);
}

impl ProfileReport {
    /// Total seconds per phase, largest first.
    pub fn by_phase(&self) -> Vec<(String, f64)> {
        Self::sum_by(&self.rows, |r| r.phase.clone())
    }

    /// Total seconds per family over all phases, largest first.
    pub fn by_family(&self) -> Vec<(String, f64)> {
        Self::sum_by(&self.rows, |r| r.family.clone())
    }

    fn sum_by(rows: &[ProfileRow], key: impl Fn(&ProfileRow) -> String) -> Vec<(String, f64)> {
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for r in rows {
            *m.entry(key(r)).or_default() += r.seconds;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Seconds attributed to operations (the rest of the wall time is host work: recording,
    /// bind groups, pipeline compilation, the CPU loss, file I/O).
    pub fn attributed_seconds(&self) -> f64 {
        self.rows.iter().map(|r| r.seconds).sum()
    }
}

impl std::fmt::Display for ProfileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = match self.method {
            Some(Method::Timestamps) => "device timestamps per dispatch",
            Some(Method::TimedSubmissions) => "timed submissions (one operation per submit)",
            None => "no GPU operations",
        };
        let att = self.attributed_seconds();
        let pct = |s: f64| 100.0 * s / self.wall_seconds.max(1e-12);
        writeln!(
            f,
            "GPU profile ({method}): wall {:.3} s, attributed {:.3} s ({:.1}%), host/other {:.3} s",
            self.wall_seconds,
            att,
            pct(att),
            (self.wall_seconds - att).max(0.0)
        )?;
        writeln!(f, "by phase:")?;
        for (p, s) in self.by_phase() {
            let n = self.submits.get(&p).copied().unwrap_or(0);
            writeln!(f, "  {p:<12} {s:>9.3} s {:>5.1}%  {n} submits", pct(s))?;
        }
        writeln!(f, "by family:")?;
        for (fam, s) in self.by_family() {
            let calls: u64 = self
                .rows
                .iter()
                .filter(|r| r.family == fam)
                .map(|r| r.calls)
                .sum();
            writeln!(f, "  {fam:<28} {s:>9.3} s {:>5.1}%  {calls} ops", pct(s))?;
        }
        writeln!(f, "by phase and family:")?;
        let mut rows: Vec<&ProfileRow> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        for r in rows {
            writeln!(
                f,
                "  {:<12} {:<28} {:>9.3} s {:>5.1}%  {} ops",
                r.phase,
                r.family,
                r.seconds,
                pct(r.seconds),
                r.calls
            )?;
        }
        Ok(())
    }
}
