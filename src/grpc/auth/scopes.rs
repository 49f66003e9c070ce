//! Which scope each RPC needs, by its HTTP/2 path (`/audience.v1.QueryService/Count`).
//!
//! Every method is named: a method missing here is refused to every token, so a new RPC is
//! closed until someone decides its scope (a test checks the table against the descriptors).

use super::tokens::Scope;

/// What a call must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Nothing: health checks (Kubernetes probes carry no token).
    Open,
    /// Any valid token: server reflection, which lists the API but no data.
    AnyToken,
    /// A valid token with this scope.
    Needs(Scope),
}

/// The rule of the method at `path`, or `None` for a method this table does not know.
pub fn rule_of(path: &str) -> Option<Rule> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let scope = match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => return Some(Rule::Open),
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => return Some(Rule::AnyToken),
        (
            "audience.v1.QueryService",
            "Count" | "ListMembers" | "ExportMembers" | "SampleMembers" | "Overlap"
            | "SegmentsForUser" | "CheckMembership",
        ) => Scope::Read,
        ("audience.v1.SegmentService", "GetSegment" | "ListSegments") => Scope::Read,
        ("audience.v1.SegmentService", "CreateSegment" | "UpdateSegment" | "DeleteSegment") => {
            Scope::Write
        }
        (
            "audience.v1.IngestService",
            "UpsertUsers" | "DeleteUsers" | "ImportUsers" | "RecordEvents" | "StreamEvents"
            | "ImportEvents",
        ) => Scope::Write,
        ("audience.v1.IngestService", "ImportUsersFile" | "ImportEventsFile") => Scope::Admin,
        ("audience.v1.SchemaService", "DescribeDataset" | "ListDatasets") => Scope::Read,
        ("audience.v1.SchemaService", "DeclareAttributes" | "SetEventRetention") => Scope::Admin,
        ("audience.v1.WatchService", "Watch") => Scope::Read,
        ("audience.v1.AdminService", "Snapshot") => Scope::Admin,
        _ => return None,
    };
    Some(Rule::Needs(scope))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every method the server serves, from the same descriptors reflection serves.
    fn served_methods() -> Vec<String> {
        let mut paths = Vec::new();
        for bytes in [
            crate::grpc::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(bytes).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        paths.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        paths
    }

    #[test]
    fn every_served_method_has_a_rule() {
        let methods = served_methods();
        assert!(methods.len() > 20, "{methods:?}");
        for path in &methods {
            assert!(rule_of(path).is_some(), "{path} has no scope");
        }
        assert_eq!(
            rule_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Rule::AnyToken)
        );
        assert_eq!(
            rule_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(Rule::AnyToken)
        );
    }

    #[test]
    fn unknown_methods_have_no_rule() {
        for path in [
            "",
            "/",
            "/audience.v1.QueryService/Nope",
            "/audience.v1.QueryService",
            "/x.Y/Count",
            "audience.v1.QueryService/Count",
        ] {
            assert_eq!(rule_of(path), None, "{path}");
        }
    }
}
