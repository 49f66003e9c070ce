"""Chart tests: render helm/audience with Helm's own library, lint it, validate every object
against the Kubernetes API schemas, check what the chart promises (hardened pods, probes, the
kinds each mode yields), and have the server binary accept each rendered configuration.

    chart_test.py CHART_DIR CASES_DIR AUDIENCE_BINARY

CASES_DIR/accepted/*.yaml must render; their header comments name the kinds that must
(`# kinds:`) and must not (`# absent:`) be rendered. CASES_DIR/rejected/*.yaml must be refused,
with the message of their `# expect:` line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

# The Kubernetes version objects are validated against (a recent one the package ships).
KUBE_VERSION = "1.35.0"
RELEASE = "audience-test"
NAMESPACE = "ads"
# Values of variables the pods read from Secrets, for the configuration check.
SECRET_ENV = {"AUDIENCE_REDIS_URL": "redis://:secret@redis.example:6379/0"}


class Failures:
    """Collects failures, so that one run reports every problem."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)


def header(path: Path, field: str) -> list[str]:
    """The words of a `# field: ...` header line of a values file."""
    for line in path.read_text().splitlines():
        match = re.match(rf"#\s*{field}:\s*(.*)$", line)
        if match:
            return [match.group(1).strip()] if field == "expect" else match.group(1).split()
    return []


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt left out)."""
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def lint(chart_dir: Path, values: dict[str, Any], case: str, failures: Failures) -> None:
    report = helm.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    for error in report.get("errors") or []:
        failures.check(False, f"{case}: lint: {error}")
    for message in report.get("messages") or []:
        # 1 = info (an icon is recommended); warnings and errors fail.
        failures.check(message["severity"] < 2, f"{case}: lint: {message}")


def validate_schema(obj: dict[str, Any], objects: list[dict[str, Any]], case: str,
                    failures: Failures) -> None:
    """Kubernetes' own schema (strict: unknown fields fail); CRDs structurally."""
    label = f"{case}: {obj['kind']}/{obj['metadata']['name']}"
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        check_service_monitor(obj, objects, label, failures)
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(p) for p in error.path)
        failures.check(False, f"{label}: at {path}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        failures.check(False, f"{label}: {error.message}")


def check_service_monitor(obj: dict[str, Any], objects: list[dict[str, Any]], label: str,
                          failures: Failures) -> None:
    """A ServiceMonitor is a CRD, absent from the Kubernetes schemas: check that it selects
    the chart's Service and scrapes a port that Service has."""
    print(f"  {label}: a CRD without a Kubernetes schema: checked against the Service instead")
    selector = obj["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"
                and selector.items() <= o["metadata"]["labels"].items()
                and o["spec"].get("clusterIP") != "None"]
    failures.check(len(services) == 1, f"{label}: selects {len(services)} Services, not 1")
    ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in obj["spec"]["endpoints"]:
        failures.check(endpoint["port"] in ports,
                       f"{label}: scrapes port {endpoint['port']}, the Service has {ports}")


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            specs.append((name, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((name, obj["spec"]))
    return specs


def check_hardened(objects: list[dict[str, Any]], case: str, failures: Failures) -> None:
    """Non-root, read-only root, no privilege escalation, no capabilities, RuntimeDefault."""
    for name, spec in pod_specs(objects):
        pod = spec.get("securityContext", {})
        failures.check(pod.get("runAsNonRoot") is True, f"{case}: {name}: runAsNonRoot")
        failures.check(pod.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                       f"{case}: {name}: pod seccomp")
        failures.check(spec.get("automountServiceAccountToken") is False,
                       f"{case}: {name}: mounts a service account token")
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            where = f"{case}: {name}: container {container['name']}"
            failures.check(context.get("readOnlyRootFilesystem") is True, f"{where}: root fs")
            failures.check(context.get("allowPrivilegeEscalation") is False,
                           f"{where}: privilege escalation")
            failures.check(context.get("capabilities", {}).get("drop") == ["ALL"],
                           f"{where}: capabilities")
            failures.check(context.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                           f"{where}: seccomp")


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 1, f"{len(workloads)} workloads"
    return workloads[0]["spec"]["template"]["spec"]["containers"][0]


def check_probes(objects: list[dict[str, Any]], case: str, failures: Failures) -> None:
    container = server_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = container.get(probe, {})
        failures.check("grpc" in action or "exec" in action, f"{case}: {probe} is not gRPC health")
    startup = container.get("startupProbe", {})
    patience = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    failures.check(patience >= 600, f"{case}: the startup probe gives up after {patience} s")


def run(binary: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    return subprocess.run([binary, *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=False)


def check_config(objects: list[dict[str, Any]], binary: str, case: str,
                 failures: Failures) -> None:
    """The server container's own arguments and environment, with the rendered ConfigMap at
    the path they name, pass `--check-config`."""
    container = server_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    configmaps = [o for o in objects
                  if o["kind"] == "ConfigMap" and mount["subPath"] in o.get("data", {})]
    failures.check(len(configmaps) == 1, f"{case}: {len(configmaps)} ConfigMaps hold the config")
    for dashboard in (o for o in objects if o["kind"] == "ConfigMap" and "audience.json" in o["data"]):
        try:
            panels = json.loads(dashboard["data"]["audience.json"])["panels"]
            failures.check(bool(panels), f"{case}: the dashboard has no panels")
        except (ValueError, KeyError) as error:
            failures.check(False, f"{case}: the dashboard is not a Grafana dashboard: {error}")
    env = {}
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else SECRET_ENV[var["name"]]
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / mount["subPath"]
        config.write_text(configmaps[0]["data"][mount["subPath"]])
        args = [str(config) if arg == mount["mountPath"] else arg for arg in container["args"]]
        result = run(binary, [*args, "--check-config"], env)
        failures.check(result.returncode == 0,
                       f"{case}: the server refuses the rendered configuration "
                       f"({' '.join(args)}):\n{result.stderr}\n{config.read_text()}")


def check_health_commands(objects: list[dict[str, Any]], binary: str, case: str,
                          failures: Failures) -> None:
    """Every `audience health` the chart runs (exec probes, the test pod) is a command line
    the binary accepts: pointed at a closed port it fails at run time (exit 1), not on usage
    (exit 2). Plaintext ones must fail to connect; TLS ones may stop earlier, at the pod's
    certificate files, which do not exist here."""
    port = closed_port()
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            commands = [container.get("command")]
            commands += [container.get(p, {}).get("exec", {}).get("command")
                         for p in ("startupProbe", "readinessProbe", "livenessProbe")]
            for command in filter(None, commands):
                args = list(command[1:])
                at = args.index("--addr") + 1
                args[at] = re.sub(r"//[^/]+$", f"//127.0.0.1:{port}", args[at])
                result = run(binary, args, {})
                connects = args[at].startswith("https://") or "cannot connect" in result.stderr
                failures.check(
                    result.returncode == 1 and connects,
                    f"{case}: {name}: `{' '.join(command)}` exits {result.returncode}: "
                    f"{result.stderr.strip()}")


def closed_port() -> int:
    """A port nothing listens on: bound by the system's choice, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_kinds(objects: list[dict[str, Any]], path: Path, case: str,
                failures: Failures) -> None:
    kinds = {o["kind"] for o in objects}
    for kind in header(path, "kinds"):
        failures.check(kind in kinds, f"{case}: no {kind} rendered (got {sorted(kinds)})")
    for kind in header(path, "absent"):
        failures.check(kind not in kinds, f"{case}: a {kind} rendered")


def accepted(chart: helm.Chart, chart_dir: Path, path: Path, binary: str,
             failures: Failures) -> None:
    case = f"accepted/{path.name}"
    values = load_values(path)
    lint(chart_dir, values, case, failures)
    objects = render(chart, values)
    for obj in objects:
        validate_schema(obj, objects, case, failures)
    check_kinds(objects, path, case, failures)
    check_hardened(objects, case, failures)
    check_probes(objects, case, failures)
    check_config(objects, binary, case, failures)
    check_health_commands(objects, binary, case, failures)
    print(f"  {case}: {len(objects)} objects")


def rejected(chart: helm.Chart, path: Path, failures: Failures) -> None:
    case = f"rejected/{path.name}"
    expected = header(path, "expect")
    failures.check(bool(expected), f"{case}: no `# expect:` line")
    try:
        render(chart, load_values(path))
    except helm.HelmError as error:
        failures.check(expected[0] in str(error) if expected else False,
                       f"{case}: refused, but not with '{expected}':\n{error}")
        print(f"  {case}: refused: {expected[0] if expected else ''}")
        return
    failures.check(False, f"{case}: rendered, but must be refused with '{expected}'")


# Values documented as a whole in the chart README (maps passed through to Kubernetes).
WHOLE_VALUES = {"config", "resources", "podSecurityContext", "securityContext", "probes.startup",
                "probes.readiness", "probes.liveness", "nodeSelector", "affinity",
                "podAnnotations", "podLabels", "serviceAccount.annotations",
                "service.annotations", "metrics.serviceMonitor.labels",
                "metrics.dashboard.labels"}


def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in WHOLE_VALUES:
            paths.extend(value_paths(value, f"{path}."))
        else:
            paths.append(path)
    return paths


def check_readme(chart: helm.Chart, chart_dir: Path, failures: Failures) -> None:
    """The chart README's table lists every value."""
    readme = (chart_dir / "README.md").read_text()
    for path in value_paths(chart.values):
        failures.check(f"| `{path}` |" in readme, f"README.md: the value {path} is not listed")


def main() -> int:
    chart_dir, cases, binary = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    failures = Failures()
    with helm.Chart.load(chart_dir) as chart:
        print(f"chart {chart.name} {chart.version}, Helm {helm.helm_sdk_version()}, "
              f"Kubernetes schemas {KUBE_VERSION}")
        accepted_cases = sorted((cases / "accepted").glob("*.yaml"))
        rejected_cases = sorted((cases / "rejected").glob("*.yaml"))
        assert accepted_cases and rejected_cases, "no test cases"
        check_readme(chart, chart_dir, failures)
        for path in accepted_cases:
            accepted(chart, chart_dir, path, binary, failures)
        for path in rejected_cases:
            rejected(chart, path, failures)
    for message in failures.messages:
        print(f"FAIL {message}", file=sys.stderr)
    print(f"{len(accepted_cases)} accepted and {len(rejected_cases)} rejected value files, "
          f"{len(failures.messages)} failures")
    return 1 if failures.messages else 0


if __name__ == "__main__":
    sys.exit(main())
