//! Built-in stages on Spark (`engine: spark`), through Spark Connect: the stage's Spark SQL
//! (`imba_stages::spark`) runs on the cluster at `SPARK_REMOTE`, reading the input where it is
//! and writing one Parquet file, which lands at the stage's staging path; imba commits it as any
//! other output.

use serde_json::Value as Json;

use super::{Executed, Execution};
use crate::run::failure::StageFailure;

/// How long to wait for the Spark Connect server to accept a connection: the client itself
/// retries an unreachable server for about ten minutes.
#[cfg(feature = "spark")]
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The Spark Connect address: `SPARK_REMOTE`, as Spark's own clients read it, else
/// `engines.spark.remote`; with the token from the variable `engines.spark.token_env` names.
fn remote(settings: &crate::model::SparkSettings) -> Result<String, StageFailure> {
    address(std::env::var("SPARK_REMOTE").ok(), settings, |variable| {
        std::env::var(variable).ok()
    })
}

/// [`remote`], given `SPARK_REMOTE` and the environment's variables.
fn address(
    spark_remote: Option<String>,
    settings: &crate::model::SparkSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, StageFailure> {
    let remote = match spark_remote {
        Some(remote) if !remote.trim().is_empty() => remote.trim().to_owned(),
        _ => settings.remote.clone().ok_or_else(|| StageFailure::Other(
            "`engine: spark` needs the Spark Connect server's address: SPARK_REMOTE or `engines.spark.remote` (e.g. `sc://127.0.0.1:15002`; `scripts/spark-local start` starts one here)".to_owned(),
        ))?,
    };
    let Some(variable) = &settings.token_env else {
        return Ok(remote);
    };
    match env(variable) {
        Some(token) if !token.trim().is_empty() => {
            // `sc://host:port/;params;token=…`, the token percent-encoded: the client splits
            // parameters on `;` and `=` and decodes `%`.
            let (authority, _) = endpoint(&remote)?;
            let params = remote
                .split_once(';')
                .map(|(_, p)| format!("{};", p.trim_end_matches(';')))
                .unwrap_or_default();
            let token = percent_encoding::utf8_percent_encode(
                token.trim(),
                percent_encoding::NON_ALPHANUMERIC,
            );
            Ok(format!("sc://{authority}/;{params}token={token}"))
        }
        _ => Err(StageFailure::Other(format!(
            "`engines.spark.token_env` names {variable}, which is not set: export the token there"
        ))),
    }
}

/// `host:port` of an `sc://host:port/;params` address, with what is shown of it (no params:
/// they may hold a token).
fn endpoint(remote: &str) -> Result<(String, String), StageFailure> {
    let rest = remote.strip_prefix("sc://").ok_or_else(|| {
        StageFailure::Other("SPARK_REMOTE must start with `sc://` (e.g. `sc://host:15002`)".into())
    })?;
    let authority = rest.split(['/', ';']).next().unwrap_or_default();
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:15002")
    };
    Ok((authority.clone(), format!("sc://{authority}")))
}

/// Runs built-in `name` on Spark.
pub(super) async fn run(
    ex: &Execution<'_>,
    name: &str,
    params: &Json,
) -> Result<Executed, StageFailure> {
    let remote = remote(&ex.engines.spark)?;
    let (authority, shown) = endpoint(&remote)?;
    // The cluster reads each input by its absolute path (a cluster on this machine; a remote
    // one reads inputs from S3).
    let mut inputs = Vec::new();
    for (port, input) in ex.stage.inputs.iter().zip(ex.inputs) {
        let path = std::path::absolute(ex.workdir.join(input)).unwrap_or_else(|_| input.clone());
        if imba_stages::io::table::is_csv(&path) && !imba_stages::spark::reads_csv(name) {
            return Err(StageFailure::Other(format!(
                "on Spark, `{name}` reads Parquet inputs; `{}` is CSV",
                path.display()
            )));
        }
        inputs.push((port.name.clone().unwrap_or_default(), path));
    }
    let staged = |port: &str| {
        ex.stage
            .outputs
            .iter()
            .zip(ex.staged)
            .find(|(p, _)| p.name.as_deref() == Some(port))
            .map(|(_, s)| std::path::absolute(ex.workdir.join(s)).unwrap_or_else(|_| s.clone()))
    };
    let port = imba_stages::spark::table_output(name);
    let Some(output) = staged(port) else {
        return Err(StageFailure::Other(format!(
            "on Spark, `{name}` writes a `{port}` output"
        )));
    };
    let job = Job {
        name: name.to_owned(),
        params: params.clone(),
        inputs,
        table: imba_stages::spark::table_file(name, &output),
        // Spark's folder of part files, beside the staged output (never inside a folder one).
        written: output.with_extension("spark"),
        summary: staged("summary"),
    };
    submit(ex, &remote, &authority, &shown, job).await
}

