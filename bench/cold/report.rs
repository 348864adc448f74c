//! Results: the JSON others compare runs with (schema kept stable), a markdown table with the
//! ratios the targets are stated in, and an SVG bar chart.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One workload and method over all runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub workload: String,
    pub method: String,
    pub seconds_median: f64,
    pub seconds_min: f64,
    pub seconds_max: f64,
    pub bytes_fetched: u64,
    pub requests: u64,
}

impl Row {
    pub fn new(
        workload: &str,
        method: &str,
        seconds: &[f64],
        bytes: &[u64],
        requests: &[u64],
    ) -> Self {
        Self {
            workload: workload.to_owned(),
            method: method.to_owned(),
            seconds_median: median_f(seconds),
            seconds_min: seconds.iter().copied().fold(f64::INFINITY, f64::min),
            seconds_max: seconds.iter().copied().fold(0.0, f64::max),
            bytes_fetched: median_u(bytes),
            requests: median_u(requests),
        }
    }
}

pub fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

pub fn median_u(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Issue 11's baseline: `lazysnap` (containerd) medians at 100 Mbit/s + 20 ms RTT before it.
fn baseline(workload: &str) -> Option<f64> {
    match workload {
        "python-hello" => Some(1.44),
        "python-import" => Some(3.24),
        "java-hello" => Some(3.06),
        _ => None,
    }
}

/// Issue 11's targets for a start with a profile, through containerd, in seconds.
fn profile_target(workload: &str) -> Option<f64> {
    match workload {
        "python-hello" => Some(0.7),
        "python-import" => Some(1.45),
        "java-hello" => Some(2.0),
        _ => None,
    }
}

fn find<'a>(rows: &'a [Row], workload: &str, method: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.workload == workload && r.method == method)
}

/// The markdown table, with each lazy method's ratio to full-pull and to the oracle, and the
/// bytes it fetched against the bytes the workload needed.
pub fn markdown(conditions: &serde_json::Value, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Conditions: {}\n",
        serde_json::to_string(conditions).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "| workload | method | median s | min s | max s | MB fetched | requests | vs full-pull | vs oracle |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let full = find(rows, &r.workload, "full-pull").map(|f| f.seconds_median);
        let oracle = find(rows, &r.workload, "oracle").map(|f| f.seconds_median);
        let ratio = |base: Option<f64>| match base {
            Some(b) if b > 0.0 && r.method != "full-pull" && r.method != "oracle" => {
                ratio_text(r.seconds_median / b)
            }
            _ => "".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
            r.workload,
            r.method,
            r.seconds_median,
            r.seconds_min,
            r.seconds_max,
            r.bytes_fetched as f64 / 1e6,
            r.requests,
            ratio(full),
            ratio(oracle)
        );
    }
    // The seconds targets and the baseline were stated for 100 Mbit/s and 20 ms RTT only.
    let stated = conditions["rate"] == "100mbit" && conditions["rtt_ms"] == 20;
    let _ = writeln!(
        s,
        "\nTargets (issue 11{}):\n",
        if stated {
            ""
        } else {
            "; the ones in seconds and against its baseline hold at 100 Mbit/s + 20 ms RTT only"
        }
    );
    for r in rows.iter().filter(|r| r.method.starts_with("lazysnap")) {
        let mut notes = Vec::new();
        let profiled = r.method.ends_with("-profile");
        // Through containerd: ctr-remote (`lazysnap`) or kubelet's CRI calls (`lazysnap-cri`).
        let containerd = !r.method.starts_with("lazysnap-run");
        if containerd && profiled && stated {
            if let Some(t) = profile_target(&r.workload) {
                notes.push(verdict(r.seconds_median, t, " s"));
            }
        }
        if containerd && !profiled {
            if let Some(b) = baseline(&r.workload).filter(|_| stated) {
                notes.push(verdict(r.seconds_median / b, 0.8, "x issue 11's baseline"));
            }
        }
        if containerd {
            let run = if profiled {
                "lazysnap-run-profile"
            } else {
                "lazysnap-run"
            };
            if let Some(run_row) = find(rows, &r.workload, run) {
                notes.push(verdict(
                    r.seconds_median - run_row.seconds_median,
                    0.1,
                    &format!(" s behind {run}"),
                ));
            }
        }
        if let Some(o) = find(rows, &r.workload, "oracle") {
            notes.push(verdict(
                r.seconds_median / o.seconds_median,
                if profiled { 1.15 } else { 1.5 },
                "x oracle",
            ));
            if o.bytes_fetched > 0 {
                notes.push(verdict(
                    r.bytes_fetched as f64 / o.bytes_fetched as f64,
                    2.0,
                    "x the bytes needed",
                ));
            }
        }
        let _ = writeln!(s, "- {} / {}: {}", r.workload, r.method, notes.join("; "));
    }
    s
}

/// Two significant decimals for the small ratios (big-sparse is a few thousandths).
fn ratio_text(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.4}x")
    } else {
        format!("{r:.2}x")
    }
}

fn verdict(got: f64, target: f64, unit: &str) -> String {
    let got_text = if unit.starts_with('x') {
        ratio_text(got).trim_end_matches('x').to_owned()
    } else {
        format!("{got:.2}")
    };
    if got <= target {
        format!("{got_text}{unit} (target <= {target}: met)")
    } else if unit.starts_with('x') {
        format!(
            "{got_text}{unit} (target <= {target}: missed by {:.0}%)",
            (got / target - 1.0) * 100.0
        )
    } else {
        format!(
            "{got_text}{unit} (target <= {target}: missed by {:.2} s)",
            got - target
        )
    }
}

/// A grouped horizontal bar chart of median seconds per workload and method.
pub fn svg(rows: &[Row]) -> String {
    let methods = [
        "full-pull",
        "lazysnap",
        "lazysnap-profile",
        "lazysnap-cri",
        "lazysnap-cri-profile",
        "lazysnap-run",
        "lazysnap-run-profile",
        "oracle",
    ];
    let colors = [
        "#9e9e9e", "#1565c0", "#6a1b9a", "#00838f", "#c2185b", "#42a5f5", "#ab47bc", "#2e7d32",
    ];
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    let max = rows.iter().map(|r| r.seconds_median).fold(0.1, f64::max);
    let (left, width, bar, gap) = (120.0, 560.0, 14.0, 18.0);
    let group = methods.len() as f64 * bar + gap;
    let height = 40.0 + group * workloads.len() as f64 + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        left + width + 80.0
    );
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"16\" font-size=\"13\">Cold start, seconds to ready (median)</text>"
    );
    for (wi, w) in workloads.iter().enumerate() {
        let y0 = 30.0 + wi as f64 * group;
        let _ = writeln!(
            s,
            "<text x=\"4\" y=\"{}\">{w}</text>",
            y0 + methods.len() as f64 * bar / 2.0 + 4.0
        );
        for (mi, m) in methods.iter().enumerate() {
            let Some(r) = find(rows, w, m) else { continue };
            let y = y0 + mi as f64 * bar;
            let len = width * r.seconds_median / max;
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{y}\" width=\"{len:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{m} {:.2} s</text>",
                bar - 2.0,
                colors[mi],
                left + len + 4.0,
                y + bar - 4.0,
                r.seconds_median
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
