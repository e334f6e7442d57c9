//! Writes a synthetic retail-banking customer base and 12 months of behaviour per customer, as in
//! seed 001: `customer_base.csv` (one row per customer) and `customer_behavior_assets.csv` (one
//! row per customer and month), seeded, so the same arguments give the same bytes.
//!
//!   cargo run --release --example gen_customers -- --customers 10000 --seed 1 --out examples/customers
//!
//! Customers differ in wealth (a log-normal balance level that grows with age and income band),
//! in how digital they are (younger ones log in more), and in trend (some save, some draw down);
//! months add seasonality (December spending, January deposits) and noise. Customers who signed
//! up during the year have no rows before their signup month.

use std::io::{BufWriter, Write};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Normal, Poisson};

const REGIONS: [&str; 5] = ["north", "south", "east", "west", "central"];
const SEGMENTS: [&str; 3] = ["mass", "affluent", "private"];
const INCOME_BANDS: [&str; 5] = ["<25k", "25-50k", "50-100k", "100-200k", ">200k"];
const YEAR: i32 = 2024;

struct Args {
    customers: usize,
    seed: u64,
    out: std::path::PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        customers: 10_000,
        seed: 1,
        out: "examples/customers".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--customers" => args.customers = value()?.parse().map_err(|e| format!("--customers: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--out" => args.out = value()?.into(),
            other => return Err(format!("unknown argument `{other}` (usage: gen_customers [--customers N] [--seed S] [--out DIR])")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("gen_customers: {message}");
            std::process::exit(2);
        }
    };
    if let Err(e) = write(&args) {
        eprintln!("gen_customers: {e}");
        std::process::exit(1);
    }
}

fn write(args: &Args) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut base = BufWriter::new(std::fs::File::create(args.out.join("customer_base.csv"))?);
    let mut behavior = BufWriter::new(std::fs::File::create(
        args.out.join("customer_behavior_assets.csv"),
    )?);
    writeln!(
        base,
        "customer_id,signup_date,age,region,segment,income_band"
    )?;
    writeln!(
        behavior,
        "customer_id,month,balance,deposits,withdrawals,transactions,products_held,digital_logins"
    )?;
    let noise = Normal::new(0.0, 0.08).map_err(std::io::Error::other)?;
    for id in 1..=args.customers {
        let age: u32 = rng.random_range(18..=85);
        let income = {
            let base = ((age as f64 - 18.0) / 20.0).min(2.5) + rng.random_range(-1.0..1.5);
            (base.round().clamp(0.0, 4.0)) as usize
        };
        let segment = match income {
            4 if rng.random_bool(0.6) => 2,
            3 | 4 => 1,
            _ if rng.random_bool(0.05) => 1,
            _ => 0,
        };
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        // Most signed up years ago; about one in ten during the year.
        let (signup_year, signup_month) = if rng.random_bool(0.1) {
            (YEAR, rng.random_range(1..=12))
        } else {
            (rng.random_range(2005..YEAR), rng.random_range(1..=12))
        };
        let signup_day = rng.random_range(1..=28);
        writeln!(
            base,
            "{id},{signup_year}-{signup_month:02}-{signup_day:02},{age},{region},{},{}",
            SEGMENTS[segment], INCOME_BANDS[income]
        )?;
        let level = LogNormal::new(7.5 + 0.6 * income as f64 + 0.8 * segment as f64, 0.9)
            .map_err(std::io::Error::other)?
            .sample(&mut rng);
        let trend: f64 = rng.random_range(-0.04..0.05);
        let digital = (4.0 - (age as f64 - 18.0) / 20.0).max(0.2) * rng.random_range(0.3..2.0);
        let activity = 4.0 + 3.0 * income as f64 * rng.random_range(0.5..1.5);
        let mut products: u32 = 1 + (segment as u32) + u32::from(rng.random_bool(0.3));
        for month in 1..=12u32 {
            if signup_year == YEAR && month < signup_month {
                continue;
            }
            let season = match month {
                1 => 1.10,
                12 => 0.92,
                _ => 1.0,
            };
            let balance = (level
                * (1.0 + trend).powi(month as i32)
                * season
                * (1.0 + noise.sample(&mut rng)))
            .max(0.0);
            let deposits = (balance * rng.random_range(0.05..0.25) * season).max(0.0);
            let withdrawals = (deposits * rng.random_range(0.6..1.3) / season).max(0.0);
            let transactions = Poisson::new(activity)
                .map_err(std::io::Error::other)?
                .sample(&mut rng) as u32;
            let logins = Poisson::new(digital * 4.0)
                .map_err(std::io::Error::other)?
                .sample(&mut rng) as u32;
            if rng.random_bool(0.03) {
                products = (products + 1).min(6);
            }
            writeln!(
                behavior,
                "{id},{YEAR}-{month:02},{balance:.2},{deposits:.2},{withdrawals:.2},{transactions},{products},{logins}"
            )?;
        }
    }
    base.flush()?;
    behavior.flush()
}