/// What one stage asks of the cluster (read only by the Spark client).
#[cfg_attr(not(feature = "spark"), allow(dead_code))]
struct Job {
    name: String,
    params: Json,
    /// Each input's name under `inputs:` (empty in a list) and absolute path.
    inputs: Vec<(String, std::path::PathBuf)>,
    /// The file of the staged table output (absolute), where Spark writes it first, and the
    /// staged summary when the stage has one.
    table: std::path::PathBuf,
    written: std::path::PathBuf,
    summary: Option<std::path::PathBuf>,
}

#[cfg(not(feature = "spark"))]
async fn submit(
    _ex: &Execution<'_>,
    _remote: &str,
    _authority: &str,
    _shown: &str,
    _job: Job,
) -> Result<Executed, StageFailure> {
    Err(StageFailure::Other(
        "this imba was built without its Spark client: build it with `--features spark` (its build needs protoc: Debian's protobuf-compiler)".to_owned(),
    ))
}

#[cfg(feature = "spark")]
async fn submit(
    ex: &Execution<'_>,
    remote: &str,
    authority: &str,
    shown: &str,
    job: Job,
) -> Result<Executed, StageFailure> {
    use crate::interrupt::Stop;
    use spark_connect::SparkSession;

    // The client retries an unreachable server for minutes: ask the port first.
    let reachable = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(authority.to_owned()),
    )
    .await;
    match reachable {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(StageFailure::Other(format!(
                "cannot reach the Spark Connect server at {shown}: {e}"
            )))
        }
        Err(_) => {
            return Err(StageFailure::Other(format!(
                "cannot reach the Spark Connect server at {shown}: no answer in {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    }
    let started = std::time::Instant::now();
    let spark = {
        let remote = remote.to_owned();
        tokio::task::spawn_blocking(move || {
            SparkSession::builder()
                .remote(&remote)
                .get_or_create()
                .map_err(Box::new)
        })
        .await
        .map_err(|e| StageFailure::Other(format!("internal error: {e}")))?
        .map_err(|e| spark_failure(shown, &e))?
    };
    // A tag on this stage's operations, to interrupt them on Ctrl-C; its temporary views are
    // named after it too.
    let tag = format!("imba-{}", blake3::hash(ex.run_id.as_bytes()).to_hex());
    let tag = format!("{}-{}", &tag[..20], crate::model::file_name(&ex.stage.name));
    let scratch = format!("imba_{}", &blake3::hash(tag.as_bytes()).to_hex()[..16]);
    let written = job.written.clone();
    let work = {
        let spark = spark.clone();
        let tag = tag.clone();
        let written = written.clone();
        let table = job.table.clone();
        let (name, params, job_inputs) = (job.name.clone(), job.params.clone(), job.inputs.clone());
        tokio::task::spawn_blocking(move || {
            let mut session = Connected {
                spark: &spark,
                output: Some((&written, &table)),
            };
            let fail = |e| imba_stages::spark::Failure::Session(Box::new(e));
            spark.add_tag(&tag).map_err(fail)?;
            read_as_imba(&spark).map_err(imba_stages::spark::Failure::Session)?;
            let mut inputs = Vec::new();
            for (i, (input_name, path)) in job_inputs.iter().enumerate() {
                let csv = imba_stages::io::table::is_csv(path);
                let location = format!("file://{}", path.display());
                let reader = spark.read();
                let df = if csv {
                    // RFC 4180 quoting as the local reader; every column a string; a malformed
                    // line fails the job instead of becoming a different row.
                    reader
                        .format("csv")
                        .option("header", "true")
                        .option("inferSchema", "false")
                        .option("escape", "\"")
                        .option("mode", "FAILFAST")
                        .load(Some(&location))
                } else {
                    reader.parquet(&location)
                };
                let view = format!("{scratch}_input{i}");
                df.create_or_replace_temp_view(&view).map_err(fail)?;
                inputs.push(imba_stages::spark::Input {
                    name: input_name.clone(),
                    view,
                    // Named in messages as the local engine names it.
                    source: path.display().to_string(),
                    path: path.clone(),
                });
            }
            let ran = imba_stages::spark::run(&name, &params, &inputs, &scratch, &mut session);
            for input in &inputs {
                let _ = spark.sql(&format!("DROP VIEW IF EXISTS {}", input.view));
            }
            let summary = ran?;
            let conf = |key: &str| spark.conf().get(key).ok().flatten();
            let app = conf("spark.app.id");
            // The driver's UI, when its address is configured (a port Spark picked itself is
            // not in the configuration).
            let ui = match (
                conf("spark.ui.enabled").as_deref(),
                conf("spark.driver.host"),
                conf("spark.ui.port"),
            ) {
                (Some("false"), _, _) => None,
                (_, Some(host), Some(port)) if port != "0" => Some(format!("http://{host}:{port}")),
                _ => None,
            };
            Ok::<_, imba_stages::spark::Failure<Box<spark_connect::SparkError>>>((summary, app, ui))
        })
    };
    let mut cancel = ex.cancel.clone();
    tokio::pin!(work);
    let ended = tokio::select! {
        ran = &mut work => Some(ran),
        _ = cancel.wait_for(|s| *s >= Stop::Cancel) => None,
        () = server_gone(authority) => {
            // The client would retry for minutes; its thread is left behind, and whatever the
            // cluster still writes lands in this run's staging, which nothing commits.
            return Err(StageFailure::Other(format!(
                "the Spark Connect server at {shown} stopped answering mid-stage; nothing was committed"
            )));
        }
    };
    let Some(ran) = ended else {
        // Ctrl-C: the cluster stops this stage's operations; nothing of it is committed.
        let interrupting = spark.clone();
        let _ =
            tokio::task::spawn_blocking(move || interrupting.interrupt_tag(&tag).map_err(Box::new))
                .await;
        let _ = work.await;
        let _ = std::fs::remove_dir_all(&written);
        return Err(StageFailure::Cancelled);
    };
    let ran = ran.map_err(|e| StageFailure::Other(format!("internal error: {e}")))?;
    if ran.is_err() {
        // An operation the client gave up on may still run on the cluster: stop it before its
        // folder goes, so that no job of this stage outlives it.
        let interrupting = spark.clone();
        let interrupt =
            tokio::task::spawn_blocking(move || interrupting.interrupt_tag(&tag).map_err(Box::new));
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, interrupt).await;
    }
    let _ = std::fs::remove_dir_all(&written);
    let (summary, app, ui) = ran.map_err(|e| match e {
        imba_stages::spark::Failure::Session(e) => spark_failure(shown, &e),
        imba_stages::spark::Failure::Stage(e) => StageFailure::Builtin {
            message: e.message,
            param: e.param,
        },
    })?;
    if let Some(path) = &job.summary {
        imba_stages::StageIo::write_json(path, &summary).map_err(|e| StageFailure::Builtin {
            message: e.message,
            param: e.param,
        })?;
    }
    Ok(Executed {
        report: Some(serde_json::json!({
            "summary": summary,
            "engine": {"name": "spark", "remote": shown, "app_id": app, "ui": ui},
            "duration_ms": started.elapsed().as_millis() as u64,
        })),
        ..Executed::default()
    })
}

/// Evaluates checks on the cluster, for a stage that ran there: each table is read where the
/// cluster reads it and only counts and extremes come back (`imba_stages::checks::spark`).
/// Connects on first use; a connection that fails makes each check an error. `None` in a build
/// without the Spark client.
pub(crate) type ClusterChecks = Box<
    dyn FnMut(
            &[imba_stages::checks::Check],
            &std::path::Path,
            &imba_stages::checks::Baselines,
        ) -> Vec<imba_stages::checks::Verdict>
        + Send,
>;

#[cfg(not(feature = "spark"))]
pub(crate) fn checks_on_cluster(
    _settings: &crate::model::SparkSettings,
    _stage: &str,
) -> Option<ClusterChecks> {
    None
}

#[cfg(feature = "spark")]
pub(crate) fn checks_on_cluster(
    settings: &crate::model::SparkSettings,
    stage: &str,
) -> Option<ClusterChecks> {
    let settings = settings.clone();
    let scratch = format!(
        "imba_checks_{}",
        &blake3::hash(stage.as_bytes()).to_hex()[..16]
    );
    let mut spark: Option<Result<spark_connect::SparkSession, String>> = None;
    Some(Box::new(move |checks, table, baselines| {
        let connected = spark.get_or_insert_with(|| {
            let remote = remote(&settings).map_err(|e| e.to_string())?;
            let (authority, shown) = endpoint(&remote).map_err(|e| e.to_string())?;
            // The client retries an unreachable server for minutes: ask the port first.
            let reachable = std::net::ToSocketAddrs::to_socket_addrs(&authority)
                .ok()
                .and_then(|mut addresses| addresses.next())
                .is_some_and(|at| {
                    std::net::TcpStream::connect_timeout(&at, CONNECT_TIMEOUT).is_ok()
                });
            if !reachable {
                return Err(format!("cannot reach the Spark Connect server at {shown}"));
            }
            let session = spark_connect::SparkSession::builder()
                .remote(&remote)
                .get_or_create()
                .map_err(|e| spark_message(&shown, &e))?;
            read_as_imba(&session).map_err(|e| spark_message(&shown, &e))?;
            Ok(session)
        });
        match connected {
            Ok(spark) => {
                let mut session = Connected {
                    spark,
                    output: None,
                };
                imba_stages::checks::spark::evaluate(
                    checks,
                    table,
                    baselines,
                    &scratch,
                    &mut session,
                )
            }
            Err(message) => checks
                .iter()
                .map(|_| imba_stages::checks::Verdict {
                    status: imba_stages::checks::Status::Error,
                    value: serde_json::Value::Null,
                    detail: message.clone(),
                })
                .collect(),
        }
    }))
}

/// Returns once the server at `authority` has refused connections (or not answered) three times
/// in a row, a second apart: it is gone.
#[cfg(feature = "spark")]
async fn server_gone(authority: &str) {
    let mut failed = 0;
    while failed < 3 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let answered = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(authority.to_owned()),
        )
        .await;
        failed = match answered {
            Ok(Ok(_)) => 0,
            _ => failed + 1,
        };
    }
}

