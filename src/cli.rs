//! The command line: argument definitions and dispatch to the library. Thin glue.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use imba_stages::Registry;

use crate::config::{self, LoadError, Overrides};
use crate::dag::{self, BuildOptions, Dag};
use crate::draw::{self, DrawOptions, Format};
use crate::report::{ColorChoice, Printer};

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
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a pipeline file and report every problem at once; runs nothing.
    Validate(PipelineArgs),
    /// Draw the stage graph (text, DOT, Mermaid or JSON) on stdout.
    Dag(DagArgs),
    /// List the built-in stages and their implementation versions.
    Stages,
    /// Print the JSON Schema of pipeline files, for editors.
    Schema,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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
}

impl PipelineArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            vars_files: self.vars.clone(),
            sets: self.set.clone(),
        }
    }
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let printer = Printer::new(cli.color, cli.quiet);
    run(cli, &printer)
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
                printer.data(&draw::draw(&dag, format, DrawOptions { files: args.files }));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Stages => {
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
            printer.data(&crate::schema::pipeline_schema_json());
            ExitCode::SUCCESS
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
    let (sources, loaded) = config::load(&args.file, &args.overrides(), registry);
    let pipeline = match loaded {
        Ok(pipeline) => pipeline,
        Err(LoadError::Unreadable(message)) => {
            printer.error(&message);
            return Err(ExitCode::from(EXIT_CONFIG));
        }
        Err(LoadError::Invalid(diagnostics)) => {
            printer.diagnostics(&sources, &diagnostics);
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    dag::build(pipeline, BuildOptions::default()).map_err(|diagnostics| {
        printer.diagnostics(&sources, &diagnostics);
        ExitCode::from(EXIT_CONFIG)
    })
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
