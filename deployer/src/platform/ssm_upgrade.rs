//! Upgrading runners on aws: each runner's EC2 instance (found by its
//! `boxctl:*` tags) is told over SSM Run Command (`AWS-RunShellScript`) to
//! run `boxlite-runner upgrade` against the release in the stage bucket, and
//! the command's invocation is polled until it ends. The runner's own exit
//! code says which step failed; it has rolled itself back where it could.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::CommandInvocationStatus;
use stack::kinds;

use super::rollout::{Failure, Upgrader, step_of_exit_code};
use crate::engine::provider::ProviderError;
use crate::providers::aws::artifacts::{self, S3Release};
use crate::providers::aws::errors::{self, Kind};
use crate::providers::aws::{AwsProvider, instances};

/// The runner binary and configuration on a runner host (see the runner's cloud-init).
const RUNNER: &str = "/usr/local/bin/boxlite-runner --config /etc/boxlite/runner.toml";
/// Seconds SSM may take to deliver the command to a host (its minimum is 30).
const DELIVERY_TIMEOUT_SECS: i32 = 120;
/// Seconds the upgrade command may run on the host.
const EXECUTION_TIMEOUT_SECS: u64 = 900;
/// How long right after SendCommand an invocation may still be unknown to
/// GetCommandInvocation (SSM creates invocations asynchronously).
const INVOCATION_GRACE: Duration = Duration::from_secs(30);
/// Lines of the command's output kept in a failure.
const TAIL_LINES: usize = 15;

/// Runs `boxlite-runner upgrade` on runner hosts over SSM Run Command.
pub struct SsmUpgrader<'a> {
    provider: &'a AwsProvider,
    release: S3Release,
    hosts: BTreeMap<String, String>,
    poll: Duration,
    progress: Box<dyn Fn(&str) + Send + Sync + 'a>,
}

impl<'a> SsmUpgrader<'a> {
    /// An upgrader to `release` for the stage's runner hosts, looked up once
    /// by their tags (one batched DescribeInstances); `progress` hears which
    /// command went to which instance.
    pub async fn new(
        provider: &'a AwsProvider,
        release: S3Release,
        progress: impl Fn(&str) + Send + Sync + 'a,
    ) -> Result<SsmUpgrader<'a>, ProviderError> {
        let hosts = instances::observe(provider)
            .await?
            .into_iter()
            .filter(|o| o.kind == kinds::AWS_INSTANCE && o.id.family() == "runner")
            .filter_map(|o| Some((o.id.name().to_string(), o.handle?)))
            .collect();
        Ok(SsmUpgrader {
            provider,
            release,
            hosts,
            poll: Duration::from_secs(1),
            progress: Box::new(progress),
        })
    }

    /// The instance id of each runner host found.
    pub fn hosts(&self) -> &BTreeMap<String, String> {
        &self.hosts
    }
}

/// The shell command a runner host runs. The presigned URL is a capability
/// to read this one object until it expires, and SendCommand parameters are
/// kept in the account's command history (readable with ssm:ListCommands),
/// which is why it is short-lived and why nothing else secret (API keys,
/// runner tokens) ever goes into the command.
pub fn upgrade_command(url: &str, sha256: &str) -> Result<String, String> {
    if url.contains(['\'', '\n', '\r']) {
        return Err("the presigned URL holds characters that cannot be quoted".into());
    }
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{sha256:?} is not a SHA-256"));
    }
    Ok(format!(
        "{RUNNER} upgrade --artifact '{url}' --sha256 {sha256}"
    ))
}

