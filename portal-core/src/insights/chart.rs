//! Usage charts, drawn on the server as SVG with `plotters`' SVG backend (no fonts or bitmaps are
//! linked: text is laid out by estimate and drawn by the browser).
//!
//! The SVG backend escapes text and attribute values (`<`, `>`, `&`, quotes); labels are also
//! clipped and stripped of control characters here, and the portal serves charts as images
//! (`<img src>`), where an SVG cannot run script even if it held one.

use plotters::prelude::*;
use time::OffsetDateTime;

use super::service::UsageReport;
use super::{Granularity, InsightsError};

/// Lines drawn at most; the rest is summed into "other".
pub const MAX_SERIES: usize = 6;
/// Chart size, px.
pub const SIZE: (u32, u32) = (960, 380);

/// What a chart plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Total tokens per bucket.
    Tokens,
    /// Calls per bucket.
    Requests,
}

impl Metric {
    /// Parses `tokens` or `requests` (default tokens).
    pub fn parse(text: &str) -> Result<Metric, InsightsError> {
        match text.trim() {
            "" | "tokens" => Ok(Metric::Tokens),
            "requests" => Ok(Metric::Requests),
            _ => Err(InsightsError::invalid("metric", "tokens or requests")),
        }
    }
}

const COLORS: [RGBColor; MAX_SERIES + 1] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
];

/// A label safe and short enough for a legend.
pub fn label(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() > 40 {
        let mut short: String = clean.chars().take(39).collect();
        short.push('…');
        short
    } else {
        clean
    }
}

