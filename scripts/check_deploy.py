"""Checks for deploy/: the Prometheus alert rules and their unit tests, the Grafana dashboard, the
systemd unit and the Dockerfile. Used by scripts/check_chart.py (run by scripts/check-chart.sh),
which passes its Report; every problem is collected, none stops the run.

Without tools:
  * deploy/prometheus/imapgate-alerts.yaml: every alert has a severity and summary, description
    and runbook_url annotations; every runbook_url is RUNBOOK_BASE#<a section of
    docs/operations.md>; every metric
    an expression uses is in docs/metrics.md; the unit tests have, for every alert, a case where
    it fires and one where it stays quiet. (The chart's PrometheusRule, a template, must render
    these groups with its default values: check_monitoring.py.)
  * deploy/grafana/imapgate-dashboard.json: the data source is a template variable that every
    panel and query uses; panel ids are unique; every metric a query uses is documented, and
    every documented metric is on the dashboard; the chart's copy
    (helm/imapgate/files/imapgate-dashboard.json, for its dashboard ConfigMap) is identical.
  * deploy/systemd/imapgate.service carries the hardening the project promises.
  * deploy/Dockerfile is multi-stage and runs as a numeric non-root user; every base image (FROM,
    and ARG *_IMAGE defaults) is pinned as <image>:<tag>@sha256:<64 hex> under a "# tag:" comment
    line naming that <image>:<tag> (the check is first run on an unpinned sample, which it must
    refuse); the binary is built with `cargo auditable build` and a version-pinned cargo-auditable;
    scripts/pin-images.sh, run against a copy with a stand-in registry client, rewrites a stale
    digest, keeps a current one and exits 2 without a client; docs/operations.md has the
    "Build, sign and publish" section (buildx, SBOM, cosign, helm push, the pin refresh).
  * docs/store.md (the credential store) has its sections, names every auth.store key of
    src/config/raw.rs and points to docs/api.md; README.md and docs/operations.md link it;
    docs/operations.md installs with PostgreSQL (a CloudNativePG Cluster) and manages users
    through the admin API over a port-forward.
  * scripts/test.sh installs Debian's postgresql with a check path where the test harness looks
    for the server, and keeps its boot service disabled; scripts/lib/common.sh's ensure_packages,
    run with stand-ins for dpkg and apt, counts a package present when an executable matches its
    globbed check path and installs it when none does.
With tools, when they are there: `promtool check rules` and `promtool test rules` on the alerts,
and `promtool check rules` on the dashboard's queries (as recording rules, for their syntax);
`systemd-analyze verify` on the unit; checkov on the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Protocol

import yaml


class Reporter(Protocol):
    def fail(self, where: str, message: str) -> None: ...

    def check(self, ok: bool, where: str, message: str) -> bool: ...


# Metrics the gateway is about to export that docs/metrics.md may not list yet; the dashboard
# already shows them. Drop an entry once the docs list it.
PENDING_METRICS: dict[str, str] = {}
# The gateway's own metrics and the standard process metrics (docs/metrics.md lists both).
METRIC = re.compile(r"\b(?:imapgate|process)_[a-z0-9_]+\b")
DOC_ROW = re.compile(r"^\| `((?:imapgate|process)_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)
SEVERITIES = ("critical", "warning", "info")
# Where the alerts' runbook_url annotations point (docs/operations.md as published; the chart's
# prometheusRule.runbookBaseUrl defaults to the same address).
RUNBOOK_BASE = "https://github.com/imapgate/imapgate/blob/main/docs/operations.md"
RUNBOOK = re.compile("^" + re.escape(RUNBOOK_BASE) + r"#([a-z0-9-]+)$")


def run(args: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs a command; (exit status, stdout + stderr). A missing binary is status 127."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except FileNotFoundError as err:
        return 127, str(err)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout}s: {' '.join(args)}"
    return done.returncode, done.stdout + done.stderr


def documented_metrics(repo: Path) -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md, plus PENDING_METRICS."""
    text = (repo / "docs" / "metrics.md").read_text(encoding="utf-8")
    found = {name: kind for name, kind in DOC_ROW.findall(text)}
    return {**PENDING_METRICS, **found}


