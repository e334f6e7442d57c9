//! The pages and the JSON behind them: pipeline, runs, a run, checks, versions, partitions,
//! reports, the event stream and the run action.
//!
//! Pages are minijinja templates compiled into the binary, rendered with HTML escaping; the
//! script and the style sheet are served from the binary too. Anything that may take long (a
//! status hashes inputs) runs on a blocking thread and is fetched by the page after it loads,
//! so a page's first response never waits for it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{App, Loaded};
use crate::graph::Dag;
use crate::state::record::{Decision, RunRecord, RunStatus};

type Shared = State<Arc<App>>;

/// The templates, compiled in.
pub fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, source) in [
        ("base.html", include_str!("assets/base.html")),
        ("pipeline.html", include_str!("assets/pipeline.html")),
        ("stage.html", include_str!("assets/stage.html")),
        ("runs.html", include_str!("assets/runs.html")),
        ("run.html", include_str!("assets/run.html")),
        ("checks.html", include_str!("assets/checks.html")),
        ("versions.html", include_str!("assets/versions.html")),
        ("partitions.html", include_str!("assets/partitions.html")),
        ("reports.html", include_str!("assets/reports.html")),
        ("error.html", include_str!("assets/error.html")),
    ] {
        // The templates are part of the binary: a broken one is a bug the tests catch (a page
        // of it then answers with its error).
        let _ = env.add_template(name, source);
    }
    env
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/p/0") }))
        .route("/assets/app.js", get(script))
        .route("/assets/app.css", get(style))
        .route("/assets/live-worker.js", get(live_worker))
        .route("/events", get(events))
        .route("/p/{n}", get(pipeline_page))
        .route("/p/{n}/status", get(status_json))
        .route("/p/{n}/stage", get(stage_panel))
        .route("/p/{n}/runs", get(runs_page))
        .route("/p/{n}/runs/{id}", get(run_page))
        .route("/p/{n}/runs/{id}/log", get(log_tail))
        .route("/p/{n}/checks", get(checks_page))
        .route("/p/{n}/versions", get(versions_page))
        .route("/p/{n}/partitions", get(partitions_page))
        .route("/p/{n}/reports", get(reports_page))
        .route("/p/{n}/files/{stage}/{*path}", get(output_file))
        .route("/p/{n}/run", post(run_action))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            super::guard::check,
        ))
        .with_state(app)
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

async fn live_worker() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/live-worker.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/app.css"),
    )
        .into_response()
}

/// A page, or the response that says why there is none.
type Page = Result<Html<String>, Failure>;

/// A response instead of the page (boxed: a response is large, and the page is the usual case).
pub struct Failure(Box<Response>);

impl From<Response> for Failure {
    fn from(response: Response) -> Self {
        Failure(Box::new(response))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        *self.0
    }
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("404 not found: {what}\n")).into_response()
}

/// The pipeline `n` and its graph, or the page that says what is wrong.
fn pipeline_of(app: &App, n: usize, page: &str) -> Result<(Arc<Loaded>, Arc<Dag>), Failure> {
    let Some(pipeline) = app.pipelines.get(n) else {
        return Err(not_found("no such pipeline").into());
    };
    let loaded = pipeline.load();
    match &loaded.dag {
        Ok(dag) => Ok((loaded.clone(), dag.clone())),
        Err(message) => Err(render(
            app,
            "error.html",
            base(app, n, page, json!({ "error": message })),
        )
        .map_or_else(|e| e, |page| page.into_response().into())),
    }
}

/// What every page's frame shows: the pipelines, this one, the page, whether actions exist.
fn base(app: &App, n: usize, page: &str, mut context: Value) -> Value {
    let pipelines: Vec<Value> = app
        .pipelines
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"n": i, "file": p.file.display().to_string()}))
        .collect();
    let workdir = app.pipelines.get(n).and_then(|p| match &p.load().dag {
        Ok(dag) => Some(app.live.index_of(&dag.pipeline().workdir)),
        Err(_) => None,
    });
    let extra = json!({
        "pipelines": pipelines,
        "n": n,
        "file": app.pipelines.get(n).map(|p| p.file.display().to_string()),
        "page": page,
        "read_only": app.read_only,
        "token": if app.read_only { String::new() } else { app.token.clone() },
        "workdir": workdir,
    });
    if let (Some(map), Some(add)) = (context.as_object_mut(), extra.as_object()) {
        for (k, v) in add {
            map.insert(k.clone(), v.clone());
        }
    }
    context
}

