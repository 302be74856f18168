//! `services`, `instances`, `watch`, `register`.

use std::process::ExitCode;

use futures::StreamExt;
use waypost::{Instance, RegistrationStatus, ServiceName};

use crate::output::{event_json, event_line, instance_json, instance_table};
use crate::{interrupted, parse, within, Ctx, Failure, Outcome};

pub(crate) async fn services(ctx: &Ctx) -> Outcome {
    let services = within(
        ctx.timeout,
        "listing services",
        ctx.discovery.watcher.services(),
    )
    .await?;
    if ctx.json {
        let names: Vec<&str> = services.iter().map(ServiceName::as_str).collect();
        println!("{}", serde_json::json!(names));
    } else {
        for s in &services {
            println!("{s}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn instances(ctx: &Ctx, service: &str) -> Outcome {
    let service: ServiceName = parse(service)?;
    let snap = within(
        ctx.timeout,
        "listing instances",
        ctx.discovery.watcher.instances(&service),
    )
    .await?;
    if ctx.json {
        let all: Vec<_> = snap.instances.iter().map(instance_json).collect();
        println!("{}", serde_json::json!(all));
    } else if snap.instances.is_empty() {
        println!("no live instances of {service}");
    } else {
        println!("{}", instance_table(&snap.instances));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn watch(ctx: &Ctx, service: &str, limit: Option<usize>) -> Outcome {
    let service: ServiceName = parse(service)?;
    let mut events = ctx.discovery.watcher.watch(&service);
    let mut seen = 0;
    loop {
        if limit.is_some_and(|l| seen >= l) {
            return Ok(ExitCode::SUCCESS);
        }
        let event = tokio::select! {
            e = events.next() => e,
            _ = interrupted() => return Ok(ExitCode::SUCCESS),
        };
        match event {
            Some(Ok(e)) => {
                if ctx.json {
                    println!("{}", event_json(&e));
                } else {
                    println!("{}", event_line(&e));
                }
                seen += 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(Failure::new("the watch ended")),
        }
    }
}

/// `register SERVICE ID HOST:PORT [--meta k=v]… [--tag t]… [--weight n] [--zone z]`
#[derive(Debug, clap::Args)]
pub(crate) struct RegisterArgs {
    /// The service.
    service: String,
    /// The instance id (unique within the service).
    id: String,
    /// Where it serves: `HOST:PORT` (`[v6]:PORT` for IPv6).
    endpoint: String,
    /// Metadata, `key=value`, repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// A tag, repeatable.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Selection weight (0 drains it).
    #[arg(long)]
    weight: Option<u32>,
    /// Availability zone.
    #[arg(long)]
    zone: Option<String>,
}

fn endpoint(s: &str) -> Result<(String, u16), Failure> {
    let bad = || Failure::new(format!("invalid endpoint `{s}`: expected HOST:PORT")).with_code(2);
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

impl RegisterArgs {
    fn instance(&self) -> Result<Instance, Failure> {
        let (host, port) = endpoint(&self.endpoint)?;
        let mut i = Instance::parse(&self.service, &self.id, &host, port)?;
        for m in &self.meta {
            let (k, v) = m.split_once('=').ok_or_else(|| {
                Failure::new(format!("invalid --meta `{m}`: expected KEY=VALUE")).with_code(2)
            })?;
            i = i.with_metadata(k, v);
        }
        for t in &self.tags {
            i = i.with_tag(t.clone());
        }
        if let Some(w) = self.weight {
            i = i.with_weight(w);
        }
        if let Some(z) = &self.zone {
            i = i.with_zone(z.clone());
        }
        i.validate()?;
        Ok(i)
    }
}

pub(crate) async fn register(ctx: &Ctx, args: RegisterArgs) -> Outcome {
    let instance = args.instance()?;
    let (service, id) = (instance.service.clone(), instance.id.clone());
    let registration = within(
        ctx.timeout,
        "registering",
        ctx.discovery.registrar.register(instance),
    )
    .await?;
    let status = |s: &RegistrationStatus| {
        if ctx.json {
            println!(
                "{}",
                serde_json::json!({"service": service.as_str(), "id": id.as_str(), "status": format!("{s:?}").to_lowercase()})
            );
        } else {
            println!("{service}/{id}: {}", format!("{s:?}").to_lowercase());
        }
    };
    let mut statuses = registration.status();
    status(&statuses.borrow_and_update());
    loop {
        tokio::select! {
            changed = statuses.changed() => {
                if changed.is_err() {
                    return Err(Failure::new("the registration ended"));
                }
                status(&statuses.borrow_and_update());
            }
            _ = interrupted() => break,
        }
    }
    within(ctx.timeout, "deregistering", registration.deregister()).await?;
    status(&RegistrationStatus::Deregistered);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::endpoint;

    #[test]
    fn endpoints_parse_with_ports_and_v6_brackets() {
        assert_eq!(endpoint("10.0.0.1:80").ok(), Some(("10.0.0.1".into(), 80)));
        assert_eq!(endpoint("[::1]:8080").ok(), Some(("::1".into(), 8080)));
        for bad in ["10.0.0.1", ":80", "h:99999", "h:x"] {
            let f = endpoint(bad).expect_err(bad);
            assert_eq!(f.code, 2, "{bad}");
        }
    }
}
