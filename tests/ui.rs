//! `imba ui`: its guard over plain HTTP (the token, `Host`, `Origin`, `--read-only`, files kept
//! inside declared outputs), and every page of the shipped monthly pipeline in a real headless
//! Chromium driven through ChromeDriver (`scripts/chromium-local`): what the DOM shows, a run
//! started from the page and seen live, no console errors, a screenshot of each page.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::Test;

/// A shell pipeline whose first stage takes a while: long enough to be seen running.
const SLOW: &str = r#"desc: Two shell stages, the first slow enough to be watched.
workdir: ..
stages:
  first:
    cmd: echo waiting for two seconds >&2 && sleep 2 && echo one > {{ outputs.stamp }}
    outputs:
      stamp: out/slow/first.txt
  second:
    cmd: sleep 2 && cat {{ inputs.stamp }} > {{ outputs.copy }}
    inputs:
      stamp: out/slow/first.txt
    outputs:
      copy: out/slow/second.txt
"#;

/// A running `imba ui`, stopped when dropped.
struct Ui {
    child: Child,
    port: u16,
    token: String,
}

impl Ui {
    /// `imba ui --port 0 ARGS…` in the test's dir; waits for the URL it prints.
    fn start(test: &Test, args: &[&str]) -> Ui {
        let mut all = vec!["ui", "--port", "0"];
        all.extend_from_slice(args);
        let mut child = test
            .command(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start imba ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the URL");
        let url = line.trim();
        let rest = url
            .strip_prefix("http://127.0.0.1:")
            .unwrap_or_else(|| panic!("imba ui printed {url:?}"));
        let (port, token) = rest.split_once("/?token=").expect("a token in the URL");
        Ui {
            child,
            port: port.parse().unwrap(),
            token: token.to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn cookie(&self) -> String {
        format!("imba-ui-{}={}", self.port, self.token)
    }

    /// One HTTP/1.1 request, as written (headers after the request line), and the status code
    /// and whole answer.
    fn raw(&self, method: &str, path: &str, headers: &[String], body: &str) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        if !headers
            .iter()
            .any(|h| h.to_lowercase().starts_with("host:"))
        {
            request.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let code = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, answer)
    }

    /// A GET with the cookie the token URL sets.
    fn get(&self, path: &str) -> (u16, String) {
        self.raw("GET", path, &[format!("Cookie: {}", self.cookie())], "")
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped monthly pipeline and sample, run once, with the slow pipeline beside it.
fn workdir() -> Test {
    let repo = common::repo();
    let mut test = common::monthly("").file("pipelines/slow.yaml", SLOW).file(
        "pipelines/monthly_partitioned.yaml",
        std::fs::read(repo.join("pipelines/monthly_partitioned.yaml")).unwrap(),
    );
    for month in ["2017-03", "2017-04", "2017-05"] {
        let path = format!("examples/instacart/months/{month}/orders.csv");
        test = test.file(&path, std::fs::read(repo.join(&path)).unwrap());
    }
    let out = test.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    test
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_missing_pipeline_file_is_a_usage_error() {
    let test = Test::new();
    insta::assert_snapshot!(
        "a_missing_pipeline_file",
        test.exec(&["ui", "nope.yaml", "--port", "0"]).all()
    );
    insta::assert_snapshot!(
        "no_pipeline_at_all",
        test.exec(&["ui", "--port", "0"]).all()
    );
}

/// Without the token, from another site, under another name, or an action without the token
/// header: 403. The token URL sets the cookie and leaves the address bar.
#[test]
fn the_guard_refuses_what_it_must() {
    let test = workdir();
    let ui = Ui::start(&test, &["pipelines/monthly.yaml"]);
    let own = format!("Origin: http://127.0.0.1:{}", ui.port);

    assert_eq!(ui.raw("GET", "/p/0", &[], "").0, 403);
    assert_eq!(ui.raw("GET", "/p/0?token=0123456789abcdef", &[], "").0, 403);
    assert_eq!(ui.raw("GET", "/assets/app.js", &[], "").0, 403);
    assert_eq!(ui.raw("GET", "/events", &[], "").0, 403);

    let (code, answer) = ui.raw("GET", &format!("/p/0/runs?token={}", ui.token), &[], "");
    assert_eq!(code, 303, "{answer}");
    assert!(answer.contains("location: /p/0/runs\r\n"), "{answer}");
    assert!(
        answer.contains(&format!(
            "set-cookie: {}; Path=/; HttpOnly; SameSite=Strict\r\n",
            ui.cookie()
        )),
        "{answer}"
    );

    let (code, page) = ui.get("/p/0");
    assert_eq!(code, 200);
    assert!(page.contains("data-stage=\"clean_orders\""), "{page}");
    assert!(page.contains("content-security-policy: default-src 'self'"));
    assert_eq!(
        ui.raw("GET", "/p/0", &[format!("X-Imba-Token: {}", ui.token)], "")
            .0,
        200
    );

    let cookie = format!("Cookie: {}", ui.cookie());
    // DNS rebinding: the browser sends the attacker's name.
    let rebound = format!("Host: evil.example:{}", ui.port);
    assert_eq!(ui.raw("GET", "/p/0", &[cookie.clone(), rebound], "").0, 403);
    // Another site's page.
    let foreign = "Origin: http://evil.example".to_owned();
    assert_eq!(
        ui.raw("GET", "/p/0", &[cookie.clone(), foreign.clone()], "")
            .0,
        403
    );
    assert_eq!(
        ui.raw("GET", "/p/0", &[cookie.clone(), own.clone()], "").0,
        200
    );

    // An action needs the token header, and no foreign origin.
    let header = format!("X-Imba-Token: {}", ui.token);
    let ask = r#"{"stage": "user_features"}"#;
    assert_eq!(ui.raw("POST", "/p/0/run", &[cookie], ask).0, 403);
    assert_eq!(
        ui.raw("POST", "/p/0/run", &[header.clone(), foreign], ask)
            .0,
        403
    );
    assert_eq!(
        ui.raw(
            "POST",
            "/p/0/run",
            &[header.clone(), own.clone()],
            r#"{"stage": "x; rm -rf /"}"#
        )
        .0,
        400
    );

    // Files: inside a declared output folder only.
    let report = "/p/0/files/diagnose_imputation/0/report.html";
    let (code, answer) = ui.get(report);
    assert_eq!(code, 200);
    assert!(
        answer.contains("<html"),
        "{}",
        &answer[..answer.len().min(400)]
    );
    for escape in [
        "/p/0/files/diagnose_imputation/0/../../../pipelines/monthly.yaml",
        "/p/0/files/diagnose_imputation/0/%2e%2e/%2e%2e/%2e%2e/pipelines/monthly.yaml",
        "/p/0/files/diagnose_imputation/9/report.html",
        "/p/0/files/nope/0/report.html",
    ] {
        let (code, answer) = ui.get(escape);
        assert!(code == 404 || code == 400, "{escape}: {answer}");
        assert!(!answer.contains("stages:"), "{escape}: {answer}");
    }

    // The action runs imba: a new record appears, the stage ran.
    let runs_before = std::fs::read_dir(test.path().join(".imba/runs"))
        .unwrap()
        .count();
    let (code, answer) = ui.raw("POST", "/p/0/run", &[header, own], ask);
    assert_eq!(code, 202, "{answer}");
    wait_until(
        "the run started from the page",
        Duration::from_secs(60),
        || {
            let records = common::tree(&test.path().join(".imba/runs"));
            records.len() > runs_before
                && records
                    .values()
                    .all(|r| !String::from_utf8_lossy(r).contains("\"status\": \"running\""))
        },
    );
    let record = test.record_of("pipelines/monthly.yaml");
    assert_eq!(record["status"], "ok", "{record}");
    let names: Vec<&str> = record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"user_features"), "{record}");

    // Read-only: the same pages, no actions.
    let read_only = Ui::start(&test, &["pipelines/monthly.yaml", "--read-only"]);
    let (code, page) = read_only.get("/p/0");
    assert_eq!(code, 200);
    assert!(!page.contains("Run the pipeline"), "{page}");
    let header = format!("X-Imba-Token: {}", read_only.token);
    let origin = format!("Origin: http://127.0.0.1:{}", read_only.port);
    let (code, answer) = read_only.raw("POST", "/p/0/run", &[header, origin], ask);
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("read-only"), "{answer}");
}

/// The browser half: every page of the shipped monthly pipeline, a live run, an action.
#[test]
fn every_page_in_a_real_browser() {
    let Some(webdriver) = common::start_cluster("chromium-local", &[], "WEBDRIVER") else {
        return;
    };
    let test = workdir();
    // A second version of the features: the same orders less their last 200 lines.
    let orders = test.read("examples/instacart/orders.csv");
    let lines: Vec<&str> = orders.lines().collect();
    test.write(
        "examples/instacart/orders.csv",
        lines[..lines.len() - 200].join("\n") + "\n",
    );
    let out = test.exec(&["run", "pipelines/monthly.yaml"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Two months of three.
    let out = test.exec(&[
        "run",
        "pipelines/monthly_partitioned.yaml",
        "--partitions",
        "2017-03..2017-04",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ui = Ui::start(
        &test,
        &[
            "pipelines/monthly.yaml",
            "pipelines/monthly_partitioned.yaml",
            "pipelines/slow.yaml",
        ],
    );
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let record = test.record_of("pipelines/monthly.yaml");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(browse(&webdriver, &ui, &test, &record, &shots));
}

/// Chromium's own console: what the page logged as an error since the last call.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(serde_json::json!({"type": "browser"}).to_string()),
        )
    }
}

async fn browse(
    webdriver: &str,
    ui: &Ui,
    test: &Test,
    record: &serde_json::Value,
    shots: &std::path::Path,
) {
    use fantoccini::Locator;
    let profile = tempfile::tempdir().unwrap();
    let mut caps = fantoccini::wd::Capabilities::new();
    caps.insert("browserName".into(), serde_json::json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     format!("--user-data-dir={}", profile.path().display())],
        }),
    );
    caps.insert(
        "goog:loggingPrefs".into(),
        serde_json::json!({"browser": "ALL"}),
    );
    let client =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(webdriver)
            .await
            .expect("a Chromium session");
    client.set_window_size(1280, 800).await.unwrap();
    let wait = Duration::from_secs(20);

