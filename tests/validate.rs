//! `imba validate` on bad pipelines: every error rendered whole, with its span, exit code 2.

mod common;

use common::Test;
use insta::assert_snapshot;

fn validate(yaml: &str) -> String {
    let out = Test::new()
        .pipeline(yaml)
        .args(&["validate", "pipeline.yaml"])
        .run();
    out.all()
}

#[test]
fn yaml_syntax_error() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: [echo, hi\n    outputs: [x]\n"
    ));
}

#[test]
fn yaml_bad_indentation() {
    assert_snapshot!(validate("stages:\n  a:\n    cmd: echo\n   outputs: [x]\n"));
}

#[test]
fn unknown_keys_suggest_the_right_one() {
    assert_snapshot!(validate(
        "varz:\n  out: o\nstages:\n  a:\n    cmd: echo\n    inptus: [x]\n    outptus: [y]\n    colour: red\n"
    ));
}

#[test]
fn wrong_value_types() {
    assert_snapshot!(validate(
        "workdir: [a]\nstages:\n  a:\n    cmd: {run: echo}\n    inputs: 3\n    outputs:\n      x: [a, b]\n    params: [1]\n  b: just a string\n"
    ));
}

#[test]
fn both_uses_and_cmd() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    uses: clean\n    cmd: echo hi\n"
    ));
}

#[test]
fn neither_uses_nor_cmd() {
    assert_snapshot!(validate("stages:\n  a:\n    outputs: [x]\n"));
}

#[test]
fn unknown_builtin() {
    assert_snapshot!(validate("stages:\n  a:\n    uses: clen\n"));
}

#[test]
fn undefined_template_variables() {
    assert_snapshot!(validate(
        "vars:\n  out: out\nstages:\n  a:\n    cmd: echo {{ ouput }} > {{ outputs.reslt }}\n    outputs:\n      result: \"{{ out }}/a.txt\"\n  b:\n    matrix:\n      month: [\"01\", \"02\"]\n    cmd: echo {{ item.mnth }}\n"
    ));
}

#[test]
fn two_stages_write_the_same_path() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    outputs: [out/x.csv]\n  b:\n    cmd: echo\n    outputs: [./out/x.csv]\n"
    ));
}

#[test]
fn an_output_inside_another_stages_directory() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    outputs: [out/]\n  b:\n    cmd: echo\n    outputs: [out/b/x.csv]\n"
    ));
}

#[test]
fn a_stage_reading_its_own_output() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    inputs: [out/a.txt]\n    outputs: [out/a.txt]\n"
    ));
}

#[test]
fn a_cycle_is_named_whole() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    inputs: [c.txt]\n    outputs: [a.txt]\n  b:\n    cmd: echo\n    inputs: [a.txt]\n    outputs: [b.txt]\n  c:\n    cmd: echo\n    inputs: [b.txt]\n    outputs: [c.txt]\n"
    ));
}

#[test]
fn a_cycle_through_a_directory() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    inputs: [b/part.csv]\n    outputs: [a/]\n  b:\n    cmd: echo\n    inputs: [a/]\n    outputs: [b/]\n"
    ));
}

#[test]
fn a_missing_source_input() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    outputs: [out/orders.csv]\n  b:\n    cmd: echo\n    inputs: [out/order.csv, data/raw.csv]\n    outputs: [out/b.csv]\n"
    ));
}

#[test]
fn an_empty_file() {
    assert_snapshot!(validate(""));
}

#[test]
fn no_stages() {
    assert_snapshot!(validate("vars:\n  out: o\nstages: {}\n"));
}

#[test]
fn not_a_map() {
    assert_snapshot!(validate("- a\n- b\n"));
}

#[test]
fn a_key_given_twice() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n  a:\n    cmd: echo\n"
    ));
}

#[test]
fn matrix_and_foreach_errors() {
    assert_snapshot!(validate(
        "vars:\n  months: []\nstages:\n  a:\n    matrix:\n      m: \"{{ months }}\"\n    cmd: echo\n  b:\n    foreach: 3\n    cmd: echo\n  c:\n    matrix: {x: [1]}\n    foreach: [1]\n    cmd: echo\n  d:\n    foreach: [x, x]\n    cmd: echo\n"
    ));
}

#[test]
fn bad_paths() {
    assert_snapshot!(validate(
        "stages:\n  a:\n    cmd: echo\n    outputs: [\"s3://\", \"gs://b/k\", \"\", s3://bucket]\n"
    ));
}

