//! The AWS SDK clients of a stage: one shared configuration (region from the
//! stage, credentials from the standard chain, the SDK's own retries for
//! throttling and 5xx), optionally pointed at an emulator.
//!
//! With an endpoint override nothing may reach real AWS: credentials then
//! come from the environment only (an SSO session or an assume-role profile
//! would call AWS's own STS and SSO endpoints), and without any, from fixed
//! placeholder keys that emulators accept.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_types::region::Region;

/// Environment variable naming an endpoint URL for every AWS client (an emulator).
pub const ENDPOINT_ENV: &str = "BOXCTL_AWS_ENDPOINT_URL";

/// One client per AWS service boxctl uses.
#[derive(Clone, Debug)]
pub struct Clients {
    /// EC2: network, runners, AMIs.
    pub ec2: aws_sdk_ec2::Client,
    /// ECS: cluster, task definitions, services.
    pub ecs: aws_sdk_ecs::Client,
    /// Elastic Load Balancing v2.
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    /// SSM Parameter Store.
    pub ssm: aws_sdk_ssm::Client,
    /// S3: the stage bucket, lock and journal.
    pub s3: aws_sdk_s3::Client,
    /// RDS.
    pub rds: aws_sdk_rds::Client,
    /// ACM.
    pub acm: aws_sdk_acm::Client,
    /// IAM.
    pub iam: aws_sdk_iam::Client,
    /// STS: who the credentials belong to.
    pub sts: aws_sdk_sts::Client,
    /// CloudWatch Logs.
    pub logs: aws_sdk_cloudwatchlogs::Client,
}

impl Clients {
    /// Clients for `region`; every one talks to `endpoint` when given. Nothing
    /// is contacted until the first call.
    pub async fn new(region: &str, endpoint: Option<&str>) -> Clients {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(5)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(90))
                    .build(),
            );
        if let Some(url) = endpoint {
            use aws_config::environment::EnvironmentVariableCredentialsProvider;
            use aws_config::meta::credentials::CredentialsProviderChain;
            let chain = CredentialsProviderChain::first_try(
                "Environment",
                EnvironmentVariableCredentialsProvider::new(),
            )
            .or_else(
                "EmulatorPlaceholder",
                aws_sdk_sts::config::Credentials::new(
                    "boxctl-emulator",
                    "boxctl-emulator",
                    None,
                    None,
                    "boxctl-emulator",
                ),
            );
            loader = loader.endpoint_url(url).credentials_provider(chain);
        }
        let conf = loader.load().await;
        // Emulators serve every bucket under one host: path-style addressing.
        let s3 = aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(endpoint.is_some())
            .build();
        Clients {
            ec2: aws_sdk_ec2::Client::new(&conf),
            ecs: aws_sdk_ecs::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
            s3: aws_sdk_s3::Client::from_conf(s3),
            rds: aws_sdk_rds::Client::new(&conf),
            acm: aws_sdk_acm::Client::new(&conf),
            iam: aws_sdk_iam::Client::new(&conf),
            sts: aws_sdk_sts::Client::new(&conf),
            logs: aws_sdk_cloudwatchlogs::Client::new(&conf),
        }
    }
}
