//! An SVG plot of latency percentiles against offered rate, from an open-loop rate sweep:
//! where the curves turn up is where the server's capacity is. Self-contained SVG (no
//! scripts, no external fonts), log-scale latency axis.

use std::fmt::Write as _;

/// One offered rate and the latencies measured at it, in µs.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Requests per second offered.
    pub rate: f64,
    /// p50, p99 and p99.9 latency, µs, from when each request was due.
    pub p50_us: u64,
    /// As above.
    pub p99_us: u64,
    /// As above.
    pub p999_us: u64,
}

/// A plotted percentile: its name, colour, and where it is in a point.
type Series = (&'static str, &'static str, fn(&SweepPoint) -> u64);

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plot as SVG text; `target_us` draws the p99 target as a dashed line.
pub fn latency_svg(title: &str, points: &[SweepPoint], target_us: Option<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let max_rate = points.iter().map(|p| p.rate).fold(1.0, f64::max);
    let latencies = points
        .iter()
        .flat_map(|p| [p.p50_us, p.p99_us, p.p999_us])
        .chain(target_us)
        .map(|us| us.max(1) as f64);
    let (low, high) = latencies.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low_decade, high_decade) = (low.min(high).log10().floor(), high.log10().ceil().max(1.0));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |rate: f64| LEFT + rate / max_rate * plot_w;
    let y = |us: u64| {
        let v = (us.max(1) as f64).log10();
        TOP + plot_h * (1.0 - (v - low_decade) / (high_decade - low_decade).max(1.0))
    };
    // Axes, decade grid lines and labels.
    let _ = writeln!(
        out,
        r##"<g stroke="#888"><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}"/><line x1="{LEFT}" y1="{}" x2="{}" y2="{}"/></g>"##,
        TOP + plot_h,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h
    );
    let mut decade = low_decade;
    while decade <= high_decade {
        let us = 10f64.powf(decade) as u64;
        let label = match us {
            0..1_000 => format!("{us} µs"),
            1_000..1_000_000 => format!("{} ms", us / 1_000),
            _ => format!("{} s", us / 1_000_000),
        };
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#eee"/><text x="{2}" y="{3:.1}" text-anchor="end">{label}</text>"##,
            y(us),
            LEFT + plot_w,
            LEFT - 6.0,
            y(us) + 4.0
        );
        decade += 1.0;
    }
    for i in 0..=4 {
        let rate = max_rate * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
            x(rate),
            TOP + plot_h + 18.0,
            rate
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">offered rate (requests/s)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">latency from due time</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    if let Some(target) = target_us {
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#c00" stroke-dasharray="6 4"/><text x="{1}" y="{2:.1}" text-anchor="end" fill="#c00">p99 target</text>"##,
            y(target),
            LEFT + plot_w,
            y(target) - 4.0
        );
    }
    let series: [Series; 3] = [
        ("p50", "#1f77b4", |p| p.p50_us),
        ("p99", "#ff7f0e", |p| p.p99_us),
        ("p99.9", "#2ca02c", |p| p.p999_us),
    ];
    for (i, (name, color, value)) in series.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.rate), y(value(p))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline class="{name}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
        for p in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(p.rate),
                y(value(p))
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
            LEFT + 10.0 + 60.0 * i as f64,
            TOP - 6.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_draws_each_percentile_through_every_point() {
        let points: Vec<SweepPoint> = [(1000.0, 200), (2000.0, 300), (4000.0, 90_000)]
            .into_iter()
            .map(|(rate, p99)| SweepPoint {
                rate,
                p50_us: p99 / 2,
                p99_us: p99,
                p999_us: p99 * 2,
            })
            .collect();
        let svg = latency_svg("fraud <h1>", &points, Some(1000));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("fraud &lt;h1&gt;"), "titles are escaped");
        for class in ["p50", "p99", "p99.9"] {
            let line = svg
                .lines()
                .find(|l| l.contains(&format!(r#"class="{class}""#)))
                .unwrap();
            assert_eq!(line.matches(',').count(), 3, "{line}");
        }
        assert_eq!(svg.matches("<circle").count(), 9);
        assert!(svg.contains("p99 target"));
        // Higher latency is drawn higher up (smaller y).
        let y_of = |class: &str, index: usize| -> f64 {
            let line = svg
                .lines()
                .find(|l| l.contains(&format!(r#"class="{class}""#)))
                .unwrap();
            let points = line
                .split("points=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap();
            let pair = points.split(' ').nth(index).unwrap();
            pair.split(',').nth(1).unwrap().parse().unwrap()
        };
        assert!(y_of("p99", 2) < y_of("p99", 0));
    }
}
