//! The stage's network on EC2: VPC, subnets, internet gateway, Elastic IPs,
//! NAT gateways, route tables (routes and subnet associations) and security
//! groups (ingress rules). One tag-filtered, paginated describe per kind.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_ec2::types::{
    AttributeBooleanValue, DomainType, Filter, IpPermission, IpRange, NatGatewayState,
    ResourceType, Tag, TagSpecification, UserIdGroupPair, VpcAttributeName,
};
use stack::{Props as PropMap, Resource, Value, kinds};

use super::errors::{AwsResult, Kind};
use super::props::{Props, raw_id_set};
use super::wait::{self, Bounds, Poll};
use super::{AwsProvider, out, output, tags};
use crate::engine::provider::{Observed, ProviderError, StepCtx};

/// The tag filters that select this stage's resources.
pub(crate) fn stage_filters(p: &AwsProvider) -> Vec<Filter> {
    vec![
        Filter::builder()
            .name(format!("tag:{}", stack::tags::STACK))
            .values(&p.stack)
            .build(),
        Filter::builder()
            .name(format!("tag:{}", stack::tags::STAGE))
            .values(&p.stage)
            .build(),
    ]
}

/// A tag specification for a create call.
pub(crate) fn tag_spec(rt: ResourceType, pairs: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(rt)
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

/// EC2 tags as a map.
pub(crate) fn tag_map(t: &[Tag]) -> BTreeMap<String, String> {
    tags::to_map(
        t.iter()
            .filter_map(|t| Some((t.key()?, t.value().unwrap_or("")))),
    )
}

/// Identity tags plus the display name.
pub(crate) fn create_tags(p: &AwsProvider, ctx: &StepCtx, d: &Resource) -> Vec<(String, String)> {
    let mut t = p.tags_for(&d.id, &d.policy, ctx.generation);
    if let Some(name) = d.props.get("name").and_then(Value::as_str) {
        t.push((tags::NAME.to_string(), name.to_string()));
    }
    t
}

async fn set_name(
    p: &AwsProvider,
    aws_id: &str,
    name: &str,
    id: &stack::ResourceId,
) -> Result<(), ProviderError> {
    p.c.ec2
        .create_tags()
        .resources(aws_id)
        .tags(Tag::builder().key(tags::NAME).value(name).build())
        .send()
        .await
        .or_fail("CreateTags", id)?;
    Ok(())
}

fn name_of(t: &BTreeMap<String, String>) -> Value {
    Value::str(t.get(tags::NAME).cloned().unwrap_or_default())
}

/// Every network resource of the stage.
pub async fn observe(p: &AwsProvider) -> Result<Vec<Observed>, ProviderError> {
    let f = || Some(stage_filters(p));
    let ec2 = &p.c.ec2;
    let (vpcs, subnets, igws, addresses, nats, tables, groups) = futures::try_join!(
        async {
            ec2.describe_vpcs()
                .set_filters(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeVpcs", "observing VPCs")
        },
        async {
            ec2.describe_subnets()
                .set_filters(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeSubnets", "observing subnets")
        },
        async {
            ec2.describe_internet_gateways()
                .set_filters(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeInternetGateways", "observing internet gateways")
        },
        async {
            ec2.describe_addresses()
                .set_filters(f())
                .send()
                .await
                .or_fail("DescribeAddresses", "observing Elastic IPs")
        },
        async {
            ec2.describe_nat_gateways()
                .set_filter(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeNatGateways", "observing NAT gateways")
        },
        async {
            ec2.describe_route_tables()
                .set_filters(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeRouteTables", "observing route tables")
        },
        async {
            ec2.describe_security_groups()
                .set_filters(f())
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .or_fail("DescribeSecurityGroups", "observing security groups")
        },
    )?;
    let mut all = Vec::new();

    for v in &vpcs {
        let t = tag_map(v.tags());
        let (Some(ident), Some(vpc_id)) = (p.identity(&t), v.vpc_id()) else {
            continue;
        };
        if v.state()
            .is_some_and(|s| s.as_str() != "available" && s.as_str() != "pending")
        {
            continue;
        }
        let (hostnames, support) = futures::try_join!(
            vpc_attribute(p, vpc_id, VpcAttributeName::EnableDnsHostnames),
            vpc_attribute(p, vpc_id, VpcAttributeName::EnableDnsSupport),
        )?;
        let props = PropMap::from([
            ("name".into(), name_of(&t)),
            (
                "cidr".into(),
                Value::str(v.cidr_block().unwrap_or_default()),
            ),
            ("dns_hostnames".into(), Value::Bool(hostnames)),
            ("dns_support".into(), Value::Bool(support)),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_VPC,
            props,
            out(&[("id", Value::str(vpc_id))]),
            Some(vpc_id.to_string()),
        ));
    }

    for s in &subnets {
        let t = tag_map(s.tags());
        let (Some(ident), Some(id)) = (p.identity(&t), s.subnet_id()) else {
            continue;
        };
        let props = PropMap::from([
            ("name".into(), name_of(&t)),
            ("vpc_id".into(), Value::str(s.vpc_id().unwrap_or_default())),
            (
                "cidr".into(),
                Value::str(s.cidr_block().unwrap_or_default()),
            ),
            (
                "availability_zone".into(),
                Value::str(s.availability_zone().unwrap_or_default()),
            ),
            (
                "public".into(),
                Value::Bool(s.map_public_ip_on_launch().unwrap_or(false)),
            ),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_SUBNET,
            props,
            out(&[("id", Value::str(id))]),
            Some(id.to_string()),
        ));
    }

    for g in &igws {
        let t = tag_map(g.tags());
        let (Some(ident), Some(id)) = (p.identity(&t), g.internet_gateway_id()) else {
            continue;
        };
        let mut props = PropMap::from([("name".into(), name_of(&t))]);
        if let Some(vpc) = g
            .attachments()
            .iter()
            .find(|a| a.state().is_some_and(|s| s.as_str() != "detached"))
            .and_then(|a| a.vpc_id())
        {
            props.insert("vpc_id".into(), Value::str(vpc));
        }
        all.push(p.observed(
            ident,
            kinds::AWS_INTERNET_GATEWAY,
            props,
            out(&[("id", Value::str(id))]),
            Some(id.to_string()),
        ));
    }

    for a in addresses.addresses() {
        let t = tag_map(a.tags());
        let (Some(ident), Some(alloc)) = (p.identity(&t), a.allocation_id()) else {
            continue;
        };
        all.push(p.observed(
            ident,
            kinds::AWS_EIP,
            PropMap::from([("name".into(), name_of(&t))]),
            out(&[
                ("allocation_id", Value::str(alloc)),
                ("public_ip", Value::str(a.public_ip().unwrap_or_default())),
            ]),
            Some(alloc.to_string()),
        ));
    }

    for n in &nats {
        let t = tag_map(n.tags());
        let (Some(ident), Some(id)) = (p.identity(&t), n.nat_gateway_id()) else {
            continue;
        };
        // Deleted and failed gateways linger in listings for a while; they are gone.
        if matches!(
            n.state(),
            Some(NatGatewayState::Deleted | NatGatewayState::Deleting | NatGatewayState::Failed)
        ) {
            continue;
        }
        let allocation = n
            .nat_gateway_addresses()
            .iter()
            .find_map(|a| a.allocation_id())
            .unwrap_or_default();
        let props = PropMap::from([
            ("name".into(), name_of(&t)),
            (
                "subnet_id".into(),
                Value::str(n.subnet_id().unwrap_or_default()),
            ),
            ("allocation_id".into(), Value::str(allocation)),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_NAT_GATEWAY,
            props,
            out(&[("id", Value::str(id))]),
            Some(id.to_string()),
        ));
    }

    for rt in &tables {
        let t = tag_map(rt.tags());
        let (Some(ident), Some(id)) = (p.identity(&t), rt.route_table_id()) else {
            continue;
        };
        let mut routes = BTreeMap::new();
        for r in rt.routes() {
            let Some(dest) = r.destination_cidr_block() else {
                continue;
            };
            if r.gateway_id() == Some("local") {
                continue;
            }
            let target = if let Some(g) = r.gateway_id() {
                ("gateway_id", g)
            } else if let Some(n) = r.nat_gateway_id() {
                ("nat_gateway_id", n)
            } else {
                ("other", r.network_interface_id().unwrap_or("unknown"))
            };
            routes.insert(
                dest.to_string(),
                Value::Map(BTreeMap::from([(
                    target.0.to_string(),
                    Value::str(target.1),
                )])),
            );
        }
        let mut associations = BTreeMap::new();
        for a in rt.associations() {
            if a.main().unwrap_or(false) {
                continue;
            }
            if let (Some(subnet), Some(assoc)) = (a.subnet_id(), a.route_table_association_id()) {
                associations.insert(subnet.to_string(), Value::str(assoc));
            }
        }
        let props = PropMap::from([
            ("name".into(), name_of(&t)),
            ("vpc_id".into(), Value::str(rt.vpc_id().unwrap_or_default())),
            ("routes".into(), Value::Map(routes)),
            ("subnets".into(), raw_id_set(associations.keys().cloned())),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_ROUTE_TABLE,
            props,
            out(&[
                ("id", Value::str(id)),
                ("associations", Value::Map(associations)),
            ]),
            Some(id.to_string()),
        ));
    }

    for g in &groups {
        let t = tag_map(g.tags());
        let (Some(ident), Some(id)) = (p.identity(&t), g.group_id()) else {
            continue;
        };
        let props = PropMap::from([
            (
                "name".into(),
                Value::str(g.group_name().unwrap_or_default()),
            ),
            (
                "description".into(),
                Value::str(g.description().unwrap_or_default()),
            ),
            ("vpc_id".into(), Value::str(g.vpc_id().unwrap_or_default())),
            ("ingress".into(), Value::Map(rules_of(g.ip_permissions()))),
        ]);
        all.push(p.observed(
            ident,
            kinds::AWS_SECURITY_GROUP,
            props,
            out(&[("id", Value::str(id))]),
            Some(id.to_string()),
        ));
    }
    Ok(all)
}

async fn vpc_attribute(
    p: &AwsProvider,
    vpc: &str,
    attr: VpcAttributeName,
) -> Result<bool, ProviderError> {
    let r =
        p.c.ec2
            .describe_vpc_attribute()
            .vpc_id(vpc)
            .attribute(attr.clone())
            .send()
            .await
            .or_fail("DescribeVpcAttribute", format!("observing VPC {vpc}"))?;
    let v = match attr {
        VpcAttributeName::EnableDnsHostnames => r.enable_dns_hostnames(),
        _ => r.enable_dns_support(),
    };
    Ok(v.and_then(AttributeBooleanValue::value).unwrap_or(false))
}

/// An ingress rule, flattened: one source per rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rule {
    protocol: String,
    from: i64,
    to: i64,
    /// `cidr:<block>` or `sg:<group id>`.
    source: String,
}

impl Rule {
    fn to_value(&self) -> Value {
        let mut m = BTreeMap::from([
            ("protocol".to_string(), Value::str(self.protocol.as_str())),
            ("from_port".to_string(), Value::Int(self.from)),
            ("to_port".to_string(), Value::Int(self.to)),
        ]);
        match self.source.split_once(':') {
            Some(("cidr", c)) => m.insert("cidr".into(), Value::str(c)),
            Some((_, g)) => m.insert("source".into(), Value::str(g)),
            None => None,
        };
        Value::Map(m)
    }

    fn from_value(v: &Value) -> Option<Rule> {
        let m = v.as_map()?;
        let source = match (m.get("cidr"), m.get("source")) {
            (Some(Value::Str(c)), _) => format!("cidr:{c}"),
            (_, Some(Value::Str(g))) => format!("sg:{g}"),
            _ => return None,
        };
        Some(Rule {
            protocol: m.get("protocol")?.as_str()?.to_string(),
            from: m.get("from_port")?.as_int()?,
            to: m.get("to_port")?.as_int()?,
            source,
        })
    }

    fn permission(&self, description: &str) -> IpPermission {
        let b = IpPermission::builder()
            .ip_protocol(&self.protocol)
            .from_port(self.from as i32)
            .to_port(self.to as i32);
        match self.source.split_once(':') {
            Some(("cidr", c)) => b
                .ip_ranges(
                    IpRange::builder()
                        .cidr_ip(c)
                        .description(description)
                        .build(),
                )
                .build(),
            Some((_, g)) => b
                .user_id_group_pairs(
                    UserIdGroupPair::builder()
                        .group_id(g)
                        .description(description)
                        .build(),
                )
                .build(),
            None => b.build(),
        }
    }
}

/// Ingress rules keyed by their description (or a description of the rule when it has none).
fn rules_of(perms: &[IpPermission]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for perm in perms {
        let protocol = perm.ip_protocol().unwrap_or("-1").to_string();
        let from = i64::from(perm.from_port().unwrap_or(-1));
        let to = i64::from(perm.to_port().unwrap_or(-1));
        let mut add = |source: String, description: Option<&str>| {
            let rule = Rule {
                protocol: protocol.clone(),
                from,
                to,
                source,
            };
            let key = description
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "{} {}-{} from {}",
                        rule.protocol, rule.from, rule.to, rule.source
                    )
                });
            out.insert(key, rule.to_value());
        };
        for r in perm.ip_ranges() {
            if let Some(c) = r.cidr_ip() {
                add(format!("cidr:{c}"), r.description());
            }
        }
        for g in perm.user_id_group_pairs() {
            if let Some(id) = g.group_id() {
                add(format!("sg:{id}"), g.description());
            }
        }
    }
    out
}

/// Create a network resource.
pub async fn create(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
) -> Result<Observed, ProviderError> {
    let pr = Props::of(&d.id, &d.props);
    let id = &d.id;
    let ec2 = &p.c.ec2;
    let t = create_tags(p, ctx, d);
    match d.kind.as_str() {
        kinds::AWS_VPC => {
            let r = ec2
                .create_vpc()
                .cidr_block(pr.str("cidr")?)
                .tag_specifications(tag_spec(ResourceType::Vpc, &t))
                .send()
                .await
                .or_fail("CreateVpc", id)?;
            let vpc = r
                .vpc()
                .and_then(|v| v.vpc_id())
                .unwrap_or_default()
                .to_string();
            set_vpc_dns(
                p,
                &vpc,
                pr.bool("dns_support")?,
                pr.bool("dns_hostnames")?,
                id,
            )
            .await?;
            Ok(p.after(ctx, d, out(&[("id", Value::str(vpc.as_str()))]), Some(vpc)))
        }
        kinds::AWS_SUBNET => {
            let r = ec2
                .create_subnet()
                .vpc_id(pr.str("vpc_id")?)
                .cidr_block(pr.str("cidr")?)
                .availability_zone(pr.str("availability_zone")?)
                .tag_specifications(tag_spec(ResourceType::Subnet, &t))
                .send()
                .await
                .or_fail("CreateSubnet", id)?;
            let subnet = r
                .subnet()
                .and_then(|s| s.subnet_id())
                .unwrap_or_default()
                .to_string();
            if pr.bool("public")? {
                set_public(p, &subnet, true, id).await?;
            }
            Ok(p.after(
                ctx,
                d,
                out(&[("id", Value::str(subnet.as_str()))]),
                Some(subnet),
            ))
        }
        kinds::AWS_INTERNET_GATEWAY => {
            let r = ec2
                .create_internet_gateway()
                .tag_specifications(tag_spec(ResourceType::InternetGateway, &t))
                .send()
                .await
                .or_fail("CreateInternetGateway", id)?;
            let igw = r
                .internet_gateway()
                .and_then(|g| g.internet_gateway_id())
                .unwrap_or_default()
                .to_string();
            ec2.attach_internet_gateway()
                .internet_gateway_id(&igw)
                .vpc_id(pr.str("vpc_id")?)
                .send()
                .await
                .or_fail("AttachInternetGateway", id)?;
            Ok(p.after(ctx, d, out(&[("id", Value::str(igw.as_str()))]), Some(igw)))
        }
        kinds::AWS_EIP => {
            let r = ec2
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tag_spec(ResourceType::ElasticIp, &t))
                .send()
                .await
                .or_fail("AllocateAddress", id)?;
            let alloc = r.allocation_id().unwrap_or_default().to_string();
            Ok(p.after(
                ctx,
                d,
                out(&[
                    ("allocation_id", Value::str(alloc.as_str())),
                    ("public_ip", Value::str(r.public_ip().unwrap_or_default())),
                ]),
                Some(alloc),
            ))
        }
        kinds::AWS_NAT_GATEWAY => {
            // A token AWS still remembers from a deleted gateway answers with it: step over it.
            let mut created = None;
            for salt in 0..=super::MAX_SALT {
                let r = ec2
                    .create_nat_gateway()
                    .subnet_id(pr.str("subnet_id")?)
                    .allocation_id(pr.str("allocation_id")?)
                    .client_token(super::token(ctx, id, salt, 64, false))
                    .tag_specifications(tag_spec(ResourceType::Natgateway, &t))
                    .send()
                    .await
                    .or_fail("CreateNatGateway", id)?;
                let gw = r.nat_gateway();
                let dead = matches!(
                    gw.and_then(|g| g.state()),
                    Some(
                        NatGatewayState::Deleted
                            | NatGatewayState::Deleting
                            | NatGatewayState::Failed
                    )
                );
                if !dead {
                    created = gw.and_then(|g| g.nat_gateway_id()).map(str::to_string);
                    break;
                }
            }
            let nat = created.ok_or_else(|| {
                ProviderError::hard(
                    "CreateNatGateway",
                    format!("{id}: every idempotency token answered with a deleted NAT gateway"),
                )
                .with_hint("wait an hour for AWS to forget the old tokens, then deploy again")
            })?;
            wait_nat(p, id, &nat, true).await?;
            Ok(p.after(ctx, d, out(&[("id", Value::str(nat.as_str()))]), Some(nat)))
        }
        kinds::AWS_ROUTE_TABLE => {
            let r = ec2
                .create_route_table()
                .vpc_id(pr.str("vpc_id")?)
                .tag_specifications(tag_spec(ResourceType::RouteTable, &t))
                .send()
                .await
                .or_fail("CreateRouteTable", id)?;
            let rt = r
                .route_table()
                .and_then(|t| t.route_table_id())
                .unwrap_or_default()
                .to_string();
            let associations =
                converge_route_table(p, d, &rt, &BTreeMap::new(), &BTreeMap::new()).await?;
            Ok(p.after(
                ctx,
                d,
                out(&[
                    ("id", Value::str(rt.as_str())),
                    ("associations", Value::Map(associations)),
                ]),
                Some(rt),
            ))
        }
        kinds::AWS_SECURITY_GROUP => {
            let r = ec2
                .create_security_group()
                .group_name(pr.str("name")?)
                .description(pr.str("description")?)
                .vpc_id(pr.str("vpc_id")?)
                .tag_specifications(tag_spec(ResourceType::SecurityGroup, &t))
                .send()
                .await
                .or_fail("CreateSecurityGroup", id)?;
            let sg = r.group_id().unwrap_or_default().to_string();
            converge_rules(p, d, &sg, &BTreeMap::new()).await?;
            Ok(p.after(ctx, d, out(&[("id", Value::str(sg.as_str()))]), Some(sg)))
        }
        other => Err(ProviderError::hard(
            "create",
            format!("{id}: unknown kind {other}"),
        )),
    }
}

async fn set_vpc_dns(
    p: &AwsProvider,
    vpc: &str,
    support: bool,
    hostnames: bool,
    id: &stack::ResourceId,
) -> Result<(), ProviderError> {
    // One attribute per call, support first: hostnames need it.
    p.c.ec2
        .modify_vpc_attribute()
        .vpc_id(vpc)
        .enable_dns_support(AttributeBooleanValue::builder().value(support).build())
        .send()
        .await
        .or_fail("ModifyVpcAttribute", id)?;
    p.c.ec2
        .modify_vpc_attribute()
        .vpc_id(vpc)
        .enable_dns_hostnames(AttributeBooleanValue::builder().value(hostnames).build())
        .send()
        .await
        .or_fail("ModifyVpcAttribute", id)?;
    Ok(())
}

async fn set_public(
    p: &AwsProvider,
    subnet: &str,
    public: bool,
    id: &stack::ResourceId,
) -> Result<(), ProviderError> {
    p.c.ec2
        .modify_subnet_attribute()
        .subnet_id(subnet)
        .map_public_ip_on_launch(AttributeBooleanValue::builder().value(public).build())
        .send()
        .await
        .or_fail("ModifySubnetAttribute", id)?;
    Ok(())
}

/// Wait for a NAT gateway to be available (or, `available == false`, deleted).
async fn wait_nat(
    p: &AwsProvider,
    id: &stack::ResourceId,
    nat: &str,
    available: bool,
) -> Result<(), ProviderError> {
    let what = if available {
        "the NAT gateway to be available"
    } else {
        "the NAT gateway to be deleted"
    };
    wait::until(
        id,
        "DescribeNatGateways",
        what,
        Bounds::up_to(Duration::from_secs(15 * 60)),
        "check the NAT gateway in the VPC console; run deploy again once it settles",
        || async {
            let r =
                p.c.ec2
                    .describe_nat_gateways()
                    .nat_gateway_ids(nat)
                    .send()
                    .await
                    .or_missing("DescribeNatGateways", id)?;
            let gw = r.as_ref().and_then(|r| r.nat_gateways().first());
            let state = gw.and_then(|g| g.state().cloned());
            match (state, available) {
                (Some(NatGatewayState::Available), true) => Ok(Poll::Ready(())),
                (None | Some(NatGatewayState::Deleted), false) => Ok(Poll::Ready(())),
                (Some(NatGatewayState::Failed), true) => Err(ProviderError::hard(
                    "CreateNatGateway",
                    format!(
                        "{id}: NAT gateway {nat} failed: {}",
                        gw.and_then(|g| g.failure_message())
                            .unwrap_or("no reason given")
                    ),
                )
                .with_hint("check the subnet and Elastic IP it uses; run deploy again to retry")),
                (s, _) => Ok(Poll::Pending(s.map_or_else(
                    || "not visible yet".to_string(),
                    |s| s.as_str().to_string(),
                ))),
            }
        },
    )
    .await
}

/// Make a route table's routes and associations match; returns the associations.
async fn converge_route_table(
    p: &AwsProvider,
    d: &Resource,
    rt: &str,
    current_routes: &BTreeMap<String, Value>,
    current_assoc: &BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, ProviderError> {
    let id = &d.id;
    let ec2 = &p.c.ec2;
    let pr = Props::of(id, &d.props);
    let routes = pr.map("routes")?;
    for (dest, target) in routes {
        if current_routes.get(dest) == Some(target) {
            continue;
        }
        let t = target.as_map().cloned().unwrap_or_default();
        let gw = t.get("gateway_id").and_then(Value::as_str);
        let nat = t.get("nat_gateway_id").and_then(Value::as_str);
        if current_routes.contains_key(dest) {
            ec2.replace_route()
                .route_table_id(rt)
                .destination_cidr_block(dest)
                .set_gateway_id(gw.map(str::to_string))
                .set_nat_gateway_id(nat.map(str::to_string))
                .send()
                .await
                .or_fail("ReplaceRoute", id)?;
        } else {
            ec2.create_route()
                .route_table_id(rt)
                .destination_cidr_block(dest)
                .set_gateway_id(gw.map(str::to_string))
                .set_nat_gateway_id(nat.map(str::to_string))
                .send()
                .await
                .or_fail("CreateRoute", id)?;
        }
    }
    for dest in current_routes.keys().filter(|k| !routes.contains_key(*k)) {
        ec2.delete_route()
            .route_table_id(rt)
            .destination_cidr_block(dest)
            .send()
            .await
            .or_missing("DeleteRoute", id)?;
    }
    let wanted: BTreeSet<String> = pr.id_set("subnets")?.into_iter().collect();
    let mut associations = current_assoc.clone();
    for subnet in &wanted {
        if associations.contains_key(subnet) {
            continue;
        }
        let r = ec2
            .associate_route_table()
            .route_table_id(rt)
            .subnet_id(subnet)
            .send()
            .await
            .or_fail("AssociateRouteTable", id)?;
        associations.insert(
            subnet.clone(),
            Value::str(r.association_id().unwrap_or_default()),
        );
    }
    let extra: Vec<String> = associations
        .keys()
        .filter(|s| !wanted.contains(*s))
        .cloned()
        .collect();
    for subnet in extra {
        if let Some(Value::Str(assoc)) = associations.remove(&subnet) {
            ec2.disassociate_route_table()
                .association_id(assoc)
                .send()
                .await
                .or_missing("DisassociateRouteTable", id)?;
        }
    }
    Ok(associations)
}

/// Make a security group's ingress rules match the desired ones.
async fn converge_rules(
    p: &AwsProvider,
    d: &Resource,
    sg: &str,
    current: &BTreeMap<String, Value>,
) -> Result<(), ProviderError> {
    let id = &d.id;
    let desired = Props::of(id, &d.props).map("ingress")?;
    let parse = |m: &BTreeMap<String, Value>| -> Vec<(String, Rule)> {
        m.iter()
            .filter_map(|(k, v)| Rule::from_value(v).map(|r| (k.clone(), r)))
            .collect()
    };
    let want = parse(desired);
    let have = parse(current);
    let revoke: Vec<IpPermission> = have
        .iter()
        .filter(|h| !want.contains(h))
        .map(|(k, r)| r.permission(k))
        .collect();
    let grant: Vec<IpPermission> = want
        .iter()
        .filter(|w| !have.contains(w))
        .map(|(k, r)| r.permission(k))
        .collect();
    if !revoke.is_empty() {
        p.c.ec2
            .revoke_security_group_ingress()
            .group_id(sg)
            .set_ip_permissions(Some(revoke))
            .send()
            .await
            .or_missing("RevokeSecurityGroupIngress", id)?;
    }
    if !grant.is_empty() {
        let r =
            p.c.ec2
                .authorize_security_group_ingress()
                .group_id(sg)
                .set_ip_permissions(Some(grant))
                .send()
                .await;
        match r {
            Ok(_) => {}
            // Granted by an earlier attempt whose answer was lost.
            Err(e)
                if super::errors::code_of(&e).as_deref() == Some("InvalidPermission.Duplicate") => {
            }
            Err(e) => {
                return Err(super::errors::to_provider(
                    "AuthorizeSecurityGroupIngress",
                    id,
                    &e,
                ));
            }
        }
    }
    Ok(())
}

/// Change a network resource in place.
pub async fn update(
    p: &AwsProvider,
    ctx: &StepCtx,
    d: &Resource,
    current: &Observed,
    changed: &[String],
) -> Result<Observed, ProviderError> {
    let id = &d.id;
    let pr = Props::of(id, &d.props);
    let aws_id = output(
        current,
        match d.kind.as_str() {
            kinds::AWS_EIP => "allocation_id",
            _ => "id",
        },
    )?
    .to_string();
    let has = |k: &str| changed.iter().any(|c| c == k);
    if has("name") && d.kind != kinds::AWS_SECURITY_GROUP {
        set_name(p, &aws_id, pr.str("name")?, id).await?;
    }
    let mut outputs = current.outputs.clone();
    match d.kind.as_str() {
        kinds::AWS_VPC if has("dns_support") || has("dns_hostnames") => {
            set_vpc_dns(
                p,
                &aws_id,
                pr.bool("dns_support")?,
                pr.bool("dns_hostnames")?,
                id,
            )
            .await?;
        }
        kinds::AWS_SUBNET if has("public") => {
            set_public(p, &aws_id, pr.bool("public")?, id).await?
        }
        kinds::AWS_INTERNET_GATEWAY if has("vpc_id") => {
            if let Some(old) = current.props.get("vpc_id").and_then(Value::as_str) {
                p.c.ec2
                    .detach_internet_gateway()
                    .internet_gateway_id(&aws_id)
                    .vpc_id(old)
                    .send()
                    .await
                    .or_missing("DetachInternetGateway", id)?;
            }
            p.c.ec2
                .attach_internet_gateway()
                .internet_gateway_id(&aws_id)
                .vpc_id(pr.str("vpc_id")?)
                .send()
                .await
                .or_fail("AttachInternetGateway", id)?;
        }
        kinds::AWS_ROUTE_TABLE => {
            let routes = current
                .props
                .get("routes")
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default();
            let assoc = current
                .outputs
                .get("associations")
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default();
            let associations = converge_route_table(p, d, &aws_id, &routes, &assoc).await?;
            outputs.insert("associations".into(), Value::Map(associations));
        }
        kinds::AWS_SECURITY_GROUP => {
            let current_rules = current
                .props
                .get("ingress")
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default();
            converge_rules(p, d, &aws_id, &current_rules).await?;
        }
        _ => {}
    }
    Ok(p.after(
        &StepCtx {
            generation: current.generation,
            ..ctx.clone()
        },
        d,
        outputs,
        current.handle.clone(),
    ))
}

/// Delete a network resource; one already gone is fine.
pub async fn delete(p: &AwsProvider, _ctx: &StepCtx, o: &Observed) -> Result<(), ProviderError> {
    let id = &o.id;
    let ec2 = &p.c.ec2;
    let settle = Duration::from_secs(10 * 60);
    match o.kind.as_str() {
        kinds::AWS_VPC => {
            let vpc = output(o, "id")?;
            wait::while_in_use(id, "DeleteVpc", settle, || async {
                ec2.delete_vpc()
                    .vpc_id(vpc)
                    .send()
                    .await
                    .or_missing("DeleteVpc", id)
                    .map(drop)
            })
            .await?;
        }
        kinds::AWS_SUBNET => {
            let subnet = output(o, "id")?;
            wait::while_in_use(id, "DeleteSubnet", settle, || async {
                ec2.delete_subnet()
                    .subnet_id(subnet)
                    .send()
                    .await
                    .or_missing("DeleteSubnet", id)
                    .map(drop)
            })
            .await?;
        }
        kinds::AWS_INTERNET_GATEWAY => {
            let igw = output(o, "id")?;
            if let Some(vpc) = o.props.get("vpc_id").and_then(Value::as_str) {
                // Refused while public addresses are still mapped in the VPC.
                wait::while_in_use(id, "DetachInternetGateway", settle, || async {
                    ec2.detach_internet_gateway()
                        .internet_gateway_id(igw)
                        .vpc_id(vpc)
                        .send()
                        .await
                        .or_missing("DetachInternetGateway", id)
                        .map(drop)
                })
                .await?;
            }
            ec2.delete_internet_gateway()
                .internet_gateway_id(igw)
                .send()
                .await
                .or_missing("DeleteInternetGateway", id)?;
        }
        kinds::AWS_EIP => {
            let alloc = output(o, "allocation_id")?;
            wait::while_in_use(id, "ReleaseAddress", settle, || async {
                match ec2.release_address().allocation_id(alloc).send().await {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let code = super::errors::code_of(&e).unwrap_or_default();
                        if super::errors::kind_of(&e) == Kind::NotFound {
                            return Ok(());
                        }
                        // Still held by a NAT gateway on its way out.
                        if code == "InvalidIPAddress.InUse"
                            || code == "AuthFailure" && e.to_string().contains("in use")
                        {
                            return Err(super::errors::build(
                                Kind::Eventual,
                                "ReleaseAddress",
                                format!("{id}: still in use"),
                            ));
                        }
                        Err(super::errors::to_provider("ReleaseAddress", id, &e))
                    }
                }
            })
            .await?;
        }
        kinds::AWS_NAT_GATEWAY => {
            let nat = output(o, "id")?;
            ec2.delete_nat_gateway()
                .nat_gateway_id(nat)
                .send()
                .await
                .or_missing("DeleteNatGateway", id)?;
            // Its Elastic IP and subnet are released only once it is gone.
            wait_nat(p, id, nat, false).await?;
        }
        kinds::AWS_ROUTE_TABLE => {
            if let Some(assoc) = o.outputs.get("associations").and_then(Value::as_map) {
                for a in assoc.values().filter_map(Value::as_str) {
                    ec2.disassociate_route_table()
                        .association_id(a)
                        .send()
                        .await
                        .or_missing("DisassociateRouteTable", id)?;
                }
            }
            ec2.delete_route_table()
                .route_table_id(output(o, "id")?)
                .send()
                .await
                .or_missing("DeleteRouteTable", id)?;
        }
        kinds::AWS_SECURITY_GROUP => {
            let sg = output(o, "id")?;
            wait::while_in_use(id, "DeleteSecurityGroup", settle, || async {
                ec2.delete_security_group()
                    .group_id(sg)
                    .send()
                    .await
                    .or_missing("DeleteSecurityGroup", id)
                    .map(drop)
            })
            .await?;
        }
        other => {
            return Err(ProviderError::hard(
                "delete",
                format!("{id}: unknown kind {other}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_between_properties_and_permissions() {
        let v = Value::Map(BTreeMap::from([
            ("protocol".to_string(), Value::str("tcp")),
            ("from_port".to_string(), Value::Int(443)),
            ("to_port".to_string(), Value::Int(443)),
            ("cidr".to_string(), Value::str("0.0.0.0/0")),
        ]));
        let r = Rule::from_value(&v).unwrap();
        let perm = r.permission("https from the internet");
        let back = rules_of(&[perm]);
        assert_eq!(back["https from the internet"], v);
        let sg = Value::Map(BTreeMap::from([
            ("protocol".to_string(), Value::str("tcp")),
            ("from_port".to_string(), Value::Int(5432)),
            ("to_port".to_string(), Value::Int(5432)),
            ("source".to_string(), Value::str("sg-123")),
        ]));
        let r = Rule::from_value(&sg).unwrap();
        let back = rules_of(&[r.permission("")]);
        assert_eq!(back.values().next().unwrap(), &sg);
        assert!(back.keys().next().unwrap().contains("sg:sg-123"));
    }
}