/// The stage's view of the cluster: small results come back as JSON, the table is written as one
/// Parquet file at the staged path.
#[cfg(feature = "spark")]
struct Connected<'a> {
    spark: &'a spark_connect::SparkSession,
    /// Where Spark writes the table (a folder of part files, beside the staged path), and the
    /// staged table output the one part file is moved to; none for a session that only reads.
    output: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

#[cfg(feature = "spark")]
impl imba_stages::spark::Session for Connected<'_> {
    type Error = Box<spark_connect::SparkError>;

    fn columns(&mut self, table: &str) -> Result<Vec<(String, String)>, Self::Error> {
        let rows = self.rows(&format!("DESCRIBE {table}"))?;
        Ok(rows
            .into_iter()
            .map_while(|row| {
                let name = row.first()?.as_str()?.to_owned();
                let data_type = row.get(1)?.as_str()?.to_owned();
                // A description's extra sections start with an empty line or a `# …` heading
                // without a type (a column may be named `#x`; it has one).
                (!name.is_empty() && !data_type.is_empty()).then_some((name, data_type))
            })
            .collect())
    }

    fn rows(&mut self, sql: &str) -> Result<Vec<Vec<Json>>, Self::Error> {
        use spark_connect::row::Value;
        let rows = self.spark.sql(sql)?.collect()?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.into_values()
                    .into_iter()
                    .map(|v| match v {
                        Value::Null => Json::Null,
                        Value::Bool(b) => Json::Bool(b),
                        Value::Byte(i) => i.into(),
                        Value::Short(i) => i.into(),
                        Value::Integer(i) => i.into(),
                        Value::Long(i) => i.into(),
                        Value::Float(f) => imba_stages::spark::double_value(f64::from(f)),
                        Value::Double(f) => imba_stages::spark::double_value(f),
                        Value::String(s) => Json::String(s),
                        // As polars prints them.
                        Value::Date(days) => Json::String(
                            chrono::NaiveDate::from_num_days_from_ce_opt(days + EPOCH_DAYS_FROM_CE)
                                .map_or_else(|| days.to_string(), |d| d.to_string()),
                        ),
                        Value::Decimal { value, .. } => Json::String(value),
                        other => Json::String(format!("{other:?}")),
                    })
                    .collect()
            })
            .collect())
    }

    fn write(&mut self, sql: &str) -> Result<usize, Self::Error> {
        let Some((written, staged)) = self.output else {
            return Err(Box::new(spark_connect::SparkError::connect_msg(
                "internal error: this session writes no table".to_owned(),
            )));
        };
        self.spark
            .sql(sql)?
            .coalesce(1)
            .write()
            .mode("overwrite")
            .parquet(&format!("file://{}", written.display()))?;
        // One part file (coalesced to one partition): the output itself.
        let part = std::fs::read_dir(written)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
                    && p.extension().is_some_and(|e| e == "parquet")
            });
        let failed = |what: String| Box::new(spark_connect::SparkError::connect_msg(what));
        match part {
            Some(part) => {
                std::fs::rename(&part, staged)
                    .map_err(|e| failed(format!("cannot move Spark's output into place: {e}")))?;
                // How many rows: the file's footer says.
                imba_stages::io::partition::parquet_rows(staged).map_err(|e| failed(e.message))
            }
            None => Err(Box::new(spark_connect::SparkError::connect_msg(format!(
                "Spark wrote no Parquet part file in {}",
                written.display()
            )))),
        }
    }
}

