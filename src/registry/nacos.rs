//! Nacos's HTTP API, read only: the services of a namespace (`/nacos/v1/ns/service/list`),
//! then each one's instances (`/nacos/v1/ns/instance/list`), after a login
//! (`/nacos/v1/auth/login`) when the registry URL carries one. Works with Nacos 1.x–3.x and
//! compatible servers (r-nacos). JSON in, [`Record`]s out.

use std::net::SocketAddr;

use super::http::{self, escape};
use super::{Family, Record, RegistryError, RegistryUrl};

/// The most services whose instances one scan reads.
const MAX_SERVICES: usize = 500;

/// The services of a `service/list` answer (`{"count":N,"doms":[..]}`).
pub fn parse_services(body: &[u8]) -> Result<Vec<String>, RegistryError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| RegistryError::Malformed("Nacos's service list is not JSON"))?;
    Ok(v.get("doms")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// The records of an `instance/list` answer for `service`.
pub fn parse_instances(service: &str, body: &[u8]) -> Result<Vec<Record>, RegistryError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| RegistryError::Malformed("Nacos's instance list is not JSON"))?;
    let hosts = v
        .get("hosts")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    // Nacos 2+ prefixes names with their group ("DEFAULT_GROUP@@name") in some answers.
    let name = service.rsplit("@@").next().unwrap_or(service);
    let mut out = Vec::new();
    for h in hosts {
        let (Some(ip), Some(port)) = (
            h.get("ip").and_then(|v| v.as_str()),
            h.get("port")
                .and_then(|v| v.as_u64())
                .and_then(|p| u16::try_from(p).ok()),
        ) else {
            continue;
        };
        let mut params = super::string_map(h.get("metadata"));
        let family = if name.starts_with("providers:") {
            Family::DubboProvider
        } else if params.contains_key("dubbo.metadata.revision")
            || params.contains_key("dubbo.endpoints")
        {
            // Dubbo 3's application-level instance: routed by the provider's own metadata.
            Family::ServiceInstance
        } else {
            Family::NacosInstance
        };
        if let Some(c) = h.get("clusterName").and_then(|c| c.as_str()) {
            params.insert("nacos.cluster".into(), c.to_owned());
        }
        out.push(Record {
            location: format!("nacos service {name}"),
            family,
            host: ip.to_owned(),
            port,
            params,
        });
    }
    Ok(out)
}

/// Every instance of every service (at most [`MAX_SERVICES`]) in the URL's namespace.
pub async fn records(addr: SocketAddr, url: &RegistryUrl) -> Result<Vec<Record>, RegistryError> {
    let host = format!("{}:{}", url.host, url.port);
    let mut common = String::new();
    if let Some(ns) = &url.namespace {
        common.push_str(&format!("&namespaceId={}", escape(ns)));
    }
    if let Some((user, pass)) = &url.login {
        let form = format!("username={}&password={}", escape(user), escape(pass));
        let r = http::exchange(addr, &host, "POST", "/nacos/v1/auth/login", Some(&form)).await?;
        if r.status != 200 {
            return Err(RegistryError::Http(r.status));
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|_| RegistryError::Malformed("Nacos's login answer is not JSON"))?;
        let token =
            v.get("accessToken")
                .and_then(|t| t.as_str())
                .ok_or(RegistryError::Malformed(
                    "Nacos's login answer has no token",
                ))?;
        common.push_str(&format!("&accessToken={}", escape(token)));
    }
    let get = |target: String| {
        let host = host.clone();
        async move {
            let r = http::exchange(addr, &host, "GET", &target, None).await?;
            if r.status != 200 {
                return Err(RegistryError::Http(r.status));
            }
            Ok(r.body)
        }
    };
    let list = get(format!(
        "/nacos/v1/ns/service/list?pageNo=1&pageSize={MAX_SERVICES}{common}"
    ))
    .await?;
    let mut out = Vec::new();
    for service in parse_services(&list)?.into_iter().take(MAX_SERVICES) {
        let body = get(format!(
            "/nacos/v1/ns/instance/list?serviceName={}&healthyOnly=false{common}",
            escape(&service)
        ))
        .await?;
        out.extend(parse_instances(&service, &body)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_instances_parse() {
        assert_eq!(
            parse_services(br#"{"count":2,"doms":["greeter","providers:org.example.Greeter::"]}"#)
                .unwrap(),
            ["greeter", "providers:org.example.Greeter::"]
        );
        assert!(parse_services(b"<html>").is_err());
        assert!(parse_services(b"{}").unwrap().is_empty());
        let body = br#"{"name":"DEFAULT_GROUP@@greeter","hosts":[
            {"ip":"10.0.0.1","port":18080,"clusterName":"alice","metadata":{"hint":"alice","preserved.register.source":"SPRING_CLOUD"}},
            {"ip":"10.0.0.20","port":8080,"clusterName":"DEFAULT","metadata":{}},
            {"ip":"10.0.0.21","port":99999},
            {"port":1}]}"#;
        let r = parse_instances("DEFAULT_GROUP@@greeter", body).unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].location, "nacos service greeter");
        assert_eq!(r[0].family, Family::NacosInstance);
        assert_eq!(r[0].tag(), Some("alice"));
        assert_eq!(r[1].tag(), Some("DEFAULT"));
        let dubbo = br#"{"hosts":[{"ip":"10.0.0.1","port":20880,"clusterName":"DEFAULT",
            "metadata":{"side":"provider","dubbo.tag":"alice"}}]}"#;
        let r = parse_instances("providers:org.example.Greeter::", dubbo).unwrap();
        assert_eq!(r[0].family, Family::DubboProvider);
        assert_eq!(r[0].tag(), Some("alice"));
        let app_level = br#"{"hosts":[{"ip":"10.0.0.1","port":20880,"clusterName":"DEFAULT",
            "metadata":{"dubbo.metadata.revision":"abc"}}]}"#;
        let r = parse_instances("greeter-provider", app_level).unwrap();
        assert_eq!(r[0].family, Family::ServiceInstance);
    }
}
