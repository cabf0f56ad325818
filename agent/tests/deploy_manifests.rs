//! `deploy/`: every plain manifest and the Helm chart rendered with default and non-default
//! values deserialize strictly into the Kubernetes API types (a misspelt or misplaced field
//! fails), and say what the docs promise (RBAC read-only, the agent's capabilities, the
//! server non-root, the values reaching the objects).

mod deploy;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
}

/// All objects of the YAML files in `dir`, checked strictly; by `kind/name`.
fn manifests(dir: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut out = Vec::new();
    for f in files {
        for doc in deploy::yaml::documents(&read(&f)?).with_context(|| f.display().to_string())? {
            let id = deploy::strict(&doc).with_context(|| f.display().to_string())?;
            out.push((id, doc));
        }
    }
    Ok(out)
}

fn get<'a>(objs: &'a [(String, Value)], id: &str) -> &'a Value {
    &objs
        .iter()
        .find(|(i, _)| i == id)
        .unwrap_or_else(|| {
            panic!(
                "{id} missing; have {:?}",
                objs.iter().map(|o| &o.0).collect::<Vec<_>>()
            )
        })
        .1
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What the agent DaemonSet must hold, whichever way it was produced.
fn check_agent(ds: &Value, extra_caps: &[&str]) {
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true);
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut want = vec!["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"];
    want.extend_from_slice(extra_caps);
    assert_eq!(strs(&sc["capabilities"]["add"]), want);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for m in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/run/corral",
        "/var/lib/corral",
    ] {
        assert!(mounts.contains(&m), "{m} not mounted: {mounts:?}");
    }
    assert_eq!(
        c["env"][0],
        json!({"name": "CORRAL_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    );
    assert_eq!(env(c, "CORRAL_KUBERNETES"), Some(&json!("true")));
    assert_eq!(
        strs(&c["readinessProbe"]["exec"]["command"]),
        ["/usr/local/bin/corral", "status"]
    );
}

fn check_rbac(role: &Value, namespaces: bool) {
    let rules = role["rules"].as_array().expect("rules");
    let mut resources = Vec::new();
    for r in rules {
        assert_eq!(strs(&r["verbs"]), ["get", "list", "watch"], "{r}");
        assert_eq!(strs(&r["apiGroups"]), [""], "{r}");
        resources.extend(strs(&r["resources"]));
    }
    let want: &[&str] = if namespaces {
        &["pods", "namespaces"]
    } else {
        &["pods"]
    };
    assert_eq!(resources, want);
}

fn check_server(dep: &Value) {
    let spec = &dep["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let c = &spec["containers"][0];
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
}

#[test]
fn plain_manifests_are_strict_kubernetes_objects() -> anyhow::Result<()> {
    let objs = manifests(&deploy_dir().join("manifests"))?;
    let ids: Vec<&str> = objs.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(
        ids,
        [
            "Namespace/corral-system",
            "ServiceAccount/corral-agent",
            "ClusterRole/corral-agent",
            "ClusterRoleBinding/corral-agent",
            "ServiceAccount/corral-server",
            "PersistentVolumeClaim/corral-server-data",
            "Service/corral-server",
            "Deployment/corral-server",
            "DaemonSet/corral-agent",
        ]
    );
    check_agent(get(&objs, "DaemonSet/corral-agent"), &[]);
    check_rbac(get(&objs, "ClusterRole/corral-agent"), true);
    check_server(get(&objs, "Deployment/corral-server"));
    Ok(())
}

#[test]
fn a_misspelt_or_misplaced_field_fails() -> anyhow::Result<()> {
    let text = read(&deploy_dir().join("manifests/30-agent.yaml"))?;
    for (from, to) in [
        ("hostPID: true", "hostPid: true"),
        ("      serviceAccountName:", "      serviceAccount_name:"),
        (
            "              mountPath: /sys/fs/bpf",
            "              mountpath: /sys/fs/bpf",
        ),
        // Right name, wrong place: `readOnly` belongs to the mount, not the hostPath.
        (
            "            type: Directory\n",
            "            type: Directory\n            readOnly: true\n",
        ),
        ("      maxUnavailable: 1", "      maxUnavailable: [1]"),
    ] {
        assert!(text.contains(from), "fixture drifted: {from}");
        let doc = deploy::yaml::document(&text.replacen(from, to, 1))?;
        let err = format!("{:#}", deploy::strict(&doc).expect_err(to));
        assert!(
            err.contains("unknown field") || err.contains("does not deserialize"),
            "{to}: {err}"
        );
    }
    // YAML 1.1 booleans are refused, whatever the YAML 1.2 reading.
    assert!(deploy::yaml::document("a: yes\n").is_err());
    Ok(())
}

struct Chart {
    templates: Vec<(String, String)>,
    values: Value,
    chart: Value,
}

fn chart() -> anyhow::Result<Chart> {
    let dir = deploy_dir().join("helm/corral");
    let values = deploy::yaml::document(&read(&dir.join("values.yaml"))?)?;
    let chart = deploy::yaml::document(&read(&dir.join("Chart.yaml"))?)?;
    let mut templates = Vec::new();
    for e in std::fs::read_dir(dir.join("templates"))? {
        let p = e?.path();
        if p.extension().is_some_and(|e| e == "yaml") {
            templates.push((p.display().to_string(), read(&p)?));
        }
    }
    templates.sort();
    anyhow::ensure!(!templates.is_empty(), "no templates");
    Ok(Chart {
        templates,
        values,
        chart,
    })
}

/// Renders the chart as `helm template <release> -n <namespace> -f overrides` would.
fn render(
    c: &Chart,
    release: &str,
    namespace: &str,
    overrides: &str,
) -> anyhow::Result<Vec<(String, Value)>> {
    let mut values = c.values.clone();
    deploy::template::merge(&mut values, &deploy::yaml::document(overrides)?);
    let root = json!({
        "Values": values,
        "Release": { "Name": release, "Namespace": namespace, "Service": "Helm" },
        "Chart": { "Name": c.chart["name"], "Version": c.chart["version"], "AppVersion": c.chart["appVersion"] },
    });
    let mut out = Vec::new();
    for (name, src) in &c.templates {
        let text =
            deploy::template::render(src, &root).with_context(|| format!("render {name}"))?;
        for doc in
            deploy::yaml::documents(&text).with_context(|| format!("{name} rendered:\n{text}"))?
        {
            let id = deploy::strict(&doc).with_context(|| format!("{name} rendered:\n{text}"))?;
            out.push((id, doc));
        }
    }
    Ok(out)
}

#[test]
fn chart_renders_with_default_values() -> anyhow::Result<()> {
    let objs = render(&chart()?, "corral", "corral-system", "")?;
    let mut ids: Vec<&str> = objs.iter().map(|o| o.0.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "ClusterRole/corral-agent",
            "ClusterRoleBinding/corral-agent",
            "DaemonSet/corral-agent",
            "Deployment/corral-server",
            "PersistentVolumeClaim/corral-server-data",
            "Service/corral-server",
            "ServiceAccount/corral-agent",
            "ServiceAccount/corral-server",
        ]
    );
    let ds = get(&objs, "DaemonSet/corral-agent");
    check_agent(ds, &[]);
    check_rbac(get(&objs, "ClusterRole/corral-agent"), true);
    // The OCI hook is installed on the node by an init container, with no capabilities.
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(
        strs(&init["command"]),
        [
            "/usr/local/bin/corral",
            "install-oci-hook",
            "--root",
            "/host"
        ]
    );
    assert_eq!(
        strs(&init["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert_eq!(init["securityContext"]["capabilities"].get("add"), None);
    let hook_mounts: Vec<&str> = init["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(
        hook_mounts,
        ["/host/opt/corral/bin", "/host/etc/containers/oci/hooks.d"]
    );
    check_server(get(&objs, "Deployment/corral-server"));
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "ghcr.io/corral-dev/corral-agent:0.1.0");
    assert_eq!(env(c, "CORRAL_TRUST_DOMAIN"), Some(&json!("cluster.local")));
    assert_eq!(
        env(c, "CORRAL_IDENTITY_MODE"),
        Some(&json!("service-account"))
    );
    assert_eq!(
        env(c, "CORRAL_SERVER"),
        Some(&json!("https://corral-server.corral-system.svc:7443"))
    );
    assert_eq!(
        env(c, "CORRAL_TLS_CERT"),
        Some(&json!("/etc/corral/tls/tls.crt"))
    );
    assert_eq!(env(c, "CORRAL_POLICY"), None);
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(
        c["resources"]["requests"],
        json!({"cpu": "50m", "memory": "64Mi"})
    );
    // The default chart and the plain manifests describe the same agent and server pods.
    let plain = manifests(&deploy_dir().join("manifests"))?;
    let pod = |objs: &[(String, Value)], id: &str| {
        let mut p = get(objs, id)["spec"]["template"]["spec"].clone();
        p["serviceAccountName"] = Value::Null;
        p
    };
    assert_eq!(
        pod(&objs, "DaemonSet/corral-agent"),
        pod(&plain, "DaemonSet/corral-agent")
    );
    let mut server = pod(&objs, "Deployment/corral-server");
    server["volumes"][0]["persistentVolumeClaim"]["claimName"] = json!("corral-server-data");
    assert_eq!(server, pod(&plain, "Deployment/corral-server"));
    Ok(())
}

#[test]
fn chart_renders_with_non_default_values() -> anyhow::Result<()> {
    let c = chart()?;
    let objs = render(
        &c,
        "edge",
        "security",
        r#"
image: { registry: registry.example.org/sec, tag: "2.0.1", pullPolicy: Always }
trustDomain: prod.example.org
identity: { mode: namespace, annotationScope: trust-domain, namespaceOptIn: false }
agent:
  mode: standalone
  policy: |
    apiVersion: corral.dev/v1alpha1
    kind: AgentPolicy
  extraCapabilities: [SYS_ADMIN]
  priorityClassName: ""
  tolerations: []
  nodeSelector: { corral.dev/node: enforced }
  resources: { limits: { cpu: "1", memory: 1Gi } }
server:
  enabled: false
ociHook: { install: false }
"#,
    )?;
    let mut ids: Vec<&str> = objs.iter().map(|o| o.0.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "ClusterRole/edge-agent",
            "ClusterRoleBinding/edge-agent",
            "ConfigMap/edge-policy",
            "DaemonSet/edge-agent",
            "ServiceAccount/edge-agent",
        ]
    );
    let ds = get(&objs, "DaemonSet/edge-agent");
    check_agent(ds, &["SYS_ADMIN"]);
    check_rbac(get(&objs, "ClusterRole/edge-agent"), false);
    assert_eq!(
        get(&objs, "ConfigMap/edge-policy")["data"]["policy.yaml"],
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\n"
    );
    let spec = &ds["spec"]["template"]["spec"];
    let ct = &spec["containers"][0];
    assert_eq!(ct["image"], "registry.example.org/sec/corral-agent:2.0.1");
    assert_eq!(ct["imagePullPolicy"], "Always");
    assert_eq!(
        env(ct, "CORRAL_TRUST_DOMAIN"),
        Some(&json!("prod.example.org"))
    );
    assert_eq!(env(ct, "CORRAL_IDENTITY_MODE"), Some(&json!("namespace")));
    assert_eq!(
        env(ct, "CORRAL_ANNOTATION_SCOPE"),
        Some(&json!("trust-domain"))
    );
    assert_eq!(env(ct, "CORRAL_NAMESPACE_OPT_IN"), Some(&json!("false")));
    assert_eq!(
        env(ct, "CORRAL_POLICY"),
        Some(&json!("/etc/corral/policy/policy.yaml"))
    );
    assert_eq!(env(ct, "CORRAL_SERVER"), None);
    assert_eq!(env(ct, "CORRAL_TLS_CERT"), None);
    assert_eq!(spec.get("tolerations"), None);
    assert_eq!(spec.get("priorityClassName"), None);
    assert_eq!(spec["nodeSelector"], json!({"corral.dev/node": "enforced"}));
    // Helm merges maps: the default requests stay.
    assert_eq!(
        ct["resources"],
        json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "50m", "memory": "64Mi"}})
    );
    assert_eq!(spec["volumes"][5]["configMap"]["name"], "edge-policy");
    assert_eq!(spec.get("initContainers"), None, "ociHook.install: false");
    assert_eq!(spec["volumes"].as_array().map(Vec::len), Some(6));

    // Managed, with an external server and TLS Secrets of its own, and the server's storage.
    let objs = render(
        &c,
        "corral",
        "corral-system",
        r#"
agent: { server: "https://policy.example.org:7443" }
tls: { agentSecret: node-certs, serverSecret: policy-certs }
server: { storage: { storageClassName: fast, size: 5Gi }, listenPort: 9443 }
ociHook: { failOpen: true }
"#,
    )?;
    let spec = &get(&objs, "DaemonSet/corral-agent")["spec"]["template"]["spec"];
    let ct = &spec["containers"][0];
    assert_eq!(
        env(ct, "CORRAL_SERVER"),
        Some(&json!("https://policy.example.org:7443"))
    );
    assert_eq!(
        env(ct, "CORRAL_TLS_CA"),
        Some(&json!("/etc/corral/tls/ca.crt"))
    );
    assert_eq!(spec["volumes"][5]["secret"]["secretName"], "node-certs");
    assert_eq!(
        strs(&spec["initContainers"][0]["command"]).last(),
        Some(&"--fail-open")
    );
    let pvc = get(&objs, "PersistentVolumeClaim/corral-server-data");
    assert_eq!(pvc["spec"]["storageClassName"], "fast");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    let srv = get(&objs, "Deployment/corral-server");
    let sc = &srv["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(sc["ports"][0]["containerPort"], 9443);
    assert_eq!(
        env(sc, "CORRAL_SERVER_LISTEN"),
        Some(&json!("0.0.0.0:9443"))
    );
    assert_eq!(
        srv["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"],
        "policy-certs"
    );
    assert_eq!(
        env(sc, "CORRAL_TLS_CERT"),
        Some(&json!("/etc/corral/tls/tls.crt"))
    );
    assert_eq!(
        get(&objs, "Service/corral-server")["spec"]["ports"][0]["port"],
        9443
    );
    Ok(())
}

#[test]
fn chart_renders_server_replicas_on_postgres_and_refuses_them_on_sqlite() -> anyhow::Result<()> {
    let c = chart()?;
    let objs = render(
        &c,
        "corral",
        "corral-system",
        "server: { replicas: 3, postgres: { urlSecret: corral-db } }",
    )?;
    assert!(
        !objs
            .iter()
            .any(|o| o.0.starts_with("PersistentVolumeClaim/")),
        "no SQLite volume with PostgreSQL"
    );
    let dep = get(&objs, "Deployment/corral-server");
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    let spec = &dep["spec"]["template"]["spec"];
    let c0 = &spec["containers"][0];
    let db = c0["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "CORRAL_SERVER_DB"))
        .context("CORRAL_SERVER_DB")?;
    assert_eq!(
        db["valueFrom"]["secretKeyRef"],
        json!({ "name": "corral-db", "key": "url" })
    );
    let mounts: Vec<&Value> = c0["volumeMounts"]
        .as_array()
        .map(|m| m.iter().map(|m| &m["name"]).collect())
        .unwrap_or_default();
    assert_eq!(mounts, [&json!("tls")]);
    // Several replicas without a shared database: refused, not silently one.
    let err = render(&c, "corral", "corral-system", "server: { replicas: 2 }")
        .expect_err("rendered replicas on SQLite");
    assert!(
        format!("{err:#}").contains("needs server.postgres.urlSecret"),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn chart_mistakes_fail_the_render() -> anyhow::Result<()> {
    let c = chart()?;
    // A misspelt value (Helm would render nothing and carry on).
    let mut bad = Chart {
        templates: c.templates.clone(),
        values: c.values.clone(),
        chart: c.chart.clone(),
    };
    for (_, src) in &mut bad.templates {
        *src = src.replace(
            ".Values.identity.namespaceOptIn",
            ".Values.identity.namespaceOptin",
        );
    }
    let err = |r: anyhow::Result<Vec<(String, Value)>>| format!("{:#}", r.expect_err("rendered"));
    assert!(
        err(render(&bad, "r", "ns", ""))
            .contains("`.Values.identity.namespaceOptin` names no value")
    );
    // A value of the wrong type reaching a typed field.
    assert!(
        err(render(
            &c,
            "r",
            "ns",
            "server: { listenPort: \"grpc-port\" }"
        ))
        .contains("does not deserialize")
    );
    // A field the Kubernetes types do not know, injected through a value.
    assert!(
        err(render(
            &c,
            "r",
            "ns",
            "agent: { resources: { request: { cpu: 1m } } }"
        ))
        .contains(".resources.request: unknown field")
    );
    // Outside the renderer's subset.
    let root = json!({});
    assert!(deploy::template::render("{{ include \"x\" . }}", &root).is_err());
    assert!(deploy::template::render("{{ .Values | upper }}", &root).is_err());
    Ok(())
}

#[test]
fn renderer_follows_go_template_semantics() -> anyhow::Result<()> {
    let root = json!({"Values": {"l": ["a", "b"], "m": {"k": "v", "num": 2}, "e": "", "t": true}, "Release": {"Name": "r"}});
    let r = |s: &str| deploy::template::render(s, &root);
    assert_eq!(r("x {{- \" y \" -}} z")?, "x y z");
    assert_eq!(
        r("a\n  {{- if .Values.t }}\nyes\n{{- else }}\nno\n{{- end }}\n")?,
        "a\nyes\n"
    );
    assert_eq!(
        r("{{ if .Values.e }}A{{ else if .Values.l }}B{{ else }}C{{ end }}")?,
        "B"
    );
    assert_eq!(
        r("{{ range .Values.l }}[{{ . }}{{ $.Release.Name }}]{{ end }}")?,
        "[ar][br]"
    );
    assert_eq!(
        r("k: {{- toYaml .Values.m | nindent 2 }}")?,
        "k:\n  k: v\n  num: 2"
    );
    assert_eq!(
        r("{{ .Values.m.num | quote }} {{ eq .Values.m.k \"v\" }} {{ not .Values.e }}")?,
        "\"2\" true true"
    );
    assert_eq!(r("{{ .Values.e | default \"d\" }}")?, "d");
    assert_eq!(r("{{/* note */}}x")?, "x");
    assert!(r("{{ .Values.m }}").is_err(), "a map needs toYaml");
    assert!(r("{{ if .Values.t }}open").is_err());
    Ok(())
}