#[test]
fn invalid_stage_name() {
    assert_snapshot!(validate("stages:\n  \"my stage\":\n    cmd: echo\n"));
}

#[test]
fn every_problem_is_reported_in_one_run() {
    // Shape errors in one stage do not hide template errors in another.
    let out = Test::new()
        .pipeline("stages:\n  a:\n    cmd: echo\n    inptus: [x]\n  b:\n    cmd: echo {{ nope }}\n  c:\n    uses: nope\n")
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_eq!(out.code, 2);
    assert_snapshot!(out.all());
}

#[test]
fn unreadable_pipeline_files() {
    let t = Test::new()
        .file("bad.yaml", b"stages:\n  a:\n    cmd: \xff\xfe\n")
        .file("dir/x", "");
    let missing = t.exec(&["validate", "nope.yaml"]);
    let directory = t.exec(&["validate", "dir"]);
    let not_utf8 = t.exec(&["validate", "bad.yaml"]);
    assert_snapshot!(format!(
        "{}\n{}\n{}",
        missing.all(),
        directory.all(),
        not_utf8.all()
    ));
}

#[test]
fn a_valid_pipeline() {
    let out = Test::new()
        .file("data/in.csv", "a\n1\n")
        .pipeline("vars:\n  out: out\nstages:\n  a:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [data/in.csv]\n    outputs: [\"{{ out }}/a.csv\"]\n  b:\n    cmd: wc -l {{ inputs.a }} > {{ outputs.n }}\n    inputs: {a: \"{{ out }}/a.csv\"}\n    outputs: {n: \"{{ out }}/n.txt\"}\n")
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_snapshot!(out.all());
}

#[test]
fn vars_file_problems() {
    let t = Test::new()
        .pipeline("vars:\n  out: o\nstages:\n  a:\n    cmd: echo {{ out }}\n")
        .file("list.yaml", "- a\n")
        .file("broken.yaml", "out: [\n");
    let not_a_map = t.exec(&["validate", "pipeline.yaml", "--vars", "list.yaml"]);
    let broken = t.exec(&["validate", "pipeline.yaml", "--vars", "broken.yaml"]);
    let missing = t.exec(&["validate", "pipeline.yaml", "--vars", "nope.yaml"]);
    assert_snapshot!(format!(
        "{}\n{}\n{}",
        not_a_map.all(),
        broken.all(),
        missing.all()
    ));
}

