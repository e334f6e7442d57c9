//! Writes an Instacart-like `orders.csv` at any scale, with a seed, and optionally bad rows.
//!
//! ```sh
//! cargo run --release --example gen_orders -- --users 206209 --seed 1 --out orders.csv
//! cargo run --release --example gen_orders -- --users 2500 --seed 7 --bad-rate 0.01 --out examples/instacart/orders.csv
//! ```
//!
//! The schema is the real one (`order_id,user_id,eval_set,order_number,order_dow,
//! order_hour_of_day,days_since_prior_order`), sorted by user and order number. Facts matched
//! (at scale): 4–100 orders per user, mean ≈ 16.6; each user's last order is `train` or `test`
//! (131,209 : 75,000), earlier ones `prior`; `days_since_prior_order` empty on a user's first
//! order, otherwise an integer 0–30 written as `15.0`, capped at 30 (30 ≈ 11.5 % of values, 7 ≈
//! 10 %, quartiles 4 / 7 / 15, mean ≈ 10.9); about 70 % of users have at least one 30. Users
//! differ: each has a typical gap and a propensity to hit the cap.
//!
//! With `--bad-rate R`, a share R of extra rows is inserted, each with one defect the clean stage
//! handles: a day of week or hour out of range, an unknown or miscased `eval_set`, an exact
//! duplicate, all of order_id/user_id/days empty, a missing order_id or user_id, a day count far
//! above 30, or a value that is not a number.

use std::io::{BufWriter, Write};

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Gamma, LogNormal};

/// Share of orders on each day of the week (Instacart's, 0 = Sunday).
const DOW: [f64; 7] = [0.176, 0.174, 0.139, 0.127, 0.124, 0.132, 0.138];
/// Share of orders by hour of day.
const HOUR: [f64; 24] = [
    0.007, 0.004, 0.002, 0.002, 0.002, 0.003, 0.009, 0.028, 0.053, 0.076, 0.085, 0.084, 0.080,
    0.080, 0.083, 0.082, 0.079, 0.065, 0.051, 0.039, 0.030, 0.024, 0.020, 0.012,
];

struct Args {
    users: usize,
    seed: u64,
    bad_rate: f64,
    out: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        users: 2500,
        seed: 1,
        bad_rate: 0.0,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--users" => args.users = value()?.parse().map_err(|e| format!("--users: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--bad-rate" => args.bad_rate = value()?.parse().map_err(|e| format!("--bad-rate: {e}"))?,
            "--out" => args.out = Some(value()?),
            other => return Err(format!("unknown argument `{other}` (usage: gen_orders --users N [--seed S] [--bad-rate R] [--out PATH])")),
        }
    }
    Ok(args)
}

fn pick(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

struct Order {
    user: usize,
    number: usize,
    eval_set: &'static str,
    dow: usize,
    hour: usize,
    days: Option<u32>,
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(2);
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let p30 = Beta::new(10.0, 77.0).expect("valid beta");
    let scale = LogNormal::new(0.0, 0.45).expect("valid lognormal");

    let mut orders = Vec::new();
    for user in 1..=args.users {
        // 4 + a geometric count with mean ≈ 12.6, capped at 100 (as Instacart's histories are).
        let extra = (rng.random::<f64>().max(f64::MIN_POSITIVE).ln() / (1.0f64 - 1.0 / 13.6).ln())
            .floor() as usize;
        let n = (4 + extra).min(100);
        let user_p30 = p30.sample(&mut rng);
        let user_scale = 8.1 * scale.sample(&mut rng);
        let gap: Gamma<f64> = Gamma::new(1.5, user_scale / 1.5).expect("valid gamma");
        let last_set = if rng.random::<f64>() < 131_209.0 / 206_209.0 {
            "train"
        } else {
            "test"
        };
        for number in 1..=n {
            let days = if number == 1 {
                None
            } else if rng.random::<f64>() < user_p30 {
                Some(30)
            } else if rng.random::<f64>() < 0.065 {
                Some(7)
            } else {
                Some((gap.sample(&mut rng).round() as u32).min(29))
            };
            let dow = pick(&mut rng, &DOW);
            orders.push(Order {
                user,
                number,
                eval_set: if number == n { last_set } else { "prior" },
                dow,
                hour: pick(&mut rng, &HOUR),
                days,
            });
        }
    }
    let mut ids: Vec<u32> = (1..=orders.len() as u32).collect();
    ids.shuffle(&mut rng);

    let sink: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::fs::File::create(path).unwrap_or_else(|e| {
            eprintln!("error: cannot create {path}: {e}");
            std::process::exit(1);
        })),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(sink);
    let result = (|| -> std::io::Result<()> {
        writeln!(out, "order_id,user_id,eval_set,order_number,order_dow,order_hour_of_day,days_since_prior_order")?;
        for (order, id) in orders.iter().zip(&ids) {
            let days = order.days.map(|d| format!("{d}.0")).unwrap_or_default();
            let line = [
                id.to_string(),
                order.user.to_string(),
                order.eval_set.to_owned(),
                order.number.to_string(),
                order.dow.to_string(),
                order.hour.to_string(),
                days,
            ];
            writeln!(out, "{}", line.join(","))?;
            if args.bad_rate > 0.0 && rng.random::<f64>() < args.bad_rate {
                writeln!(out, "{}", bad_row(&mut rng, &line).join(","))?;
            }
        }
        out.flush()
    })();
    if let Err(e) = result {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// A copy of `line` with one defect.
fn bad_row(rng: &mut ChaCha8Rng, line: &[String; 7]) -> [String; 7] {
    let mut row = line.clone();
    match rng.random_range(0..8) {
        0 => row[4] = ["7", "9", "-1"][rng.random_range(0..3)].to_owned(),
        1 => row[5] = ["24", "25", "-3", "99"][rng.random_range(0..4)].to_owned(),
        2 => row[2] = ["Prior", "TRAIN", "unknown", "Test", ""][rng.random_range(0..5)].to_owned(),
        3 => {} // an exact duplicate
        4 => {
            row[0].clear();
            row[1].clear();
            row[6].clear();
        }
        5 => {
            let field = rng.random_range(0..2);
            row[field].clear();
        }
        6 => row[6] = format!("{}.0", rng.random_range(45..400)),
        _ => {
            let field = [3, 6][rng.random_range(0..2)];
            row[field] = ["abc", "7x", "n/a"][rng.random_range(0..3)].to_owned();
        }
    }
    row
}
