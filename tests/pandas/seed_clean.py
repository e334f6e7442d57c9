"""The seed's clean_orders (seed 000, section 4.1), run by tests/pandas.rs to compare with imba.

One change: the seed casts with `astype(int)`, which raises on a missing or malformed value, so it
cannot run on dirty data at all. imba's documented cast turns such a value into a null and keeps
the row, which is what `pd.to_numeric(errors="coerce")` does; everything else is the seed's code.
Prints the seed's stats dict as JSON.
"""
import json
import sys

import pandas as pd


def clean_orders(df, eval_sets=("prior", "train", "test"), iqr_k=1.5):
    df0 = df.copy()
    stats = {"initial": len(df0)}
    df1 = df0.copy()
    for column in ["order_id", "user_id", "order_number", "order_dow", "order_hour_of_day", "days_since_prior_order"]:
        df1[column] = pd.to_numeric(df1[column], errors="coerce")
    stats["after_cast"] = len(df1)
    before = len(df1)
    df2 = df1[df1.eval_set.isin(list(eval_sets)) & df1.order_dow.between(0, 6) & df1.order_hour_of_day.between(0, 23)]
    stats["after_domain"] = len(df2)
    stats["removed_domain"] = before - stats["after_domain"]
    before = len(df2)
    q1, q3 = df2["days_since_prior_order"].quantile([0.25, 0.75])
    iqr = q3 - q1
    lower, upper = q1 - iqr_k * iqr, q3 + iqr_k * iqr
    df3 = df2[df2.days_since_prior_order.between(lower, upper) | df2.days_since_prior_order.isna()]
    stats["after_iqr"] = len(df3)
    stats["removed_iqr"] = before - stats["after_iqr"]
    stats["iqr_bounds"] = {"q1": q1, "q3": q3, "lower": lower, "upper": upper}
    before = len(df3)
    df4 = df3.dropna(subset=["order_id", "user_id", "days_since_prior_order"], how="all")
    df4 = df4.drop_duplicates().reset_index(drop=True)
    stats["after_dropna_dedup"] = len(df4)
    stats["removed_dropna_dedup"] = before - stats["after_dropna_dedup"]
    return df4, stats


if __name__ == "__main__":
    orders = pd.read_csv(sys.argv[1])
    _, stats = clean_orders(orders)
    print(json.dumps(stats, default=float))
