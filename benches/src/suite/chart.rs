//! PNG charts of a suite: throughput and p99 latency per client count, one
//! panel per workload, etcd and lmskv side by side. Drawn with plotters'
//! bitmap backend; text uses a TrueType font read from the system
//! (`fonts-dejavu-core`, or the file named by `BENCH_FONT`).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::summary::{Cell, Summary};
use crate::target::TargetKind;
use crate::ycsb::WorkloadKind;

/// Font files tried in order when `BENCH_FONT` is not set.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
/// Name the font is registered under.
const FONT: &str = "sans-serif";
/// Size of one panel in pixels.
const PANEL: (u32, u32) = (420, 320);

static FONT_LOADED: OnceLock<Result<(), String>> = OnceLock::new();

fn load_font() -> anyhow::Result<()> {
    FONT_LOADED
        .get_or_init(|| {
            let candidates: Vec<String> = match std::env::var("BENCH_FONT") {
                Ok(p) if !p.is_empty() => vec![p],
                _ => FONT_PATHS.iter().map(|s| s.to_string()).collect(),
            };
            for p in &candidates {
                if let Ok(bytes) = std::fs::read(p) {
                    // The font must live as long as the process: charts may be drawn again.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                        .map_err(|_| format!("{p} is not a usable TrueType font"));
                }
            }
            Err(format!(
                "no TrueType font found (tried {}); install fonts-dejavu-core or set BENCH_FONT",
                candidates.join(", ")
            ))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn color(t: TargetKind) -> RGBColor {
    match t {
        TargetKind::Etcd => RGBColor(0x41, 0x69, 0xe1),
        TargetKind::Lmskv => RGBColor(0xe0, 0x4a, 0x1f),
    }
}

type Metric = (&'static str, &'static str, fn(&Cell) -> f64);

/// Draws `throughput.png` and `p99.png` into `dir`; returns their file names.
pub fn draw(summary: &Summary, dir: &Path) -> anyhow::Result<Vec<String>> {
    load_font()?;
    let metrics: [Metric; 2] = [
        ("throughput.png", "ops/s", |c| c.throughput_ops_s),
        ("p99.png", "p99 latency (ms)", |c| c.p99_us / 1000.0),
    ];
    let workloads: Vec<WorkloadKind> = WorkloadKind::ALL
        .into_iter()
        .filter(|w| summary.cells.keys().any(|(x, _, _)| x == w))
        .collect();
    if workloads.is_empty() {
        bail!("no results to draw");
    }
    let mut files = Vec::new();
    for (file, label, f) in metrics {
        let path = dir.join(file);
        draw_metric(summary, &workloads, &path, label, f)
            .with_context(|| format!("draw {}", path.display()))?;
        files.push(file.to_string());
    }
    Ok(files)
}

fn draw_metric(
    summary: &Summary,
    workloads: &[WorkloadKind],
    path: &Path,
    label: &str,
    f: fn(&Cell) -> f64,
) -> anyhow::Result<()> {
    let cols = workloads.len().min(4);
    let rows = workloads.len().div_ceil(cols);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + 40);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        &format!("{label} per client count: etcd (blue) vs lmskv (red)"),
        (FONT, 22),
    )?;
    let panels = body.split_evenly((rows, cols));
    for (w, panel) in workloads.iter().zip(panels.iter()) {
        // Client counts are evenly spaced categories, labelled with the count.
        let mut counts: Vec<usize> = summary
            .cells
            .keys()
            .filter(|(x, _, _)| x == w)
            .map(|(_, c, _)| *c)
            .collect();
        counts.sort_unstable();
        counts.dedup();
        let series: Vec<(TargetKind, Vec<(i32, f64)>)> = [TargetKind::Etcd, TargetKind::Lmskv]
            .into_iter()
            .map(|t| {
                let pts = summary
                    .cells
                    .iter()
                    .filter(|((x, _, y), _)| x == w && *y == t)
                    .filter_map(|((_, c, _), cell)| {
                        let i = counts.iter().position(|x| x == c)?;
                        Some((i as i32, f(cell)))
                    })
                    .collect();
                (t, pts)
            })
            .collect();
        let ymax = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.15;
        let n = counts.len() as i32;
        let mut chart = ChartBuilder::on(panel)
            .caption(w.describe(), (FONT, 13))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(-1..n, 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("clients")
            .x_labels((n + 2) as usize)
            .x_label_formatter(&|x| {
                usize::try_from(*x)
                    .ok()
                    .and_then(|i| counts.get(i))
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            })
            .y_label_formatter(&|y| {
                if *y >= 10_000.0 {
                    format!("{:.0}k", y / 1000.0)
                } else if *y >= 1000.0 {
                    format!("{:.1}k", y / 1000.0)
                } else if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .label_style((FONT, 11))
            .draw()?;
        for (t, pts) in series {
            let c = color(t);
            chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
        }
    }
    root.present()?;
    Ok(())
}
