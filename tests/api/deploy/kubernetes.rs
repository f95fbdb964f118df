//! The Kubernetes manifests: validated offline, and their pods' container specs run under
//! Docker as the kubelet would run them.

use super::*;

/// A tool of the test venv (tests/run installs it), by the variable tests/run exports or at
/// the venv's default place.
pub fn venv_tool(var: &str, name: &str) -> std::path::PathBuf {
    let path = std::env::var_os(var)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/venv-tests/bin").join(name));
    assert!(
        path.exists(),
        "{} is missing: tests/run installs it (kubernetes-validate and PyYAML in the test venv)",
        path.display()
    );
    path
}

/// The manifest files, in the order deploy/k8s/kustomization.yaml lists them.
fn manifest_files() -> Vec<std::path::PathBuf> {
    let dir = repo_root().join("deploy/k8s");
    let kustomization = yaml_documents(&[dir.join("kustomization.yaml")]);
    kustomization[0]["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| dir.join(r.as_str().unwrap()))
        .collect()
}

/// Every document of YAML files, as JSON (read by PyYAML from the test venv).
fn yaml_documents(files: &[std::path::PathBuf]) -> Vec<Value> {
    let out = std::process::Command::new(venv_tool("TRAINVISOR_TEST_PYTHON", "python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        ])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// `kubernetes-validate --strict` on files: Ok(output) if they all validate.
fn k8s_validate(files: &[std::path::PathBuf]) -> Result<String, String> {
    let out =
        std::process::Command::new(venv_tool("TRAINVISOR_K8S_VALIDATE", "kubernetes-validate"))
            .arg("--strict")
            .args(files)
            .output()
            .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The manifests validate offline against the official Kubernetes schemas (strict: no unknown
/// field), alone and as `kubectl kustomize` renders them where kubectl is installed; and they
/// keep the promises the README makes: one replica replaced with Recreate, readiness on /ready and liveness on /health,
/// a restrictive securityContext, a Role that grants nothing (the server calls no Kubernetes
/// API) bound to a ServiceAccount whose token is not mounted, network policies for both pods.
#[test]
fn kubernetes_manifests_validate_offline() {
    let files = manifest_files();
    let report = k8s_validate(&files).unwrap_or_else(|e| panic!("invalid manifests:\n{e}"));
    let docs = yaml_documents(&files);
    assert_eq!(
        report.matches(" passed for resource ").count(),
        docs.len(),
        "{report}"
    );
    // The validator does reject what the API server would.
    let broken = tempfile::tempdir().unwrap();
    let bad = broken.path().join("bad.yaml");
    let text = std::fs::read_to_string(&files[2]).unwrap();
    std::fs::write(&bad, text.replace("replicas: 1", "replicas: one")).unwrap();
    assert!(
        k8s_validate(&[bad]).is_err(),
        "a broken Deployment validated"
    );

    if std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_root().join("deploy/k8s"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = broken.path().join("rendered.yaml");
        std::fs::write(&rendered, &out.stdout).unwrap();
        k8s_validate(std::slice::from_ref(&rendered))
            .unwrap_or_else(|e| panic!("kustomize output invalid:\n{e}"));
        let all = yaml_documents(&[rendered]);
        assert_eq!(all.len(), docs.len());
        for doc in all.iter().filter(|d| d["kind"] != "Namespace") {
            assert_eq!(doc["metadata"]["namespace"], "training-system", "{doc}");
        }
    } else {
        eprintln!("kubectl is not installed: kustomize rendering not checked");
    }

    let deployment = find(&docs, "Deployment", "trainvisor");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trainvisor");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(find(&docs, "Role", "trainvisor")["rules"], json!([]));
    let binding = find(&docs, "RoleBinding", "trainvisor");
    assert_eq!(binding["roleRef"]["name"], "trainvisor");
    assert_eq!(binding["subjects"][0]["name"], "trainvisor");
    assert_eq!(
        find(&docs, "ServiceAccount", "trainvisor")["automountServiceAccountToken"],
        false
    );
    find(&docs, "NetworkPolicy", "trainvisor");
    find(&docs, "NetworkPolicy", "s3");
    find(&docs, "StatefulSet", "s3");
}

/// A container's environment as Kubernetes would set it: `envFrom` ConfigMaps, then `env`
/// values and references to ConfigMap and Secret keys, all resolved from the manifests.
fn resolve_env(docs: &[Value], container: &Value) -> Vec<(String, String)> {
    let data = |kind: &str, name: &str| -> Value {
        let doc = find(docs, kind, name);
        if kind == "Secret" {
            doc["stringData"].clone()
        } else {
            doc["data"].clone()
        }
    };
    let mut env = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let map = data("ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in map.as_object().unwrap() {
            env.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
            data("Secret", r["name"].as_str().unwrap())[r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            let r = &var["valueFrom"]["configMapKeyRef"];
            data("ConfigMap", r["name"].as_str().unwrap())[r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_string()
        };
        env.push((name, value));
    }
    env
}

/// `docker run` arguments for a pod's container as the manifests describe it: its user and
/// groups, securityContext, environment, ports, volumes (PVC: a named volume; emptyDir: a
/// tmpfs) and command/args. Returns them with the volumes to keep alive.
fn docker_args_for(docs: &[Value], pod: &Value, image: &str) -> (Vec<String>, Vec<Volume>) {
    let container = &pod["containers"][0];
    let mut args: Vec<String> = Vec::new();
    let psc = &pod["securityContext"];
    if let Some(uid) = psc["runAsUser"].as_u64() {
        let gid = psc["runAsGroup"].as_u64().unwrap_or(uid);
        args.extend(["--user".into(), format!("{uid}:{gid}")]);
    }
    if let Some(fs_group) = psc["fsGroup"].as_u64() {
        args.extend(["--group-add".into(), fs_group.to_string()]);
    }
    let sc = &container["securityContext"];
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
        args.extend(["--cap-drop".into(), cap.as_str().unwrap().into()]);
    }
    for (k, v) in resolve_env(docs, container) {
        args.extend(["-e".into(), format!("{k}={v}")]);
    }
    for port in container["ports"].as_array().into_iter().flatten() {
        args.extend([
            "-p".into(),
            format!("127.0.0.1::{}", port["containerPort"].as_u64().unwrap()),
        ]);
    }
    let mut volumes = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let path = mount["mountPath"].as_str().unwrap();
        let source = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"]);
        match source {
            Some(v) if v.get("emptyDir").is_some() => {
                args.extend(["--tmpfs".into(), path.into()]);
            }
            // A PersistentVolumeClaim (or a StatefulSet's volumeClaimTemplate): a named volume.
            _ => {
                let volume = Volume::create("tv-pvc");
                args.extend(["-v".into(), format!("{}:{path}", volume.name)]);
                volumes.push(volume);
            }
        }
    }
    let command = container["command"].as_array().cloned().unwrap_or_default();
    if let Some(entry) = command.first() {
        args.extend(["--entrypoint".into(), entry.as_str().unwrap().into()]);
    }
    args.push(image.into());
    for a in command
        .iter()
        .skip(1)
        .chain(container["args"].as_array().into_iter().flatten())
    {
        args.push(a.as_str().unwrap().into());
    }
    (args, volumes)
}

/// The manifests proven against the real image: the S3 StatefulSet's container (the s3s image
/// standing in for MinIO) and trainvisor's Deployment container run under Docker with the
/// command, arguments, environment (ConfigMap and Secret), ports, volume paths and security
/// context read from the manifests, on a network where the Service names resolve. The
/// readiness and liveness probes answer, the Secret's token opens the API, and a trainer job
/// runs with its data and checkpoints in the bucket the ConfigMap names.
#[actix_web::test]
async fn kubernetes_pod_specs_run_under_docker() {
    let docs = yaml_documents(&manifest_files());
    let network = Network::create("tv-k8s");

    let s3_set = find(&docs, "StatefulSet", "s3");
    let s3_service = find(&docs, "Service", "s3");
    let s3_pod = &s3_set["spec"]["template"]["spec"];
    let (mut s3_args, _s3_volumes) = docker_args_for(&docs, s3_pod, &s3s_image());
    // The Service's name resolves to the pod; the s3s image serves on 9000, like MinIO here.
    assert_eq!(s3_service["spec"]["ports"][0]["port"], 9000);
    assert_eq!(s3_pod["containers"][0]["ports"][0]["containerPort"], 9000);
    let s3_name = s3_service["metadata"]["name"].as_str().unwrap().to_string();
    let mut prefix = vec!["--network".to_string(), network.name.clone()];
    prefix.extend(["--network-alias".into(), s3_name]);
    s3_args.splice(0..0, prefix);
    let refs: Vec<&str> = s3_args.iter().map(String::as_str).collect();
    let _s3 = Container::run("tv-k8s-s3", &refs);

    let deployment = find(&docs, "Deployment", "trainvisor");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let (mut args, _volumes) = docker_args_for(&docs, pod, &trainvisor_image());
    args.splice(0..0, ["--network".to_string(), network.name.clone()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Container::run("tv-k8s", &refs);

    let port_of = |name: &Value| -> u16 {
        let ports = container["ports"].as_array().unwrap();
        let port = ports
            .iter()
            .find(|p| p["name"] == *name || p["containerPort"] == *name)
            .unwrap_or_else(|| panic!("probe port {name} is not a container port"));
        port["containerPort"].as_u64().unwrap() as u16
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = port_of(&get["port"]);
        let url = format!(
            "http://{}{}",
            c.host_port(port),
            get["path"].as_str().unwrap()
        );
        wait_ok(&c, &url).await;
    }

    let env = resolve_env(&docs, container);
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} is not set in the manifests"))
    };
    let api_port = port_of(&json!("http"));
    let app = client_for(
        format!("http://{}", c.host_port(api_port)),
        Some(&var("TRAINVISOR_API_TOKEN")),
    );
    let bare = test_client().get(app.url("/jobs")).send().await.unwrap();
    assert_eq!(bare.status(), 401, "the Secret's token is required");
    assert!(
        generated_token(&c.logs()).is_none(),
        "the Secret's token is used"
    );

    let bucket = var("S3_BUCKET");
    let dataset = format!("s3://{bucket}/datasets/small");
    c.exec(&[
        "trainvisor",
        "make-dataset",
        "--out",
        &dataset,
        "--shards",
        "2",
        "--rows-per-shard",
        "200",
        "--features",
        "8",
        "--classes",
        "3",
        "--test-rows",
        "50",
    ]);
    let mut spec = trainer_spec(&dataset);
    spec["total_steps"] = json!(40);
    let id = app.create_job(spec).await;
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["spec"]["checkpoint_dir"],
        format!("s3://{bucket}/checkpoints")
    );
    assert!(committed_checkpoints(&app, &id).await >= 1);
}