/// Output for people: the last lines of stdout and stderr, with any
/// presigned URL replaced by the object's `s3://` address.
fn tail(stdout: &str, stderr: &str, url: &str, s3_url: &str) -> String {
    let text = format!("{stdout}\n{stderr}").replace(url, s3_url);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(' ')
                .map(|w| {
                    if w.contains("X-Amz-Signature") {
                        "<presigned URL>"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

fn fail(step: &str, output: impl Into<String>) -> Failure {
    Failure {
        step: step.to_string(),
        output: output.into(),
    }
}

impl Upgrader for SsmUpgrader<'_> {
    async fn upgrade(&self, runner: &str) -> Result<String, Failure> {
        let p = self.provider;
        let Some(instance) = self.hosts.get(runner) else {
            return Err(fail(
                "check",
                format!(
                    "no EC2 instance carries the tag boxctl:id=runner/{runner} in this stage; `boxctl deploy` creates it"
                ),
            ));
        };
        let s3_url = self.release.url();
        let url = artifacts::presign(p, &self.release.key, artifacts::URL_TTL)
            .await
            .map_err(|e| fail("presign", e.to_string()))?;
        let command = upgrade_command(&url, &self.release.published.sha256)
            .map_err(|e| fail("configuration", e))?;
        let comment: String = format!(
            "boxctl runner upgrade {runner} to {}",
            self.release.published.release
        )
        .chars()
        .take(100)
        .collect();
        let sent = p
            .clients()
            .ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .instance_ids(instance)
            .parameters("commands", vec![command])
            .parameters("executionTimeout", vec![EXECUTION_TIMEOUT_SECS.to_string()])
            .timeout_seconds(DELIVERY_TIMEOUT_SECS)
            .comment(comment)
            .send()
            .await;
        let sent = match sent {
            Ok(s) => s,
            Err(e) => {
                let mut msg =
                    errors::to_provider("SendCommand", format!("{runner} ({instance})"), &e)
                        .to_string();
                if errors::code_of(&e).as_deref() == Some("InvalidInstanceId") {
                    msg.push_str(&format!(
                        " (hint: the instance is not running or its SSM agent is not registered; `aws ssm describe-instance-information --filters Key=InstanceIds,Values={instance}` shows whether SSM manages it, and the runner's instance role must keep AmazonSSMManagedInstanceCore)"
                    ));
                }
                return Err(fail("send", msg));
            }
        };
        let Some(command_id) = sent
            .command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
        else {
            return Err(fail("send", "SendCommand answered without a command id"));
        };
        (self.progress)(&format!(
            "{runner}: SSM command {command_id} sent to {instance}"
        ));
        let started = Instant::now();
        let deadline = Duration::from_secs(
            EXECUTION_TIMEOUT_SECS + u64::try_from(DELIVERY_TIMEOUT_SECS).unwrap_or(120) + 60,
        );
        let look = format!(
            "`aws ssm get-command-invocation --region {} --command-id {command_id} --instance-id {instance}`",
            p.region()
        );
        let mut interval = self.poll;
        loop {
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_secs(10));
            let r = p
                .clients()
                .ssm
                .get_command_invocation()
                .command_id(&command_id)
                .instance_id(instance)
                .send()
                .await;
            let inv = match r {
                Ok(inv) => inv,
                Err(e) => {
                    let code = errors::code_of(&e);
                    let early = code.as_deref() == Some("InvocationDoesNotExist")
                        && started.elapsed() < INVOCATION_GRACE;
                    let transient =
                        matches!(errors::kind_of(&e), Kind::Throttled | Kind::Unavailable);
                    if (early || transient) && started.elapsed() < deadline {
                        continue;
                    }
                    return Err(fail(
                        "ssm",
                        errors::to_provider(
                            "GetCommandInvocation",
                            format!("{runner} ({instance})"),
                            &e,
                        )
                        .to_string(),
                    ));
                }
            };
            let out = tail(
                inv.standard_output_content().unwrap_or_default(),
                inv.standard_error_content().unwrap_or_default(),
                &url,
                &s3_url,
            );
            let details = inv.status_details().unwrap_or_default();
            match inv.status() {
                Some(CommandInvocationStatus::Success) => return Ok(out),
                Some(CommandInvocationStatus::Failed) => {
                    let code = inv.response_code();
                    // -1: the command never ran (undeliverable, the host went away).
                    let step = if code < 0 {
                        "ssm"
                    } else {
                        step_of_exit_code(Some(code))
                    };
                    let why = format!("exit code {code} ({details}); see {look}");
                    return Err(fail(
                        step,
                        if out.is_empty() {
                            why
                        } else {
                            format!("{out}\n{why}")
                        },
                    ));
                }
                Some(
                    s @ (CommandInvocationStatus::TimedOut | CommandInvocationStatus::Cancelled),
                ) => {
                    return Err(fail(
                        "ssm",
                        format!(
                            "the command {} ({details}): {}; see {look}",
                            s.as_str().to_lowercase(),
                            if details.contains("Delivery") {
                                "SSM could not reach the host's agent"
                            } else {
                                "the upgrade did not finish; the runner rolls back an upgrade it could not confirm"
                            }
                        ),
                    ));
                }
                _ => {}
            }
            if started.elapsed() >= deadline {
                return Err(fail(
                    "ssm",
                    format!(
                        "no result after {}s (last status {details}); see {look}",
                        started.elapsed().as_secs()
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_quotes_the_url_and_pins_the_digest() {
        let sha = "a".repeat(64);
        let c = upgrade_command(
            "https://b.s3.amazonaws.com/k?X-Amz-Expires=900&X-Amz-Signature=f",
            &sha,
        )
        .unwrap();
        assert!(c.contains(
            "upgrade --artifact 'https://b.s3.amazonaws.com/k?X-Amz-Expires=900&X-Amz-Signature=f'"
        ));
        assert!(c.ends_with(&format!("--sha256 {sha}")));
        assert!(upgrade_command("https://x/'; rm -rf /", &sha).is_err());
        assert!(upgrade_command("https://x/", "nothex").is_err());
    }

    #[test]
    fn output_never_shows_the_presigned_url() {
        let url = "https://b/k?X-Amz-Signature=secret";
        let out = tail(
            &format!("downloading {url}\nok"),
            "GET https://b/k?X-Amz-Date=1&X-Amz-Signature=other: 403",
            url,
            "s3://b/k",
        );
        assert!(!out.contains("X-Amz-Signature"), "{out}");
        assert!(out.contains("downloading s3://b/k"), "{out}");
        assert!(out.contains("<presigned URL>"), "{out}");
    }
}
