//! The Slurm executor: `sbatch` to submit, `scontrol show job` to poll, `scancel` to cancel;
//! the cluster is the one the environment names (`SLURM_CONF`), as for Slurm's own commands.

use std::time::Duration;

use super::remote::{Executor, Job, JobState};
use crate::model::SlurmSettings;

pub struct Slurm<'a> {
    pub settings: &'a SlurmSettings,
}

/// A Slurm command's stdout, or its stderr as the error.
async fn slurm(program: &str, args: &[String]) -> Result<String, String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("`{program}` is not installed here (Slurm's client commands are needed on the machine that runs imba)")
            }
            _ => format!("cannot run `{program}`: {e}"),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        Err(if stderr.is_empty() {
            format!("`{program}` failed ({})", output.status)
        } else {
            stderr.lines().map(str::trim).collect::<Vec<_>>().join("; ")
        })
    }
}

/// `--time` in minutes, rounded up.
fn minutes(limit: Duration) -> String {
    limit.as_secs().div_ceil(60).max(1).to_string()
}

/// `--mem` in MiB, rounded up.
fn mebibytes(bytes: u64) -> String {
    format!("{}M", bytes.div_ceil(1 << 20).max(1))
}

impl Slurm<'_> {
    /// `sbatch`'s arguments for `job`.
    pub fn sbatch_args(&self, job: &Job) -> Vec<String> {
        // sbatch expands `%` in file names (`%j`: the job id): `monthly%402017-01.log` is
        // written as it is named only with `%%`.
        let log = job.log.display().to_string().replace('%', "%%");
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={}", job.name),
            format!("--comment={}", job.tag),
            format!("--chdir={}", job.workdir.display()),
            format!("--output={log}"),
            format!("--error={log}"),
            "--open-mode=append".to_owned(),
            // imba retries; a job requeued by Slurm would run again after imba moved on.
            "--no-requeue".to_owned(),
            // Variables a stage passes through (`env:`) come from this environment (`extra`
            // may narrow it: `--export=PATH,HOME,AWS_PROFILE`; the last `--export` wins).
            "--export=ALL".to_owned(),
            "--nodes=1".to_owned(),
            "--ntasks=1".to_owned(),
            format!("--cpus-per-task={}", job.cpus.max(1)),
        ];
        if let Some(memory) = job.memory {
            args.push(format!("--mem={}", mebibytes(memory)));
        }
        if let Some(limit) = job.time_limit {
            args.push(format!("--time={}", minutes(limit)));
        }
        if let Some(partition) = &self.settings.partition {
            args.push(format!("--partition={partition}"));
        }
        if let Some(account) = &self.settings.account {
            args.push(format!("--account={account}"));
        }
        args.extend(self.settings.extra.iter().cloned());
        let command: Vec<String> = job
            .command
            .iter()
            .map(|w| crate::config::shell::quote(w))
            .collect();
        args.push(format!("--wrap=exec {}", command.join(" ")));
        args
    }
}

/// The most CPUs and memory (bytes) one node of the executor's partition has, from `sinfo`.
pub fn largest_node(settings: &SlurmSettings) -> Result<(u32, u64), String> {
    let mut args = vec![
        "-h".to_owned(),
        "-N".to_owned(),
        "-o".to_owned(),
        "%c %m".to_owned(),
    ];
    if let Some(partition) = &settings.partition {
        args.push(format!("--partition={partition}"));
    }
    let output = std::process::Command::new("sinfo")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `sinfo`: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
    }
    parse_nodes(&String::from_utf8_lossy(&output.stdout))
}

/// `sinfo -h -N -o "%c %m"` lines (CPUs, memory in MiB; `+` marks a range's top) to the largest.
pub fn parse_nodes(text: &str) -> Result<(u32, u64), String> {
    let mut largest: Option<(u32, u64)> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let number = |f: Option<&str>| -> Option<u64> { f?.trim_end_matches('+').parse().ok() };
        let (Some(cpus), Some(mebibytes)) = (number(fields.next()), number(fields.next())) else {
            return Err(format!("cannot read `sinfo` line `{line}`"));
        };
        let (c, m) = largest.unwrap_or((0, 0));
        largest = Some((c.max(cpus as u32), m.max(mebibytes << 20)));
    }
    largest.ok_or_else(|| "the partition has no node".to_owned())
}

/// `KEY=VALUE` fields of `scontrol show job -o`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty() && *v != "(null)" && *v != "None")
}

/// The state `scontrol show job -o ID` prints.
pub fn parse_job(line: &str) -> Result<JobState, String> {
    let state = field(line, "JobState").ok_or_else(|| format!("no JobState in `{line}`"))?;
    let node = field(line, "NodeList").map(str::to_owned);
    // The states a job does not leave (Slurm's `JOB_*` base states past running); anything
    // else, known or new, is looked at again.
    const ENDED: &[&str] = &[
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    ];
    Ok(match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" | "SUSPENDED" => JobState::Queued,
        ended if ENDED.contains(&ended) => JobState::Ended {
            state: ended.to_owned(),
            exit: field(line, "ExitCode").map(str::to_owned),
            node,
            reason: field(line, "Reason").map(str::to_owned),
        },
        // RUNNING, COMPLETING, STOPPED (holds its node), SIGNALING, …
        _ => JobState::Running { node },
    })
}

