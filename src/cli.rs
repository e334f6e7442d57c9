//! The command line: argument definitions and dispatch to the library. Thin glue.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use imba_stages::Registry;

use std::sync::Arc;

use crate::config::{self, LoadError, Overrides};
use crate::graph::dag::{self, BuildOptions, Dag};
use crate::graph::draw::{self, DrawOptions, Format};
use crate::plan::{PartitionFilter, Selection, StageStatus};
use crate::report::{ColorChoice, Printer};
use crate::run::{Events, RunError, RunOptions};
use crate::state::record;
use crate::state::StateDir;

/// Exit status for a usage or config error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status when a stage failed.
pub const EXIT_STAGE_FAILED: u8 = 1;

/// imba: a declarative DAG orchestrator for data and feature pipelines.
///
/// Exit status: 0 success, 1 a stage failed, 2 a usage or config error.
#[derive(Parser, Debug)]
#[command(name = "imba", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// When to use color on stderr.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log what imba decides and why, and the time of each step of a built-in (-v); and how
    /// (-vv). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a project: a commented `pipelines/pipeline.yaml` (a built-in stage and a shell
    /// stage), a small `data/orders.csv` for it, and `.imba/` and `out/` in `.gitignore`.
    /// Overwrites nothing.
    Init {
        /// The project directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Check a pipeline file and report every problem at once; runs nothing.
    Validate(PipelineArgs),
    /// Run every stage that is out of date, in dependency order, in parallel.
    Run(RunArgs),
    /// Run what is stale, then watch the pipeline's source inputs, its file and vars files, and
    /// re-run exactly the stages a change affects, until Ctrl-C.
    Watch(WatchArgs),
    /// Serve a local web page for the pipelines: the DAG coloured by status, runs and their
    /// timelines, checks, versions, partitions and reports, updated live while a run goes on.
    /// Listens on 127.0.0.1 only and prints the URL, with the token every request needs.
    Ui(UiArgs),
    /// List the stages that are out of date, and why; runs nothing. With `-q`: print nothing,
    /// exit 1 when a stage is out of date (to gate CI).
    Status(StatusArgs),
    /// Draw the stage graph (text, DOT, Mermaid or JSON) on stdout.
    Dag(DagArgs),
    /// List recent runs of a pipeline.
    Log(LogArgs),
    /// Show one run of a pipeline: each stage's decision, reasons and outputs.
    Show(ShowArgs),
    /// What changed between two runs (default: the last two): the `--set` arguments and vars,
    /// the stages whose outputs changed, and the numbers the built-in stages reported.
    Diff(DiffArgs),
    /// List the outputs that checks kept in quarantine (`.imba/quarantine/`): which run and
    /// stage, which checks failed, where they are.
    Quarantine(ChecksArgs),
    /// Commit the outputs that checks kept in quarantine, after a person looked at them; the
    /// reason goes into the run record (`imba checks` shows the stage as accepted by hand).
    Accept(AcceptArgs),
    /// Print the latest result of every stage's checks as a table.
    Checks(ChecksArgs),
    /// Print each stage's `metrics:` across the partitions, with the change from the previous
    /// one; or draw them (`--plot`), or write CloudWatch Embedded Metric Format lines (`--emf`).
    Metrics(MetricsArgs),
    /// List the versions of a versioned output (`imba versions FILE [STAGE]`), or compare two
    /// (`imba versions diff FILE V1 V2`).
    Versions(VersionsArgs),
    /// Show the run cache of a pipeline's workdir: entries, blobs and their size, last uses.
    Cache(CacheArgs),
    /// Remove the run-cache entries that none of the given pipelines' lock files refers to, and
    /// the blobs only they referred to.
    Gc(GcArgs),
    /// Send the outputs the lock file refers to (their run-cache entries and blobs) to the
    /// remote run cache; only what it lacks moves.
    Push(PushArgs),
    /// Bring the outputs of the lock file into place from the run cache, here or in the
    /// remote, computing nothing (a fresh clone gets the team's results).
    Pull(PullArgs),
    /// List the built-in stages and their implementation versions, or (`imba stages NAME`)
    /// describe one: its params, their types, defaults and meaning.
    Stages {
        /// A built-in stage, e.g. `clean`.
        name: Option<String>,
    },
    /// Print the JSON Schema of pipeline files, for editors.
    Schema,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run one stage's computation from a job spec, on a node of an executor (imba submits it).
    #[command(hide = true)]
    ExecStage {
        /// The job spec imba wrote (`.imba/logs/RUN/STAGE.job.json`).
        spec: PathBuf,
    },
}

/// The pipeline to read, and overrides of its vars and params.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline file, e.g. pipelines/monthly.yaml.
    pub file: PathBuf,
    /// Override a var or a stage param: `out=DIR`, `vars.out=DIR`, `STAGE.PARAM=VALUE`,
    /// `+NEW_VAR=VALUE`. VALUE is YAML. Repeatable; applied in order, after --vars.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Merge a YAML file of vars over the pipeline's `vars:`. Repeatable.
    #[arg(long = "vars", value_name = "FILE")]
    pub vars: Vec<PathBuf>,
    /// Run every built-in stage that can run there on this engine (`spark`: through Spark
    /// Connect, at `SPARK_REMOTE`), unless the stage names its own `engine:`.
    #[arg(long, value_name = "ENGINE", value_parser = ["local", "spark"])]
    pub engine: Option<String>,
    /// Run every stage that names no `executor:` as a job of this executor (a name in the
    /// pipeline's `executors:`; `local`: here). Stages on Spark stay on Spark.
    #[arg(long, value_name = "NAME")]
    pub executor: Option<String>,
}

/// Which stages to consider.
#[derive(Args, Debug, Clone)]
pub struct SelectArgs {
    /// Only this stage and what it needs (repeatable; a name without `@…` means all its
    /// matrix/foreach instances).
    #[arg(long = "stage", short = 's', value_name = "NAME")]
    pub stages: Vec<String>,
    /// With --stage: also every stage downstream of it.
    #[arg(long, requires = "stages")]
    pub downstream: bool,
    /// Only the stages of this partition and what they need (repeatable): `--partition 2017-05`.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["partitions", "latest"])]
    pub partition: Vec<String>,
    /// Only the partitions from FROM to TO, both included, in the set's order (a backfill):
    /// `--partitions 2017-01..2017-06`.
    #[arg(long, value_name = "FROM..TO", value_parser = parse_partition_range, conflicts_with = "latest")]
    pub partitions: Option<(String, String)>,
    /// Only the last partition of each set.
    #[arg(long)]
    pub latest: bool,
}

