//! Charts for the HTML report and docs/charts, drawn by plotters' SVG backend: a [`Chart`]
//! is a title, two labelled axes (with units) and named series of points, drawn as lines
//! or, for one point per round, as dots, with a legend. Log axes are drawn as log10 of the
//! value on a linear axis whose labels show the value again; the percentile axis is
//! HdrHistogram's: x = 1/(1-p) on a log scale, labelled 90%, 99%, 99.9% ... Pure: data in,
//! SVG text out.

use plotters::prelude::*;

/// How an axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Axis {
    Linear,
    /// Values > 0 on a log10 scale.
    Log,
    /// Percentiles as 1/(1-p), log10 scale (the values given are already 1/(1-p)).
    Percentile,
    /// Small whole numbers (rounds): one label per integer.
    Rounds,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    Lines,
    Points,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Chart {
    /// Identifies the chart in the report (`id` of its figure) and names its SVG file.
    pub id: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: Axis,
    pub y_axis: Axis,
    pub style: Style,
    pub series: Vec<Series>,
}

const WIDTH: u32 = 760;
const HEIGHT: u32 = 380;
/// The plotting area's height (the image less caption, margins and x labels) and a legend
/// row's, in pixels: how much headroom the legend needs.
const PLOT_HEIGHT_PX: f64 = 280.0;
const LEGEND_ROW_PX: f64 = 20.0;
/// Series colours, in order (colour-blind safe: Okabe and Ito's palette).
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

impl Axis {
    /// Where `v` goes on the drawn (linear) axis; `None` when it cannot be shown.
    fn map(self, v: f64) -> Option<f64> {
        match self {
            Axis::Linear | Axis::Rounds => v.is_finite().then_some(v),
            Axis::Log | Axis::Percentile => (v.is_finite() && v > 0.0).then(|| v.log10()),
        }
    }

    /// The drawn range over the mapped values `lo..hi`.
    fn range(self, lo: f64, hi: f64) -> (f64, f64) {
        match self {
            Axis::Rounds => (lo.min(1.0) - 0.5, hi.max(1.0) + 0.5),
            // Whole decades.
            Axis::Log | Axis::Percentile => {
                let (a, b) = (lo.floor(), hi.ceil());
                let a = if self == Axis::Percentile { a.min(0.0) } else { a };
                (a, if b > a { b } else { a + 1.0 })
            }
            Axis::Linear => {
                let lo = lo.min(0.0);
                let hi = if hi > lo { hi * 1.08 } else { lo + 1.0 };
                (lo, hi)
            }
        }
    }

    fn label(self, v: f64) -> String {
        match self {
            Axis::Linear => number(v),
            Axis::Rounds => {
                if (v - v.round()).abs() < 1e-9 {
                    format!("{}", v.round())
                } else {
                    String::new()
                }
            }
            Axis::Log => number(10f64.powf(v)),
            Axis::Percentile => {
                let p = 100.0 * (1.0 - 10f64.powf(-v));
                let decimals = (v.ceil() as i64 - 2).max(0) as usize;
                format!("{p:.decimals$}%")
            }
        }
    }

    /// How many labels to ask plotters for over `lo..hi` (mapped).
    fn labels(self, lo: f64, hi: f64) -> usize {
        match self {
            Axis::Rounds | Axis::Log | Axis::Percentile => ((hi - lo).round() as usize + 1).clamp(2, 12),
            Axis::Linear => 8,
        }
    }
}

/// A readable number for a tick label: no needless decimals.
fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}").trim_end_matches(".0").to_string()
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

impl Chart {
    /// The chart as one `<svg>` element.
    pub fn svg(&self) -> String {
        let mut out = String::new();
        if let Err(e) = self.draw(&mut out) {
            // plotters' SVG backend only fails on impossible geometry; say so in the chart.
            out = format!(
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"40\"><text x=\"10\" y=\"20\">cannot draw {}: {}</text></svg>",
                escape(&self.title),
                escape(&e)
            );
        }
        out
    }

    fn draw(&self, out: &mut String) -> Result<(), String> {
        let series: Vec<Vec<(f64, f64)>> = self
            .series
            .iter()
            .map(|s| {
                s.points
                    .iter()
                    .filter_map(|&(x, y)| Some((self.x_axis.map(x)?, self.y_axis.map(y)?)))
                    .collect()
            })
            .collect();
        let all = || series.iter().flatten();
        let bounds = |f: fn(&(f64, f64)) -> f64| {
            all().map(f).fold(None, |acc: Option<(f64, f64)>, v| {
                Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
            })
        };
        let (x0, x1) = bounds(|p| p.0).unwrap_or((0.0, 1.0));
        let (y0, y1) = bounds(|p| p.1).unwrap_or((0.0, 1.0));
        let (x0, x1) = self.x_axis.range(x0, x1);
        let (y0, y1) = self.y_axis.range(y0, y1);
        // Room above the data for the legend (upper left), so that it hides no point.
        let legend = (LEGEND_ROW_PX * self.series.len() as f64 + 16.0) / PLOT_HEIGHT_PX;
        let y1 = y0 + (y1 - y0) / (1.0 - legend.min(0.6));
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let (xa, ya) = (self.x_axis, self.y_axis);
        let x_fmt = move |v: &f64| xa.label(*v);
        let y_fmt = move |v: &f64| ya.label(*v);
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(xa.labels(x0, x1))
            .y_labels(ya.labels(y0, y1))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .light_line_style(WHITE.mix(0.0))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (s, points)) in self.series.iter().zip(series).enumerate() {
            let color = COLORS[i % COLORS.len()];
            match self.style {
                Style::Lines => chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))),
                Style::Points => chart
                    .draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| err(&e))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled())),
            };
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// Text for XML content and attributes.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels_read_as_values() {
        assert_eq!(Axis::Percentile.label(0.0), "0%");
        assert_eq!(Axis::Percentile.label(1.0), "90%");
        assert_eq!(Axis::Percentile.label(2.0), "99%");
        assert_eq!(Axis::Percentile.label(3.0), "99.9%");
        assert_eq!(Axis::Percentile.label(5.0), "99.999%");
        assert_eq!(Axis::Log.label(2.0), "100");
        assert_eq!(Axis::Log.label(-1.0), "0.1");
        assert_eq!(Axis::Rounds.label(2.0), "2");
        assert_eq!(Axis::Rounds.label(2.5), "");
        assert_eq!(number(1234.5), "1234");
        assert_eq!(number(12.0), "12");
        assert_eq!(number(1.5), "1.5");
    }
}