def base_metric(name: str, metrics: dict[str, str]) -> str:
    """A histogram's series (_bucket, _sum, _count) belong to the histogram."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and metrics.get(base) == "histogram":
            return base
    return name


def used_metrics(expr: str, metrics: dict[str, str]) -> set[str]:
    return {base_metric(m, metrics) for m in METRIC.findall(expr)}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"`", "", match.group(1)).lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


# --- alert rules ---------------------------------------------------------------------------


def check_alerts(repo: Path, chart_dir: Path, metrics: dict[str, str], report: Reporter) -> list[Any] | None:
    """Static checks of the alert rules; returns their groups (None when they do not load)."""
    path = repo / "deploy" / "prometheus" / "imapgate-alerts.yaml"
    where = str(path.relative_to(repo))
    try:
        text = path.read_text(encoding="utf-8")
        rules_file = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        report.fail(where, f"does not load: {err}")
        return None
    groups = rules_file.get("groups") if isinstance(rules_file, dict) else None
    if not report.check(isinstance(groups, list) and bool(groups), where, "has no groups"):
        return None

    # The chart's PrometheusRule is a template; check_monitoring compares its rendering with these
    # groups.
    report.check(
        not (chart_dir / "files" / "alerts.yaml").exists(),
        os.path.relpath(chart_dir / "files" / "alerts.yaml", repo),
        "is no longer used: templates/prometheusrule.yaml renders the rules",
    )

    operations = repo / "docs" / "operations.md"
    anchors = github_anchors(operations.read_text(encoding="utf-8")) if operations.is_file() else set()
    report.check(operations.is_file(), "docs/operations.md", "is missing (the alerts' runbooks)")
    names = []
    for group in groups:
        for rule in group.get("rules", []):
            if "alert" not in rule:
                continue
            name = rule["alert"]
            names.append(name)
            here = f"{where}: {name}"
            report.check(
                rule.get("labels", {}).get("severity") in SEVERITIES, here, f"severity must be one of {SEVERITIES}"
            )
            annotations = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                report.check(bool(annotations.get(key)), here, f"needs a {key} annotation")
            report.check("runbook" not in annotations, here, "the runbook's annotation is runbook_url")
            runbook = RUNBOOK.match(str(annotations.get("runbook_url", "")))
            if report.check(bool(runbook), here, f"runbook_url must be {RUNBOOK_BASE}#<section>"):
                report.check(
                    runbook.group(1) in anchors,  # type: ignore[union-attr]
                    here,
                    f"runbook section #{runbook.group(1)} is not a heading of docs/operations.md",  # type: ignore[union-attr]
                )
            for metric in sorted(used_metrics(str(rule.get("expr", "")), metrics)):
                report.check(metric in metrics, here, f"uses {metric}, which docs/metrics.md does not list")
    report.check(len(names) == len(set(names)), where, "alert names must be unique")
    check_alert_tests(repo, set(names), report)
    return groups


def check_alert_tests(repo: Path, alerts: set[str], report: Reporter) -> None:
    path = repo / "deploy" / "prometheus" / "imapgate-alerts.test.yaml"
    where = str(path.relative_to(repo))
    try:
        tests = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        report.fail(where, f"does not load: {err}")
        return
    report.check(tests.get("rule_files") == ["imapgate-alerts.yaml"], where, "must test imapgate-alerts.yaml")
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests.get("tests", []):
        for test in case.get("alert_rule_test", []):
            (fires if test.get("exp_alerts") else quiet).add(test.get("alertname"))
    for name in sorted(alerts):
        report.check(name in fires, where, f"no case where {name} fires")
        report.check(name in quiet, where, f"no case where {name} stays quiet")
    for name in sorted((fires | quiet) - alerts):
        report.fail(where, f"tests {name}, which the rules do not define")


def check_alerts_with_promtool(repo: Path, promtool: str, report: Reporter) -> None:
    directory = repo / "deploy" / "prometheus"
    status, out = run([promtool, "check", "rules", str(directory / "imapgate-alerts.yaml")], timeout=120)
    report.check(status == 0, "promtool check rules imapgate-alerts.yaml", out)
    # promtool resolves rule_files relative to the test file.
    status, out = run([promtool, "test", "rules", str(directory / "imapgate-alerts.test.yaml")], timeout=300)
    report.check(status == 0, "promtool test rules imapgate-alerts.test.yaml", out)


# --- dashboard -----------------------------------------------------------------------------


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel, rows' panels included."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def check_dashboard(
    repo: Path, chart_dir: Path, metrics: dict[str, str], promtool: str | None, report: Reporter
) -> None:
    path = repo / "deploy" / "grafana" / "imapgate-dashboard.json"
    where = str(path.relative_to(repo))
    try:
        text = path.read_text(encoding="utf-8")
        dashboard = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        report.fail(where, f"does not load: {err}")
        return
    # The chart ships the same file for its dashboard ConfigMap (grafanaDashboard.enabled).
    copy = chart_dir / "files" / "imapgate-dashboard.json"
    copy_name = os.path.relpath(copy, repo)
    report.check(
        copy.is_file() and copy.read_text(encoding="utf-8") == text,
        copy_name,
        f"must be identical to {where} (cp {where} {copy_name})",
    )
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    report.check(
        source.get("type") == "datasource" and source.get("query") == "prometheus",
        where,
        "needs a template variable 'datasource' of type datasource (prometheus)",
    )
    report.check(bool(dashboard.get("uid")) and bool(dashboard.get("title")), where, "needs a uid and a title")
    ids: list[int] = []
    wanted = {"type": "prometheus", "uid": "${datasource}"}

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel.get("id"))
            report.check("gridPos" in panel, where, f"panel {panel.get('title')!r} has no gridPos")
            if panel.get("type") != "row":
                report.check(
                    panel.get("datasource") == wanted, where, f"panel {panel.get('title')!r} must use ${{datasource}}"
                )
                report.check(bool(panel.get("targets")), where, f"panel {panel.get('title')!r} has no query")
            for target in panel.get("targets", []):
                report.check(
                    target.get("datasource") == wanted,
                    where,
                    f"a query of panel {panel.get('title')!r} must use ${{datasource}}",
                )
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    report.check(len(ids) == len(set(ids)) and None not in ids, where, "panel ids must be present and unique")

    exprs = dashboard_exprs(dashboard)
    shown: set[str] = set()
    for title, expr in exprs:
        for metric in used_metrics(expr, metrics):
            report.check(
                metric in metrics, where, f"panel {title!r} uses {metric}, which docs/metrics.md does not list"
            )
            shown.add(metric)
    for metric in sorted(set(metrics) - shown):
        report.fail(where, f"no panel shows {metric}")

    if promtool:
        # The queries' syntax: each becomes a recording rule, with Grafana's variables replaced.
        rules = []
        for index, (_title, expr) in enumerate(exprs):
            concrete = (
                expr.replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$job", ".*")
                .replace("$instance", ".*")
            )
            rules.append({"record": f"dashboard:query_{index}", "expr": concrete})
        with tempfile.TemporaryDirectory() as tmp:
            rule_file = Path(tmp) / "dashboard-queries.yaml"
            rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
            status, out = run([promtool, "check", "rules", str(rule_file)], timeout=120)
        report.check(status == 0, f"promtool check rules ({where} queries)", out)


# --- systemd unit and Dockerfile -----------------------------------------------------------


# Directive -> the value it must have (or one of its values, for directives given more than once).
UNIT_HARDENING: dict[str, str] = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "StateDirectory": "imapgate",
    "ConfigurationDirectory": "imapgate",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "UMask": "0077",
    # sd_notify: READY=1 once serving, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 (server::notify).
    "Type": "notify",
    "NotifyAccess": "main",
}


def check_systemd_unit(repo: Path, systemd_analyze: str | None, imapgate: Path | None, report: Reporter) -> None:
    path = repo / "deploy" / "systemd" / "imapgate.service"
    where = str(path.relative_to(repo))
    directives: dict[str, list[str]] = {}
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            directives.setdefault(match.group(1), []).append(match.group(2).strip())
    for key, value in UNIT_HARDENING.items():
        report.check(value in directives.get(key, []), where, f"must set {key}={value}")
    report.check(
        "User" in directives and "Group" not in directives, where, "the dynamic user needs User= and no static Group="
    )
    if systemd_analyze:
        # ExecStart must name an existing executable for verify; the real path is an install-time fact.
        binary = imapgate if imapgate and imapgate.is_file() else Path("/bin/true")
        with tempfile.TemporaryDirectory() as tmp:
            unit = Path(tmp) / "imapgate.service"
            unit.write_text(text.replace("/usr/local/bin/imapgate", str(binary)), encoding="utf-8")
            status, out = run([systemd_analyze, "verify", str(unit)], timeout=120)
        report.check(status == 0 and not out.strip(), f"systemd-analyze verify {where}", out or f"exit {status}")


# Base images: <image>:<tag>@sha256:<64 hex>, the tag also on a "# tag:" line just above.
PINNED_IMAGE = re.compile(r"^(?P<image>[^\s@]+:[^\s@:/]+)@sha256:[0-9a-f]{64}$")
FROM_LINE = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(?P<ref>\S+)(?:\s+AS\s+(?P<stage>\S+))?\s*$", re.IGNORECASE)
ARG_IMAGE = re.compile(r"^ARG\s+(?P<name>[A-Za-z0-9_]*_IMAGE)(?:=(?P<default>\S*))?\s*$", re.IGNORECASE)
ARG_REF = re.compile(r"^\$\{?(?P<name>[A-Za-z0-9_]+)\}?$")
TAG_LINE = re.compile(r"^#\s*tag:\s*(?P<image>\S+)\s*$")
# The Dockerfile as it was before the base images were pinned: the pin check must refuse it.
UNPINNED_SAMPLE = """ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
FROM ${RUST_IMAGE} AS build
FROM ${RUNTIME_IMAGE}
"""


def image_pin_problems(text: str) -> list[str]:
    """Every base image of a Dockerfile that is not pinned by digest under a "# tag:" line."""
    lines = [l.strip() for l in text.splitlines()]
    problems: list[str] = []
    stages: set[str] = set()
    pinned_args: set[str] = set()
    seen_from = False

    def tags_above(index: int) -> set[str]:
        tags = set()
        i = index - 1
        while i >= 0 and lines[i].startswith("#"):
            match = TAG_LINE.match(lines[i])
            if match:
                tags.add(match.group("image"))
            i -= 1
        return tags

    def pinned(ref: str, index: int, what: str) -> bool:
        match = PINNED_IMAGE.match(ref)
        if not match:
            problems.append(f"line {index + 1}: {what} {ref!r} is not pinned as <image>:<tag>@sha256:<64 hex>")
            return False
        if match.group("image") not in tags_above(index):
            problems.append(f"line {index + 1}: {what} needs a '# tag: {match.group('image')}' comment line above it")
            return False
        return True

    for index, line in enumerate(lines):
        arg = ARG_IMAGE.match(line)
        if arg and not seen_from:
            name, default = arg.group("name"), arg.group("default")
            if default and pinned(default, index, f"ARG {name} default"):
                pinned_args.add(name)
            elif not default:
                problems.append(f"line {index + 1}: ARG {name} has no pinned default")
            continue
        found = FROM_LINE.match(line)
        if not found:
            continue
        seen_from = True
        ref = found.group("ref")
        variable = ARG_REF.match(ref)
        if ref.lower() == "scratch" or ref in stages:
            pass
        elif variable:
            name = variable.group("name")
            if name not in pinned_args:
                problems.append(f"line {index + 1}: FROM {ref} needs a global ARG {name} with a pinned default")
        else:
            pinned(ref, index, "FROM")
        if found.group("stage"):
            stages.add(found.group("stage"))
    return problems


def check_pin_script(repo: Path, report: Reporter) -> None:
    """scripts/pin-images.sh against a copy of the Dockerfile, with a stand-in `crane` that gives a
    new digest for the Rust image and the pinned one for the runtime image."""
    script = repo / "scripts" / "pin-images.sh"
    where = "scripts/pin-images.sh"
    if not report.check(script.is_file(), where, "is missing"):
        return
    original = (repo / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    refs = re.findall(r"^FROM\s+(\S+@sha256:[0-9a-f]{64})", original, re.MULTILINE)
    if not report.check(len(refs) >= 2, where, "self-test needs two pinned FROM lines in deploy/Dockerfile"):
        return
    stale, current = refs[0], refs[-1]
    new_digest = "sha256:" + "0123456789abcdef" * 4
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp) / "bin"
        bin_dir.mkdir()
        crane = bin_dir / "crane"
        crane.write_text(
            "#!/bin/sh\n"
            '[ "$1" = digest ] || exit 1\n'
            f'[ "$2" = "{stale.split("@")[0]}" ] && {{ echo {new_digest}; exit 0; }}\n'
            f'[ "$2" = "{current.split("@")[0]}" ] && {{ echo {current.split("@")[1]}; exit 0; }}\n'
            "exit 1\n",
            encoding="utf-8",
        )
        crane.chmod(0o755)
        copy = Path(tmp) / "Dockerfile"
        copy.write_text(original, encoding="utf-8")
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PIN_IMAGES_TOOL="crane")
        status, out = run(["bash", str(script), "--check", str(copy)], timeout=60, env=env)
        report.check(status == 1, where, f"--check must exit 1 on a stale pin (exit {status}): {out}")
        status, out = run(["bash", str(script), str(copy)], timeout=60, env=env)
        text = copy.read_text(encoding="utf-8")
        report.check(
            status == 0 and f"{stale.split('@')[0]}@{new_digest}" in text and current in text,
            where,
            f"did not rewrite the stale digest and keep the current one (exit {status}): {out}",
        )
        report.check(not image_pin_problems(text), where, f"left the pins unchecked: {image_pin_problems(text)}")
        status, out = run(["bash", str(script), "--check", str(copy)], timeout=60, env=env)
        report.check(status == 0, where, f"--check must exit 0 once the pins are current (exit {status}): {out}")
        env["PIN_IMAGES_TOOL"] = "none"
        status, out = run(["bash", str(script), str(copy)], timeout=60, env=env)
        report.check(
            status == 2 and copy.read_text(encoding="utf-8") == text,
            where,
            f"without a registry client it must exit 2 and change nothing (exit {status}): {out}",
        )


def check_dockerfile(repo: Path, checkov: Path | None, report: Reporter) -> None:
    path = repo / "deploy" / "Dockerfile"
    where = str(path.relative_to(repo))
    text = path.read_text(encoding="utf-8")
    lines = [l.strip() for l in text.splitlines()]
    # A check that cannot fail is a defect: the unpinned shape must be refused first.
    report.check(
        len(image_pin_problems(UNPINNED_SAMPLE)) == 4,
        "check_deploy self-test",
        f"the pin check must refuse every unpinned base image: {image_pin_problems(UNPINNED_SAMPLE)}",
    )
    for problem in image_pin_problems(text):
        report.fail(where, problem)
    report.check(
        re.search(r"^\s*cargo auditable build --release --locked\b", text, re.MULTILINE) is not None
        and re.search(r"^\s*cargo build\b", text, re.MULTILINE) is None,
        where,
        "the binary must be built with `cargo auditable build --release --locked` (its dependency list in .dep-v0)",
    )
    report.check(
        re.search(r"cargo install cargo-auditable --locked --version \S+", text) is not None,
        where,
        "cargo-auditable must be installed with --locked and a pinned --version",
    )
    check_pin_script(repo, report)
    # docs/operations.md says how to build, sign and publish what this Dockerfile builds.
    operations = repo / "docs" / "operations.md"
    guide = operations.read_text(encoding="utf-8") if operations.is_file() else ""
    report.check(
        "build-sign-and-publish" in github_anchors(guide),
        "docs/operations.md",
        "needs a section 'Build, sign and publish'",
    )
    for needed in ("buildx build", "scripts/sbom.sh", "scripts/pin-images.sh", "cosign sign", "cosign verify",
                   "cosign attest --yes --type cyclonedx", "helm package", "helm push", "helm install mail oci://",
                   "cargo audit bin"):
        report.check(needed in guide, "docs/operations.md", f"'Build, sign and publish' must show `{needed}`")
    stages = [l for l in lines if l.upper().startswith("FROM ")]
    report.check(len(stages) >= 2, where, "must be multi-stage (build and runtime)")
    last = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
    users = [l.split(None, 1)[1] for l in lines[last:] if l.upper().startswith("USER ")]
    report.check(
        bool(users) and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]) is not None,
        where,
        "the runtime stage must run as a numeric non-root USER",
    )
    report.check(
        any(l.startswith('ENTRYPOINT ["') for l in lines[last:]), where, "ENTRYPOINT must be exec form (no shell)"
    )
    if checkov:
        findings, problem = run_checkov(checkov, path, "dockerfile")
        if report.check(problem is None, f"checkov {where}", problem or ""):
            for check_id, resource in findings:
                report.fail(
                    f"checkov {where}",
                    f"{check_id} fails for {resource} (fix it, or skip it in the Dockerfile with a reason)",
                )


def run_checkov(checkov: Path, target: Path, framework: str) -> tuple[list[tuple[str, str]], str | None]:
    """Runs checkov on one file without any network access; ([(check id, resource)], problem)."""
    env = dict(os.environ)
    env.update(
        {
            # Never ask Prisma Cloud for its policy metadata, nor PyPI for a newer checkov ...
            "BC_SKIP_MAPPING": "TRUE",
            "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE",
            # ... and if anything still tried, send it to a closed port on this machine.
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9",
            "NO_PROXY": "",
            "no_proxy": "",
        }
    )
    status, out = run(
        [
            str(checkov),
            "-f",
            str(target),
            "--framework",
            framework,
            "--skip-download",
            "--quiet",
            "--compact",
            "-o",
            "json",
        ],
        timeout=300,
        env=env,
    )
    start = out.find("{") if out.lstrip().startswith("{") else out.find("[")
    try:
        result = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        return [], f"exit {status}, no JSON report: {out[-2000:]}"
    reports = result if isinstance(result, list) else [result]
    findings = []
    for item in reports:
        summary = item.get("summary", {})
        if summary.get("parsing_errors"):
            return [], f"{summary['parsing_errors']} parsing error(s)"
        if item.get("check_type") not in (None, framework):
            continue
        for failed in item.get("results", {}).get("failed_checks", []):
            findings.append((failed.get("check_id", "?"), failed.get("resource", "?")))
    if not findings and status not in (0, 1):
        return [], f"exit {status}: {out[-2000:]}"
    return findings, None


def check_deploy(
    repo: Path,
    chart_dir: Path,
    report: Reporter,
    promtool: str | None,
    systemd_analyze: str | None,
    checkov: Path | None,
    imapgate: Path | None,
) -> list[Any] | None:
    """Runs every check of this module; returns the alert groups (for the PrometheusRule check)."""
    metrics = documented_metrics(repo)
    groups = check_alerts(repo, chart_dir, metrics, report)
    if promtool:
        check_alerts_with_promtool(repo, promtool, report)
    check_dashboard(repo, chart_dir, metrics, promtool, report)
    check_systemd_unit(repo, systemd_analyze, imapgate, report)
    check_dockerfile(repo, checkov, report)
    check_store_docs(repo, report)
    check_test_script(repo, report)
    return groups


# --- the credential store's documentation ---------------------------------------------------

# docs/store.md's sections (GitHub anchors), each a question an operator comes with.
STORE_SECTIONS = (
    "which-backend",
    "configuration",
    "migrations",
    "moving-between-backends-bulk-creation",
    "backup-and-restore",
    "when-the-database-cannot-be-reached",
    "the-change-log-how-a-revocation-reaches-every-replica",
    "security",
    "admin-api",
)


def raw_struct_fields(source: str, name: str) -> list[str]:
    """The field names of `struct NAME { ... }` in a Rust source (the config's raw structs)."""
    match = re.search(r"struct " + re.escape(name) + r" \{(.*?)\n\}", source, re.DOTALL)
    return re.findall(r"^\s*pub (\w+):", match.group(1), re.MULTILINE) if match else []


def check_store_docs(repo: Path, report: Reporter) -> None:
    where = "docs/store.md"
    path = repo / "docs" / "store.md"
    if not report.check(path.is_file(), where, "is missing (backends, migrations, backup and restore, revocation)"):
        return
    text = path.read_text(encoding="utf-8")
    anchors = github_anchors(text)
    for section in STORE_SECTIONS:
        report.check(section in anchors, where, f"needs the section #{section}")
    admin_api = text.split("## Admin API", 1)[-1]
    report.check("(api.md)" in admin_api, where, "the Admin API section must point to docs/api.md")
    # Every key of auth.store, as the raw config structs spell it.
    raw = (repo / "src" / "config" / "raw.rs").read_text(encoding="utf-8")
    keys = {
        "Store": raw_struct_fields(raw, "Store"),
        "Sqlite": raw_struct_fields(raw, "Sqlite"),
        "Postgres": raw_struct_fields(raw, "Postgres"),
    }
    report.check(all(keys.values()), where, f"cannot find auth.store's raw structs in src/config/raw.rs: {keys}")
    for struct, fields in keys.items():
        for field in fields:
            report.check(f"{field}:" in text or f"`{field}`" in text, where, f"does not document {struct}.{field}")
    for needed in ("imapgate migrate", "imapgate users export", "imapgate users import", "--csv", ".backup",
                   "VACUUM INTO", "pg_dump", "pg_restore", "fail_closed", "0600"):  # fmt: skip
        report.check(needed in text, where, f"must cover `{needed}`")
    for doc in ("README.md", "docs/operations.md"):
        linked = (repo / doc).read_text(encoding="utf-8")
        report.check("store.md" in linked, doc, "must link docs/store.md")
    operations = (repo / "docs" / "operations.md").read_text(encoding="utf-8")
    for needed in ("kubectl -n mail port-forward deployment/mail-imapgate 9190",
                   "--admin http://127.0.0.1:9190 --token-file admin.token", "imapgate users add alice@example.org $ADMIN",
                   "apiVersion: postgresql.cnpg.io/v1", "kind: Cluster", "backend: postgres"):  # fmt: skip
        report.check(needed in operations, "docs/operations.md", f"the Helm install must show `{needed}`")


# --- scripts/test.sh: the packages the tests need ------------------------------------------


def check_test_script(repo: Path, report: Reporter) -> None:
    where = "scripts/test.sh"
    text = (repo / "scripts" / "test.sh").read_text(encoding="utf-8")
    packages = re.search(r"^SYSTEM_PACKAGES=\((.*?)^\)", text, re.DOTALL | re.MULTILINE)
    specs = re.findall(r"^\s*'?([a-z0-9.+-]+(?::[^\s']+)?)'?", packages.group(1), re.MULTILINE) if packages else []
    postgres = [spec for spec in specs if spec.split(":", 1)[0] == "postgresql"]
    # tests/gateway/pg.rs runs initdb and postgres from /usr/lib/postgresql/VERSION/bin.
    report.check(
        postgres == ["postgresql:/usr/lib/postgresql/*/bin/postgres"],
        where,
        "SYSTEM_PACKAGES must install Debian's postgresql, present when /usr/lib/postgresql/*/bin/postgres "
        f"exists (found {postgres})",
    )
    loop = re.search(r'^for service in ([^;]+); do\n\s+case " \$ENSURE_PACKAGES_INSTALLED', text, re.MULTILINE)
    report.check(
        loop is not None and "postgresql" in loop.group(1).split(),
        where,
        "must keep the postgresql package's boot service disabled, like redis-server's",
    )
    # ensure_packages, with dpkg saying nothing is installed and as_root recording instead of running.
    with tempfile.TemporaryDirectory(prefix="check-ensure-") as tmp:
        root = Path(tmp)
        stubs = root / "bin"
        stubs.mkdir()
        for tool in ("dpkg-query", "apt-get"):
            (stubs / tool).write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
            (stubs / tool).chmod(0o755)
        server = root / "lib" / "postgresql" / "15" / "bin" / "postgres"
        script = (
            f". '{repo / 'scripts' / 'lib' / 'common.sh'}'\n"
            'as_root() { printf "%s\\n" "$*" >>"$CALLS"; }\n'
            'ensure_packages "stand-in-postgresql:$LIB/*/bin/postgres" >/dev/null 2>&1\n'
            'printf "installed=%s\\n" "$ENSURE_PACKAGES_INSTALLED"\n'
        )
        outcomes = {}
        for present in (True, False):
            if present:
                server.parent.mkdir(parents=True)
                server.write_text("#!/bin/sh\n", encoding="utf-8")
                server.chmod(0o755)
            else:
                server.unlink()
            calls = root / f"calls-{present}"
            env = dict(os.environ, PATH=f"{stubs}:{os.environ.get('PATH', '')}", CALLS=str(calls),
                       LIB=str(root / "lib" / "postgresql"))  # fmt: skip
            rc, out = run(["bash", "-c", script], timeout=60, env=env)
            installed = calls.read_text(encoding="utf-8") if calls.exists() else ""
            outcomes[present] = (rc, out.strip(), "stand-in-postgresql" in installed)
        report.check(
            outcomes[True] == (0, "installed=", False),
            "scripts/lib/common.sh",
            "ensure_packages must count a package present when its globbed check path matches an executable: "
            f"{outcomes[True]}",
        )
        report.check(
            outcomes[False][2],
            "scripts/lib/common.sh",
            f"ensure_packages must install a package whose globbed check path matches nothing: {outcomes[False]}",
        )
