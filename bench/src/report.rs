//! What a run produced: a [`RunReport`] per run, printed as one JSON line and as a table, and
//! the Markdown comparison of many runs (several repetitions of two systems).

use std::collections::BTreeMap;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde::{Deserialize, Serialize};

/// One run of one workload against one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `W1`..`W12`.
    pub workload: String,
    /// Backend name (`etcd`, `quiver`, `memory`).
    pub backend: String,
    /// Free tag from `--label` (e.g. `rep=2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `closed` or `open`.
    pub mode: String,
    /// Client tasks (closed loop) or maximum in flight (open loop).
    pub clients: usize,
    /// Connections the clients shared.
    pub connections: usize,
    /// `uniform` or `zipfian`.
    pub keys: String,
    /// Records in the key space.
    pub records: u64,
    /// Value bytes of each put.
    pub value_size: usize,
    /// Pairs per put request.
    pub batch: usize,
    /// Percentage of gets.
    pub read_percent: u32,
    /// Warm-up, seconds (not measured).
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Requests completed in the window without error (one latency sample each).
    pub requests: u64,
    /// Keys read or written by those requests (a batch of 16 is 16 ops).
    pub ops: u64,
    /// `ops / duration_s`.
    pub ops_per_s: f64,
    /// Requests that failed in the window.
    pub errors: u64,
    /// Gets that found no value.
    pub not_found: u64,
    /// Open loop: target rate, requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Open loop: requests sent later than `--late-after-ms` after their intended start.
    pub late: u64,
    /// Open loop: requests intended inside the window but never sent (rate not sustained).
    pub missed: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// CPU seconds of the server pids per 1,000 ops (`--server-pids`).
    pub cpu_server_s_per_kop: Option<f64>,
    /// CPU seconds of the bench process itself per 1,000 ops.
    pub cpu_client_s_per_kop: Option<f64>,
    /// Server fsyncs per 1,000 ops, when the backend reports them.
    pub fsyncs_per_kop: Option<f64>,
    /// The first error message seen, to tell what the errors were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Unix time the measured window started, seconds.
    pub started_unix_s: u64,
}

impl RunReport {
    /// One JSON object on one line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// A readable table of runs, one row each.
pub fn table(runs: &[RunReport]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "workload",
        "backend",
        "clients",
        "ops/s",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "srv CPU s/kop",
        "bench CPU s/kop",
        "fsyncs/kop",
        "late",
        "missed",
    ]);
    for r in runs {
        t.add_row(vec![
            Cell::new(&r.workload),
            Cell::new(&r.backend),
            Cell::new(r.clients),
            Cell::new(format!("{:.0}", r.ops_per_s)),
            Cell::new(r.errors),
            Cell::new(ms(r.p50_us as f64)),
            Cell::new(ms(r.p90_us as f64)),
            Cell::new(ms(r.p99_us as f64)),
            Cell::new(ms(r.p999_us as f64)),
            Cell::new(ms(r.max_us as f64)),
            Cell::new(opt(r.cpu_server_s_per_kop, 3)),
            Cell::new(opt(r.cpu_client_s_per_kop, 3)),
            Cell::new(opt(r.fsyncs_per_kop, 1)),
            Cell::new(r.late),
            Cell::new(r.missed),
        ]);
    }
    for i in 2..15 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Parse JSON lines (blank lines and lines not starting with `{` are skipped).
///
/// # Errors
/// A line that starts with `{` but is not a [`RunReport`].
pub fn parse_lines(text: &str) -> Result<Vec<RunReport>, serde_json::Error> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of the repetitions of one workload on one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub reps: usize,
    pub ops_per_s: f64,
    pub ops_min: f64,
    pub ops_max: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    pub missed: u64,
    pub cpu_server_s_per_kop: Option<f64>,
    pub fsyncs_per_kop: Option<f64>,
}

/// Group runs by workload and backend and take medians over repetitions.
pub fn aggregate(runs: &[RunReport]) -> BTreeMap<(String, String), Aggregate> {
    let mut groups: BTreeMap<(String, String), Vec<&RunReport>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.workload.clone(), r.backend.clone()))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|(k, rs)| {
            let col = |f: &dyn Fn(&RunReport) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
            let ops = col(&|r| r.ops_per_s);
            let opt_med = |f: &dyn Fn(&RunReport) -> Option<f64>| {
                median(rs.iter().filter_map(|r| f(r)).collect())
            };
            let a = Aggregate {
                reps: rs.len(),
                ops_per_s: median(ops.clone()).unwrap_or(0.0),
                ops_min: ops.iter().copied().fold(f64::INFINITY, f64::min),
                ops_max: ops.iter().copied().fold(0.0, f64::max),
                p50_us: median(col(&|r| r.p50_us as f64)).unwrap_or(0.0),
                p99_us: median(col(&|r| r.p99_us as f64)).unwrap_or(0.0),
                p999_us: median(col(&|r| r.p999_us as f64)).unwrap_or(0.0),
                errors: rs.iter().map(|r| r.errors).sum(),
                missed: rs.iter().map(|r| r.missed).sum(),
                cpu_server_s_per_kop: opt_med(&|r| r.cpu_server_s_per_kop),
                fsyncs_per_kop: opt_med(&|r| r.fsyncs_per_kop),
            };
            (k, a)
        })
        .collect()
}

