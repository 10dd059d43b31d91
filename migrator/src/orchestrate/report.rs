//! The SVG timeline of a `migrator migrate` run: the link's throughput, the
//! guest's dirty rate, and the phases.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Report;

const COLORS: [RGBColor; 8] = [
    RGBColor(0xcf, 0xe2, 0xf3),
    RGBColor(0xd9, 0xea, 0xd3),
    RGBColor(0xff, 0xf2, 0xcc),
    RGBColor(0xf4, 0xcc, 0xcc),
    RGBColor(0xea, 0xd1, 0xdc),
    RGBColor(0xd0, 0xe0, 0xe3),
    RGBColor(0xfc, 0xe5, 0xcd),
    RGBColor(0xd9, 0xd2, 0xe9),
];

/// Throughput (MB/s) between consecutive samples.
fn rates(r: &Report) -> Vec<(f64, f64, f64)> {
    r.samples
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let dt = w[1].0 - w[0].0;
            (
                w[1].0,
                w[1].1.saturating_sub(w[0].1) as f64 / dt / 1e6,
                w[1].2 as f64 / 1e6,
            )
        })
        .collect()
}

pub fn write_svg(r: &Report, path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pts = rates(r);
    let t_max = r
        .total_s
        .max(pts.last().map(|p| p.0).unwrap_or(0.0))
        .max(0.1);
    let y_max = pts.iter().map(|p| p.1.max(p.2)).fold(1.0f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: {} → {} in {:.1} s", r.service, r.from, r.to, r.total_s),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MB/s")
        .draw()
        .map_err(|e| err(&e))?;
    // phases as bands
    for (i, (start, name)) in r.phases.iter().enumerate() {
        let end = r.phases.get(i + 1).map(|p| p.0).unwrap_or(t_max);
        if end <= *start {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*start, 0.0), (end, y_max)],
                color.filled(),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                name.clone(),
                (*start, y_max * 0.97),
                ("sans-serif", 12),
            )))
            .map_err(|e| err(&e))?;
    }
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("link throughput (disk + memory frames)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.2)),
            RED.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("dirty (MB: disk set, or memory per second)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_timeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Report {
            service: "web1".into(),
            from: "siteA".into(),
            to: "siteB".into(),
            total_s: 3.0,
            phases: vec![
                (0.0, "prepare".into()),
                (0.2, "bulk copy".into()),
                (2.0, "memory".into()),
            ],
            samples: vec![(0.2, 0, 0), (1.0, 10_000_000, 65536), (2.0, 30_000_000, 0)],
            ..Report::default()
        };
        let p = dir.path().join("t.svg");
        write_svg(&r, &p).expect("svg");
        let svg = std::fs::read_to_string(&p).expect("read");
        assert!(
            svg.starts_with("<svg") && svg.contains("memory") && svg.contains("<polyline"),
            "{svg}"
        );
    }
}