/// The page `name` inside the frame (`base.html`); a fragment (`stage.html`) alone.
fn render(app: &App, name: &str, context: Value) -> Page {
    render_with(app, name, context, minijinja::Value::UNDEFINED)
}

/// [`render`], with `rows` for the page only (not for the frame): a long list is converted
/// once, straight from its Rust structs.
fn render_with(app: &App, name: &str, context: Value, rows: minijinja::Value) -> Page {
    let failed = |e: minijinja::Error| {
        Failure::from(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot render {name}: {e}\n"),
            )
                .into_response(),
        )
    };
    let frame = minijinja::Value::from_serialize(&context);
    let page_context = if rows.is_undefined() {
        frame.clone()
    } else {
        minijinja::context! { rows => rows, ..frame.clone() }
    };
    let page = app
        .templates
        .get_template(name)
        .and_then(|t| t.render(page_context))
        .map_err(failed)?;
    if name == "stage.html" {
        return Ok(Html(page));
    }
    let main = minijinja::Value::from_safe_string(page);
    app.templates
        .get_template("base.html")
        .and_then(|t| t.render(minijinja::context! { main => main, ..frame }))
        .map(Html)
        .map_err(failed)
}

/// What a path segment or query value keeps as it is.
const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'@');

/// A path segment, percent-encoded.
fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, KEPT).to_string()
}

/// Bytes as people read them.
fn size_text(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().si().to_string()
}

/// The size of a local file or folder (its files', summed), if it exists.
fn size_of(path: &std::path::Path) -> Option<u64> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some(if meta.is_dir() {
        crate::store::fs::size_of(path)
    } else {
        meta.len()
    })
}