/// Sets the session to read SQL as imba means it: column names as the file writes them (`a` and
/// `A` are two columns, as locally), and no `${…}` substitution inside the SQL text (a value is
/// a value).
#[cfg(feature = "spark")]
fn read_as_imba(spark: &spark_connect::SparkSession) -> Result<(), Box<spark_connect::SparkError>> {
    for setting in [
        "SET spark.sql.caseSensitive=true",
        "SET spark.sql.variable.substitute=false",
    ] {
        spark.sql(setting).map_err(Box::new)?;
    }
    Ok(())
}

/// Days from 0001-01-01 (chrono's count) to 1970-01-01 (Spark's).
#[cfg(feature = "spark")]
const EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// A Spark error as a stage failure: its error class and message, and where it came from.
#[cfg(feature = "spark")]
fn spark_failure(shown: &str, error: &spark_connect::SparkError) -> StageFailure {
    StageFailure::Other(spark_message(shown, error))
}

/// A Spark error's class and first line of message, and where it came from; never a token.
#[cfg(feature = "spark")]
fn spark_message(shown: &str, error: &spark_connect::SparkError) -> String {
    // An error the client raises itself may have its text in its parameters, not its message.
    let text = if error.message.trim().is_empty() {
        error.to_string()
    } else {
        error.message.clone()
    };
    let message = redact_tokens(text.lines().next().unwrap_or_default());
    // Spark's message mostly starts with its class already.
    let class = if error.error_class.is_empty()
        || message.starts_with(&format!("[{}]", error.error_class))
    {
        String::new()
    } else {
        format!("[{}] ", error.error_class)
    };
    format!("Spark at {shown}: {class}{message}")
}

