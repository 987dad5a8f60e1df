#!/usr/bin/env python3
"""Renders the reshard Helm chart and checks what it renders.

Run by scripts/check-helm (part of scripts/test). No helm binary and no cluster are needed:
the chart is rendered by Helm's own Go engine (Helm v4, as the `helm-python-sdk` wheel ships
it: libhelm_c over the official Helm SDK), the manifests are validated against the Kubernetes
OpenAPI schemas in strict mode (`kubernetes-validate`), and the references between them are
checked here. Nothing is applied to a cluster.

The values rendered are deploy/helm/reshard/ci/plan-values.yaml: the Helm values `reshard plan`
writes (a unit test of the engine keeps that file equal to what `plan` writes today).
"""

import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "reshard")
PLAN_VALUES = os.path.join(CHART, "ci", "plan-values.yaml")
# The oldest and newest Kubernetes the chart is checked against.
K8S_VERSIONS = ["1.29.0", "1.37.0"]

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def render(values):
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="mig", namespace="reshard")
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path, d))
    return docs


def render_fails(values, expect, what):
    """A render that must be refused with a message containing `expect`."""
    try:
        render(values)
    except helm.HelmError as e:
        if expect not in str(e):
            fail(f"{what}: refused, but the message lacks {expect!r}: {e}")
        else:
            print(f"ok   {what}: refused ({expect})")
        return
    fail(f"{what}: rendered, must be refused")


def by_kind(docs, kind):
    return [d for _, d in docs if d.get("kind") == kind]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def main():
    lint = helm.lint(CHART)
    if lint.get("errors"):
        fail(f"helm lint: {lint['errors']}")
    for m in lint.get("messages") or []:
        # severity 1 is INFO (e.g. "icon is recommended").
        if m.get("severity", 0) > 1:
            fail(f"helm lint: {m}")

    with open(PLAN_VALUES) as f:
        plan = yaml.safe_load(f)
    values = dict(plan)
    values["secret"] = {"existingSecret": "reshard-env", "create": False, "env": {}}
    values["serviceMonitor"] = {"enabled": True, "labels": {"release": "prometheus"}}
    docs = render(values)
    kinds = sorted(d["kind"] for _, d in docs)
    groups = plan["groups"]
    print(f"ok   rendered {len(docs)} manifests for {len(groups)} groups: {kinds}")

    # Every manifest (except the prometheus-operator CRD's ServiceMonitor, whose schema is not
    # in the Kubernetes OpenAPI) against the Kubernetes schemas, strictly.
    for path, d in docs:
        if d["kind"] == "ServiceMonitor":
            continue
        for v in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{path} {d['kind']}/{d['metadata']['name']} against Kubernetes {v}: {e}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{path}: no schema: {e}")
    print(f"ok   schemas (strict, Kubernetes {', '.join(K8S_VERSIONS)})")

    sets = by_kind(docs, "StatefulSet")
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    if len(sets) != len(groups):
        fail(f"{len(sets)} StatefulSets for {len(groups)} groups")
    for g, sts in zip(groups, sorted(sets, key=lambda d: d["metadata"]["name"])):
        name = sts["metadata"]["name"]
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        if spec["replicas"] != 1:
            fail(f"{name}: replicas {spec['replicas']}, a group must run exactly once")
        if not matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
            fail(f"{name}: selector does not match the pod labels")
        svc = services.get(spec["serviceName"])
        if svc is None:
            fail(f"{name}: serviceName {spec['serviceName']} is not rendered")
        elif not matches(svc["spec"]["selector"], spec["template"]["metadata"]["labels"]):
            fail(f"{name}: its Service does not select its pod")
        elif not svc["spec"].get("publishNotReadyAddresses"):
            fail(f"{svc['metadata']['name']}: not-ready pods (full load) would not be scraped")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        metrics_port = int(g["metrics"].rsplit(":", 1)[1])
        if ports.get("metrics") != metrics_port:
            fail(f"{name}: metrics port {ports.get('metrics')}, the config says {metrics_port}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            if get["path"] != path or get["port"] not in ports:
                fail(f"{name}: {probe} is {get}, want {path} on a declared port")
        args = c["args"]
        config = args[args.index("--config") + 1]
        if not config.startswith("/etc/reshard/"):
            fail(f"{name}: --config {config} is not under the config mount")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
        for m in mounts:
            if m not in vols and m not in claims:
                fail(f"{name}: volumeMount {m} has no volume or claim")
        if mounts.get("config") != "/etc/reshard":
            fail(f"{name}: the configs are not mounted at /etc/reshard")
        cm = configmaps.get(vols["config"]["configMap"]["name"], {})
        data = cm.get("data", {})
        file = config[len("/etc/reshard/"):]
        if file not in data:
            fail(f"{name}: {file} is not in the ConfigMap")
        # The peers of the group resolve inside the pod: every config is in the one ConfigMap.
        for other in groups:
            if other["config"] not in data:
                fail(f"{name}: peer config {other['config']} is not mounted")
        if not g["spillDir"].startswith(mounts.get("spill", "?") + "/"):
            fail(f"{name}: spill dir {g['spillDir']} is not on the claim at {mounts.get('spill')}")
        if f'dir = "{g["spillDir"]}"' not in data.get(file, ""):
            fail(f"{name}: {file} does not set [spill] dir = {g['spillDir']!r}")
        env_from = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
        if env_from != ["reshard-env"]:
            fail(f"{name}: envFrom {env_from}, want the existing Secret reshard-env")
    print(f"ok   cross-references of {len(sets)} StatefulSets")

    monitors = by_kind(docs, "ServiceMonitor")
    if len(monitors) != 1:
        fail(f"{len(monitors)} ServiceMonitors, want 1")
    else:
        sm = monitors[0]
        sel = sm["spec"]["selector"]["matchLabels"]
        for svc in services.values():
            if not matches(sel, svc["metadata"]["labels"]):
                fail(f"ServiceMonitor does not select Service {svc['metadata']['name']}")
        for ep in sm["spec"]["endpoints"]:
            for svc in services.values():
                if ep["port"] not in {p["name"] for p in svc["spec"]["ports"]}:
                    fail(f"ServiceMonitor port {ep['port']} is not a port of {svc['metadata']['name']}")
        if sm["metadata"]["labels"].get("release") != "prometheus":
            fail("serviceMonitor.labels are not applied")
        print("ok   ServiceMonitor selects every group's Service and its metrics port")

    # What the chart must refuse.
    render_fails({}, "groups is empty", "no groups")
    bad = yaml.safe_load(yaml.safe_dump(plan))
    bad["groups"][0]["metrics"] = "127.0.0.1:9187"
    render_fails(bad, "cannot reach a loopback", "metrics on loopback")
    bad = yaml.safe_load(yaml.safe_dump(plan))
    bad["groups"][0]["spillDir"] = "/tmp/spill"
    render_fails(bad, "outside the volume", "spill dir off the volume")
    bad = yaml.safe_load(yaml.safe_dump(plan))
    bad["groups"][1]["config"] = "missing.toml"
    render_fails(bad, "not a key of configs", "config file missing")

    if failures:
        print(f"helm chart: {len(failures)} problem(s)")
        return 1
    print("helm chart: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