#[test]
fn a_vars_file_and_sets_apply_in_order() {
    let t = Test::new()
        .pipeline("vars:\n  out: o\n  nested: {a: 1, b: 2}\nstages:\n  a:\n    cmd: echo {{ nested.a }} {{ nested.b }}\n    outputs: [\"{{ out }}/x\"]\n")
        .file("prod.yaml", "out: prod\nnested: {b: 3}\n");
    let out = t.exec(&[
        "dag",
        "pipeline.yaml",
        "--json",
        "--vars",
        "prod.yaml",
        "--set",
        "out=cli",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        json["stages"][0]["outputs"][0]["path"], "cli/x",
        "--set wins over --vars"
    );
}

#[test]
fn built_in_stages_check_their_inputs_and_outputs() {
    assert_snapshot!(validate(
        "stages:\n  two_inputs:\n    uses: clean\n    inputs: [a.csv, b.csv]\n    outputs: [x.parquet]\n  misnamed:\n    uses: aggregate\n    inputs: [a.csv]\n    outputs: {tabel: y.parquet}\n    params: {by: [k], aggs: {n: {count: \"*\"}}}\n  a:\n    cmd: echo\n    outputs: [a.csv, b.csv]\n"
    ));
}

/// A built-in's params that fit their type but not each other (`impute`'s method and predictor
/// names against its columns): every problem at once, each at its param, at validate time.
#[test]
fn builtin_params_that_do_not_fit_each_other() {
    assert_snapshot!(validate(
        "stages:\n  imp:\n    uses: impute\n    inputs: [users.csv]\n    outputs: [out/imputed/]\n    params:\n      columns: [days, freq]\n      id: days\n      method: {dayz: norm}\n      predictors: {days: [days, frq]}\n"
    ));
}

/// Every mistake in `checks:` at once, each at its key or value.
#[test]
fn checks_that_cannot_be_evaluated() {
    assert_snapshot!(validate(
        r#"stages:
  two_tables:
    cmd: touch {{ outputs.a }} {{ outputs.b }}
    outputs: {a: out/a.csv, b: out/b.parquet, dir: out/parts/}
    checks:
      - rows: {min: 10, max: 2}
      - rows: {}
      - change: {metric: median(x)}
      - not_null: []
      - range: {x: [1], y: [5, 1]}
      - sql: ""
      - rows: {min: -1}
        output: a
      - unique: [k]
        rows: {min: 1}
        output: a
      - severity: warning
        output: b
      - outputs: a
        rows: {min: 1}
      - rows: {min: 1}
      - rows: {min: 1}
        output: nope
      - rows: {min: 1}
        output: dir
      - rows: {min: 1}
        output: dir/notes.txt
"#
    ));
}

/// Where the columns of a checked table follow from the source's header and the built-ins'
/// params, a check naming a column that will not be there fails validation.
#[test]
fn checks_naming_columns_the_table_will_not_have() {
    let t = Test::new()
        .file("orders.csv", "order_id,user_id,days\n1,1,3\n")
        .pipeline(
            r#"stages:
  clean:
    uses: clean
    inputs: [orders.csv]
    outputs: {table: out/clean.parquet}
    checks:
      - not_null: [order_id, user]
      - change: {metric: mean(day), max_pct: 5}
  users:
    uses: aggregate
    inputs: [out/clean.parquet]
    outputs: {table: out/users.parquet}
    params:
      by: [user_id]
      aggs: {orders: {count: order_id}}
    checks:
      - unique: [user_id]
      - range: {order: [1, null]}
  shell:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [out/users.parquet]
    outputs: [out/copy.parquet]
    checks:
      - not_null: [anything_goes_for_a_shell_stage]
"#,
        );
    assert_snapshot!(t.exec(&["validate", "pipeline.yaml"]).all());
}

/// `storage:` holds S3 settings, never secrets.
#[test]
fn storage_settings_and_secrets() {
    assert_snapshot!(validate(
        r#"storage:
  endpoint: minio.local:9000
  region: eu-west-1
  path_style: "yes"
  retries: 100
  secret_access_key: abc
  aws_access_key_id: AKIA
  bucket: x
stages:
  s:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [s3://bucket/in.csv]
    outputs: [s3://bucket/out.csv]
"#
    ));
}

/// `version: auto` needs one local directory output; `keep` needs `version`.
#[test]
fn versioned_outputs_that_cannot_be() {
    assert_snapshot!(validate(
        r#"stages:
  two_outputs:
    cmd: touch {{ outputs[0] }} {{ outputs[1] }}
    outputs: [out/a/, out/b/]
    version: auto
  a_file:
    cmd: touch {{ outputs[0] }}
    outputs: [out/c.csv]
    version: auto
    keep: 0
  manual:
    cmd: mkdir -p {{ outputs[0] }}
    outputs: [out/d/]
    version: manual
  keep_alone:
    cmd: mkdir -p {{ outputs[0] }}
    outputs: [out/e/]
    keep: 2
"#
    ));
}

/// A name a param does not know (an aggregation, a method) is named with the choices and the
/// nearest one, never as a raw `oneOf` message; a known name with a wrong value says so.
#[test]
fn an_unknown_choice_is_named_with_the_nearest() {
    let out = Test::new()
        .file("in.csv", "user_id,d\n1,2\n")
        .pipeline(
            r#"
stages:
  agg:
    uses: aggregate
    inputs: {orders: in.csv}
    outputs: {table: out.parquet}
    params:
      by: [user_id]
      aggs:
        n: {summ: d}
        m: {sum: [d, d]}
  imp:
    uses: impute
    inputs: {users: out.parquet}
    outputs: {imputed: imp/}
    params:
      columns: [d]
      method: {d: pmmm}
"#,
        )
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_eq!(out.code, 2);
    assert_snapshot!(out.all());
}

/// One error of each layer, each in a stage of its own: shape, built-in, template, params,
/// a missing file, a cycle, a check's column. One `validate` names them all; the stages that
/// read what a broken stage writes are not blamed for it.
#[test]
fn one_round_names_an_error_of_every_layer() {
    let out = Test::new()
        .file("orders.csv", "user_id,x,day\n1,2,3\n")
        .pipeline(
            r#"stages:
  shaped:
    cmd: echo hi > {{ outputs[0] }}
    outputs: [out/shaped.txt]
    colour: red
  after_shaped:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [out/shaped.txt]
    outputs: [out/after_shaped.txt]
  unknown_builtin:
    uses: cleen
    inputs: {orders: orders.csv}
    outputs: {table: out/u.parquet}
  after_unknown:
    uses: aggregate
    inputs: {orders: out/u.parquet}
    outputs: {table: out/after_unknown.parquet}
    params: {by: [user_id], aggs: {n: {count: x}}}
  templated:
    cmd: echo {{ montth }} > {{ outputs[0] }}
    outputs: [out/t.txt]
  agg:
    uses: aggregate
    inputs: {orders: orders.csv}
    outputs: {table: out/agg.parquet}
    params:
      by: [user_id]
      aggs:
        n: {summ: x}
  missing:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [nope.csv]
    outputs: [out/copy.csv]
  loop_a:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [out/b.txt]
    outputs: [out/a.txt]
  loop_b:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [out/a.txt]
    outputs: [out/b.txt]
  checked:
    uses: aggregate
    inputs: {orders: orders.csv}
    outputs: {table: out/checked.parquet}
    params: {by: [user_id], aggs: {n: {count: x}}}
    checks:
      - not_null: [nn]
"#,
        )
        .args(&["validate", "pipeline.yaml"])
        .run();
    assert_eq!(out.code, 2);
    let headlines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(headlines.len(), 8, "{}", out.stderr);
    assert_eq!(
        headlines[7],
        "error: 7 problems in the pipeline; nothing was run"
    );
    assert!(!out.stderr.contains("after_"), "{}", out.stderr);
    assert_snapshot!(out.all());
}

/// A stage whose `outputs:` is misspelt may write anything: a stage reading what it would
/// write is not told that its input does not exist.
#[test]
fn a_misspelt_outputs_key_blames_no_reader() {
    let out = validate(
        "stages:\n  a:\n    cmd: echo hi > out/a.txt\n    output: [out/a.txt]\n  b:\n    cmd: cp out/a.txt {{ outputs[0] }}\n    inputs: [out/a.txt]\n    outputs: [out/b.txt]\n",
    );
    assert!(out.contains("unknown key `output`"), "{out}");
    assert!(!out.contains("does not exist"), "{out}");
}

#[test]
fn a_versioned_output_cannot_be_called_archive() {
    let out = validate(
        "stages:\n  f:\n    cmd: echo > {{ outputs[0] }}/x\n    outputs: [out/archive/]\n    version: auto\n",
    );
    assert!(out.contains("its output is called `archive`"), "{out}");
    assert!(out.starts_with("exit: 2"), "{out}");
}

/// Partition sets are checked whole: an impossible month, a key listed twice, a set named like
/// a var, a range that runs backwards, both `values` and `range`. A stage using a set that
/// failed is not blamed for it.
#[test]
fn partition_sets_are_checked() {
    assert_snapshot!(validate(
        "vars:\n  day: 1\npartitions:\n  month:\n    values: [2017-01, 2017-13, 2017-01]\n  day:\n    range: {from: 2017-01-05, to: 2017-01-01}\n  region:\n    values: [eu, us]\n    range: {from: 2017-01, to: 2017-02}\nstages:\n  a:\n    cmd: echo {{ month }} {{ region }} > {{ outputs[0] }}\n    outputs: [\"out/{{ month }}.txt\"]\n"
    ));
}

#[test]
fn partitions_is_a_reserved_name() {
    let out = validate(
        "vars:\n  partitions: x\npartitions:\n  partitions:\n    values: [a]\nstages:\n  a:\n    cmd: echo > {{ outputs[0] }}\n    outputs: [o.txt]\n",
    );
    assert!(
        out.contains("cannot have a var called `partitions`"),
        "{out}"
    );
    assert!(
        out.contains("a partition set cannot be called `partitions`"),
        "{out}"
    );
}

#[test]
fn engine_spark_is_checked_where_it_cannot_run() {
    let t = Test::new()
        .file("data/orders.csv", "user,days,day\n1,3,2017-05-01\n")
        .pipeline(
            r#"
engine: spork
engines:
  spark:
    remote: sc://cluster:15002/;use_ssl=true;token=abc123
    token_env: $SPARK_TOKEN
    region: eu
stages:
  features:
    uses: feature
    inputs: {orders: out/firsts.parquet}
    outputs: {features: out/features/}
    params:
      entity: user
      groups: [{name: all, from: orders, features: [{n: count(*)}]}]
      formats: [parquet, csv]
    engine: spark
  first_orders:
    uses: feature
    inputs: {orders: out/firsts.parquet}
    outputs: {features: out/first_orders.parquet}
    params:
      entity: user
      groups: [{name: all, from: orders, features: [{first_days: first(first_days)}]}]
    engine: spark
  shell:
    cmd: cp data/orders.csv {{ outputs[0] }}
    outputs: [out/copy.csv]
    engine: spark
  clean:
    uses: clean
    inputs: [data/orders.csv]
    outputs: {table: out/clean.parquet, summary: out/summary.json}
    params:
      cast: {day: date}
    engine: spark
  firsts:
    uses: aggregate
    inputs: [out/copy.csv]
    outputs: [out/firsts.parquet]
    params:
      by: [user]
      aggs:
        first_days: {first: days}
    engine: spark
  typo:
    uses: aggregate
    inputs: [out/copy.csv]
    outputs: [out/typo.parquet]
    params:
      by: [user]
      aggs:
        days: {max: days}
    engine: sprak
"#,
        );
    let out = t.exec(&["validate", "pipeline.yaml"]);
    assert_eq!(out.code, 2);
    insta::assert_snapshot!(out.all());
}

/// `engine:` at the top applies to every built-in that can run there (a stage's own `engine:`
/// wins); switching is a reason `status` names; the token comes from the variable
/// `engines.spark.token_env` names, and a missing one is said before anything is asked of the
/// cluster.
#[test]
fn the_pipeline_engine_applies_where_a_stage_does_not_say() {
    let t = Test::new().file("in.csv", "a,b\n1,2\n").pipeline(
        r#"
vars: {engine: local}
engine: "{{ engine }}"
engines:
  spark: {remote: "sc://127.0.0.1:9", token_env: IMBA_TEST_SPARK_TOKEN}
stages:
  follows:
    uses: clean
    inputs: {table: in.csv}
    outputs: {table: out/follows.parquet}
    params: {cast: {a: int64}}
  pinned:
    uses: clean
    engine: local
    inputs: {table: in.csv}
    outputs: {table: out/pinned.parquet}
    params: {cast: {a: int64}}
  shell:
    cmd: cp in.csv {{ outputs[0] }}
    outputs: [out/copy.csv]
"#,
    );
    t.run_ok(&[]);
    let status = t.exec(&["status", "pipeline.yaml", "--set", "engine=spark"]);
    insta::assert_snapshot!(status.all(), @r"
    exit: 0
    --- stdout
    follows
      - engine changed: local → spark
    1 of 3 stages are stale
    --- stderr
    ");
    let mut command = t.command(&["run", "pipeline.yaml", "--set", "engine=spark"]);
    command
        .env_remove("IMBA_TEST_SPARK_TOKEN")
        .env_remove("SPARK_REMOTE");
    let out = t.captured(&command.output().unwrap());
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("error: stage `follows` failed: `engines.spark.token_env` names IMBA_TEST_SPARK_TOKEN, which is not set: export the token there"),
        "{}",
        out.stderr
    );
}

/// The shipped monthly pipeline given a bad orders file: each named, its bytes never printed.
#[test]
fn bad_input_files_are_named() {
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    png.extend_from_slice(&[0x1b, b'[', b'2', b'J', 0xff, 0xfe, b'\n', b'1']);
    let t = common::monthly("")
        .file("data/picture.csv", png)
        .file("data/nul.csv", b"order_id,user\x00_id\n1,2\n")
        .file("data/wrong.csv", "a,b,c\n1,2,3\n")
        .file(
            "data/renamed.csv",
            "order_id,user,eval_set,order_number,order_dow,order_hour_of_day,days_since_prior\n",
        )
        .file("data/escaped.csv", "order_id,user\x1b[31mid\n1,2\n");
    let mut all = String::new();
    for input in [
        "data/picture.csv",
        "data/nul.csv",
        "data/wrong.csv",
        "data/renamed.csv",
        "data/escaped.csv",
        "nope.csv",
        "examples/instacart/order.csv",
        "instacart/orders.csv",
    ] {
        let out = t.exec(&[
            "validate",
            "pipelines/monthly.yaml",
            "--set",
            &format!("input={input}"),
        ]);
        assert_eq!(out.code, 2, "{input}: {}", out.all());
        all.push_str(&format!(
            "$ imba validate pipelines/monthly.yaml --set input={input}\n{}\n",
            out.all()
        ));
    }
    assert!(!all.contains('\x1b') && !all.contains("PNG\r"), "{all}");
    assert_snapshot!(all);
}
