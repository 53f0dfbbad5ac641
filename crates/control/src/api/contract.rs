//! What every operation of the document shares, written once after the
//! routes are collected: the answers any of them can give (401 without a
//! valid token, 403 when the role or a quota forbids, 400 for a malformed
//! request, 404 for a named object that is not there, 503 while the store
//! is unreachable), unique operation ids, and links from each create to
//! the operations on what it created, so that stateful clients and
//! fuzzers can follow them.

use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{Content, OpenApi, Ref, RefOr};

/// Completes `doc` (see the module documentation).
pub fn complete(doc: &mut OpenApi) {
    let paths: Vec<String> = doc.paths.paths.keys().cloned().collect();
    for path in &paths {
        let Some(item) = doc.paths.paths.get_mut(path) else {
            continue;
        };
        for (method, op) in operations(item) {
            op.operation_id = Some(operation_id(method, path));
            let named = path.contains('{');
            let takes_input = named
                || op.request_body.is_some()
                || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            add_error(
                op,
                "401",
                "no API token, or a malformed, unknown, expired or revoked one",
            );
            add_error(
                op,
                "403",
                "the caller's role does not allow this (the message names the role needed), or a quota would be exceeded",
            );
            add_error(op, "503", "the state store is unreachable; retry");
            if takes_input {
                add_error(
                    op,
                    "400",
                    "a malformed request or an invalid value (the message names it)",
                );
            }
            if method != "get" || path.contains("/files/") {
                add_error(
                    op,
                    "409",
                    "the object's state does not allow this now (the message says why)",
                );
            }
            if named {
                add_error(
                    op,
                    "404",
                    "no such object in the request's project (another project's objects are not found either)",
                );
            }
        }
    }
    link_creates(doc, &paths);
}

fn operations(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("post", item.post.as_mut()),
        ("put", item.put.as_mut()),
        ("patch", item.patch.as_mut()),
        ("delete", item.delete.as_mut()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|o| (m, o)))
    .collect()
}

/// `get /v1/instances/{name}/snapshots` → `get_instances_by_name_snapshots`:
/// unique, and readable as a generated client's function name.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_string();
    for seg in path.split('/').filter(|s| !s.is_empty() && *s != "v1") {
        id.push('_');
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(param) => {
                id.push_str("by_");
                id.push_str(param);
            }
            None => id.push_str(&seg.replace(['-', '.'], "_")),
        }
    }
    id
}

fn add_error(op: &mut Operation, status: &str, description: &str) {
    if op.responses.responses.contains_key(status) {
        return;
    }
    let response = ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody")))),
        )
        .build();
    op.responses
        .responses
        .insert(status.to_string(), RefOr::T(response));
}

/// For each `post P` that answers 201 and each operation on `P/{name}...`,
/// a link naming the created object: the name is at `/spec/name` for
/// objects with a spec (instances, volumes), else at `/name`.
fn link_creates(doc: &mut OpenApi, paths: &[String]) {
    for collection in paths {
        let item_prefix = format!("{collection}/{{name}}");
        let targets: Vec<(String, String)> = paths
            .iter()
            .filter(|p| p.starts_with(&item_prefix) && !p[item_prefix.len()..].contains('{'))
            .flat_map(|p| {
                let ops: Vec<String> = doc
                    .paths
                    .paths
                    .get(p)
                    .map(|item| {
                        [
                            ("get", item.get.is_some()),
                            ("post", item.post.is_some()),
                            ("put", item.put.is_some()),
                            ("patch", item.patch.is_some()),
                            ("delete", item.delete.is_some()),
                        ]
                        .into_iter()
                        .filter(|(_, has)| *has)
                        .map(|(m, _)| operation_id(m, p))
                        .collect()
                    })
                    .unwrap_or_default();
                ops.into_iter().map(move |id| (p.clone(), id))
            })
            .collect();
        if targets.is_empty() {
            continue;
        }
        let Some(create) = doc
            .paths
            .paths
            .get_mut(collection)
            .and_then(|i| i.post.as_mut())
        else {
            continue;
        };
        let Some(RefOr::T(created)) = create.responses.responses.get_mut("201") else {
            continue;
        };
        let name_at = if matches!(collection.as_str(), "/v1/instances" | "/v1/volumes") {
            "$response.body#/spec/name"
        } else {
            "$response.body#/name"
        };
        for (_, id) in targets {
            let link = LinkBuilder::new()
                .operation_id(id.clone())
                .parameter("name", name_at)
                .description("the object this create made")
                .build();
            created.links.insert(id, RefOr::T(link));
        }
    }
}

