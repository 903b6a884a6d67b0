"""Checks of the chart's monitoring objects: the Grafana dashboard ConfigMap (grafanaDashboard) and
the PrometheusRule (prometheusRule). Used by scripts/check_chart.py, which adds these value sets
to its own: BAD_VALUES (the schema must refuse each), VARIANTS (rendered, or refused with
FAILURE_MESSAGES), and Checks.pairs (what each render must hold).

  * The dashboard ConfigMap carries files/imapgate-dashboard.json byte for byte (that file is
    deploy/grafana/imapgate-dashboard.json: check_deploy.py), the sidecar's label (key and value
    as set), the folder annotation when a folder is set, and the namespace asked for.
  * The PrometheusRule renders, with the default values and deploy/'s job as targetSelector,
    exactly the groups of deploy/prometheus/imapgate-alerts.yaml (the file promtool's unit tests
    cover); with the ServiceMonitor's job, the same but for the up selector; with other values,
    the thresholds, for: durations, labels, switches, up selector and runbook address asked for,
    and nothing else changed. Without a ServiceMonitor or targetSelector, the target alerts are
    refused. Every PrometheusRule any variant renders passes `promtool check rules`
    (when promtool is on PATH), and each runbook_url ends in its alert's section of
    docs/operations.md.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import check_deploy
import yaml

Docs = list[dict[str, Any]]
Pairs = list[tuple[bool, str]]

DASHBOARD_COMPONENT = "grafana-dashboard"
DASHBOARD_KEY = "imapgate-dashboard.json"


def is_dashboard_config_map(doc: dict[str, Any]) -> bool:
    """The dashboard ConfigMap (not the gateway's configuration)."""
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    return doc.get("kind") == "ConfigMap" and labels.get("app.kubernetes.io/component") == DASHBOARD_COMPONENT


def dashboards(docs: Docs) -> Docs:
    return [d for d in docs if is_dashboard_config_map(d)]


def rule_groups(docs: Docs) -> list[Any] | None:
    found = [d for d in docs if d.get("kind") == "PrometheusRule"]
    return found[0].get("spec", {}).get("groups") if len(found) == 1 else None


def rules(docs: Docs) -> dict[str, dict[str, Any]]:
    """alert name -> rule, of the one PrometheusRule."""
    return {r["alert"]: r for g in rule_groups(docs) or [] for r in g.get("rules", []) if "alert" in r}


# Values the schema must refuse.
BAD_VALUES: list[tuple[str, Any]] = [
    ("grafanaDashboard.enabled", "true"),
    ("grafanaDashboard.enable", True),
    ("grafanaDashboard.labelValue", 1),
    ("grafanaDashboard.labelValue", "a value"),
    ("grafanaDashboard.label", "grafana dashboard"),
    ("grafanaDashboard.label", "-dashboard"),
    ("grafanaDashboard.labels", {"grafana_dashboard": 1}),
    ("grafanaDashboard.namespace", "Monitoring"),
    ("grafanaDashboard.folder", "../../etc"),
    ("grafanaDashboard.folder", "/var/lib/grafana"),
    ("grafanaDashboard.folderAnnotation", "grafana folder"),
    ("grafanaDashboard.annotations", {"grafana_folder": 1}),
    ("prometheusRule.runbookBaseUrl", "docs/operations.md"),
    ("prometheusRule.runbookBaseUrl", "https://wiki.example.org/imapgate#alerts"),
    ("prometheusRule.runbookBaseUrl", ""),
    ("prometheusRule.alertLabels", {"team": 1}),
    ("prometheusRule.alertLabels", {"team-name": "mail"}),
    ("prometheusRule.alerts.ImapgateBackendDow", {"enabled": False}),
    ("prometheusRule.alerts.ImapgateBackendDown.enabled", "false"),
    ("prometheusRule.alerts.ImapgateBackendDown.for", "5 minutes"),
    ("prometheusRule.alerts.ImapgateBackendDown.for", 300),
    ("prometheusRule.alerts.ImapgateBackendDown.threshold", 1),
    # severity: null in a values file deletes it; the schema sees labels without it.
    ("prometheusRule.alerts.ImapgateBackendDown.labels", {"team": "mail"}),
    ("prometheusRule.alerts.ImapgateBackendDown.labels", {"severity": ""}),
    ("prometheusRule.alerts.ImapgateBackendDown.labels", {"severity": "critical", "pager": True}),
    ("prometheusRule.alerts.ImapgateAuthFailureSpike.failureRatio", 50),
    ("prometheusRule.alerts.ImapgateAuthFailureSpike.failureRatio", 0),
    ("prometheusRule.alerts.ImapgateAuthFailureSpike.failureRatio", "0.5"),
    ("prometheusRule.alerts.ImapgateAuthFailureSpike.minFailuresPerMinute", -1),
    ("prometheusRule.alerts.ImapgateAccountInAttackMode.accountsAbove", 0.5),
    ("prometheusRule.alerts.ImapgateCertificateExpiringSoon.daysLeft", 0),
    ("prometheusRule.alerts.ImapgateCertificateExpiryImminent.daysLeft", "3d"),
    ("prometheusRule.alerts.ImapgateConnectionsSaturated.usedRatio", 1.2),
    ("prometheusRule.alerts.ImapgateConnectionsSaturated.usedRatio", 80),
    ("prometheusRule.alerts.ImapgateTLSHandshakeFailures.failureRatio", 0),
    ("prometheusRule.alerts.ImapgateTLSHandshakeFailures.minFailuresPerMinute", "1"),
    ("prometheusRule.alerts.ImapgateTargetAbsent", {"enabled": False}),
    ("prometheusRule.targetSelector", "job=imapgate"),
    ("prometheusRule.targetSelector", 'up{job="imapgate"}'),
    ("prometheusRule.targetSelector", 'job="imapgate"} or vector(1) or up{'),
]

DASHBOARD_DEFAULTS = "Grafana dashboard with its defaults"
DASHBOARD_TUNED = "Grafana dashboard in the monitoring namespace, own label, folder"
RULE_DEFAULTS = "PrometheusRule with its defaults and deploy/'s job: deploy/'s rules"
RULE_SERVICE_MONITOR = "PrometheusRule and ServiceMonitor with their defaults"
RULE_NO_JOB = "PrometheusRule without ServiceMonitor or targetSelector"
RULE_NO_JOB_NO_TARGET_ALERTS = "PrometheusRule without ServiceMonitor, the target alerts off"
RULE_TUNED = "PrometheusRule with thresholds, for, labels, runbook address, two alerts off"
RULE_ALL_OFF = "PrometheusRule with every alert off"

# Every alert of prometheusRule.alerts, in the order of the rules.
ALERTS = [
    "ImapgatePasswordSpraying",
    "ImapgateAuthFailureSpike",
    "ImapgateAppPasswordLeaked",
    "ImapgateAppPasswordSuspect",
    "ImapgateAccountInAttackMode",
    "ImapgateBackendDown",
    "ImapgateCertificateExpiringSoon",
    "ImapgateCertificateExpiryImminent",
    "ImapgateReloadFailing",
    "ImapgateConfigRestartNeeded",
    "ImapgateStateStoreErrors",
    "ImapgateTargetDown",
    "ImapgateTargetAbsent",
    "ImapgateConnectionsSaturated",
    "ImapgateTLSHandshakeFailures",
    "ImapgateIdentityProviderUnreachable",
]

# deploy/'s rules select the gateway's up series with this; the chart's own ServiceMonitor makes
# CHART_SELECTOR (release mail in namespace mail).
DEPLOY_SELECTOR = 'job="imapgate"'
CHART_SELECTOR = 'namespace="mail", job="mail-imapgate-metrics"'
TUNED_SELECTOR = 'job="mail-gateway", env!="test"'

WIKI = "https://wiki.example.org/mail/imapgate-operations"
TUNED_ALERTS: dict[str, Any] = {
    "ImapgatePasswordSpraying": {"for": "5m", "labels": {"severity": "critical"}},
    "ImapgateAuthFailureSpike": {"failureRatio": 0.25, "minFailuresPerMinute": 3, "for": "30m"},
    "ImapgateAppPasswordLeaked": {"enabled": False},
    "ImapgateAccountInAttackMode": {"accountsAbove": 5},
    "ImapgateBackendDown": {"for": "0s", "labels": {"pager": "yes"}},
    "ImapgateCertificateExpiringSoon": {"daysLeft": 21},
    "ImapgateCertificateExpiryImminent": {"daysLeft": 7, "for": "1h"},
    "ImapgateConfigRestartNeeded": {"enabled": False},
    "ImapgateStateStoreErrors": {"for": "2m"},
    "ImapgateTargetDown": {"for": "2m"},
    "ImapgateConnectionsSaturated": {"usedRatio": 0.9},
    "ImapgateTLSHandshakeFailures": {"failureRatio": 0.3, "minFailuresPerMinute": 5},
    "ImapgateIdentityProviderUnreachable": {"labels": {"severity": "critical"}},
}

# (name, overrides, must_render), as check_chart.render_variants.
VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    (DASHBOARD_DEFAULTS, {"grafanaDashboard": {"enabled": True}}, True),
    (
        DASHBOARD_TUNED,
        {
            "grafanaDashboard": {
                "enabled": True,
                "namespace": "monitoring",
                "label": "example.org/dashboard",
                "labelValue": "imapgate",
                # Neither may replace the sidecar's label or the chart's own.
                "labels": {"team": "mail", "example.org/dashboard": "other", "app.kubernetes.io/component": "x"},
                "folder": "Mail/imapgate",
                "folderAnnotation": "grafana_folder",
                "annotations": {"example.org/owner": "mail-team"},
            }
        },
        True,
    ),
    (RULE_DEFAULTS, {"prometheusRule": {"enabled": True, "targetSelector": DEPLOY_SELECTOR}}, True),
    (RULE_SERVICE_MONITOR, {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}}, True),
    (RULE_NO_JOB, {"prometheusRule": {"enabled": True}}, False),
    (
        RULE_NO_JOB_NO_TARGET_ALERTS,
        {
            "prometheusRule": {
                "enabled": True,
                "alerts": {"ImapgateTargetDown": {"enabled": False}, "ImapgateTargetAbsent": {"enabled": False}},
            }
        },
        True,
    ),
    (
        RULE_TUNED,
        {
            "prometheusRule": {
                "enabled": True,
                "runbookBaseUrl": WIKI,
                "targetSelector": TUNED_SELECTOR,
                # severity here loses to each alert's own.
                "alertLabels": {"team": "mail", "severity": "page"},
                "alerts": TUNED_ALERTS,
            }
        },
        True,
    ),
    (
        RULE_ALL_OFF,
        {"prometheusRule": {"enabled": True, "alerts": {name: {"enabled": False} for name in ALERTS}}},
        False,
    ),
]