    let errors = |client: fantoccini::Client, page: &'static str| async move {
        let log = client.issue_cmd(BrowserLog).await.unwrap();
        let severe: Vec<&serde_json::Value> = log
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(severe.is_empty(), "console errors on {page}: {severe:?}");
    };
    let shot = |client: fantoccini::Client, name: &'static str| {
        let path = shots.join(format!("{name}.png"));
        async move {
            let png = client.screenshot().await.unwrap();
            std::fs::write(&path, png).unwrap();
        }
    };
    let click = |client: fantoccini::Client, css: &'static str| async move {
        client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    };
    // A page done: no console errors, and its screenshot.
    let checked = |client: fantoccini::Client, page: &'static str| async move {
        errors(client.clone(), page).await;
        shot(client, page).await;
    };
    // A page opened and seen live: its statuses fetched and its event stream open.
    let open_live = |client: fantoccini::Client, url: String, what: String| async move {
        client.goto(&url).await.unwrap();
        client
            .wait()
            .at_most(wait)
            .for_element(Locator::Css(
                "body[data-status-loaded='true'][data-live='true']",
            ))
            .await
            .unwrap_or_else(|e| panic!("{what} never loaded its statuses live: {e}"));
    };
    let text_of = |client: fantoccini::Client, css: String| async move {
        client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(&css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .unwrap()
    };

    // The token URL, then the pipeline page: every stage drawn, each up to date.
    client
        .goto(&ui.url(&format!("/?token={}", ui.token)))
        .await
        .unwrap();
    assert_eq!(
        client.current_url().await.unwrap().as_str(),
        ui.url("/p/0"),
        "the token leaves the address bar"
    );
    client
        .wait()
        .at_most(wait)
        .for_element(Locator::Css("body[data-status-loaded='true']"))
        .await
        .expect("the statuses");
    let nodes = client.find_all(Locator::Css("#dag g.node")).await.unwrap();
    let mut seen = Vec::new();
    for node in &nodes {
        let name = node.attr("data-stage").await.unwrap().unwrap();
        let class = node.attr("class").await.unwrap().unwrap();
        assert!(class.contains("fresh"), "{name}: {class}");
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "aggregate_users",
            "clean_orders",
            "diagnose_imputation",
            "impute_days",
            "user_features"
        ]
    );
    assert_eq!(
        client
            .find_all(Locator::Css("#dag .edges path"))
            .await
            .unwrap()
            .len(),
        6
    );
    // A stage's panel.
    click(client.clone(), "#dag g.node[data-stage='clean_orders']").await;
    assert_eq!(
        text_of(client.clone(), "#panel h2.stage-name".into()).await,
        "clean_orders"
    );
    let panel = text_of(client.clone(), "#panel".into()).await;
    assert!(panel.contains("built-in clean v2"), "{panel}");
    assert!(panel.contains("examples/instacart/orders.csv"), "{panel}");
    assert!(text_of(client.clone(), "#stage-state".into())
        .await
        .starts_with("up to date"),);
    checked(client.clone(), "pipeline").await;

    // Runs, and the newest run's timeline: a bar for each stage that ran.
    client.goto(&ui.url("/p/0/runs")).await.unwrap();
    let rows = client
        .find_all(Locator::Css("#runs tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    checked(client.clone(), "runs").await;
    let newest = record["id"].as_str().unwrap();
    click(client.clone(), "#runs tbody tr a").await;
    assert_eq!(
        text_of(client.clone(), "#run h1".into()).await,
        format!("Run {newest}")
    );
    let ran: Vec<&str> = record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["decision"] == "ran")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(ran.contains(&"clean_orders"), "{record}");
    for stage in &ran {
        let bar = client
            .find(Locator::Css(&format!(
                ".lane[data-stage='{stage}'] .bar.ran"
            )))
            .await
            .unwrap_or_else(|_| panic!("a bar for {stage}"));
        let style = bar.attr("style").await.unwrap().unwrap();
        assert!(style.contains("width:"), "{style}");
    }
    checked(client.clone(), "run").await;

    // Checks: the values of the latest evaluation, as the record has them.
    client.goto(&ui.url("/p/0/checks")).await.unwrap();
    let clean = record["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "clean_orders")
        .unwrap();
    let first = &clean["checks"][0];
    let cells = client
        .find_all(Locator::Css(
            ".checks-of[data-stage='clean_orders'] tbody tr",
        ))
        .await
        .unwrap();
    assert_eq!(cells.len(), clean["checks"].as_array().unwrap().len());
    let row = cells[0].text().await.unwrap();
    assert!(row.contains(first["name"].as_str().unwrap()), "{row}");
    assert!(row.contains(&first["value"].to_string()), "{row} / {first}");
    assert!(row.contains("pass"), "{row}");
    checked(client.clone(), "checks").await;

    // Versions: two, and the diff between them.
    client.goto(&ui.url("/p/0/versions")).await.unwrap();
    let versions = client
        .find_all(Locator::Css(
            ".versions-of[data-stage='user_features'] tbody tr",
        ))
        .await
        .unwrap();
    assert_eq!(versions.len(), 2);
    click(client.clone(), "form.diff-form button").await;
    let diff = text_of(client.clone(), "#diff h2".into()).await;
    assert!(diff.starts_with("features_v1 → features_v2"), "{diff}");
    let rows_line = text_of(client.clone(), "#diff p".into()).await;
    assert!(rows_line.starts_with("rows: "), "{rows_line}");
    checked(client.clone(), "versions").await;

    // Reports: the diagnostics report, embedded.
    client.goto(&ui.url("/p/0/reports")).await.unwrap();
    let frame = client
        .find(Locator::Css(
            ".report-of[data-stage='diagnose_imputation'] iframe",
        ))
        .await
        .unwrap();
    let src = frame.attr("src").await.unwrap().unwrap();
    assert!(src.ends_with("/report.html"), "{src}");
    // Its text, once the frame has loaded it.
    let start = Instant::now();
    loop {
        let inside = client
            .execute(
                "const d = document.querySelector('iframe').contentDocument; \
                 return d && d.body && d.location.href !== 'about:blank' ? d.body.innerText : '';",
                vec![],
            )
            .await
            .unwrap();
        let text = inside.as_str().unwrap_or_default().to_owned();
        if text.contains("R-hat") || text.contains("R̂") || text.len() > 500 {
            break;
        }
        assert!(start.elapsed() < wait, "the report never showed: {text:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    checked(client.clone(), "reports").await;

    // Partitions: two months of three run, their metrics charted.
    client.goto(&ui.url("/p/1/partitions")).await.unwrap();
    let rows = client
        .find_all(Locator::Css("table.grid tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for (row, want) in rows.iter().zip(["up to date", "up to date", "never run"]) {
        let cells = row.find_all(Locator::Css("td.cell")).await.unwrap();
        assert_eq!(cells.len(), 5);
        for cell in cells {
            assert_eq!(cell.text().await.unwrap(), want);
        }
    }
    let charts = client
        .find_all(Locator::Css("figure.metric svg.chart"))
        .await
        .unwrap();
    assert!(!charts.is_empty());
    for chart in charts {
        let points = chart.find_all(Locator::Css("circle")).await.unwrap();
        assert_eq!(points.len(), 2, "a point per month run");
    }
    checked(client.clone(), "partitions").await;

    // Live: the slow pipeline, run from its page; its first stage seen running, then done.
    open_live(
        client.clone(),
        ui.url("/p/2"),
        "the slow pipeline's page".into(),
    )
    .await;
    let state = |name: &'static str| {
        let client = client.clone();
        async move {
            client
                .find(Locator::Css(&format!("#dag g.node[data-stage='{name}']")))
                .await
                .unwrap()
                .attr("data-state")
                .await
                .unwrap()
                .unwrap_or_default()
        }
    };
    assert_eq!(state("first").await, "stale");
    click(client.clone(), "#run-all").await;
    let start = Instant::now();
    while state("first").await != "running" {
        assert!(start.elapsed() < wait, "`first` never showed as running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shot(client.clone(), "live").await;
    // `first` done while `second` runs.
    while state("first").await != "fresh" || state("second").await != "running" {
        assert!(
            start.elapsed() < wait,
            "`first` never showed as done before `second`"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The run's page, while it runs: `second` running, then ran, as the record says.
    client.goto(&ui.url("/p/2/runs")).await.unwrap();
    click(client.clone(), "#runs tbody tr.running a").await;
    // Marks this document: a reload would lose the mark.
    client
        .execute("window.imbaTestMark = 42; return null;", vec![])
        .await
        .unwrap();
    client
        .wait()
        .at_most(wait)
        .for_element(Locator::Css(
            "#main:has(#run[data-running='true']) .lane[data-stage='second'] .decision.running",
        ))
        .await
        .unwrap_or_else(|e| {
            panic!("`second` running on the run's page: {e}");
        });

    if client
        .wait()
        .at_most(wait)
        .for_element(Locator::Css(
            "#main:has(#run[data-running='false']) .lane[data-stage='second'] .decision.ran",
        ))
        .await
        .is_err()
    {
        let main = client.find(Locator::Css("#main")).await.unwrap();
        let html = main.html(true).await.unwrap();
        panic!("`second` never showed as ran on the run's page, without a reload: {html}");
    }
    assert_eq!(text_of(client.clone(), "#run .status".into()).await, "ok");
    let mark = client
        .execute("return window.imbaTestMark;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, serde_json::json!(42), "the page was reloaded");
    assert_eq!(test.read("out/slow/second.txt"), "one\n");
    // A stage's log end comes when its details are opened.
    click(
        client.clone(),
        "details.stage-run[data-stage='first'] summary",
    )
    .await;
    let start = Instant::now();
    loop {
        let pre = client
            .find(Locator::Css(
                "details.stage-run[data-stage='first'] pre.log",
            ))
            .await
            .unwrap();
        if pre
            .text()
            .await
            .unwrap()
            .contains("waiting for two seconds")
        {
            break;
        }
        assert!(start.elapsed() < wait, "the log never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    errors(client.clone(), "live").await;

    // Eight tabs of the UI open at once: they share one event stream (a browser allows six
    // connections to a host), so the eighth still loads, fetches its statuses and is live.
    for tab in 1..=8 {
        let opened = client.new_window(true).await.unwrap();
        client.switch_to_window(opened.handle).await.unwrap();
        open_live(client.clone(), ui.url("/p/0"), format!("tab {tab} of 8")).await;
    }
    errors(client.clone(), "eight tabs").await;
    client.close().await.unwrap();

    // docs/ui.md shows these.
    if std::env::var_os("IMBA_UPDATE_DOCS").is_some() {
        let docs = common::repo().join("docs/ui");
        std::fs::create_dir_all(&docs).unwrap();
        for page in [
            "pipeline",
            "runs",
            "run",
            "checks",
            "versions",
            "partitions",
            "reports",
            "live",
        ] {
            let name = format!("{page}.png");
            std::fs::copy(shots.join(&name), docs.join(&name)).unwrap();
        }
    }
}

/// The states the Pipeline page colours: a stage whose check failed is quarantined, one whose
/// command failed is failed, what they block is stale, the rest up to date, each with its
/// reasons.
#[test]
fn statuses_tell_failed_quarantined_stale_and_up_to_date() {
    let test = Test::new().file("data.csv", "id,x\n1,5\n").pipeline(
        r#"
stages:
  copy:
    cmd: cp {{ inputs[0] }} {{ outputs.table }}
    inputs: [data.csv]
    outputs: {table: out/table.csv}
    checks:
      - rows: {min: 2}
  count:
    cmd: wc -l < {{ inputs[0] }} > {{ outputs[0] }}
    inputs: [out/table.csv]
    outputs: [out/count.txt]
  fine:
    cmd: cp {{ inputs[0] }} {{ outputs[0] }}
    inputs: [data.csv]
    outputs: [out/fine.csv]
  broken:
    cmd: exit 3
    inputs: [out/fine.csv]
    outputs: [out/broken.txt]
"#,
    );
    let out = test.exec(&["run", "pipeline.yaml", "--keep-going"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let ui = Ui::start(&test, &["pipeline.yaml"]);
    let (code, answer) = ui.get("/p/0/status");
    assert_eq!(code, 200, "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let status: serde_json::Value = serde_json::from_str(body).unwrap();
    let state = |stage: &str| {
        status["stages"][stage]["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(state("copy"), "quarantined", "{status}");
    assert_eq!(state("count"), "stale", "{status}");
    assert_eq!(state("fine"), "fresh", "{status}");
    assert_eq!(state("broken"), "failed", "{status}");
    let reasons = status["stages"]["broken"]["reasons"].to_string();
    assert!(reasons.contains("never run"), "{reasons}");
    assert!(
        status["stages"]["broken"]["error"]
            .as_str()
            .is_some_and(|e| e.contains('3')),
        "{status}"
    );
}

/// A pipeline file with errors is served as its errors, as `imba validate` prints them (file,
/// line and column), escaped; once fixed, the next request shows its graph.
#[test]
fn a_broken_pipeline_shows_its_errors_until_it_is_fixed() {
    let test = Test::new()
        .file("data.csv", "id\n1\n")
        .pipeline("stages:\n  a:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [data.csv]\n    outputs: [out/a.csv]\n    nonsense: <b>\n");
    let ui = Ui::start(&test, &["pipeline.yaml"]);
    let (code, page) = ui.get("/p/0");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("This pipeline does not load"), "{page}");
    assert!(page.contains("pipeline.yaml:6:5"), "{page}");
    assert!(page.contains("nonsense"), "{page}");
    assert!(!page.contains("<b>"), "unescaped: {page}");
    // Fixed: the graph, without restarting the server.
    std::thread::sleep(Duration::from_millis(20));
    test.write(
        "pipeline.yaml",
        "stages:\n  a:\n    cmd: cp {{ inputs[0] }} {{ outputs[0] }}\n    inputs: [data.csv]\n    outputs: [out/a.csv]\n",
    );
    let (code, page) = ui.get("/p/0");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("data-stage=\"a\""), "{page}");
}
