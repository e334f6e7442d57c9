//! Draws docs/img/censoring.svg: the monthly sample's observed `days_imp` beside the values PMM
//! and the `censored` method impute for the users whose gap hit Instacart's 30-day cap.
//!
//! ```sh
//! imba run pipelines/monthly.yaml
//! cargo run --example censoring_figure -- out/monthly/aggregated/user_imp.parquet docs/img/censoring.svg
//! ```

use imba_stages::stats::mice::{impute, Method, Spec};
use plotters::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: censoring_figure USER_IMP.parquet OUT.svg".into());
    };
    let users = imba_stages::io::table::read_table(std::path::Path::new(input))?;
    let column = |name: &str| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let values = users
            .column(name)?
            .cast(&imba_stages::polars::prelude::DataType::Float64)?;
        Ok(values
            .f64()?
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect())
    };
    let (days, frequency) = (column("days_imp")?, column("frequency")?);
    let missing: Vec<usize> = (0..days.len()).filter(|&r| days[r].is_nan()).collect();
    let imputed = |method: Method| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        let spec = Spec {
            m: 7,
            iterations: 10,
            seed: 2024,
            donors: 5,
            methods: vec![method, Method::Pmm],
            predictors: vec![vec![1], vec![0]],
        };
        let result =
            impute(&[days.clone(), frequency.clone()], &spec).map_err(|e| format!("{e:?}"))?;
        Ok(result
            .chains
            .iter()
            .flat_map(|c| missing.iter().map(|&r| c.columns[0][r]))
            .collect())
    };
    let pmm = imputed(Method::Pmm)?;
    let censored = imputed(Method::Censored {
        at: 30.0,
        above: true,
    })?;
    let observed: Vec<f64> = days.iter().copied().filter(|v| !v.is_nan()).collect();

    // Share of each series per 1-day bin, 0–50.
    let shares = |values: &[f64]| -> Vec<(f64, f64)> {
        let mut counts = vec![0usize; 50];
        for v in values {
            let bin = (v.floor().max(0.0) as usize).min(49);
            counts[bin] += 1;
        }
        counts
            .iter()
            .enumerate()
            .map(|(b, c)| (b as f64 + 0.5, *c as f64 / values.len() as f64))
            .collect()
    };
    let series = [
        (
            "observed days_imp (all below the cap)",
            shares(&observed),
            RGBColor(120, 120, 120),
        ),
        (
            "imputed by pmm (the default, as the seed)",
            shares(&pmm),
            RGBColor(31, 119, 180),
        ),
        (
            "imputed by censored {at: 30}",
            shares(&censored),
            RGBColor(255, 127, 14),
        ),
    ];
    let top = series
        .iter()
        .flat_map(|(_, s, _)| s.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(output, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "days_imp of users whose longest gap hit the 30-day cap (monthly sample)",
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..50f64, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("days (1-day bins)")
        .y_desc("share of the series")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .disable_mesh()
        .draw()?;
    for (label, points, color) in &series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(
            vec![(30.0, 0.0), (30.0, top)],
            BLACK.stroke_width(1),
        ))?
        .label("the cap: a true value here is ≥ 30")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "observed mean {:.2}; imputed mean: pmm {:.2} (max {}), censored {:.2} (min {:.2})",
        mean(&observed),
        mean(&pmm),
        pmm.iter().cloned().fold(f64::MIN, f64::max),
        mean(&censored),
        censored.iter().cloned().fold(f64::MAX, f64::min)
    );
    Ok(())
}