impl Executor for Slurm<'_> {
    fn kind(&self) -> &'static str {
        "slurm"
    }

    async fn submit(&self, job: &Job) -> Result<String, String> {
        let out = slurm("sbatch", &self.sbatch_args(job)).await?;
        // `ID` or `ID;CLUSTER`.
        let id = out.split(';').next().unwrap_or_default().trim().to_owned();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("sbatch printed no job id: {out}"));
        }
        Ok(id)
    }

    async fn poll(&self, id: &str) -> Result<JobState, String> {
        let out = slurm(
            "scontrol",
            &["show".into(), "job".into(), "-o".into(), id.into()],
        )
        .await;
        match out {
            Ok(line) => parse_job(&line),
            // Gone from the controller's memory (older than MinJobAge): it ended long ago.
            Err(e) if e.contains("Invalid job id") => Ok(JobState::Ended {
                state: "ENDED".to_owned(),
                exit: None,
                node: None,
                reason: None,
            }),
            Err(e) => Err(e),
        }
    }

    async fn cancel(&self, id: &str) -> Result<(), String> {
        slurm("scancel", &[id.to_owned()]).await.map(drop)
    }

    async fn live(&self, prefix: &str) -> Result<Vec<(String, String)>, String> {
        let args = [
            "--me",
            "--noheader",
            "--states=PENDING,CONFIGURING,RUNNING,SUSPENDED",
            "--format=%i|%k",
        ];
        let out = slurm("squeue", &args.map(str::to_owned)).await?;
        Ok(out
            .lines()
            .filter_map(|line| line.trim().split_once('|'))
            .filter(|(_, tag)| tag.starts_with(prefix))
            .map(|(id, tag)| (id.to_owned(), tag.to_owned()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_are_read() {
        let running = "JobId=7 JobName=imba:a UserId=root(0) JobState=RUNNING Reason=None Dependency=(null) ExitCode=0:0 NodeList=n2 BatchHost=n2";
        assert_eq!(
            parse_job(running).unwrap(),
            JobState::Running {
                node: Some("n2".to_owned())
            }
        );
        let pending = "JobId=8 JobState=PENDING Reason=Resources ExitCode=0:0 NodeList=(null)";
        assert_eq!(parse_job(pending).unwrap(), JobState::Queued);
        let stopped = "JobId=10 JobState=STOPPED Reason=None ExitCode=0:0 NodeList=n1";
        assert!(matches!(
            parse_job(stopped).unwrap(),
            JobState::Running { .. }
        ));
        let stopped = "JobId=10 JobState=STOPPED Reason=None ExitCode=0:0 NodeList=n1";
        assert!(matches!(
            parse_job(stopped).unwrap(),
            JobState::Running { .. }
        ));
        let failed = "JobId=9 JobState=FAILED Reason=NonZeroExitCode ExitCode=0:9 NodeList=n1";
        assert_eq!(
            parse_job(failed).unwrap(),
            JobState::Ended {
                state: "FAILED".to_owned(),
                exit: Some("0:9".to_owned()),
                node: Some("n1".to_owned()),
                reason: Some("NonZeroExitCode".to_owned()),
            }
        );
        assert!(parse_job("nonsense").is_err());
    }

    #[test]
    fn the_largest_node_is_found() {
        assert_eq!(parse_nodes("2 4096\n8+ 1000\n").unwrap(), (8, 4096 << 20));
        assert!(parse_nodes("").is_err());
        assert!(parse_nodes("n/a x").is_err());
    }

    #[test]
    fn a_log_name_with_percent_is_written_as_named() {
        let settings = SlurmSettings::default();
        let job = Job {
            name: "imba:m@2017-01".to_owned(),
            tag: "imba:0123456789abcdef:r".to_owned(),
            command: vec!["imba".to_owned()],
            workdir: "/w".into(),
            log: "/w/.imba/logs/r/m%402017-01.log".into(),
            cpus: 1,
            memory: None,
            time_limit: None,
        };
        let args = Slurm {
            settings: &settings,
        }
        .sbatch_args(&job);
        assert!(args.contains(&"--output=/w/.imba/logs/r/m%%402017-01.log".to_owned()));
        assert!(args.contains(&"--no-requeue".to_owned()));
    }

    #[test]
    fn a_job_asks_for_its_resources() {
        let settings = SlurmSettings {
            partition: Some("batch".to_owned()),
            account: None,
            extra: vec!["--qos=high".to_owned()],
        };
        let job = Job {
            name: "imba:impute".to_owned(),
            tag: "imba:0123456789abcdef:20261204T124706.819Z-2f1b".to_owned(),
            command: vec![
                "/opt/imba".to_owned(),
                "exec-stage".to_owned(),
                "/w/it's.json".to_owned(),
            ],
            workdir: "/w".into(),
            log: "/w/.imba/logs/r/impute.log".into(),
            cpus: 2,
            memory: Some(4_000_000_000),
            time_limit: Some(Duration::from_secs(90)),
        };
        let args = Slurm {
            settings: &settings,
        }
        .sbatch_args(&job);
        assert!(args.contains(&"--cpus-per-task=2".to_owned()));
        assert!(args.contains(&"--mem=3815M".to_owned()));
        assert!(args.contains(&"--time=2".to_owned()));
        assert!(args.contains(&"--partition=batch".to_owned()));
        assert!(args.contains(&"--qos=high".to_owned()));
        assert!(
            args.contains(&"--comment=imba:0123456789abcdef:20261204T124706.819Z-2f1b".to_owned())
        );
        assert_eq!(
            args.last().unwrap(),
            r#"--wrap=exec /opt/imba exec-stage '/w/it'\''s.json'"#
        );
    }
}