fn parse_partition_range(text: &str) -> Result<(String, String), String> {
    match text.split_once("..") {
        Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
            Ok((from.trim().to_owned(), to.trim().to_owned()))
        }
        _ => Err("expected FROM..TO, e.g. 2017-01..2017-06".to_owned()),
    }
}

#[derive(Args, Debug)]
pub struct UiArgs {
    /// The pipeline files to show (default: every `pipelines/*.yaml`).
    pub files: Vec<PathBuf>,
    /// The port on 127.0.0.1 (0: any free one).
    #[arg(long, default_value_t = 8765)]
    pub port: u16,
    /// Serve without actions: nothing can be run from the page.
    #[arg(long)]
    pub read_only: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Quiet time after the last change before anything runs: `100ms`, `1s`, or milliseconds.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub debounce: std::time::Duration,
    /// How often S3 inputs are looked at (HEAD or LIST), since S3 sends no events.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub poll_interval: std::time::Duration,
    /// When a change arrives during a run, cancel the run and start again, instead of running
    /// the change after it.
    #[arg(long)]
    pub restart: bool,
    /// Stages to run at once, at most [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// When a stage fails, go on with the stages that do not need it.
    #[arg(long, short = 'k')]
    pub keep_going: bool,
}

/// The CPU and memory budget stages compute within (`resources:` in docs/pipeline-format.md).
#[derive(Args, Debug, Clone, Copy)]
pub struct BudgetArgs {
    /// CPUs the stages computing at once may use together [default: the number of cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: Option<u32>,
    /// Memory the stages computing at once may take together, as their `resources.memory` or a
    /// built-in's estimate say: `8G`, `512MiB` [default: 80% of the machine's memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
}

impl BudgetArgs {
    fn budget(self) -> crate::run::admit::Budget {
        crate::run::admit::Budget::with(self.cpus, self.memory)
    }
}

/// `8G`, `512MiB`: a size with a unit.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        return Err("a size needs a unit: `8G`, `512M`".to_owned());
    }
    match text.parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() > 0 => Ok(size.as_u64()),
        Ok(_) => Err("the budget must be more than 0".to_owned()),
        Err(_) => Err("not a size: write `8G`, `512M`, `2GiB`".to_owned()),
    }
}

/// `100ms`, `2s`, `1m` (humantime), or a bare number of milliseconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    if let Ok(millis) = text.trim().parse::<u64>() {
        return Ok(std::time::Duration::from_millis(millis));
    }
    humantime::parse_duration(text.trim()).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Stages to run at once, at most [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Run the selected stages even when they are up to date.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Print what would run and why; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// When a stage fails, go on with the stages that do not need it.
    #[arg(long, short = 'k')]
    pub keep_going: bool,
    /// Fail at once if another run of this workdir is in progress, instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Which remote run cache to use.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// The remote run cache: an S3 prefix (`s3://bucket/imba-cache`) or a shared folder
    /// [default: `IMBA_REMOTE`, else the pipeline's `cache.remote`].
    #[arg(long, value_name = "URL", conflicts_with = "no_remote")]
    pub remote: Option<String>,
    /// Use no remote run cache, whatever the pipeline or `IMBA_REMOTE` says.
    #[arg(long)]
    pub no_remote: bool,
}

impl RemoteArgs {
    fn choice(&self) -> crate::run::RemoteChoice {
        match (&self.remote, self.no_remote) {
            (_, true) => crate::run::RemoteChoice::Off,
            (Some(url), false) => crate::run::RemoteChoice::Url(url.clone()),
            (None, false) => crate::run::RemoteChoice::Configured,
        }
    }
}