fn compact(value: f64) -> String {
    let abs = value.abs();
    if abs >= 1e9 {
        format!("{:.1}G", value / 1e9)
    } else if abs >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if abs >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

fn draw_error<E: std::error::Error + Send + Sync>(
    error: plotters::drawing::DrawingAreaErrorKind<E>,
) -> InsightsError {
    InsightsError::Chart(error.to_string())
}

/// The report's usage over time as an SVG document: the [`MAX_SERIES`] largest values as lines,
/// the others summed as "other" (when the report holds their points), with axes (time in UTC;
/// tokens or calls per bucket) and a legend.
pub fn usage_svg(report: &UsageReport, metric: Metric) -> Result<String, InsightsError> {
    let step_minutes: i64 = match report.granularity {
        Granularity::Minute => 1,
        Granularity::Hour => 60,
    };
    let buckets = ((report.range.to - report.range.from).whole_minutes() / step_minutes).max(1);
    let index =
        |at: OffsetDateTime| ((at - report.range.from).whole_minutes() / step_minutes) as usize;
    let value_of = |point: &super::UsagePoint| match metric {
        Metric::Tokens => point.total_tokens as f64,
        Metric::Requests => point.requests as f64,
    };
    let shown: Vec<&str> = report
        .totals
        .iter()
        .take(MAX_SERIES)
        .map(|t| t.value.as_str())
        .collect();
    // The others' line needs every value's buckets; when only the top values' were read (too
    // many points), the caption says how many values are not drawn instead.
    let left_out = report.totals.len().saturating_sub(MAX_SERIES);
    let has_other = left_out > 0 && report.points_complete;
    let mut series = vec![vec![0f64; buckets as usize]; shown.len() + usize::from(has_other)];
    for point in &report.points {
        let i = index(point.bucket);
        let slot = shown
            .iter()
            .position(|v| *v == point.value)
            .unwrap_or(shown.len());
        if let Some(line) = series.get_mut(slot)
            && let Some(cell) = line.get_mut(i)
        {
            *cell += value_of(point);
        }
    }
    let max = series
        .iter()
        .flatten()
        .copied()
        .fold(0f64, f64::max)
        .max(1.0);
    let unit = match report.granularity {
        Granularity::Minute => "minute",
        Granularity::Hour => "hour",
    };
    let (y_desc, mut caption) = match metric {
        Metric::Tokens => (
            format!("tokens per {unit}"),
            format!("Tokens by {}", report.dimension.as_str().replace('_', " ")),
        ),
        Metric::Requests => (
            format!("calls per {unit}"),
            format!("Calls by {}", report.dimension.as_str().replace('_', " ")),
        ),
    };
    if left_out > 0 && !report.points_complete {
        caption.push_str(&format!(" (top {MAX_SERIES}; {left_out} more not drawn)"));
    }
    let from = report.range.from;
    let x_format = move |x: &f64| {
        let Some(at) = from.checked_add(time::Duration::minutes((*x as i64) * step_minutes)) else {
            return String::new();
        };
        format!(
            "{:02}-{:02} {:02}:{:02}",
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute()
        )
    };
    let y_format = |y: &f64| compact(*y);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 24))
            .margin(12)
            // Room for the last time label, centred on the right edge.
            .margin_right(52)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..(buckets as f64), 0f64..(max * 1.1))
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc("time (UTC)")
            .y_desc(y_desc)
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 17))
            .draw()
            .map_err(draw_error)?;
        let names: Vec<String> = shown
            .iter()
            .map(|v| label(v))
            .chain(has_other.then(|| "other".to_owned()))
            .collect();
        for (i, (line, name)) in series.iter().zip(names).enumerate() {
            let color = COLORS[i.min(COLORS.len() - 1)];
            chart
                .draw_series(LineSeries::new(
                    line.iter().enumerate().map(|(x, y)| (x as f64, *y)),
                    color.stroke_width(2),
                ))
                .map_err(draw_error)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insights::service::UsageReport;
    use crate::insights::{Dimension, TimeRange, UsagePoint, UsageRequest};
    use time::macros::datetime;

    fn point(minute: i64, value: &str, tokens: i64) -> UsagePoint {
        UsagePoint {
            bucket: datetime!(2026-12-01 10:00 UTC) + time::Duration::minutes(minute),
            value: value.to_owned(),
            requests: 1,
            errors: 0,
            prompt_tokens: tokens / 2,
            completion_tokens: tokens / 2,
            total_tokens: tokens,
            latency_sum_ms: 10,
            latency_max_ms: 10,
        }
    }

    #[test]
    fn a_chart_has_axes_units_a_legend_and_escaped_labels() {
        let request = UsageRequest {
            range: TimeRange::new(
                datetime!(2026-12-01 10:00 UTC),
                datetime!(2026-12-01 11:00 UTC),
            )
            .unwrap(),
            granularity: Granularity::Minute,
            dimension: Dimension::User,
            only: None,
        };
        let mut points = vec![
            point(1, "<script>alert(1)</script>", 500),
            point(2, "bob", 1200),
        ];
        for i in 0..8 {
            points.push(point(3, &format!("user-{i}"), 10));
        }
        let report = UsageReport::build(&request, points);
        let svg = usage_svg(&report, Metric::Tokens).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("tokens per minute"));
        assert!(svg.contains("time (UTC)"));
        assert!(svg.contains("Tokens by user"));
        assert!(
            svg.contains("\nbob\n</text>"),
            "the legend holds the values"
        );
        assert!(svg.contains("other"), "the values beyond six are summed");
        assert!(svg.contains("&lt;script&gt;"));
        assert!(!svg.contains("<script"));
        // Only the top values' buckets read (too many points): no "other" line, and the caption
        // says how many values are left out.
        let top = UsageReport {
            points: report
                .points
                .iter()
                .filter(|p| p.value == "bob" || p.value.starts_with('<'))
                .cloned()
                .collect(),
            points_complete: false,
            ..report.clone()
        };
        let svg = usage_svg(&top, Metric::Tokens).unwrap();
        assert!(!svg.contains("\nother\n"), "no other line");
        assert!(
            svg.contains("Tokens by user (top 6; 4 more not drawn)"),
            "{svg}"
        );
        let empty = UsageReport::build(&request, Vec::new());
        assert!(
            usage_svg(&empty, Metric::Requests)
                .unwrap()
                .contains("calls per minute")
        );
    }
}