fn millis(duration_ms: u64) -> String {
    if duration_ms >= 60_000 {
        format!("{}m{:02}s", duration_ms / 60_000, duration_ms / 1000 % 60)
    } else if duration_ms >= 1000 {
        format!("{:.1}s", duration_ms as f64 / 1000.0)
    } else {
        format!("{duration_ms}ms")
    }
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn epoch_ms(text: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339_weak(text).ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

// ---- pipeline ---------------------------------------------------------------------------

async fn pipeline_page(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Page {
    let (loaded, dag) = pipeline_of(&app, n, "pipeline")?;
    let stages = dag.pipeline().stages.len();
    let context = json!({
        "svg": loaded.drawing.as_ref().map(|d| d.svg.clone()).unwrap_or_default(),
        "stages": stages,
        "edges": dag.edge_count(),
        "name": dag.pipeline().file.display().to_string(),
    });
    render(&app, "pipeline.html", base(&app, n, "pipeline", context))
}

/// Each stage's state: `fresh`, `stale` (with reasons), `failed` or `quarantined` (by the last
/// run that decided it, while it is still stale), `running` (in a run going on now).
async fn status_json(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Response {
    let (_, dag) = match pipeline_of(&app, n, "pipeline") {
        Ok(found) => found,
        Err(response) => return response.into_response(),
    };
    let app2 = app.clone();
    let dag2 = dag.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let statuses = crate::plan::status(&dag2, &crate::plan::Selection::default(), |_| {});
        let records = app2.pipelines[n].records(&dag2);
        (statuses, records)
    })
    .await;
    let (statuses, records) = match computed {
        Ok(found) => found,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let statuses = match statuses {
        Ok(statuses) => statuses,
        Err(e) => return Json(json!({"error": e.to_string()})).into_response(),
    };
    let running = running_stages(&dag.pipeline().workdir);
    let newest = newest_by_stage(&records, |_| true);
    let mut out = serde_json::Map::new();
    for status in statuses {
        let last = newest.get(status.name.as_str()).map(|(_, s)| *s);
        let state = if let Some(state) = running.get(&status.name) {
            state.clone()
        } else if !status.stale {
            "fresh".to_owned()
        } else {
            match last {
                Some(s) if s.quarantine.is_some() && s.accepted.is_none() => "quarantined".into(),
                Some(s) if s.decision == Decision::Failed => "failed".into(),
                _ => "stale".into(),
            }
        };
        let reasons: Vec<String> = status.reasons.iter().map(ToString::to_string).collect();
        out.insert(
            status.name.clone(),
            json!({"state": state, "reasons": reasons, "error": last.and_then(|s| s.error.clone())}),
        );
    }
    Json(json!({ "stages": out })).into_response()
}

/// Stage records by stage name, each with its run.
type Newest<'a> =
    std::collections::HashMap<&'a str, (&'a RunRecord, &'a crate::state::record::StageRecord)>;

/// Each stage's newest record (of a run in `records`, newest first) that `keep` keeps, with its
/// run: one pass over the records, whatever the number of stages.
fn newest_by_stage(
    records: &[Arc<RunRecord>],
    keep: impl Fn(&crate::state::record::StageRecord) -> bool,
) -> Newest<'_> {
    let mut found = std::collections::HashMap::new();
    for run in records {
        for stage in run.stages.iter().filter(|s| keep(s)) {
            found.entry(stage.name.as_str()).or_insert((&**run, stage));
        }
    }
    found
}

/// The stages of the runs going on in `workdir`, by their last line (`running`, `queued`…).
fn running_stages(workdir: &std::path::Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (_, lines) in super::live::running(workdir) {
        for line in lines.into_iter().filter(|l| !l.stage.is_empty()) {
            out.insert(line.stage, line.state);
        }
    }
    out.retain(|_, state| {
        matches!(
            state.as_str(),
            "running" | "restoring" | "queued" | "retrying" | "waiting"
        )
    });
    out
}

#[derive(Deserialize)]
struct StageQuery {
    name: String,
}

/// A stage's panel: what it is, its params, its inputs and outputs with sizes, its last runs.
async fn stage_panel(
    State(app): Shared,
    UrlPath(n): UrlPath<usize>,
    Query(query): Query<StageQuery>,
) -> Page {
    let (_, dag) = pipeline_of(&app, n, "pipeline")?;
    let Some(index) = dag.index_of(&query.name) else {
        return Err(not_found("no such stage").into());
    };
    let stage = dag.stage(index);
    let workdir = &dag.pipeline().workdir;
    let (kind, params, commands) = match &stage.kind {
        crate::model::StageKind::Builtin {
            name,
            version,
            params,
        } => (
            format!("built-in {name} v{version}"),
            masked(params),
            Vec::new(),
        ),
        crate::model::StageKind::Shell {
            templates,
            params,
            argv,
            ..
        } => (
            if *argv { "argv" } else { "shell" }.to_owned(),
            masked(params),
            templates.iter().map(|(t, _)| t.clone()).collect(),
        ),
    };
    let port = |p: &crate::model::Port| {
        let shown = p.declared.location.display(workdir);
        let size = p
            .declared
            .location
            .local_path()
            .and_then(size_of)
            .map(size_text);
        json!({"name": p.name, "path": shown, "size": size})
    };
    let records = app.pipelines[n].records(&dag);
    let last: Vec<Value> = records
        .iter()
        .filter_map(|r| {
            let s = r.stages.iter().find(|s| s.name == stage.name)?;
            Some(json!({
                "run": r.id, "href": format!("/p/{n}/runs/{}", encode(&r.id)),
                "decision": s.decision.as_str(), "duration": millis(s.duration_ms),
                "started": r.started,
            }))
        })
        .take(5)
        .collect();
    let context = json!({
        "stage": stage.name,
        "desc": stage.desc,
        "kind": kind,
        "engine": format!("{:?}", stage.engine).to_lowercase(),
        "executor": stage.executor,
        "params": if params.is_null() || params == json!({}) { None } else { Some(serde_json::to_string_pretty(&params).unwrap_or_default()) },
        "commands": commands,
        "inputs": stage.inputs.iter().map(port).collect::<Vec<_>>(),
        "outputs": stage.outputs.iter().map(port).collect::<Vec<_>>(),
        "checks": stage.checks.len(),
        "last": last,
        "n": n,
        "read_only": app.read_only,
    });
    render(&app, "stage.html", context)
}

/// Params with a secret-looking key's value masked.
fn masked(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if crate::config::looks_secret(k) {
                        json!("***")
                    } else {
                        masked(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(masked).collect()),
        other => other.clone(),
    }
}

// ---- runs -------------------------------------------------------------------------------

fn run_row(n: usize, r: &RunRecord) -> Value {
    json!({
        "id": r.id,
        "href": format!("/p/{n}/runs/{}", encode(&r.id)),
        "started": r.started,
        "status": r.status.as_str(),
        "duration": if r.status == RunStatus::Running { String::new() } else { millis(r.duration_ms) },
        "ran": r.count(Decision::Ran),
        "restored": r.count(Decision::Restored),
        "skipped": r.count(Decision::Skipped) + r.count(Decision::Cached),
        "failed": r.count(Decision::Failed),
        "stages": r.stages.len(),
    })
}

async fn runs_page(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Page {
    let (_, dag) = pipeline_of(&app, n, "runs")?;
    let records = app.pipelines[n].records(&dag);
    let rows: Vec<Value> = records.iter().map(|r| run_row(n, r)).collect();
    render(
        &app,
        "runs.html",
        base(&app, n, "runs", json!({ "runs": rows })),
    )
}

/// A stage's line on a run's page.
#[derive(serde::Serialize, Default)]
struct Lane {
    name: String,
    decision: String,
    reasons: Vec<String>,
    start: Option<u64>,
    duration_ms: u64,
    duration: String,
    worker: String,
    error: Option<String>,
    checks: Vec<Value>,
    report: Option<String>,
    log: String,
    log_href: Option<String>,
    quarantine: Option<String>,
    attempts: usize,
    /// Where its bar starts and how wide it is, in percent of the run's span.
    bar: Option<(String, String)>,
}

/// One run: its stages on a timeline, each with its decision, reasons, worker, checks, report
/// and the tail of its log. A run going on shows its live lines.
async fn run_page(State(app): Shared, UrlPath((n, id)): UrlPath<(usize, String)>) -> Page {
    let (_, dag) = pipeline_of(&app, n, "runs")?;
    let records = app.pipelines[n].records(&dag);
    let Some(record) = records.iter().find(|r| r.id == id) else {
        return Err(not_found("no such run").into());
    };
    let workdir = dag.pipeline().workdir.clone();
    let by_name: std::collections::HashMap<&str, &crate::model::Stage> = dag
        .pipeline()
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let live: Vec<crate::run::live::LiveLine> = super::live::running(&workdir)
        .into_iter()
        .find(|(run, _)| *run == id)
        .map(|(_, lines)| lines)
        .unwrap_or_default();
    let running = record.status == RunStatus::Running && !live.is_empty();
    let t0 = epoch_ms(&record.started).unwrap_or(0);
    let mut rows: Vec<Lane> = Vec::new();
    if running {
        // Stage by stage as the live file tells: when each started, and how it is now.
        let mut seen: BTreeMap<String, (u64, String, String)> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for line in live.iter().filter(|l| !l.stage.is_empty()) {
            let entry = seen.entry(line.stage.clone()).or_insert_with(|| {
                order.push(line.stage.clone());
                (line.at, String::new(), String::new())
            });
            if line.state == "running" || line.state == "restoring" {
                entry.0 = line.at;
            }
            entry.1 = line.state.clone();
            entry.2 = line.detail.clone();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last_at = live.iter().map(|l| l.at).max().unwrap_or(now);
        for name in order {
            let (at, state, detail) = &seen[&name];
            let ends = if state == "running" || state == "restoring" {
                now
            } else {
                last_at.min(now)
            };
            rows.push(Lane {
                worker: worker(by_name.get(name.as_str()).copied(), None),
                decision: state.clone(),
                reasons: vec![detail.clone()],
                start: Some(at.saturating_sub(t0)),
                duration_ms: ends.saturating_sub(*at),
                duration: millis(ends.saturating_sub(*at)),
                name,
                ..Lane::default()
            });
        }
    } else {
        for s in &record.stages {
            let start = s.started.as_deref().and_then(epoch_ms);
            // A failed stage's log end is on the page; the others' come when opened (a run
            // may have 10,000 stages).
            let log_tail = match (&s.log, s.decision) {
                (Some(log), Decision::Failed) => tail(&workdir, log),
                _ => String::new(),
            };
            let log_href = s.log.as_ref().map(|_| {
                format!(
                    "/p/{n}/runs/{}/log?name={}",
                    encode(&record.id),
                    encode(&s.name)
                )
            });
            rows.push(Lane {
                name: s.name.clone(),
                decision: s.decision.as_str().to_owned(),
                reasons: s.reasons.clone(),
                start: start.map(|at| at.saturating_sub(t0)),
                duration_ms: s.duration_ms,
                duration: millis(s.duration_ms),
                worker: worker(by_name.get(s.name.as_str()).copied(), s.job.as_ref()),
                error: s.error.clone(),
                checks: s
                    .checks
                    .iter()
                    .map(|c| {
                        json!({
                            "name": c.name, "status": format!("{:?}", c.status).to_lowercase(),
                            "value": c.value.to_string(), "expected": c.expected,
                            "detail": c.detail,
                        })
                    })
                    .collect(),
                report: s
                    .report
                    .as_ref()
                    .map(|r| serde_json::to_string_pretty(&r["summary"]).unwrap_or_default())
                    .filter(|r| r != "null"),
                log: log_tail,
                log_href,
                quarantine: s.quarantine.clone(),
                attempts: s.attempts.len(),
                bar: None,
            });
        }
    }
    // The bars: each stage's start and length as a share of the run's span.
    let span = rows
        .iter()
        .filter_map(|r| Some(r.start? + r.duration_ms))
        .max()
        .unwrap_or(0)
        .max(record.duration_ms)
        .max(1);
    for row in &mut rows {
        if let Some(start) = row.start {
            row.bar = Some((
                format!("{:.2}", start as f64 * 100.0 / span as f64),
                format!(
                    "{:.2}",
                    (row.duration_ms as f64 * 100.0 / span as f64).max(0.3)
                ),
            ));
        }
    }
    let context = json!({
        "run": run_row(n, record),
        "running": running,
        "title": format!("run {}", record.id),
        "overrides": record.overrides,
        "span": millis(span),
    });
    let rows = minijinja::Value::from_serialize(&rows);
    render_with(&app, "run.html", base(&app, n, "runs", context), rows)
}

/// The end of one stage's log in one run, as text.
async fn log_tail(
    State(app): Shared,
    UrlPath((n, id)): UrlPath<(usize, String)>,
    Query(query): Query<StageQuery>,
) -> Response {
    let (_, dag) = match pipeline_of(&app, n, "runs") {
        Ok(found) => found,
        Err(response) => return response.into_response(),
    };
    let records = app.pipelines[n].records(&dag);
    let log = records
        .iter()
        .find(|r| r.id == id)
        .and_then(|r| r.stages.iter().find(|s| s.name == query.name))
        .and_then(|s| s.log.clone());
    match log {
        Some(log) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            tail(&dag.pipeline().workdir, &log),
        )
            .into_response(),
        None => not_found("no log"),
    }
}

/// Where a stage ran: its executor's job (and node), Spark, or here.
fn worker(
    stage: Option<&crate::model::Stage>,
    job: Option<&crate::state::record::JobRecord>,
) -> String {
    if let Some(job) = job {
        return match &job.node {
            Some(node) => format!("{} job {} on {node}", job.executor, job.id),
            None => format!("{} job {}", job.executor, job.id),
        };
    }
    match stage {
        Some(stage) if stage.executor.is_some() => stage.executor.clone().unwrap_or_default(),
        Some(stage) if stage.engine == crate::model::Engine::Spark => "spark".to_owned(),
        _ => "local".to_owned(),
    }
}

/// The last lines of a stage's log, if it is under the workdir's `.imba/logs/`.
fn tail(workdir: &std::path::Path, log: &str) -> String {
    let path = workdir.join(log);
    let logs = crate::state::StateDir::new(workdir).root.join("logs");
    let (Ok(path), Ok(logs)) = (path.canonicalize(), logs.canonicalize()) else {
        return String::new();
    };
    if !path.starts_with(&logs) {
        return String::new();
    }
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(&path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    // No terminal escapes in a page.
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

// ---- checks, versions, partitions, reports ------------------------------------------------

async fn checks_page(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Page {
    let (_, dag) = pipeline_of(&app, n, "checks")?;
    let records = app.pipelines[n].records(&dag);
    let newest = newest_by_stage(&records, |s| !s.checks.is_empty());
    let mut stages = Vec::new();
    for &index in dag.order() {
        let stage = dag.stage(index);
        let found = newest.get(stage.name.as_str()).copied();
        if stage.checks.is_empty() && found.is_none() {
            continue;
        }
        let checks: Vec<Value> = found
            .map(|(_, s)| {
                s.checks
                    .iter()
                    .map(|c| {
                        json!({
                            "name": c.name,
                            "status": format!("{:?}", c.status).to_lowercase(),
                            "severity": format!("{:?}", c.severity).to_lowercase(),
                            "value": c.value.to_string(),
                            "expected": c.expected,
                            "detail": c.detail,
                            "output": c.output,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        stages.push(json!({
            "stage": stage.name,
            "run": found.map(|(r, _)| r.id.clone()),
            "href": found.map(|(r, _)| format!("/p/{n}/runs/{}", encode(&r.id))),
            "checks": checks,
            "declared": stage.checks.len(),
        }));
    }
    render(
        &app,
        "checks.html",
        base(&app, n, "checks", json!({ "stages": stages })),
    )
}

#[derive(Deserialize, Default)]
struct DiffQuery {
    stage: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn versions_page(
    State(app): Shared,
    UrlPath(n): UrlPath<usize>,
    Query(query): Query<DiffQuery>,
) -> Page {
    let (_, dag) = pipeline_of(&app, n, "versions")?;
    let mut stages = Vec::new();
    let mut diff = Value::Null;
    for stage in dag
        .pipeline()
        .stages
        .iter()
        .filter(|s| s.versioning.is_some())
    {
        let Some(root) = stage.outputs[0].declared.location.local_path() else {
            stages
                .push(json!({"stage": stage.name, "error": "versions on S3 are not listed here"}));
            continue;
        };
        let listed = crate::report::versions::list(root, &stage.outputs[0].text, true)
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()));
        let versions = match listed {
            Ok(versions) => versions,
            Err(e) => {
                stages.push(json!({"stage": stage.name, "error": e}));
                continue;
            }
        };
        if query.stage.as_deref() == Some(stage.name.as_str()) {
            if let (Some(from), Some(to)) = (&query.from, &query.to) {
                diff = crate::report::versions::diff(root, from, to, true)
                    .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
                    .unwrap_or_else(|e| json!({"error": e}));
                if let Some(means) = diff["means"].as_array_mut() {
                    for m in means {
                        m["change"] = json!(m["change_pct"]
                            .as_f64()
                            .map(|p| format!("{p:+.2}%"))
                            .unwrap_or_default());
                    }
                }
            }
        }
        stages.push(json!({
            "stage": stage.name, "output": stage.outputs[0].text, "versions": versions,
        }));
    }
    let context = json!({
        "stages": stages, "diff": diff,
        "query": {"stage": query.stage, "from": query.from, "to": query.to},
    });
    render(&app, "versions.html", base(&app, n, "versions", context))
}

async fn partitions_page(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Page {
    let (_, dag) = pipeline_of(&app, n, "partitions")?;
    if dag.pipeline().partitions.is_empty() {
        return render(
            &app,
            "partitions.html",
            base(&app, n, "partitions", json!({"partitioned": false})),
        );
    }
    let app2 = app.clone();
    let dag2 = dag.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let statuses = crate::plan::status(&dag2, &crate::plan::Selection::default(), |_| {});
        let records: Vec<RunRecord> = app2.pipelines[n]
            .records(&dag2)
            .iter()
            .map(|r| (**r).clone())
            .collect();
        let grid = statuses.map(|statuses| {
            let states = crate::report::partitions::states(&statuses, &records);
            crate::report::partitions::rows(&dag2, &states)
        });
        let series = crate::plan::metrics(&dag2, &[], |_| {});
        (grid, series)
    })
    .await
    .map_err(|e| {
        Failure::from((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
    })?;
    let (grid, series) = computed;
    let (names, rows) =
        grid.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())?;
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let cells: Vec<Value> = names
                .iter()
                .map(|name| match r.stages.get(name) {
                    Some(state) => json!({
                        "class": serde_json::to_value(state).unwrap_or_default(),
                        "text": state.as_str(),
                    }),
                    None => Value::Null,
                })
                .collect();
            json!({"set": r.set, "key": r.key, "cells": cells})
        })
        .collect();
    let plots: Vec<Value> = series
        .unwrap_or_default()
        .iter()
        .filter(|s| s.points.len() > 1 && s.points.iter().any(|p| p.value.is_some()))
        .map(|s| {
            json!({
                "title": format!("{} · {}", s.stage, s.metric),
                "svg": line_chart(&s.points),
                "points": s.points.iter().map(|p| json!({
                    "key": p.partition, "value": p.value.map(|v| format!("{v:.6}")),
                    "change": p.change_pct.map(|c| format!("{c:+.2}%")),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let context = json!({"partitioned": true, "names": names, "rows": rows, "plots": plots});
    render(
        &app,
        "partitions.html",
        base(&app, n, "partitions", context),
    )
}

/// A metric over partitions as a small SVG line chart (points only where a value exists).
fn line_chart(points: &[crate::plan::MetricPoint]) -> String {
    use std::fmt::Write;
    let (w, h, pad) = (560.0, 160.0, 28.0);
    let values: Vec<f64> = points.iter().filter_map(|p| p.value).collect();
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, hi + 1.0)
    } else {
        (0.0, 1.0)
    };
    let x = |i: usize| pad + i as f64 * (w - 2.0 * pad) / (points.len().max(2) - 1) as f64;
    let y = |v: f64| h - pad - (v - lo) / (hi - lo) * (h - 2.0 * pad);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    let path: Vec<String> = points
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some(format!("{:.1},{:.1}", x(i), y(p.value?))))
        .collect();
    let _ = write!(out, r#"<polyline points="{}"/>"#, path.join(" "));
    for (i, p) in points.iter().enumerate() {
        if let Some(v) = p.value {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3"><title>{}: {v}</title></circle>"#,
                x(i),
                y(v),
                super::layout::escape(p.partition.as_deref().unwrap_or(&p.instance))
            );
        }
    }
    let _ = write!(
        out,
        r#"<text x="2" y="{pad}">{}</text><text x="2" y="{}">{}</text></svg>"#,
        super::layout::escape(&format!("{hi:.4}")),
        h - pad,
        super::layout::escape(&format!("{lo:.4}"))
    );
    out
}

/// The diagnostics reports of `diagnose` stages, each embedded.
async fn reports_page(State(app): Shared, UrlPath(n): UrlPath<usize>) -> Page {
    let (_, dag) = pipeline_of(&app, n, "reports")?;
    let mut reports = Vec::new();
    for stage in &dag.pipeline().stages {
        let crate::model::StageKind::Builtin { name, .. } = &stage.kind else {
            continue;
        };
        if name != "diagnose" {
            continue;
        }
        for (i, output) in stage.outputs.iter().enumerate() {
            let Some(dir) = output.declared.location.local_path() else {
                continue;
            };
            let exists = dir.join("report.html").is_file();
            reports.push(json!({
                "stage": stage.name,
                "src": format!("/p/{n}/files/{}/{i}/report.html", encode(&stage.name)),
                "exists": exists,
                "path": output.text,
            }));
        }
    }
    render(
        &app,
        "reports.html",
        base(&app, n, "reports", json!({"reports": reports})),
    )
}

/// A file inside a stage's declared output folder (a report and its plots), never outside it.
async fn output_file(
    State(app): Shared,
    UrlPath((n, stage, path)): UrlPath<(usize, String, String)>,
) -> Response {
    let Ok((_, dag)) = pipeline_of(&app, n, "reports") else {
        return not_found("no such pipeline");
    };
    let Some(index) = dag.index_of(&stage) else {
        return not_found("no such stage");
    };
    let (output, rest) = path.split_once('/').unwrap_or((path.as_str(), ""));
    let Some(port) = output
        .parse::<usize>()
        .ok()
        .and_then(|i| dag.stage(index).outputs.get(i))
    else {
        return not_found("no such output");
    };
    let Some(root) = port.declared.location.local_path() else {
        return not_found("not a local output");
    };
    let (Ok(root), Ok(file)) = (root.canonicalize(), root.join(rest).canonicalize()) else {
        return not_found("no such file");
    };
    if !file.starts_with(&root) || !file.is_file() {
        return not_found("no such file");
    }
    let Ok(bytes) = tokio::fs::read(&file).await else {
        return not_found("unreadable");
    };
    let kind = match file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
    {
        "html" => "text/html; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" => "application/json",
        "css" => "text/css",
        _ => "application/octet-stream",
    };
    let mut response = ([(header::CONTENT_TYPE, kind)], bytes).into_response();
    // A report is a document of its own, with its own inline style, and no script of ours.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'self'",
        ),
    );
    response
}

// ---- live and actions ---------------------------------------------------------------------

/// Server-sent events: every line a run writes and every record saved, as they come.
async fn events(
    State(app): Shared,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let receiver = app.live.sender.subscribe();
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(text) => SseEvent::default().data(text),
            // A slow page missed some: it reloads what it shows.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                SseEvent::default().event("lagged").data("{}")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
struct RunAsk {
    /// One stage (with `--downstream` when `downstream`), or the whole pipeline.
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    downstream: bool,
}

/// Starts `imba run` for the pipeline (or one stage and what depends on it) as a process of
/// its own, as the CLI would; its progress reaches the pages through its live file.
async fn run_action(
    State(app): Shared,
    UrlPath(n): UrlPath<usize>,
    Json(ask): Json<RunAsk>,
) -> Response {
    let (_, dag) = match pipeline_of(&app, n, "pipeline") {
        Ok(found) => found,
        Err(response) => return response.into_response(),
    };
    let file = app.pipelines[n].file.clone();
    let mut command = tokio::process::Command::new(&app.exe);
    command.arg("run").arg(&file).arg("--no-wait");
    if let Some(stage) = &ask.stage {
        // Only a stage of this pipeline: the name goes to imba as one argument, never a shell.
        if dag.index_of(stage).is_none() {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "no such stage"})),
            )
                .into_response();
        }
        command.arg("--stage").arg(stage);
        if ask.downstream {
            command.arg("--downstream");
        }
    }
    let state = crate::state::StateDir::new(&dag.pipeline().workdir);
    let logs = state.root.join("ui");
    let _ = std::fs::create_dir_all(&logs);
    let log_path = logs.join(format!("{}.log", crate::state::new_run_id()));
    let Ok(log) = std::fs::File::create(&log_path) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot write the run's log",
        )
            .into_response();
    };
    let Ok(log2) = log.try_clone() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot write the run's log",
        )
            .into_response();
    };
    command
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .env("NO_COLOR", "1");
    match command.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            // Reaped when it ends; the server does not wait for it.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            (
                StatusCode::ACCEPTED,
                Json(json!({"started": true, "pid": pid, "log": log_path.display().to_string()})),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": format!("cannot start imba: {e}")})),
        )
            .into_response(),
    }
}