# What refusals among VARIANTS must say.
FAILURE_MESSAGES: dict[str, str | tuple[str, ...]] = {
    RULE_ALL_OFF: "every alert in prometheusRule.alerts is disabled",
    RULE_NO_JOB: (
        "serviceMonitor.enabled is false, so the chart cannot know its job",
        'Set prometheusRule.targetSelector to your scrape job\'s label matchers (e.g. job="imapgate")',
    ),
}


class Checks:
    """What each render must hold (pairs), for check_chart.check_rendering."""

    def __init__(
        self,
        repo: Path,
        chart_dir: Path,
        full_values: str,
        deploy_groups: list[Any] | None,
        promtool: str | None,
        tmp: Path,
    ) -> None:
        self.chart_dir = chart_dir
        self.promtool = promtool
        self.promtool_runs = 0
        self.tmp = tmp
        self.deploy_groups = deploy_groups or []
        self.deploy_rules = {r["alert"]: r for g in self.deploy_groups for r in g.get("rules", []) if "alert" in r}
        operations = repo / "docs" / "operations.md"
        markdown = operations.read_text(encoding="utf-8") if operations.is_file() else ""
        self.anchors = check_deploy.github_anchors(markdown)
        self.dashboard = (chart_dir / "files" / DASHBOARD_KEY).read_text(encoding="utf-8")
        self.by_name: dict[str, Callable[[Docs], Pairs]] = {
            "defaults": lambda d: [
                (not dashboards(d), "no dashboard ConfigMap by default"),
                (rule_groups(d) is None, "no PrometheusRule by default"),
            ],
            full_values: self.full_values,
            DASHBOARD_DEFAULTS: self.dashboard_defaults,
            DASHBOARD_TUNED: self.dashboard_tuned,
            RULE_DEFAULTS: lambda d: [
                (
                    rule_groups(d) == self.deploy_groups,
                    "with its default values the PrometheusRule's groups must equal "
                    "deploy/prometheus/imapgate-alerts.yaml's",
                ),
            ],
            RULE_SERVICE_MONITOR: lambda d: [
                (
                    rules(d).get("ImapgateTargetDown", {}).get("expr") == f"up{{{CHART_SELECTOR}}} == 0\n",
                    "the target alerts must select the ServiceMonitor's job in the release's namespace",
                ),
                *(
                    (
                        self.like_deploy(r, check_deploy.RUNBOOK_BASE, {}, CHART_SELECTOR) == self.deploy_rules.get(a),
                        f"{a}: besides the up selector, deploy/'s rule",
                    )
                    for a, r in rules(d).items()
                ),
                (list(rules(d)) == ALERTS, "every alert must render"),
            ],
            RULE_NO_JOB_NO_TARGET_ALERTS: lambda d: [
                (list(rules(d)) == [a for a in ALERTS if not a.startswith("ImapgateTarget")], "the target alerts are off"),
            ],
            RULE_TUNED: self.rule_tuned,
        }

    def pairs(self, name: str, docs: Docs) -> Pairs:
        found = self.every_rule(name, docs)
        return found + self.by_name.get(name, lambda _d: [])(docs)

    # the PrometheusRule ------------------------------------------------------------------

    def every_rule(self, name: str, docs: Docs) -> Pairs:
        """Any render's PrometheusRule: known alerts, runbook sections, promtool check rules."""
        groups = rule_groups(docs)
        if groups is None:
            return []
        found: Pairs = []
        for alert, rule in rules(docs).items():
            found.append((alert in self.deploy_rules, f"alert {alert} is not in deploy/prometheus/imapgate-alerts.yaml"))
            url = str(rule.get("annotations", {}).get("runbook_url", ""))
            anchor = url.rpartition("#")[2]
            found.append(
                (
                    anchor == alert.lower() and anchor in self.anchors,
                    f"{alert}: runbook_url {url} must end in #{alert.lower()}, a heading of docs/operations.md",
                )
            )
            found.append((bool(rule.get("labels", {}).get("severity")), f"{alert} needs a severity label"))
        if self.promtool:
            self.promtool_runs += 1
            target = self.tmp / f"prometheusrule-{self.promtool_runs}.yaml"
            target.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
            done = subprocess.run(
                [self.promtool, "check", "rules", str(target)], capture_output=True, text=True, check=False, timeout=120
            )
            found.append((done.returncode == 0, f"promtool check rules on the PrometheusRule: {done.stdout}{done.stderr}"))
        return found

    def like_deploy(
        self, rule: dict[str, Any], base: str, extra_labels: dict[str, str], selector: str
    ) -> dict[str, Any]:
        """The rendered rule as deploy/ would have it: runbook_url on RUNBOOK_BASE, without the
        labels the values added, DEPLOY_SELECTOR for the up series' selector."""
        out = copy.deepcopy(rule)
        wanted, given = f"up{{{DEPLOY_SELECTOR}}}", f"up{{{selector}}}"
        out["expr"] = str(out.get("expr", "")).replace(given, wanted)
        annotations = out.get("annotations", {})
        for key in ("summary", "description"):
            if key in annotations:
                annotations[key] = str(annotations[key]).replace(given, wanted)
        url = str(annotations.get("runbook_url", ""))
        if url.startswith(base + "#"):
            annotations["runbook_url"] = check_deploy.RUNBOOK_BASE + url[len(base) :]
        for key in extra_labels:
            if out.get("labels", {}).get(key) == extra_labels[key]:
                del out["labels"][key]
        return out

    def full_values(self, docs: Docs) -> Pairs:
        found = self.carries_the_dashboard(docs)
        found += [
            (self.one(docs).get("metadata", {}).get("namespace") == "monitoring", "the full values put the dashboard in monitoring"),
            (self.meta(docs, "annotations").get("k8s-sidecar-target-directory") == "Mail", "the full values set a folder"),
        ]
        rendered = rules(docs)
        found.append((list(rendered) == list(self.deploy_rules), "the full values render every alert"))
        for alert, rule in rendered.items():
            found.append((rule.get("labels", {}).get("team") == "mail", f"{alert}: alertLabels must render"))
            found.append(
                (
                    self.like_deploy(rule, check_deploy.RUNBOOK_BASE, {"team": "mail"}, CHART_SELECTOR)
                    == self.deploy_rules.get(alert),
                    f"{alert}: besides alertLabels, the full values render deploy/'s rule",
                )
            )
        return found

    def rule_tuned(self, docs: Docs) -> Pairs:
        rendered = rules(docs)
        off = [a for a, v in TUNED_ALERTS.items() if v.get("enabled") is False]
        on = [a for a in self.deploy_rules if a not in off]

        def expr(alert: str) -> str:
            return str(rendered.get(alert, {}).get("expr", ""))

        def text(alert: str) -> str:
            """The description, on one line."""
            return " ".join(str(rendered.get(alert, {}).get("annotations", {}).get("description", "")).split())

        def field(alert: str, key: str) -> Any:
            return rendered.get(alert, {}).get(key)

        up = f"up{{{TUNED_SELECTOR}}}"
        found: Pairs = [
            (list(rendered) == on, f"alerts switched off must not render: {list(rendered)}"),
            # for:, labels
            (field("ImapgatePasswordSpraying", "for") == "5m", "ImapgatePasswordSpraying: for must render"),
            (
                field("ImapgatePasswordSpraying", "labels") == {"severity": "critical", "team": "mail"},
                f"the alert's own severity wins over alertLabels: {field('ImapgatePasswordSpraying', 'labels')}",
            ),
            ("for" not in rendered.get("ImapgateBackendDown", {}), "for: 0s must leave for: out"),
            (
                field("ImapgateBackendDown", "labels") == {"severity": "critical", "pager": "yes", "team": "mail"},
                "an alert's labels must add to its severity and alertLabels",
            ),
            (
                field("ImapgateIdentityProviderUnreachable", "labels") == {"severity": "critical", "team": "mail"},
                "severity must be overridable",
            ),
            (field("ImapgateAuthFailureSpike", "for") == "30m", "ImapgateAuthFailureSpike: for must render"),
            (field("ImapgateCertificateExpiryImminent", "for") == "1h", "ImapgateCertificateExpiryImminent: for"),
            (
                field("ImapgateStateStoreErrors", "for") == "2m" and "for 2m." in text("ImapgateStateStoreErrors"),
                "ImapgateStateStoreErrors: for must render, also in the description",
            ),
            (
                field("ImapgateTargetDown", "for") == "2m" and "for 2m (up == 0)" in text("ImapgateTargetDown"),
                "ImapgateTargetDown: for must render, also in the description",
            ),
            # thresholds, in the expression and in the description
            (
                ") > 0.25\n" in expr("ImapgateAuthFailureSpike") and "* 60 > 3\n" in expr("ImapgateAuthFailureSpike"),
                "ImapgateAuthFailureSpike: failureRatio and minFailuresPerMinute must render",
            ),
            (
                "ratio of 0.25), at more than 3 failures a minute, for 30m." in text("ImapgateAuthFailureSpike"),
                "ImapgateAuthFailureSpike: the description must quote the thresholds and for",
            ),
            (expr("ImapgateAccountInAttackMode").rstrip().endswith("> 5"), "accountsAbove must render"),
            ("< 21 * 86400" in expr("ImapgateCertificateExpiringSoon"), "ImapgateCertificateExpiringSoon: daysLeft"),
            ("(less than 21 days)" in text("ImapgateCertificateExpiringSoon"), "the description must quote daysLeft"),
            ("< 7 * 86400" in expr("ImapgateCertificateExpiryImminent"), "ImapgateCertificateExpiryImminent: daysLeft"),
            (expr("ImapgateConnectionsSaturated").rstrip().endswith("> 0.9"), "usedRatio must render"),
            ("above a ratio of 0.9 of its" in text("ImapgateConnectionsSaturated"), "the description must quote usedRatio"),
            (
                ") > 0.3\n" in expr("ImapgateTLSHandshakeFailures") and "* 60 > 5\n" in expr("ImapgateTLSHandshakeFailures"),
                "ImapgateTLSHandshakeFailures: failureRatio and minFailuresPerMinute must render",
            ),
            (
                "ratio of 0.3), at more than 5 failure a minute" in text("ImapgateTLSHandshakeFailures"),
                "ImapgateTLSHandshakeFailures: the description must quote the thresholds",
            ),
            # targetSelector
            (expr("ImapgateTargetDown") == f"{up} == 0\n", "targetSelector must select the up series"),
            (
                expr("ImapgateTargetAbsent") == f"absent({up})\nor\nsum by (namespace, job) ({up}) == 0\n",
                f"ImapgateTargetAbsent: targetSelector must select the up series, not {expr('ImapgateTargetAbsent')!r}",
            ),
        ]
        for alert, rule in rendered.items():
            url = str(rule.get("annotations", {}).get("runbook_url", ""))
            found.append((url == f"{WIKI}#{alert.lower()}", f"{alert}: runbook_url must be on runbookBaseUrl, not {url}"))
            if alert not in TUNED_ALERTS:
                found.append(
                    (
                        self.like_deploy(rule, WIKI, {"team": "mail"}, TUNED_SELECTOR) == self.deploy_rules.get(alert),
                        f"{alert}: values that do not concern it must not change it",
                    )
                )
        return found

    # the dashboard ConfigMap ---------------------------------------------------------------

    @staticmethod
    def one(docs: Docs) -> dict[str, Any]:
        found = dashboards(docs)
        return found[0] if len(found) == 1 else {}

    def meta(self, docs: Docs, key: str) -> dict[str, Any]:
        return self.one(docs).get("metadata", {}).get(key) or {}

    def carries_the_dashboard(self, docs: Docs) -> Pairs:
        data = self.one(docs).get("data") or {}
        return [
            (len(dashboards(docs)) == 1, f"one dashboard ConfigMap, got {len(dashboards(docs))}"),
            (
                data.get(DASHBOARD_KEY) == self.dashboard,
                f"the ConfigMap's {DASHBOARD_KEY} must be files/{DASHBOARD_KEY} byte for byte",
            ),
            (list(data) == [DASHBOARD_KEY], f"the ConfigMap must hold only {DASHBOARD_KEY}"),
        ]

    def dashboard_defaults(self, d: Docs) -> Pairs:
        return [
            *self.carries_the_dashboard(d),
            (self.one(d).get("metadata", {}).get("name") == "mail-imapgate-dashboard", "the ConfigMap is <fullname>-dashboard"),
            (self.one(d).get("metadata", {}).get("namespace") == "mail", "the ConfigMap defaults to the release's namespace"),
            (self.meta(d, "labels").get("grafana_dashboard") == "1", 'the sidecar label must default to grafana_dashboard: "1"'),
            (self.meta(d, "labels").get("app.kubernetes.io/instance") == "mail", "the chart's labels must render"),
            (not self.meta(d, "annotations"), f"no folder, no annotations: none, not {self.meta(d, 'annotations')!r}"),
        ]

    def dashboard_tuned(self, d: Docs) -> Pairs:
        labels = self.meta(d, "labels")
        return [
            *self.carries_the_dashboard(d),
            (self.one(d).get("metadata", {}).get("namespace") == "monitoring", "grafanaDashboard.namespace must render"),
            (labels.get("example.org/dashboard") == "imapgate", "label and labelValue must render, over labels"),
            ("grafana_dashboard" not in labels, "another label key replaces grafana_dashboard"),
            (labels.get("team") == "mail", "grafanaDashboard.labels must render"),
            (
                labels.get("app.kubernetes.io/component") == DASHBOARD_COMPONENT,
                "grafanaDashboard.labels must not replace the chart's own labels",
            ),
            (
                self.meta(d, "annotations") == {"grafana_folder": "Mail/imapgate", "example.org/owner": "mail-team"},
                f"the folder annotation and annotations must render, not {self.meta(d, 'annotations')!r}",
            ),
        ]
