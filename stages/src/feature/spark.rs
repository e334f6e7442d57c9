//! `feature` on Spark: the groups as Spark SQL aggregations joined on the entity, the derived
//! features over them, rows sorted by the entity; each column of the type the local engine gives.
//!
//! The features are written for polars SQL. Each one is parsed as polars parses it and printed
//! as the Spark SQL that reads the same ([`crate::spark_sql::expression`]). The local engine then
//! computes the features of empty tables with the inputs' schemas (a Parquet footer each), and
//! Spark describes its plan: a feature whose kind of value differs (a decimal where polars gives
//! a float, a float where it gives an integer) is refused before anything runs, naming it.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::*;
use crate::spark_sql::{
    conformed, expression, first_repeat, ident, Failure, Input, Session, Unsupported,
};

/// Whether these params can run on Spark: the features are written as Parquet, and every SQL
/// text reads as Spark SQL.
pub(crate) fn supports(params: &FeatureParams) -> Result<(), Unsupported> {
    if params.formats.iter().any(|f| *f != Format::Parquet) {
        return Err(Unsupported {
            param: "/formats".to_owned(),
            why: "on Spark, features are written as Parquet only (a CSV of floats is printed differently there): write the CSV on the local engine".to_owned(),
        });
    }
    spark_texts(params).map(|_| ())
}

/// Every SQL text of the params as Spark SQL, by JSON pointer.
fn spark_texts(params: &FeatureParams) -> Result<BTreeMap<String, String>, Unsupported> {
    let mut texts = BTreeMap::new();
    let mut add = |at: String, sql: &str| match expression(sql) {
        Ok(spark) => {
            texts.insert(at, spark);
            Ok(())
        }
        Err(why) if why.starts_with("no exact equivalent") => Err(Unsupported { param: at, why }),
        Err(why) => Err(Unsupported {
            param: at,
            why: format!("does not read as SQL: {why}"),
        }),
    };
    for (index, group) in params.groups.iter().enumerate() {
        let index = index.to_string();
        if let Some(filter) = &group.filter {
            add(pointer(&["groups", &index, "where"]), filter)?;
        }
        for (at, _, definition) in located(&group.features, &["groups", &index, "features"]) {
            add(at, definition.sql())?;
        }
    }
    for (at, _, definition) in located(&params.derive, &["derive"]) {
        add(at, definition.sql())?;
    }
    Ok(texts)
}