/// Sort key of a workload name: `W2` before `W10`.
fn workload_order(name: &str) -> (u32, String) {
    let n = name
        .trim_start_matches(['W', 'w'])
        .parse()
        .unwrap_or(u32::MAX);
    (n, name.to_string())
}

/// The Markdown comparison: one row per workload and backend, medians over repetitions, and the
/// ratio `numerator / denominator` (e.g. quiver / etcd) of median ops/s and of median p99.
pub fn markdown_comparison(runs: &[RunReport], numerator: &str, denominator: &str) -> String {
    let agg = aggregate(runs);
    let mut workloads: Vec<String> = agg.keys().map(|(w, _)| w.clone()).collect();
    workloads.sort_by_key(|w| workload_order(w));
    workloads.dedup();
    let mut backends: Vec<String> = agg.keys().map(|(_, b)| b.clone()).collect();
    backends.sort();
    backends.dedup();
    // The denominator (baseline) first, then the others.
    backends.sort_by_key(|b| (b != denominator, b != numerator));

    let mut out = String::new();
    out.push_str(&format!(
        "| workload | system | reps | ops/s median (min-max) | p50 ms | p99 ms | p99.9 ms | errors \
         | CPU s / 1k ops | fsyncs / 1k ops | {numerator}/{denominator} ops/s | \
         {numerator}/{denominator} p99 |\n"
    ));
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let desc: BTreeMap<&str, &str> = crate::workload::Workload::all()
        .iter()
        .map(|w| (w.name, w.description))
        .collect();
    for w in &workloads {
        for b in &backends {
            let Some(a) = agg.get(&(w.clone(), b.clone())) else {
                continue;
            };
            let ratio = |f: &dyn Fn(&Aggregate) -> f64| {
                if b != numerator {
                    return String::new();
                }
                match agg.get(&(w.clone(), denominator.to_string())) {
                    Some(base) if f(base) > 0.0 => format!("{:.2}x", f(a) / f(base)),
                    _ => "-".to_string(),
                }
            };
            let errors = if a.missed > 0 {
                format!("{} (+{} missed)", a.errors, a.missed)
            } else {
                a.errors.to_string()
            };
            let name = desc
                .get(w.as_str())
                .map_or(w.clone(), |d| format!("{w} {d}"));
            out.push_str(&format!(
                "| {name} | {b} | {} | {:.0} ({:.0}-{:.0}) | {} | {} | {} | {errors} | {} | {} | {} | {} |\n",
                a.reps,
                a.ops_per_s,
                a.ops_min,
                a.ops_max,
                ms(a.p50_us),
                ms(a.p99_us),
                ms(a.p999_us),
                opt(a.cpu_server_s_per_kop, 3),
                opt(a.fsyncs_per_kop, 1),
                ratio(&|x| x.ops_per_s),
                ratio(&|x| x.p99_us),
            ));
        }
    }
    out
}