/// The rules the server enforces that the types alone do not state, put
/// into the document from the same constants the validation uses: name
/// patterns, ranges, closed sets, and which fields go together.
pub fn constrain(doc: &mut serde_json::Value) {
    use serde_json::json;
    use skyvisor_core::firewall::{MAX_DESCRIPTION, MAX_GROUPS_PER_INSTANCE, MAX_RULES};
    use skyvisor_core::names::{MAX_NAME_LEN, NAME_PATTERN};
    // Four dotted decimal octets, without leading zeros.
    const OCTETS: &str = r"((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    use skyvisor_core::resources::{MAX_DISK_GIB, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
    use skyvisor_core::snapshot::{MAX_CHECKPOINT_KEEP, MIN_CHECKPOINT_INTERVAL_SECS};
    use skyvisor_core::volume::{
        MAX_REPLICAS, MAX_VOLUME_BYTES, MAX_VOLUMES_PER_INSTANCE, MIN_VOLUME_BYTES,
        VOLUME_SIZE_UNIT,
    };

    let name = json!({"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_LEN});
    let types: Vec<String> = skyvisor_core::resources::builtin_types()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    let recipes: Vec<&str> = skyvisor_image::recipes().iter().map(|r| r.name).collect();
    let snapshot_ref = json!({
        "type": "string",
        "pattern": format!("^{}/{}$", &NAME_PATTERN[1..NAME_PATTERN.len() - 1], &NAME_PATTERN[1..NAME_PATTERN.len() - 1]),
    });
    let vcpus = json!({"type": "integer", "minimum": 1, "maximum": MAX_VCPUS});
    let memory = json!({"type": "integer", "minimum": MIN_MEMORY_MIB, "maximum": MAX_MEMORY_MIB});
    let size = json!({"type": "integer", "minimum": MIN_VOLUME_BYTES, "maximum": MAX_VOLUME_BYTES, "multipleOf": VOLUME_SIZE_UNIT});
    let rules = json!({"type": "array", "items": {"$ref": "#/components/schemas/SecurityRule"}, "maxItems": MAX_RULES});
    // One named schema, so that generated clients make one model of it.
    let labels = json!({"$ref": "#/components/schemas/Labels"});
    let stop_timeout = json!({"type": "integer", "minimum": 1, "maximum": crate::instances::MAX_STOP_TIMEOUT_SECS});
    let props: &[(&str, &str, serde_json::Value)] = &[
        ("CreateInstanceRequest", "name", name.clone()),
        ("CreateInstanceRequest", "image", name.clone()),
        (
            "CreateInstanceRequest",
            "instance_type",
            json!({"type": "string", "enum": types}),
        ),
        ("CreateInstanceRequest", "vcpus", vcpus.clone()),
        ("CreateInstanceRequest", "memory_mib", memory.clone()),
        (
            "CreateInstanceRequest",
            "disk_gib",
            json!({"type": "integer", "minimum": 1, "maximum": MAX_DISK_GIB}),
        ),
        (
            "CreateInstanceRequest",
            "stop_timeout_secs",
            stop_timeout.clone(),
        ),
        ("CreateInstanceRequest", "root_volume", name.clone()),
        (
            "CreateInstanceRequest",
            "volumes",
            json!({"type": "array", "items": name, "maxItems": MAX_VOLUMES_PER_INSTANCE, "uniqueItems": true}),
        ),
        ("CreateInstanceRequest", "spread_group", name.clone()),
        ("CreateInstanceRequest", "from_snapshot", snapshot_ref),
        ("CreateInstanceRequest", "network", name.clone()),
        (
            "CreateInstanceRequest",
            "security_groups",
            json!({"type": "array", "items": name, "maxItems": MAX_GROUPS_PER_INSTANCE, "uniqueItems": true}),
        ),
        ("CreateInstanceRequest", "labels", labels.clone()),
        (
            "CreateInstanceRequest",
            "keys",
            json!({"type": "array", "items": name, "maxItems": crate::guest_config::MAX_KEYS, "uniqueItems": true}),
        ),
        (
            "CreateInstanceRequest",
            "user_data",
            json!({"type": "string", "maxLength": skyvisor_cloudinit::USER_DATA_MAX_CHARS}),
        ),
        (
            "CreateInstanceRequest",
            "hostname",
            json!({"type": "string", "maxLength": 253, "pattern": crate::guest_config::HOSTNAME_PATTERN}),
        ),
        ("SetLabelsRequest", "labels", labels),
        (
            "SetSecurityGroupsRequest",
            "security_groups",
            json!({"type": "array", "items": name, "maxItems": MAX_GROUPS_PER_INSTANCE, "uniqueItems": true}),
        ),
        ("CreateNetworkRequest", "name", name.clone()),
        (
            "CreateNetworkRequest",
            "subnet",
            json!({"type": "string", "pattern": format!("^{OCTETS}/([89]|1[0-9]|2[0-9])$")}),
        ),
        ("CreateSecurityGroupRequest", "name", name.clone()),
        (
            "CreateGroupRequest",
            "name",
            json!({"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": crate::groups::MAX_GROUP_NAME}),
        ),
        (
            "HealthCheck",
            "path",
            json!({"type": "string", "pattern": "^/[!-~]*$", "maxLength": 256}),
        ),
        ("CreateLoadBalancerRequest", "name", name.clone()),
        ("CreateLoadBalancerRequest", "group", name.clone()),
        (
            "CreateLoadBalancerRequest",
            "listeners",
            json!({"type": "array", "items": {"$ref": "#/components/schemas/Listener"}, "minItems": 1, "maxItems": skyvisor_core::lb::MAX_LISTENERS}),
        ),
        (
            "ScheduledSize",
            "at",
            json!({"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}),
        ),
        ("CreateKeyPairRequest", "name", name.clone()),
        (
            "CreateKeyPairRequest",
            "public_key",
            json!({"type": "string", "minLength": 1, "maxLength": skyvisor_core::keypair::MAX_PUBLIC_KEY_BYTES}),
        ),
        (
            "CreateSecurityGroupRequest",
            "description",
            json!({"type": "string", "maxLength": MAX_DESCRIPTION}),
        ),
        ("CreateSecurityGroupRequest", "rules", rules.clone()),
        ("SecurityRulesRequest", "rules", rules),
        (
            "SecurityRule",
            "cidr",
            json!({"type": "string", "pattern": format!("^{OCTETS}/([0-9]|[12][0-9]|3[0-2])$")}),
        ),
        ("SecurityRule", "group", name.clone()),
        ("CreateSnapshotRequest", "name", name.clone()),
        ("RestoreInstanceRequest", "snapshot", name.clone()),
        ("StopInstanceRequest", "timeout_secs", stop_timeout),
        (
            "ResizeInstanceRequest",
            "instance_type",
            json!({"type": "string", "enum": types}),
        ),
        ("ResizeInstanceRequest", "vcpus", vcpus),
        ("ResizeInstanceRequest", "memory_mib", memory),
        ("BuildImageRequest", "name", name.clone()),
        (
            "BuildImageRequest",
            "recipe",
            json!({"type": "string", "enum": recipes}),
        ),
        ("MigrateInstanceRequest", "to", name.clone()),
        (
            "MigrateInstanceRequest",
            "max_bandwidth_mib_s",
            json!({"type": "integer", "minimum": 1, "maximum": u64::MAX}),
        ),
        (
            "RebalanceRequest",
            "max_moves",
            json!({"type": "integer", "minimum": 1, "maximum": crate::migrations::MAX_REBALANCE_MOVES}),
        ),
        ("CreateVolumeRequest", "name", name.clone()),
        ("CreateVolumeRequest", "size_bytes", size.clone()),
        (
            "CreateVolumeRequest",
            "replicas",
            json!({"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS}),
        ),
        (
            "CreateVolumeRequest",
            "min_in_sync",
            json!({"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS}),
        ),
        ("GrowVolumeRequest", "size_bytes", size),
        ("AttachVolumeRequest", "volume", name.clone()),
        ("CreateVolumeSnapshotRequest", "name", name.clone()),
        (
            "CheckpointSchedule",
            "every_secs",
            json!({"type": "integer", "minimum": MIN_CHECKPOINT_INTERVAL_SECS, "maximum": u64::MAX}),
        ),
        (
            "CheckpointSchedule",
            "keep",
            json!({"type": "integer", "minimum": 1, "maximum": MAX_CHECKPOINT_KEEP}),
        ),
    ];
    let schemas = &mut doc["components"]["schemas"];
    {
        use skyvisor_core::labels::{LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS};
        schemas["Labels"] = json!({
            "type": "object",
            "description": "Labels: at most 32 KEY: VALUE pairs.",
            "maxProperties": MAX_LABELS,
            "propertyNames": {"pattern": LABEL_KEY_PATTERN},
            "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN},
        });
    }
    for (schema, prop, rule) in props {
        let slot = &mut schemas[*schema]["properties"][*prop];
        // Keep the description; an optional field stays nullable.
        let description = slot.get("description").cloned();
        let nullable = slot
            .get("type")
            .and_then(|t| t.as_array())
            .is_some_and(|t| t.iter().any(|v| v == "null"))
            || slot.get("oneOf").is_some();
        let mut rule = rule.clone();
        if nullable && let Some(t) = rule.get("type").cloned() {
            rule["type"] = json!([t, "null"]);
            if let Some(options) = rule.get_mut("enum").and_then(|e| e.as_array_mut()) {
                options.push(serde_json::Value::Null);
            }
        }
        if let Some(d) = description {
            rule["description"] = d;
        }
        *slot = rule;
    }
    // A create names its instance. A group's launch template is the same
    // request without what belongs to one instance (its name, hostname,
    // volumes, clone source); its members run (`start` is not false).
    schemas["CreateInstanceRequest"]["required"] = json!(["name"]);
    let mut template = schemas["CreateInstanceRequest"].clone();
    if let Some(p) = template["properties"].as_object_mut() {
        // Absent, null or empty only (clients send a whole create body).
        for one in ["name", "hostname", "root_volume", "from_snapshot"] {
            p.insert(one.into(), json!({"type": "null"}));
        }
        p.insert("volumes".into(), json!({"type": "array", "maxItems": 0}));
        p.insert(
            "start".into(),
            json!({"description": "Members run: true or absent.", "type": ["boolean", "null"], "enum": [true, null]}),
        );
    }
    template["description"] = json!(
        "A group's launch template: what each member is made from, as an instance create without a name, hostname, volumes or clone source."
    );
    template["required"] = json!(["image"]);
    template["anyOf"] = json!([
        {"required": ["instance_type"], "properties": {"instance_type": {"type": "string"}}},
        {"required": ["vcpus", "memory_mib"],
         "properties": {"vcpus": {"type": "integer"}, "memory_mib": {"type": "integer"}}}
    ]);
    template["allOf"] = json!([
        {"not": {"required": ["disk_replicas", "local_disk"],
                 "properties": {"disk_replicas": {"type": "integer"}, "local_disk": {"const": true}}}},
        {"not": {"required": ["local_disk", "ha"],
                 "properties": {"local_disk": {"const": true}, "ha": {"const": "restart"}}}}
    ]);
    schemas["InstanceTemplate"] = template;
    // A policy has a target or a schedule; a TCP check has no path.
    schemas["AutoscalePolicy"]["anyOf"] = json!([
        {"required": ["target_cpu_percent"], "properties": {"target_cpu_percent": {"type": "integer"}}},
        {"required": ["target_requests_per_member"], "properties": {"target_requests_per_member": {"type": "integer"}}},
        {"required": ["schedule"], "properties": {"schedule": {"type": "array", "minItems": 1}}}
    ]);
    schemas["UpdateGroupRequest"]["anyOf"] = json!([
        {"required": ["template"], "properties": {"template": {"type": "object"}}},
        {"required": ["health_check"], "properties": {"health_check": {"type": "object"}}},
        {"required": ["rollout"], "properties": {"rollout": {"type": "object"}}}
    ]);
    // A rollout that could never replace a member is refused.
    schemas["Rollout"]["anyOf"] = json!([
        {"required": ["max_unavailable"], "properties": {"max_unavailable": {"minimum": 1}}},
        {"properties": {"max_surge": {"minimum": 1}}}
    ]);
    schemas["HealthCheck"]["allOf"] = json!([
        {"if": {"required": ["protocol"], "properties": {"protocol": {"const": "tcp"}}},
         "then": {"properties": {"path": {"type": "null"}}}}
    ]);
    let template_ref = json!({"$ref": "#/components/schemas/InstanceTemplate"});
    let described = |d: &serde_json::Value| {
        let mut r = template_ref.clone();
        if let Some(d) = d.get("description") {
            r["description"] = d.clone();
        }
        r
    };
    let create = described(&schemas["CreateGroupRequest"]["properties"]["template"]);
    schemas["CreateGroupRequest"]["properties"]["template"] = create;
    let update = described(&schemas["UpdateGroupRequest"]["properties"]["template"]["oneOf"][1]);
    schemas["UpdateGroupRequest"]["properties"]["template"] =
        json!({"oneOf": [{"type": "null"}, update]});
    // A create boots an image at a size (a type, or vCPUs and memory), or
    // clones a snapshot, which brings both. A null field is an absent one.
    schemas["CreateInstanceRequest"]["anyOf"] = json!([
        {
            "required": ["image", "instance_type"],
            "properties": {"instance_type": {"type": "string"}, "from_snapshot": {"type": "null"}}
        },
        {
            "required": ["image", "vcpus", "memory_mib"],
            "properties": {
                "vcpus": {"type": "integer"}, "memory_mib": {"type": "integer"},
                "from_snapshot": {"type": "null"}
            }
        },
        {
            "required": ["from_snapshot"],
            "properties": {
                "from_snapshot": {"type": "string"}, "instance_type": {"type": "null"},
                "vcpus": {"type": "null"}, "memory_mib": {"type": "null"}
            },
            "not": {"required": ["image"]}
        }
    ]);
    // What goes together and what does not.
    schemas["CreateInstanceRequest"]["allOf"] = json!([
        {"not": {"required": ["disk_replicas", "root_volume"],
                 "properties": {"disk_replicas": {"type": "integer"}, "root_volume": {"type": "string"}}}},
        {"not": {"required": ["disk_replicas", "local_disk"],
                 "properties": {"disk_replicas": {"type": "integer"}, "local_disk": {"const": true}}}},
        {"not": {"required": ["local_disk", "root_volume"],
                 "properties": {"local_disk": {"const": true}, "root_volume": {"type": "string"}}}},
        {"not": {"required": ["local_disk", "ha"],
                 "properties": {"local_disk": {"const": true}, "ha": {"const": "restart"}}}}
    ]);
    // Ports go with TCP and UDP only; a rule has one source.
    schemas["SecurityRule"]["allOf"] = json!([
        {"if": {"required": ["protocol"], "properties": {"protocol": {"enum": ["icmp", "any"]}}},
         "then": {"properties": {"port_from": {"type": "null"}, "port_to": {"type": "null"}}}},
        {"oneOf": [
            {"required": ["cidr"], "properties": {"cidr": {"type": "string"}},
             "not": {"required": ["group"], "properties": {"group": {"type": "string"}}}},
            {"required": ["group"], "properties": {"group": {"type": "string"}},
             "not": {"required": ["cidr"], "properties": {"cidr": {"type": "string"}}}}
        ]}
    ]);
    // A resize changes something.
    schemas["ResizeInstanceRequest"]["anyOf"] = json!([
        {"required": ["instance_type"], "properties": {"instance_type": {"type": "string"}}},
        {"required": ["vcpus"], "properties": {"vcpus": {"type": "integer"}}},
        {"required": ["memory_mib"], "properties": {"memory_mib": {"type": "integer"}}}
    ]);
    // The replicas of a volume move between hosts, named, or "auto".
    for field in ["to", "from"] {
        let description =
            schemas["ChangeReplicasRequest"]["properties"][field]["description"].clone();
        schemas["ChangeReplicasRequest"]["properties"][field] = json!({
            "description": description,
            "anyOf": [name.clone(), {"type": "null"}],
        });
    }
    if let Some(a) = schemas["ChangeReplicasRequest"]["properties"]["to"]["anyOf"].as_array_mut() {
        a.push(json!({"const": "auto"}));
    }
    schemas["ChangeReplicasRequest"]["anyOf"] = json!([
        {"required": ["to"], "properties": {"to": {"type": "string"}}},
        {"required": ["from"], "properties": {"from": {"type": "string"}}}
    ]);
    schemas["CreateTokenRequest"]["properties"]["expires_in_secs"]["maximum"] =
        json!(super::access::MAX_TOKEN_SECS);
    // Request bodies are closed: an unknown field is refused.
    if let Some(all) = schemas.as_object_mut() {
        for (name, schema) in all.iter_mut() {
            let closed = name.ends_with("Request")
                || matches!(
                    name.as_str(),
                    "Quota" | "CheckpointSchedule" | "SecurityRule"
                );
            if closed && schema.get("properties").is_some() {
                schema["additionalProperties"] = json!(false);
            }
        }
    }
    // A replicated volume cannot need more in-sync replicas than it has.
    schemas["CreateVolumeRequest"]["anyOf"] = json!([
        {"not": {"required": ["min_in_sync"]}},
        {"properties": {"min_in_sync": {"type": ["integer", "null"], "maximum": 1}}},
        {"required": ["replicas"], "properties": {"replicas": {"type": "integer", "minimum": 2}, "min_in_sync": {"maximum": 2}}},
        {"required": ["replicas"], "properties": {"replicas": {"type": "integer", "minimum": 3}}}
    ]);
    // Bodies a handler takes as optional (empty: the defaults).
    for (path, method) in [
        ("/v1/instances/{name}/stop", "post"),
        ("/v1/instances/{name}/snapshots", "post"),
        ("/v1/instances/{name}/migrate", "post"),
        ("/v1/hosts/rebalance", "post"),
        ("/v1/cluster/join-tokens", "post"),
    ] {
        if doc["paths"][path][method]["requestBody"].is_object() {
            doc["paths"][path][method]["requestBody"]["required"] = json!(false);
        }
    }
    // An upload names its parts.
    doc["paths"]["/v1/images/import"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"] = json!({
        "type": "object",
        "properties": {
            "disk": {"type": "string", "format": "binary", "description": "a disk image booted by firmware (qcow2 or raw)"},
            "kernel": {"type": "string", "format": "binary", "description": "a kernel to boot directly"},
            "initrd": {"type": "string", "format": "binary", "description": "its initrd (with a kernel)"}
        },
        "additionalProperties": false,
        "anyOf": [
            {"required": ["disk"], "not": {"anyOf": [{"required": ["kernel"]}, {"required": ["initrd"]}]}},
            {"required": ["kernel"], "not": {"required": ["disk"]}}
        ]
    });
    rename_link_ids(doc);
    unsigned_bounds(doc);
    for name in [
        "CreateInstanceRequest",
        "InstanceTemplate",
        "ResizeInstanceRequest",
        "ChangeReplicasRequest",
        "CreateVolumeRequest",
    ] {
        expand_branches(&mut doc["components"]["schemas"][name]);
    }
    // Path parameters that name objects are names.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let migration = path.starts_with("/v1/migrations/");
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (_, op) in item.iter_mut() {
                let Some(params) = op.get_mut("parameters").and_then(|p| p.as_array_mut()) else {
                    continue;
                };
                for p in params {
                    let pname = p["name"].as_str().unwrap_or_default().to_owned();
                    let pname = pname.as_str();
                    let named = (p["in"] == "path"
                        && ["name", "volume", "snapshot", "identity"].contains(&pname))
                        || (p["in"] == "query"
                            && ["name", "host", "identity", "instance"].contains(&pname));
                    let required = p["required"] == true;
                    if p["in"] == "query" && pname == "label" {
                        use skyvisor_core::labels::{LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN};
                        let strip = |p: &'static str| &p[1..p.len() - 1];
                        let term = format!(
                            "{}(={})?",
                            strip(LABEL_KEY_PATTERN),
                            strip(LABEL_VALUE_PATTERN)
                        );
                        p["schema"] = json!({"type": ["string", "null"], "pattern": format!("^{term}(,{term})*$")});
                    }
                    if p["in"] == "path" && pname == "month" {
                        p["schema"] =
                            json!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"});
                    }
                    if p["in"] == "query" && (pname == "from" || pname == "to") {
                        p["schema"] = json!({"type": ["string", "null"], "anyOf": [
                            {"format": "date-time"}, {"format": "date"}, {"type": "null"}
                        ]});
                    }
                    if migration && p["in"] == "path" && pname == "id" {
                        p["schema"] = json!({"type": "string", "format": "uuid"});
                    }
                    if named {
                        let mut rule = json!({"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_LEN});
                        if !required {
                            rule["type"] = json!(["string", "null"]);
                        }
                        p["schema"] = rule;
                    }
                }
            }
        }
    }
}

/// An object schema with `anyOf` branches that only add rules becomes an
/// `anyOf` of whole objects, each the base with its branch's rules, so
/// that client generators see every field in every variant (the same
/// values are valid either way).
fn expand_branches(schema: &mut serde_json::Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let Some(serde_json::Value::Array(branches)) = obj.remove("anyOf") else {
        return;
    };
    let description = obj.get("description").cloned();
    let all_of = obj.remove("allOf");
    let base = serde_json::Value::Object(obj.clone());
    let mut whole = Vec::new();
    for branch in branches {
        let mut full = base.clone();
        if let Some(required) = branch["required"].as_array() {
            let mut all: Vec<serde_json::Value> =
                full["required"].as_array().cloned().unwrap_or_default();
            for r in required {
                if !all.contains(r) {
                    all.push(r.clone());
                }
            }
            full["required"] = serde_json::Value::Array(all);
        }
        for (prop, rule) in branch["properties"].as_object().into_iter().flatten() {
            let slot = &mut full["properties"][prop.as_str()];
            if rule["type"] == "null" {
                // Absent or null only: the base's other rules go.
                *slot = serde_json::json!({"type": "null"});
            } else if let (Some(s), Some(r)) = (slot.as_object_mut(), rule.as_object()) {
                // Narrower: the branch's keys replace the base's.
                for (k, v) in r {
                    s.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(not) = branch.get("not") {
            full["not"] = not.clone();
        }
        whole.push(full);
    }
    let mut out = serde_json::Map::new();
    if let Some(d) = description {
        out.insert("description".into(), d);
    }
    out.insert("anyOf".into(), serde_json::Value::Array(whole));
    if let Some(a) = all_of {
        out.insert("allOf".into(), a);
    }
    *schema = serde_json::Value::Object(out);
}

/// utoipa writes links' `operationId` as `operation_id`; clients and
/// fuzzers read the former.
fn rename_link_ids(doc: &mut serde_json::Value) {
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            for op in item
                .as_object_mut()
                .into_iter()
                .flat_map(|o| o.values_mut())
            {
                for resp in op["responses"]
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|r| r.values_mut())
                {
                    for link in resp
                        .get_mut("links")
                        .and_then(|l| l.as_object_mut())
                        .into_iter()
                        .flat_map(|l| l.values_mut())
                    {
                        if let Some(obj) = link.as_object_mut()
                            && let Some(id) = obj.remove("operation_id")
                        {
                            obj.insert("operationId".into(), id);
                        }
                    }
                }
            }
        }
    }
}

/// utoipa writes Rust's unsigned integers as `int32`/`int64` with a
/// minimum of 0, whose implied maximum is the signed one; the server takes
/// the whole unsigned range, so the document says so.
fn unsigned_bounds(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let unsigned = map.get("minimum").and_then(|m| m.as_u64()) == Some(0);
            let format = map
                .get("format")
                .and_then(|f| f.as_str())
                .map(str::to_string);
            if unsigned && let Some(f) = format {
                let max = match f.as_str() {
                    "int32" => Some(serde_json::Value::from(u64::from(u32::MAX))),
                    "int64" => Some(serde_json::Value::from(u64::MAX)),
                    _ => None,
                };
                if let Some(max) = max {
                    map.remove("format");
                    map.entry("maximum").or_insert(max);
                }
            }
            map.values_mut().for_each(unsigned_bounds);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned_bounds),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_unique_and_every_operation_lists_the_shared_answers() {
        let doc = crate::api::openapi();
        let mut ids = std::collections::HashSet::new();
        for (path, item) in &doc.paths.paths {
            let mut item = item.clone();
            for (method, op) in operations(&mut item) {
                let id = op.operation_id.clone().expect("an id");
                assert!(ids.insert(id.clone()), "{id} twice");
                for status in ["401", "403", "503"] {
                    assert!(
                        op.responses.responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
                if path.contains('{') {
                    assert!(
                        op.responses.responses.contains_key("404"),
                        "{method} {path}"
                    );
                }
            }
        }
        assert_eq!(
            operation_id("get", "/v1/instances/{name}/snapshots"),
            "get_instances_by_name_snapshots"
        );
    }

    #[test]
    fn a_create_links_to_what_uses_its_object() {
        let doc = crate::api::openapi();
        let create = doc.paths.paths["/v1/instances"]
            .post
            .as_ref()
            .expect("create");
        let Some(RefOr::T(created)) = create.responses.responses.get("201") else {
            panic!("no 201");
        };
        assert!(created.links.contains_key("get_instances_by_name"));
        assert!(created.links.contains_key("delete_instances_by_name"));
    }
}