/// Runs `feature` on Spark over `inputs` (Parquet tables, each in a view) and writes the table.
/// Returns the summary the local engine gives.
pub(crate) fn run<S: Session>(
    params: &FeatureParams,
    inputs: &[Input],
    session: &mut S,
) -> Result<Json, Failure<S::Error>> {
    let texts = spark_texts(params).map_err(|u| StageError::new(u.why).at_param(u.param))?;
    // What the local engine gives: its errors, its columns and their types.
    let mut empty = BTreeMap::new();
    for input in inputs {
        empty.insert(
            input.name.clone(),
            crate::io::table::empty_parquet(&input.path)?,
        );
    }
    let local = compute(params, &empty)?;
    let entity = ident(&params.entity);
    // Where each output column is defined, for messages.
    let mut defined: BTreeMap<String, String> = BTreeMap::new();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (index, group) in params.groups.iter().enumerate() {
        let index = index.to_string();
        // `t`, as the local engine names the group's table.
        let view = inputs
            .iter()
            .find(|i| i.name == group.from)
            .map(|i| format!("{} t", i.view))
            .ok_or_else(|| StageError::new(format!("no input `{}`", group.from)))?;
        let filter = match &group.filter {
            Some(_) => format!(
                " WHERE {entity} IS NOT NULL AND ({})",
                texts[&pointer(&["groups", &index, "where"])]
            ),
            None => format!(" WHERE {entity} IS NOT NULL"),
        };
        let (query, names) = if !group.features.is_empty() {
            let mut selected = Vec::new();
            let mut names = Vec::new();
            for (at, feature, _) in located(&group.features, &["groups", &index, "features"]) {
                selected.push(format!("{} AS {}", texts[&at], ident(feature)));
                names.push(feature.clone());
                defined.insert(feature.clone(), at);
            }
            let query = format!(
                "SELECT {entity}, {} FROM {view}{filter} GROUP BY {entity}",
                selected.join(", ")
            );
            (query, names)
        } else {
            let columns: Vec<String> = group.columns.iter().map(|c| ident(c)).collect();
            let query = format!(
                "SELECT {entity}, {} FROM {view}{filter}",
                columns.join(", ")
            );
            one_row_per_entity(params, group, &index, &view, &filter, session)?;
            for column in &group.columns {
                defined.insert(column.clone(), pointer(&["groups", &index, "columns"]));
            }
            (query, group.columns.clone())
        };
        groups.push((query, names));
    }
    // The groups joined on the first one's entities.
    let mut selected = vec![format!("g0.{entity}")];
    let mut from = String::new();
    for (i, (query, names)) in groups.iter().enumerate() {
        selected.extend(names.iter().map(|n| format!("g{i}.{}", ident(n))));
        if i == 0 {
            from = format!("({query}) g0");
        } else {
            from = format!("{from} LEFT JOIN ({query}) g{i} ON g0.{entity} = g{i}.{entity}");
        }
    }
    let mut sql = format!("SELECT {} FROM {from}", selected.join(", "));
    for (at, feature, _) in located(&params.derive, &["derive"]) {
        sql = format!(
            "SELECT d.*, ({}) AS {} FROM ({sql}) d",
            texts[&at],
            ident(feature)
        );
        defined.insert(feature.clone(), at);
    }
    // Each column of the local type, where Spark's holds the same kind of value.
    let described = session
        .columns(&format!("QUERY {sql}"))
        .map_err(Failure::Session)?;
    let mut typed = Vec::new();
    for (column, (name, spark_type)) in local.columns().iter().zip(&described) {
        if column.name().as_str() != name {
            return Err(StageError::new(format!(
                "internal error: Spark names column `{name}` where the local engine has `{}`",
                column.name()
            ))
            .into());
        }
        let local_type = column.dtype();
        let Some(to) = conformed(local_type, spark_type) else {
            let e = StageError::new(format!(
                "`{name}` is {spark_type} on Spark and {local_type} on the local engine, so their values would differ (write a float literal as `1.0`, or cast the expression)"
            ));
            return Err(match defined.get(name.as_str()) {
                Some(at) => e.at_param(at.clone()),
                None => e,
            }
            .into());
        };
        typed.push(format!("CAST({0} AS {to}) AS {0}", ident(name)));
    }
    if described.len() != local.width() {
        return Err(StageError::new(format!(
            "Spark gives {} columns where the local engine gives {}",
            described.len(),
            local.width()
        ))
        .into());
    }
    let sql = format!(
        "SELECT {} FROM ({sql}) o ORDER BY {entity}",
        typed.join(", ")
    );
    let rows = session.write(&sql).map_err(Failure::Session)?;
    Ok(summary(params, rows))
}

/// Refuses a `columns:` group whose table repeats an entity, as the local engine does: the
/// number of rows that repeat one, and the first of them in file order as an example.
fn one_row_per_entity<S: Session>(
    params: &FeatureParams,
    group: &Group,
    index: &str,
    view: &str,
    filter: &str,
    session: &mut S,
) -> Result<(), Failure<S::Error>> {
    let entity = ident(&params.entity);
    let repeats = crate::spark_sql::count(
        session,
        &format!("SELECT count(1) - count(DISTINCT {entity}) FROM {view}{filter}"),
    )?;
    if repeats == 0 {
        return Ok(());
    }
    let first = session
        .rows(&first_repeat(&entity, &format!("{view}{filter}")))
        .map_err(Failure::Session)?;
    let key = match first.first().and_then(|r| r.get(1)) {
        Some(Json::String(s)) => format!("\"{s}\""),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    Err(repeated_entity(params, group, index, repeats, &key).into())
}
