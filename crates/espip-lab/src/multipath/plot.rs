//! `--plot FILE.svg`: the throughput of the cut transfer, of the stream (what B's receiving
//! socket took in order) and of each path (what A sent on it), in half-second bins, with the
//! cut marked.

use plotters::prelude::*;
use std::io;
use std::path::Path;
use std::time::Duration;

/// Half a second: each point is what moved in one bin, as Mbit/s.
const BIN: f64 = 0.5;

/// Mbit/s per bin from cumulative byte counters sampled at the given times.
pub(super) fn rates(samples: &[(Duration, u64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let Some(&(t0, _)) = samples.first() else {
        return out;
    };
    let mut bin_start = (t0, samples[0].1);
    for &(t, b) in samples {
        let dt = (t - bin_start.0).as_secs_f64();
        if dt >= BIN {
            let mbit = b.saturating_sub(bin_start.1) as f64 * 8.0 / dt / 1e6;
            out.push(((bin_start.0.as_secs_f64() + t.as_secs_f64()) / 2.0, mbit));
            bin_start = (t, b);
        }
    }
    out
}

/// Draw the stream and each path over time, the cut as a vertical line, into `file` (SVG).
pub(super) fn draw(
    file: &Path,
    title: &str,
    stream: &[(f64, f64)],
    paths: &[(String, Vec<(f64, f64)>)],
    cut_at: Option<f64>,
) -> io::Result<()> {
    let err = |e: &dyn std::fmt::Display| io::Error::other(format!("plot {}: {e}", file.display()));
    let xmax = stream
        .iter()
        .chain(paths.iter().flat_map(|(_, p)| p.iter()))
        .map(|(t, _)| *t)
        .fold(1.0, f64::max);
    let ymax = stream
        .iter()
        .chain(paths.iter().flat_map(|(_, p)| p.iter()))
        .map(|(_, r)| *r)
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(file, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 13))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the transfer started")
        .y_desc("Mbit/s (0.5 s bins)")
        .draw()
        .map_err(|e| err(&e))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN];
    chart
        .draw_series(LineSeries::new(
            stream.iter().copied(),
            BLACK.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("the TCP stream (B, in order)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    for (i, (name, p)) in paths.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied(), c))
            .map_err(|e| err(&e))?
            .label(format!("{name} (sent by A)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    if let Some(t) = cut_at {
        chart
            .draw_series(LineSeries::new(
                [(t, 0.0), (t, ymax)],
                RED.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("link 1 cut")
            .legend(|(x, y)| PathElement::new(vec![(x, y - 6), (x, y + 6)], RED));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_turn_counters_into_rates_and_the_svg_is_written() {
        // 1 MB every 100 ms is 80 Mbit/s.
        let s: Vec<(Duration, u64)> = (0..=30)
            .map(|i| (Duration::from_millis(i * 100), i * 1_000_000))
            .collect();
        let r = rates(&s);
        assert_eq!(r.len(), 6);
        assert!(r.iter().all(|(_, m)| (m - 80.0).abs() < 1e-6), "{r:?}");
        let dir = std::env::temp_dir().join(format!("espip-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.svg");
        draw(&f, "test", &r, &[("link1".into(), r.clone())], Some(1.0)).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("link 1 cut"),
            "{}",
            &text[..200.min(text.len())]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