impl RunArgs {
    fn remote_choice(&self) -> crate::run::RemoteChoice {
        self.remote.choice()
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
    /// In a partitioned pipeline, each stale stage with its reasons instead of the grid.
    #[arg(long)]
    pub reasons: bool,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// How many runs to list.
    #[arg(long, short = 'n', default_value_t = 20)]
    pub limit: usize,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ChecksArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Only this stage's metrics (repeatable).
    #[arg(long = "stage", short = 's', value_name = "NAME")]
    pub stages: Vec<String>,
    /// JSON, for scripts.
    #[arg(long, conflicts_with_all = ["emf", "plot"])]
    pub json: bool,
    /// Draw each metric over the partitions into FILE (`.png` or `.svg`).
    #[arg(long, value_name = "FILE", conflicts_with = "emf")]
    pub plot: Option<PathBuf>,
    /// CloudWatch Embedded Metric Format: one JSON line per stage instance, to stdout.
    #[arg(long)]
    pub emf: bool,
    /// The CloudWatch namespace of `--emf` lines.
    #[arg(long, value_name = "NAME", default_value = "imba", requires = "emf")]
    pub namespace: String,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct VersionsArgs {
    #[command(subcommand)]
    pub diff: Option<VersionsCommand>,
    /// The pipeline file.
    #[arg(required = true)]
    pub file: Option<PathBuf>,
    /// The versioned stage (default: the only one).
    pub stage: Option<String>,
    /// Override a var, as for `run`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Merge a YAML file of vars, as for `run`.
    #[arg(long = "vars", value_name = "FILE")]
    pub vars: Vec<PathBuf>,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VersionsCommand {
    /// Compare two versions: columns added and removed, row count, per-column mean.
    Diff {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// The older version: `3`, `v3` or `features_v3`.
        from: String,
        /// The newer version.
        to: String,
        /// The versioned stage (default: the only one).
        #[arg(long)]
        stage: Option<String>,
        /// JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The run id (or a unique prefix of it) [default: the latest run].
    #[arg(long)]
    pub run: Option<String>,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AcceptArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The run that kept them (an id or a unique prefix; `imba quarantine` lists them).
    pub run: String,
    /// The stage.
    pub stage: String,
    /// Why they are right after all, for the record.
    #[arg(long, required = true)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The older run (an id or a unique prefix) [default: the one before the newer].
    pub from: Option<String>,
    /// The newer run [default: the latest].
    pub to: Option<String>,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Every entry of the local run cache, not only those of the lock file.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Stages to restore at once [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// The pipelines whose results to keep (their lock files'); all in one workdir.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Also keep entries used within this long: `30d`, `12h`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Option<std::time::Duration>,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove what checks kept in quarantine (`.imba/quarantine/`) instead: every run's, or
    /// with --older-than those older than that.
    #[arg(long, conflicts_with = "remote")]
    pub quarantine: bool,
    /// Remove archived versions (`archive/NAME_vN/`, moved there by `keep:`) of the pipelines'
    /// versioned outputs, local or in S3, instead: all, or with --older-than those older than
    /// that.
    #[arg(long, conflicts_with_all = ["remote", "quarantine"])]
    pub archive: bool,
    /// Also collect the remote run cache: the pipelines' (`IMBA_REMOTE`, `cache.remote`), or
    /// URL. Unreferenced remote objects younger than an hour stay (another machine may be
    /// pushing them).
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub remote: Option<String>,
    /// JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Graphviz DOT.
    #[arg(long, group = "format")]
    pub dot: bool,
    /// A Mermaid flowchart.
    #[arg(long, group = "format")]
    pub mermaid: bool,
    /// JSON, for scripts.
    #[arg(long, group = "format")]
    pub json: bool,
    /// Show data files as nodes too.
    #[arg(long)]
    pub files: bool,
    /// Mark the stages that are out of date.
    #[arg(long)]
    pub status: bool,
}

impl PipelineArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            vars_files: self.vars.clone(),
            sets: self.set.clone(),
            engine: self.engine.as_deref().map(|e| match e {
                "spark" => crate::model::Engine::Spark,
                _ => crate::model::Engine::Local,
            }),
            executor: self.executor.clone(),
            ..Overrides::default()
        }
    }
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.color);
    let printer = Printer::new(cli.color, cli.quiet);
    run(cli, &printer)
}

/// Tracing to stderr: `RUST_LOG` when set, else warnings, or more with `-v`/`-vv`.
fn init_tracing(verbose: u8, color: ColorChoice) {
    let default = match verbose {
        0 => "warn",
        1 => "imba=debug,imba_stages=debug",
        _ => "imba=trace,imba_stages=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = color.for_stderr();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

pub fn run(cli: Cli, printer: &Printer) -> ExitCode {
    let registry = Registry::standard();
    match cli.command {
        Command::Validate(args) => match checked_dag(&args, &registry, printer) {
            Ok(dag) => {
                let plural = |n: usize, one: &str, many: &str| {
                    format!("{n} {}", if n == 1 { one } else { many })
                };
                printer.data(&format!(
                    "{} is valid: {}, {}\n",
                    args.file.display(),
                    plural(dag.pipeline().stages.len(), "stage", "stages"),
                    plural(dag.edge_count(), "dependency", "dependencies")
                ));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Dag(args) => match checked_dag(&args.pipeline, &registry, printer) {
            Ok(dag) => {
                let format = if args.dot {
                    Format::Dot
                } else if args.mermaid {
                    Format::Mermaid
                } else if args.json {
                    Format::Json
                } else {
                    Format::Text
                };
                let stale = if args.status {
                    match stale_map(&dag, &Selection::default(), printer) {
                        Ok(stale) => Some(stale),
                        Err(code) => return code,
                    }
                } else {
                    None
                };
                printer.data(&draw::draw(
                    &dag,
                    format,
                    DrawOptions {
                        files: args.files,
                        stale,
                    },
                ));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Init { dir } => init_command(&dir, printer),
        Command::Run(args) => run_command(args, registry, printer),
        Command::Watch(args) => watch_command(args, registry, printer),
        Command::Ui(args) => {
            let files = if args.files.is_empty() {
                crate::ui::default_files()
            } else {
                args.files
            };
            let options = crate::ui::Options {
                files,
                port: args.port,
                read_only: args.read_only,
            };
            match crate::ui::serve(options, registry, printer) {
                Ok(()) => ExitCode::from(crate::interrupt::EXIT_INTERRUPTED),
                Err(message) => printer.fail(&message, EXIT_CONFIG),
            }
        }
        Command::Status(args) => status_command(args, &registry, printer),
        Command::Log(args) => log_command(args, &registry, printer),
        Command::Show(args) => show_command(args, &registry, printer),
        Command::Checks(args) => checks_command(args, &registry, printer),
        Command::Metrics(args) => metrics_command(args, &registry, printer),
        Command::Versions(args) => versions_command(args, &registry, printer),
        Command::Cache(args) => cache_command(args, &registry, printer),
        Command::Diff(args) => diff_command(args, &registry, printer),
        Command::Quarantine(args) => quarantine_command(args, &registry, printer),
        Command::Accept(args) => accept_command(args, &registry, printer),
        Command::Gc(args) => gc_command(args, &registry, printer),
        Command::Push(args) => push_command(args, &registry, printer),
        Command::Pull(args) => pull_command(args, registry, printer),
        Command::Stages { name: Some(name) } => match registry.get(&name) {
            Some(builtin) => {
                printer.data(&crate::report::tables::builtin(builtin));
                ExitCode::SUCCESS
            }
            None => {
                let hint = crate::diagnostic::did_you_mean(&name, registry.names())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                let known: Vec<&str> = registry.names().collect();
                printer.error(&format!(
                    "there is no built-in stage `{name}`{hint} (there are: {})",
                    known.join(", ")
                ));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Stages { name: None } => {
            let mut out = String::new();
            for builtin in registry.iter() {
                out.push_str(&format!(
                    "{:<12} v{:<3} {}\n",
                    builtin.name, builtin.version, builtin.summary
                ));
            }
            if out.is_empty() {
                printer.status("this build of imba has no built-in stages");
            }
            printer.data(&out);
            ExitCode::SUCCESS
        }
        Command::Schema => {
            printer.data(&crate::config::schema::pipeline_schema_json());
            ExitCode::SUCCESS
        }
        Command::ExecStage { spec } => {
            use crate::run::execute::job::{exec_stage, Said};
            let say = |said: Said| match said {
                Said::Note(line) => printer.status(&line),
                Said::Error(line) => printer.error(&line),
            };
            let code = exec_stage(&spec, &registry, &say);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Completions { shell } => {
            let mut buffer = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "imba", &mut buffer);
            printer.data(&String::from_utf8_lossy(&buffer));
            ExitCode::SUCCESS
        }
    }
}

/// Loads and checks a pipeline, printing every problem; the exit code on failure.
fn checked_dag(
    args: &PipelineArgs,
    registry: &Registry,
    printer: &Printer,
) -> Result<Dag, ExitCode> {
    checked_dag_and_sources(args, registry, printer).map(|(dag, _)| dag)
}

/// [`checked_dag`], with the sources it was read from (to point into them later).
fn checked_dag_and_sources(
    args: &PipelineArgs,
    registry: &Registry,
    printer: &Printer,
) -> Result<(Dag, crate::diagnostic::Sources), ExitCode> {
    match load_dag(args, registry) {
        (sources, Ok(dag)) => Ok((dag, sources)),
        (sources, Err(error)) => {
            printer.load_error(&sources, &error);
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The graph of a pipeline for a command that runs nothing of it and reads none of its
/// inputs (`log`, `show`, `cache`, `gc`, `push`): its source inputs need not exist.
fn dag_for_records(
    args: &PipelineArgs,
    registry: &Registry,
    printer: &Printer,
) -> Result<Dag, ExitCode> {
    let overrides = match crate::plan::discover(&args.file, &args.overrides(), registry) {
        Ok(overrides) => overrides,
        Err((sources, error)) => {
            printer.load_error(&sources, &error);
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    let (sources, loaded) = config::load(&args.file, &overrides, registry);
    let built = loaded.and_then(|pipeline| {
        let options = BuildOptions {
            check_sources: false,
            ..BuildOptions::default()
        };
        dag::build(pipeline, options).map_err(LoadError::Invalid)
    });
    built.map_err(|error| {
        printer.load_error(&sources, &error);
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Loads the pipeline and builds its checked graph: the file, the graph, the columns.
fn load_dag(
    args: &PipelineArgs,
    registry: &Registry,
) -> (crate::diagnostic::Sources, Result<Dag, LoadError>) {
    let (sources, loaded) = match crate::plan::discover(&args.file, &args.overrides(), registry) {
        Ok(overrides) => crate::graph::load(&args.file, &overrides, registry),
        Err((sources, error)) => return (sources, Err(error)),
    };
    // What stages ask of an executor's nodes, when one runs here to ask.
    let checked = loaded.and_then(|dag| {
        let mut found = crate::run::execute::check_nodes(dag.pipeline());
        found.dedup_by(|a, b| a.message == b.message);
        if found.is_empty() {
            Ok(dag)
        } else {
            Err(LoadError::Invalid(found))
        }
    });
    (sources, checked)
}

/// `docs/cli.md`: the help of every command, as the binary prints it.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# imba command-line reference\n\n\
         Generated from the code (`IMBA_UPDATE_DOCS=1 cargo test --test docs` rewrites it; a test fails when it drifts).\n\n\
         Exit status: `0` success, `1` a stage failed, `2` a usage or config error.\n",
    );
    let mut root = Cli::command().term_width(100);
    out.push_str(&format!(
        "\n## `imba`\n\n```text\n{}```\n",
        root.render_long_help()
    ));
    let names: Vec<String> = root
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in names {
        if let Some(sub) = root.find_subcommand_mut(&name) {
            let mut sub = sub.clone().term_width(100).bin_name(format!("imba {name}"));
            out.push_str(&format!(
                "\n## `imba {name}`\n\n```text\n{}```\n",
                sub.render_long_help()
            ));
        }
    }
    out
}

impl SelectArgs {
    fn selection(&self, force: bool) -> Selection {
        let partitions = if self.latest {
            Some(PartitionFilter::Latest)
        } else if let Some((from, to)) = &self.partitions {
            Some(PartitionFilter::Range(from.clone(), to.clone()))
        } else if !self.partition.is_empty() {
            Some(PartitionFilter::Keys(self.partition.clone()))
        } else {
            None
        };
        Selection {
            stages: self.stages.clone(),
            downstream: self.downstream,
            force,
            partitions,
        }
    }
}

fn run_error(printer: &Printer, error: RunError) -> ExitCode {
    printer.error(&error.to_string());
    match error {
        RunError::Config(_) => ExitCode::from(EXIT_CONFIG),
        RunError::Busy(_) | RunError::Io(_) => ExitCode::from(EXIT_STAGE_FAILED),
    }
}

/// The static plan of the selected stages (status, dry run, dag --status).
fn static_plan(
    dag: &Dag,
    selection: &Selection,
    printer: &Printer,
) -> Result<Vec<StageStatus>, ExitCode> {
    crate::plan::status(dag, selection, |w| printer.warning(&w))
        .map_err(|e| run_error(printer, e.into()))
}

fn stale_map(
    dag: &Dag,
    selection: &Selection,
    printer: &Printer,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, ExitCode> {
    Ok(static_plan(dag, selection, printer)?
        .into_iter()
        .filter(|s| s.stale)
        .map(|s| (s.name, s.reasons.iter().map(ToString::to_string).collect()))
        .collect())
}

fn status_command(args: StatusArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match checked_dag(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    match static_plan(&dag, &args.select.selection(false), printer) {
        Ok(statuses) => {
            let partitioned = !dag.pipeline().partitions.is_empty();
            let states = if partitioned {
                crate::report::partitions::states(&statuses, &records_of(dag.pipeline()))
            } else {
                Default::default()
            };
            if args.json {
                let mut json = serde_json::json!({ "stages": statuses });
                if partitioned {
                    for (value, status) in json["stages"]
                        .as_array_mut()
                        .into_iter()
                        .flatten()
                        .zip(&statuses)
                    {
                        value["state"] = serde_json::json!(states.get(&status.index));
                    }
                    let (_, rows) = crate::report::partitions::rows(&dag, &states);
                    json["partitions"] = serde_json::json!(rows);
                }
                printer.data(&(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"));
            } else if printer.quiet {
                // `imba status -q` gates CI as `dvc status -q` does: nothing printed, exit 1
                // when anything selected is stale.
                if statuses.iter().any(|s| s.stale) {
                    return ExitCode::from(EXIT_STAGE_FAILED);
                }
            } else if partitioned && !args.reasons {
                printer.data(&crate::report::partitions::grid(&dag, &statuses, &states));
            } else {
                printer.data(&crate::report::tables::plan(&statuses, "are stale"));
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run_command(args: RunArgs, registry: Registry, printer: &Printer) -> ExitCode {
    let (dag, sources) = match checked_dag_and_sources(&args.pipeline, &registry, printer) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let selection = args.select.selection(args.force);
    if args.dry_run {
        return match static_plan(&dag, &selection, printer) {
            Ok(statuses) => {
                printer.data(&crate::report::tables::plan(&statuses, "would run"));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    let options = RunOptions {
        jobs: jobs_or_cores(args.jobs),
        budget: args.budget.budget(),
        selection,
        keep_going: args.keep_going,
        no_wait: args.no_wait,
        stop: crate::interrupt::listen(),
        remote: args.remote_choice(),
        restore_only: false,
    };
    let events = Arc::new(crate::report::RunPrinter::new(
        printer,
        Some(Arc::new(sources)),
    ));
    let dag = Arc::new(dag);
    let outcome = crate::run::run(dag.clone(), registry, options, events.clone());
    events.finish();
    match outcome {
        Ok(summary) => {
            let line = crate::report::run_summary(&summary.record);
            if summary.interrupted {
                printer.error(&format!("interrupted: {line}"));
                ExitCode::from(crate::interrupt::EXIT_INTERRUPTED)
            } else if summary.failed {
                printer.error(&format!("the pipeline failed: {line}"));
                ExitCode::from(EXIT_STAGE_FAILED)
            } else {
                printer.status(&line);
                printer.status(&crate::report::tables::outputs(&dag, &summary.record));
                ExitCode::SUCCESS
            }
        }
        Err(error) => run_error(printer, error),
    }
}

fn watch_command(args: WatchArgs, registry: Registry, printer: &Printer) -> ExitCode {
    let (dag, sources) = match checked_dag_and_sources(&args.pipeline, &registry, printer) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let mut config_files = vec![args.pipeline.file.clone()];
    config_files.extend(args.pipeline.vars.iter().cloned());
    let options = crate::watch::Options {
        debounce: args.debounce,
        poll_interval: args
            .poll_interval
            .max(std::time::Duration::from_millis(100)),
        restart: args.restart,
        jobs: jobs_or_cores(args.jobs),
        budget: args.budget.budget(),
        keep_going: args.keep_going,
    };
    let load = || load_dag(&args.pipeline, &registry);
    let watched = crate::watch::watch(
        dag,
        sources,
        &load,
        config_files,
        registry.clone(),
        options,
        printer,
    );
    match watched {
        // A watch ends only when interrupted.
        Ok(()) => ExitCode::from(crate::interrupt::EXIT_INTERRUPTED),
        Err(message) => printer.fail(&message, EXIT_STAGE_FAILED),
    }
}

/// `--jobs`, or the number of cores.
fn jobs_or_cores(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

fn runs_of(
    args: &PipelineArgs,
    registry: &Registry,
    printer: &Printer,
) -> Result<Vec<record::RunRecord>, ExitCode> {
    let dag = dag_for_records(args, registry, printer)?;
    Ok(records_of(dag.pipeline()))
}

/// The run records of `pipeline`, newest first.
fn records_of(pipeline: &crate::model::Pipeline) -> Vec<record::RunRecord> {
    let shown = pipeline.file.display().to_string();
    record::list(&StateDir::new(&pipeline.workdir).runs())
        .into_iter()
        .filter(|r| r.pipeline == shown)
        .collect()
}

fn log_command(args: LogArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let runs = match runs_of(&args.pipeline, registry, printer) {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    let runs: Vec<_> = runs.into_iter().take(args.limit).collect();
    if args.json {
        printer.data(&(serde_json::to_string_pretty(&runs).unwrap_or_default() + "\n"));
        return ExitCode::SUCCESS;
    }
    if runs.is_empty() {
        printer.status("no runs yet");
        return ExitCode::SUCCESS;
    }
    printer.data(&crate::report::tables::runs(&runs));
    ExitCode::SUCCESS
}

fn versions_command(args: VersionsArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let (pipeline, stage, json, diff) = match args.diff {
        Some(VersionsCommand::Diff {
            pipeline,
            from,
            to,
            stage,
            json,
        }) => (pipeline, stage, json, Some((from, to))),
        None => (
            PipelineArgs {
                file: args.file.unwrap_or_default(),
                set: args.set,
                vars: args.vars,
                engine: None,
                executor: None,
            },
            args.stage,
            args.json,
            None,
        ),
    };
    let dag = match checked_dag(&pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    let versioned: Vec<&crate::model::Stage> = dag
        .pipeline()
        .stages
        .iter()
        .filter(|s| s.versioning.is_some())
        .collect();
    let chosen = match (&stage, versioned.as_slice()) {
        (Some(name), _) => versioned.iter().find(|s| &s.name == name).copied(),
        (None, [one]) => Some(*one),
        (None, _) => None,
    };
    let Some(stage) = chosen else {
        let names: Vec<String> = versioned.iter().map(|s| format!("`{}`", s.name)).collect();
        printer.error(&match (&stage, names.is_empty()) {
            (_, true) => "no stage of this pipeline has `version: auto`".to_owned(),
            (Some(name), false) => format!(
                "stage `{name}` is not versioned; the versioned stages are {}",
                names.join(", ")
            ),
            (None, false) => format!(
                "this pipeline has several versioned stages ({}): name one",
                names.join(", ")
            ),
        });
        return ExitCode::from(EXIT_CONFIG);
    };
    let root = match stage.outputs[0].declared.location.local_path() {
        Some(root) => root.to_path_buf(),
        None => {
            printer.error(
                "listing versions on S3 is not supported yet: list the prefix with the AWS CLI",
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shown = stage.outputs[0].text.clone();
    let result = match diff {
        None => crate::report::versions::list(&root, &shown, json),
        Some((from, to)) => crate::report::versions::diff(&root, &from, &to, json),
    };
    match result {
        Ok(text) => {
            printer.data(&text);
            ExitCode::SUCCESS
        }
        Err(message) => printer.fail(&message, EXIT_CONFIG),
    }
}

fn metrics_command(args: MetricsArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match dag_for_records(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    let series = match crate::plan::metrics(&dag, &args.stages, |w| printer.warning(&w)) {
        Ok(series) => series,
        Err(e) => return run_error(printer, e.into()),
    };
    if args.json {
        let json = serde_json::json!({ "metrics": series });
        printer.data(&(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"));
    } else if args.emf {
        let pipeline = dag
            .pipeline()
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        printer.data(&crate::report::metrics::emf(
            &series,
            &pipeline,
            &args.namespace,
            now,
        ));
    } else if let Some(out) = &args.plot {
        // One chart per partition set; the unpartitioned values have no axis to go along.
        let Some(set) = dag.pipeline().partitions.iter().find(|set| {
            series
                .iter()
                .any(|s| s.set.as_deref() == Some(set.name.as_str()))
        }) else {
            return printer.fail(
                "--plot draws metrics over partitions, and no partitioned stage has `metrics:`",
                EXIT_CONFIG,
            );
        };
        let one_stage = crate::report::metrics::one_stage(&series);
        let drawn: Vec<imba_stages::chart::Series> = series
            .iter()
            .filter(|s| s.set.as_deref() == Some(set.name.as_str()))
            .map(|s| imba_stages::chart::Series {
                title: crate::report::metrics::heading(s, one_stage),
                values: set
                    .keys
                    .iter()
                    .map(|key| {
                        s.points
                            .iter()
                            .find(|p| p.partition.as_deref() == Some(key.as_str()))
                            .and_then(|p| p.value)
                    })
                    .collect(),
            })
            .collect();
        if let Err(e) = imba_stages::chart::draw(&set.name, &set.keys, &drawn, out) {
            return printer.fail(&e, EXIT_STAGE_FAILED);
        }
        printer.status(&format!(
            "drew {} over {} partitions of `{}` into {}",
            match drawn.len() {
                1 => "1 metric".to_owned(),
                n => format!("{n} metrics"),
            },
            set.keys.len(),
            set.name,
            out.display()
        ));
    } else {
        printer.data(&crate::report::metrics::table(&series));
    }
    ExitCode::SUCCESS
}

fn checks_command(args: ChecksArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match checked_dag(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    let runs = records_of(dag.pipeline());
    // Each stage with checks (its `checks:`, or those a built-in evaluates itself), in run
    // order, with its newest evaluated checks.
    let latest: Vec<(&str, Option<(&str, &record::StageRecord)>)> = dag
        .order()
        .iter()
        .map(|&i| dag.stage(i))
        .map(|stage| {
            let found = runs.iter().find_map(|run| {
                run.stages
                    .iter()
                    .find(|s| s.name == stage.name && !s.checks.is_empty())
                    .map(|s| (run.id.as_str(), s))
            });
            (stage, found)
        })
        .filter(|(stage, found)| !stage.checks.is_empty() || found.is_some())
        .map(|(stage, found)| (stage.name.as_str(), found))
        .collect();
    if args.json {
        let value: Vec<serde_json::Value> = latest
            .iter()
            .map(|(name, found)| {
                serde_json::json!({
                    "stage": name,
                    "run": found.map(|(run, _)| run),
                    "decision": found.map(|(_, s)| s.decision.as_str()),
                    "checks": found.map(|(_, s)| &s.checks),
                })
            })
            .collect();
        printer.data(&(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"));
        return ExitCode::SUCCESS;
    }
    if latest.is_empty() {
        printer.status("no stage of this pipeline has checks");
        return ExitCode::SUCCESS;
    }
    printer.data(&crate::report::tables::checks(&latest));
    ExitCode::SUCCESS
}

/// What `imba init` writes, compiled in.
const STARTER_PIPELINE: &str = include_str!("../examples/init/pipeline.yaml");
const STARTER_ORDERS: &str = include_str!("../examples/init/orders.csv");
/// The lines `imba init` makes sure `.gitignore` has.
const IGNORED: [&str; 2] = [".imba/", "/out/"];

fn init_command(dir: &std::path::Path, printer: &Printer) -> ExitCode {
    // Shown as given: `pipelines/pipeline.yaml` in the current directory, `DIR/…` elsewhere.
    let at = |relative: &str| {
        if dir == std::path::Path::new(".") {
            PathBuf::from(relative)
        } else {
            dir.join(relative)
        }
    };
    let files = [
        (at("pipelines/pipeline.yaml"), STARTER_PIPELINE),
        (at("data/orders.csv"), STARTER_ORDERS),
    ];
    let taken: Vec<String> = files
        .iter()
        .filter(|(path, _)| path.symlink_metadata().is_ok())
        .map(|(path, _)| format!("`{}`", path.display()))
        .collect();
    if !taken.is_empty() {
        printer.error(&format!(
            "{} already {}: `imba init` overwrites nothing (start in an empty directory, or `imba init DIR`)",
            taken.join(" and "),
            if taken.len() == 1 { "exists" } else { "exist" }
        ));
        return ExitCode::from(EXIT_CONFIG);
    }
    let written = (|| -> std::io::Result<Vec<String>> {
        let mut written = Vec::new();
        for (path, text) in &files {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // Created only if absent, even if something appeared since the check above.
            crate::store::fs::create_new(path, text.as_bytes())?
                .then_some(())
                .ok_or_else(|| {
                    std::io::Error::other(format!("{} appeared meanwhile", path.display()))
                })?;
            written.push(path.display().to_string());
        }
        let gitignore = at(".gitignore");
        let existing = std::fs::read_to_string(&gitignore).unwrap_or_default();
        let missing: Vec<&str> = IGNORED
            .iter()
            .copied()
            .filter(|line| !existing.lines().any(|l| l.trim() == *line))
            .collect();
        if !missing.is_empty() {
            let mut text = existing.clone();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            for line in &missing {
                text.push_str(line);
                text.push('\n');
            }
            crate::store::fs::write_atomic(&gitignore, text.as_bytes())?;
            written.push(format!("{} ({})", gitignore.display(), missing.join(", ")));
        }
        Ok(written)
    })();
    match written {
        Ok(written) => {
            for path in written {
                printer.status(&format!("wrote {path}"));
            }
            let pipeline = at("pipelines/pipeline.yaml");
            printer.status(&format!("next: imba run {}", pipeline.display()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            printer.error(&format!("cannot start a project in {}: {e}", dir.display()));
            ExitCode::from(EXIT_STAGE_FAILED)
        }
    }
}

fn cache_command(args: CacheArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match dag_for_records(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    let state = StateDir::new(&dag.pipeline().workdir);
    let usage = crate::store::RunCache::new(state.cache()).usage();
    if args.json {
        printer.data(
            &(serde_json::to_string_pretty(&crate::report::tables::cache_json(&usage))
                .unwrap_or_default()
                + "\n"),
        );
        return ExitCode::SUCCESS;
    }
    printer.data(&crate::report::tables::cache(&state.cache(), &usage));
    ExitCode::SUCCESS
}

fn push_command(args: PushArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match dag_for_records(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    let pipeline = dag.pipeline();
    let remote = match crate::run::remote_location(&args.remote.choice(), pipeline) {
        Ok(Some(remote)) => remote,
        Ok(None) => {
            printer.error(NO_REMOTE);
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(message) => return printer.fail(&message, EXIT_CONFIG),
    };
    let bar = printer.transfer_bar();
    let progress = |bytes: u64| bar.add(bytes);
    let pushed = crate::run::housekeeping::push(pipeline, remote, args.all, &progress, |w| {
        printer.warning(&w)
    });
    bar.finish();
    match pushed {
        Ok(pushed) => {
            if args.json {
                printer.data(&(serde_json::to_string_pretty(&pushed).unwrap_or_default() + "\n"));
            } else {
                for stage in &pushed.not_cached {
                    printer.warning(&format!(
                        "stage `{stage}` is not in the local run cache (computed before it, or collected): `imba run --force -s {stage}` computes it again"
                    ));
                }
                printer.status(&crate::report::tables::pushed(&pushed));
            }
            ExitCode::SUCCESS
        }
        Err(message) => printer.fail(&message, EXIT_STAGE_FAILED),
    }
}

const NO_REMOTE: &str = "no remote run cache: set `cache.remote` in the pipeline file, `IMBA_REMOTE`, or give --remote URL";

fn pull_command(args: PullArgs, registry: Registry, printer: &Printer) -> ExitCode {
    let (dag, sources) = match checked_dag_and_sources(&args.pipeline, &registry, printer) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match crate::run::remote_location(&args.remote.choice(), dag.pipeline()) {
        Ok(Some(_)) => {}
        Ok(None) => {
            printer.error(NO_REMOTE);
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(message) => return printer.fail(&message, EXIT_CONFIG),
    }
    let options = RunOptions {
        jobs: jobs_or_cores(args.jobs),
        // Restoring computes nothing.
        budget: crate::run::admit::Budget::machine(),
        selection: args.select.selection(false),
        keep_going: true,
        no_wait: false,
        stop: crate::interrupt::listen(),
        remote: args.remote.choice(),
        restore_only: true,
    };
    let events = Arc::new(crate::report::RunPrinter::new(
        printer,
        Some(Arc::new(sources)),
    ));
    let outcome = crate::run::run(Arc::new(dag), registry, options, events.clone());
    events.finish();
    match outcome {
        Ok(summary) => {
            let line = crate::report::run_summary(&summary.record);
            if summary.failed || summary.interrupted {
                printer.error(&format!("the pull is incomplete: {line}"));
                ExitCode::from(EXIT_STAGE_FAILED)
            } else {
                printer.status(&line);
                ExitCode::SUCCESS
            }
        }
        Err(error) => run_error(printer, error),
    }
}

fn gc_command(args: GcArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let mut workdir: Option<PathBuf> = None;
    let mut first: Option<Dag> = None;
    let mut locks = Vec::new();
    for file in &args.files {
        let pipeline_args = PipelineArgs {
            file: file.clone(),
            set: Vec::new(),
            vars: Vec::new(),
            engine: None,
            executor: None,
        };
        let dag = match dag_for_records(&pipeline_args, registry, printer) {
            Ok(dag) => dag,
            Err(code) => return code,
        };
        let pipeline = dag.pipeline();
        match &workdir {
            Some(first) if *first != pipeline.workdir => {
                printer.error(&format!(
                    "`{}` works in {}, not in {} as `{}` does: collect each workdir on its own",
                    file.display(),
                    pipeline.workdir.display(),
                    first.display(),
                    args.files[0].display()
                ));
                return ExitCode::from(EXIT_CONFIG);
            }
            Some(_) => {}
            None => workdir = Some(pipeline.workdir.clone()),
        }
        locks.push(crate::state::lock::lock_path(&pipeline.file));
        if first.is_none() {
            first = Some(dag);
        }
    }
    let (Some(workdir), Some(first)) = (workdir, first) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    if args.archive {
        let mut released = crate::run::housekeeping::Released::default();
        for file in &args.files {
            let pipeline_args = PipelineArgs {
                file: file.clone(),
                set: Vec::new(),
                vars: Vec::new(),
                engine: None,
                executor: None,
            };
            let dag = match dag_for_records(&pipeline_args, registry, printer) {
                Ok(dag) => dag,
                Err(code) => return code,
            };
            match crate::run::housekeeping::collect_archive(
                &dag,
                args.older_than,
                args.dry_run,
                |w| printer.warning(&w),
            ) {
                Ok(more) => {
                    released.runs += more.runs;
                    released.bytes += more.bytes;
                }
                Err(message) => return printer.fail(&message, EXIT_STAGE_FAILED),
            }
        }
        if args.json {
            let json = serde_json::json!({"versions": released.runs, "bytes": released.bytes});
            printer.data(&(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"));
        } else {
            let verb = if args.dry_run {
                "would remove"
            } else {
                "removed"
            };
            printer.data(&format!(
                "{verb} {} archived version{}\n",
                released.runs,
                if released.runs == 1 { "" } else { "s" }
            ));
        }
        return ExitCode::SUCCESS;
    }
    if args.quarantine {
        return match crate::run::housekeeping::collect_quarantine(
            &workdir,
            args.older_than,
            args.dry_run,
            |w| printer.warning(&w),
        ) {
            Ok(released) => {
                if args.json {
                    printer.data(
                        &(serde_json::to_string_pretty(&released).unwrap_or_default() + "\n"),
                    );
                } else {
                    printer.data(&crate::report::tables::released(&released, args.dry_run));
                }
                ExitCode::SUCCESS
            }
            Err(message) => printer.fail(&message, EXIT_STAGE_FAILED),
        };
    }
    let keep = crate::run::housekeeping::Keep {
        locks,
        used_within: args.older_than,
    };
    // The remote first: a remote that cannot be collected leaves the local cache as it was.
    let remote = match &args.remote {
        None => None,
        Some(url) => {
            let choice = if url.is_empty() {
                crate::run::RemoteChoice::Configured
            } else {
                crate::run::RemoteChoice::Url(url.clone())
            };
            match crate::run::remote_location(&choice, first.pipeline()) {
                Ok(Some(remote)) => Some(remote),
                Ok(None) => {
                    printer.error(NO_REMOTE);
                    return ExitCode::from(EXIT_CONFIG);
                }
                Err(message) => return printer.fail(&message, EXIT_CONFIG),
            }
        }
    };
    let remote_removed = match remote {
        None => None,
        Some(remote) => match crate::run::housekeeping::gc_remote(
            first.pipeline(),
            remote,
            &keep,
            args.dry_run,
            |w| printer.warning(&w),
        ) {
            Ok(done) => Some(done),
            Err(message) => return printer.fail(&message, EXIT_STAGE_FAILED),
        },
    };
    match crate::run::housekeeping::gc(&workdir, &keep, args.dry_run, |w| printer.warning(&w)) {
        Ok(removed) => {
            if args.json {
                let json = serde_json::json!({
                    "local": removed,
                    "remote": remote_removed.as_ref().map(|(url, r)| serde_json::json!({"url": url, "removed": r})),
                });
                printer.data(&(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"));
            } else {
                printer.data(&crate::report::tables::removed(&removed, args.dry_run));
                if let Some((url, removed)) = &remote_removed {
                    let line = crate::report::tables::removed(removed, args.dry_run);
                    printer.data(&format!("{url}: {line}"));
                }
            }
            ExitCode::SUCCESS
        }
        Err(message) => printer.fail(&message, EXIT_CONFIG),
    }
}

fn accept_command(args: AcceptArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let dag = match checked_dag(&args.pipeline, registry, printer) {
        Ok(dag) => dag,
        Err(code) => return code,
    };
    match crate::run::housekeeping::accept(&dag, &args.run, &args.stage, &args.reason, |w| {
        printer.warning(&w)
    }) {
        Ok(outputs) => {
            printer.status(&format!(
                "accepted the quarantined outputs of stage `{}`: {}",
                args.stage,
                outputs.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
            ExitCode::SUCCESS
        }
        Err(crate::run::housekeeping::AcceptError::Refused(message)) => {
            printer.fail(&message, EXIT_CONFIG)
        }
        Err(crate::run::housekeeping::AcceptError::Failed(message)) => {
            printer.fail(&message, EXIT_STAGE_FAILED)
        }
    }
}

fn quarantine_command(args: ChecksArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let runs = match runs_of(&args.pipeline, registry, printer) {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    let held = crate::report::tables::quarantined(&runs);
    if args.json {
        printer.data(&(serde_json::to_string_pretty(&held).unwrap_or_default() + "\n"));
    } else if held.is_empty() {
        printer.status("nothing is in quarantine");
    } else {
        printer.data(&crate::report::tables::quarantine(&held));
    }
    ExitCode::SUCCESS
}

fn diff_command(args: DiffArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let runs = match runs_of(&args.pipeline, registry, printer) {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    let find = |id: &str| -> Result<usize, String> {
        let found: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].id.starts_with(id))
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!(
                "no run of this pipeline has an id starting with `{id}`"
            )),
            _ => Err(format!(
                "`{id}` matches {} runs; give more of the id",
                found.len()
            )),
        }
    };
    // Newest first: the newer run's index is the smaller.
    let picked = match (&args.from, &args.to) {
        (Some(from), Some(to)) => find(from).and_then(|a| find(to).map(|b| (a, b))),
        (Some(from), None) => find(from).map(|a| (a, 0)),
        (None, _) if runs.len() < 2 => Err(format!(
            "this pipeline has {} run{}: a diff needs two",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        )),
        (None, _) => Ok((1, 0)),
    };
    match picked {
        Ok((a, b)) => {
            printer.data(&crate::report::diff::diff(&runs, a, b, args.json));
            ExitCode::SUCCESS
        }
        Err(message) => printer.fail(&message, EXIT_CONFIG),
    }
}

fn show_command(args: ShowArgs, registry: &Registry, printer: &Printer) -> ExitCode {
    let runs = match runs_of(&args.pipeline, registry, printer) {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    let chosen: Vec<&record::RunRecord> = match &args.run {
        None => runs.iter().take(1).collect(),
        Some(id) => runs
            .iter()
            .filter(|r| r.id.starts_with(id.as_str()))
            .collect(),
    };
    let run = match chosen.as_slice() {
        [one] => *one,
        [] => {
            printer.error(&match &args.run {
                Some(id) => format!("no run of this pipeline has an id starting with `{id}`"),
                None => "this pipeline has not run yet".to_owned(),
            });
            return ExitCode::from(EXIT_CONFIG);
        }
        _ => {
            printer.error(&format!(
                "`{}` matches {} runs; give more of the id",
                args.run.unwrap_or_default(),
                chosen.len()
            ));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.json {
        printer.data(&(serde_json::to_string_pretty(run).unwrap_or_default() + "\n"));
        return ExitCode::SUCCESS;
    }
    printer.data(&crate::report::tables::run(run));
    ExitCode::SUCCESS
}