/// The bar in absolute numbers, from the baseline's medians: what `numerator` must reach
/// on this machine (W2 and W4 at 10x the baseline's ops/s, W2 p99 no worse, W1 p50 under
/// 0.3 ms, every workload at least 1x with p99 no worse), and where it stands when it ran.
pub fn markdown_bar(runs: &[RunReport], numerator: &str, baseline: &str) -> String {
    let agg = aggregate(runs);
    let get = |w: &str, b: &str| agg.get(&(w.to_string(), b.to_string()));
    let stands = |w: &str, f: &dyn Fn(&Aggregate) -> String| {
        get(w, numerator).map_or_else(
            || format!("{numerator}: not measured"),
            |a| format!("{numerator}: {}", f(a)),
        )
    };
    let mut out = String::new();
    if let Some(e) = get("W2", baseline) {
        out.push_str(&format!(
            "- W2: at least {:.0} ops/s (10x {baseline}'s {:.0}) with p99 at most {} ms; {}.\n",
            10.0 * e.ops_per_s,
            e.ops_per_s,
            ms(e.p99_us),
            stands("W2", &|a| format!(
                "{:.0} ops/s, p99 {} ms",
                a.ops_per_s,
                ms(a.p99_us)
            )),
        ));
    }
    if let Some(e) = get("W4", baseline) {
        out.push_str(&format!(
            "- W4: at least {:.0} ops/s (10x {baseline}'s {:.0}); {}.\n",
            10.0 * e.ops_per_s,
            e.ops_per_s,
            stands("W4", &|a| format!("{:.0} ops/s", a.ops_per_s)),
        ));
    }
    if let Some(e) = get("W1", baseline) {
        out.push_str(&format!(
            "- W1: p50 under 0.300 ms with fsync on ({baseline}: {} ms); {}.\n",
            ms(e.p50_us),
            stands("W1", &|a| format!("p50 {} ms", ms(a.p50_us))),
        ));
    }
    out.push_str(&format!(
        "- Every workload: ops/s at least {baseline}'s and p99 at most {baseline}'s (table above).\n"
    ));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(workload: &str, backend: &str, ops_per_s: f64, p99_us: u64) -> RunReport {
        RunReport {
            workload: workload.into(),
            backend: backend.into(),
            label: Some("rep=1".into()),
            mode: "closed".into(),
            clients: 64,
            connections: 8,
            keys: "uniform".into(),
            records: 100_000,
            value_size: 256,
            batch: 1,
            read_percent: 0,
            warmup_s: 1.0,
            duration_s: 10.0,
            requests: (ops_per_s * 10.0) as u64,
            ops: (ops_per_s * 10.0) as u64,
            ops_per_s,
            errors: 2,
            not_found: 0,
            rate: None,
            late: 0,
            missed: 0,
            p50_us: 900,
            p90_us: 1500,
            p99_us,
            p999_us: 9000,
            max_us: 12_000,
            mean_us: 1000.5,
            cpu_server_s_per_kop: Some(0.125),
            cpu_client_s_per_kop: Some(0.01),
            fsyncs_per_kop: None,
            first_error: Some("put failed: \"quoted\"".into()),
            started_unix_s: 1_790_000_000,
        }
    }

    #[test]
    fn json_line_is_one_line_and_round_trips() {
        let r = sample("W2", "etcd", 1234.5, 5000);
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        for field in [
            "workload",
            "backend",
            "clients",
            "duration_s",
            "ops",
            "ops_per_s",
            "errors",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "cpu_server_s_per_kop",
            "fsyncs_per_kop",
        ] {
            assert!(v.get(field).is_some(), "missing {field} in {line}");
        }
        assert_eq!(v["p99_us"], 5000);
        assert!(v["fsyncs_per_kop"].is_null());
        assert!(v.get("rate").is_none());
        let back = parse_lines(&format!("noise\n{line}\n\n{line}\n")).expect("parse");
        assert_eq!(back, vec![r.clone(), r]);
    }

    #[test]
    fn comparison_takes_medians_and_ratios() {
        let runs = vec![
            sample("W2", "etcd", 1000.0, 8000),
            sample("W2", "quiver", 12_000.0, 4000),
            sample("W2", "etcd", 3000.0, 6000),
            sample("W2", "quiver", 8_000.0, 2000),
            sample("W2", "etcd", 2000.0, 7000),
            sample("W2", "quiver", 10_000.0, 3000),
            sample("W10", "etcd", 500.0, 9000),
        ];
        let agg = aggregate(&runs);
        let e = &agg[&("W2".to_string(), "etcd".to_string())];
        assert_eq!(
            (e.reps, e.ops_per_s, e.ops_min, e.ops_max),
            (3, 2000.0, 1000.0, 3000.0)
        );
        assert_eq!(e.p99_us, 7000.0);
        assert_eq!(e.errors, 6);
        let md = markdown_comparison(&runs, "quiver", "etcd");
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 2 + 3);
        assert!(
            lines[2].starts_with("| W2 ") && lines[2].contains("| etcd |"),
            "{md}"
        );
        assert!(
            lines[3].contains("| quiver |") && lines[3].contains("5.00x"),
            "{md}"
        );
        assert!(lines[3].contains("0.43x"), "p99 ratio 3000/7000: {md}");
        assert!(lines[4].starts_with("| W10 "), "W10 after W2: {md}");
    }

    #[test]
    fn bar_is_ten_times_the_baseline() {
        let runs = vec![
            sample("W2", "etcd", 4000.0, 30_000),
            sample("W4", "etcd", 5000.0, 50_000),
            sample("W2", "quiver", 50_000.0, 20_000),
        ];
        let bar = markdown_bar(&runs, "quiver", "etcd");
        assert!(
            bar.contains("at least 40000 ops/s") && bar.contains("p99 at most 30.000 ms"),
            "{bar}"
        );
        assert!(bar.contains("quiver: 50000 ops/s, p99 20.000 ms"), "{bar}");
        assert!(
            bar.contains("at least 50000 ops/s") && bar.contains("quiver: not measured"),
            "{bar}"
        );
        assert!(!bar.contains("W1:"), "{bar}");
    }

    #[test]
    fn table_renders_every_run() {
        let t = table(&[
            sample("W1", "memory", 10.0, 1),
            sample("W2", "memory", 20.0, 2),
        ]);
        let s = t.to_string();
        assert!(s.contains("W1") && s.contains("W2") && s.contains("p99.9 ms"));
    }
}
