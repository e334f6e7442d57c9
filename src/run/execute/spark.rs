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

/// The Spark Connect address: `SPARK_REMOTE`, as Spark's own clients read it.
fn remote() -> Result<String, StageFailure> {
    match std::env::var("SPARK_REMOTE") {
        Ok(remote) if !remote.trim().is_empty() => Ok(remote.trim().to_owned()),
        _ => Err(StageFailure::Other(
            "`engine: spark` needs SPARK_REMOTE, the Spark Connect server's address (e.g. `sc://127.0.0.1:15002`; `scripts/spark-local start` starts one here)".to_owned(),
        )),
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
    let remote = remote()?;
    let (authority, shown) = endpoint(&remote)?;
    let [input] = ex.inputs else {
        return Err(StageFailure::Other(format!(
            "on Spark, `{name}` reads one input"
        )));
    };
    // The cluster reads it by its absolute path (a cluster on this machine; a remote one reads
    // inputs from S3).
    let input = std::path::absolute(ex.workdir.join(input)).unwrap_or_else(|_| input.clone());
    if imba_stages::io::table::is_csv(&input) {
        return Err(StageFailure::Other(format!(
            "on Spark, `{name}` reads a Parquet input; `{}` is CSV",
            input.display()
        )));
    }
    let source = format!(
        "parquet.`file://{}`",
        input.to_string_lossy().replace('`', "``")
    );
    let query =
        imba_stages::spark::query(name, params, &source).map_err(|u| StageFailure::Builtin {
            message: u.why,
            param: Some(u.param).filter(|p| !p.is_empty()),
        })?;
    let [staged] = ex.staged else {
        return Err(StageFailure::Other(format!(
            "on Spark, `{name}` writes one output"
        )));
    };
    let staged = &std::path::absolute(ex.workdir.join(staged)).unwrap_or_else(|_| staged.clone());
    submit(ex, &remote, &authority, &shown, &query, staged).await
}

#[cfg(not(feature = "spark"))]
async fn submit(
    _ex: &Execution<'_>,
    _remote: &str,
    _authority: &str,
    _shown: &str,
    _query: &str,
    _staged: &std::path::Path,
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
    query: &str,
    staged: &std::path::Path,
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
    // A tag on this stage's operations, to interrupt them on Ctrl-C.
    let tag = format!("imba-{}", blake3::hash(ex.run_id.as_bytes()).to_hex());
    let tag = format!("{}-{}", &tag[..20], crate::model::file_name(&ex.stage.name));
    let written = staged.with_extension("spark");
    let job = {
        let spark = spark.clone();
        let query = query.to_owned();
        let tag = tag.clone();
        let written = written.clone();
        tokio::task::spawn_blocking(move || {
            spark.add_tag(&tag)?;
            let df = spark.sql(&query)?.coalesce(1);
            df.write()
                .mode("overwrite")
                .parquet(&format!("file://{}", written.display()))?;
            let app = spark.conf().get("spark.app.id").ok().flatten();
            Ok::<_, Box<spark_connect::SparkError>>(app)
        })
    };
    let mut cancel = ex.cancel.clone();
    tokio::pin!(job);
    let ended = tokio::select! {
        ran = &mut job => Some(ran),
        _ = cancel.wait_for(|s| *s >= Stop::Cancel) => None,
    };
    let Some(ran) = ended else {
        // Ctrl-C: the cluster stops this stage's operations; nothing of it is committed.
        let interrupting = spark.clone();
        let _ =
            tokio::task::spawn_blocking(move || interrupting.interrupt_tag(&tag).map_err(Box::new))
                .await;
        let _ = job.await;
        let _ = std::fs::remove_dir_all(&written);
        return Err(StageFailure::Cancelled);
    };
    let app = ran
        .map_err(|e| StageFailure::Other(format!("internal error: {e}")))?
        .map_err(|e| {
            let _ = std::fs::remove_dir_all(&written);
            spark_failure(shown, &e)
        })?;
    // One part file (coalesced to one partition): the output itself.
    let part = std::fs::read_dir(&written)
        .map_err(|e| {
            StageFailure::Other(format!("Spark wrote nothing at {}: {e}", written.display()))
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
                && p.extension().is_some_and(|e| e == "parquet")
        })
        .ok_or_else(|| {
            StageFailure::Other(format!(
                "Spark wrote no Parquet part file in {}",
                written.display()
            ))
        })?;
    std::fs::rename(&part, staged)
        .map_err(|e| StageFailure::Other(format!("cannot move Spark's output into place: {e}")))?;
    let _ = std::fs::remove_dir_all(&written);
    Ok(Executed {
        report: Some(serde_json::json!({
            "summary": {"engine": "spark", "remote": shown, "app_id": app},
            "duration_ms": started.elapsed().as_millis() as u64,
        })),
        ..Executed::default()
    })
}

/// A Spark error as a stage failure: its error class and message, and where it came from.
#[cfg(feature = "spark")]
fn spark_failure(shown: &str, error: &spark_connect::SparkError) -> StageFailure {
    let class = if error.error_class.is_empty() {
        String::new()
    } else {
        format!("[{}] ", error.error_class)
    };
    let message = error.message.lines().next().unwrap_or_default();
    StageFailure::Other(format!("Spark at {shown}: {class}{message}"))
}