/// `text` with the value of every `token=` parameter masked.
#[cfg_attr(not(feature = "spark"), allow(dead_code))]
fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find("token=") {
        out.push_str(&rest[..at + "token=".len()]);
        out.push_str("***");
        rest = &rest[at + "token=".len()..];
        let end = rest
            .find([';', '\'', '"', ' ', ',', ')'])
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_joins_the_address_encoded_and_never_shows() {
        let settings = crate::model::SparkSettings {
            remote: Some("sc://spark.internal:15002;use_ssl=true".to_owned()),
            token_env: Some("IMBA_UNIT_TEST_SPARK_TOKEN".to_owned()),
        };
        let env = |v: &str| (v == "IMBA_UNIT_TEST_SPARK_TOKEN").then(|| "a=b;c%d".to_owned());
        assert_eq!(
            address(None, &settings, env).unwrap(),
            "sc://spark.internal:15002/;use_ssl=true;token=a%3Db%3Bc%25d"
        );
        // SPARK_REMOTE wins over the file's address; the token still joins it.
        assert_eq!(
            address(Some("sc://other:443".to_owned()), &settings, env).unwrap(),
            "sc://other:443/;token=a%3Db%3Bc%25d"
        );
        assert_eq!(
            redact_tokens("Parameter 'token=a=b' in 'sc://h/;token=xyz;use_ssl=true'"),
            "Parameter 'token=***' in 'sc://h/;token=***;use_ssl=true'"
        );
    }
}
