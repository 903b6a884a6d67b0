"""Checks of the chart's monitoring objects: the Grafana dashboard ConfigMap (grafanaDashboard).
Used by scripts/check_chart.py, which adds these value sets to its own: BAD_VALUES (the schema
must refuse each), VARIANTS (rendered, or refused with FAILURE_MESSAGES), and EXPECTATIONS (what
each variant must render).

  * The dashboard ConfigMap carries files/imapgate-dashboard.json byte for byte (that file is
    deploy/grafana/imapgate-dashboard.json: check_deploy.py), the sidecar's label (key and value
    as set), the folder annotation when a folder is set, and the namespace asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Docs = list[dict[str, Any]]

DASHBOARD_COMPONENT = "grafana-dashboard"
DASHBOARD_KEY = "imapgate-dashboard.json"


def is_dashboard_config_map(doc: dict[str, Any]) -> bool:
    """The dashboard ConfigMap (not the gateway's configuration)."""
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    return doc.get("kind") == "ConfigMap" and labels.get("app.kubernetes.io/component") == DASHBOARD_COMPONENT


def dashboards(docs: Docs) -> Docs:
    return [d for d in docs if is_dashboard_config_map(d)]


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
]

DASHBOARD_DEFAULTS = "Grafana dashboard with its defaults"
DASHBOARD_TUNED = "Grafana dashboard in the monitoring namespace, own label, folder"

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
]

# What refusals among VARIANTS must say.
FAILURE_MESSAGES: dict[str, str | tuple[str, ...]] = {}


def _dashboard_text(chart_dir: Path) -> str:
    return (chart_dir / "files" / DASHBOARD_KEY).read_text(encoding="utf-8")


def expectations(chart_dir: Path, full_values: str) -> dict[str, Callable[[Docs], list[tuple[bool, str]]]]:
    """What VARIANTS and some of check_chart's own (by name: "defaults", and full_values for
    ci/full-values.yaml) must render: (holds, message) pairs."""
    text = _dashboard_text(chart_dir)

    def one(docs: Docs) -> dict[str, Any]:
        found = dashboards(docs)
        return found[0] if len(found) == 1 else {}

    def meta(docs: Docs, key: str) -> dict[str, Any]:
        return one(docs).get("metadata", {}).get(key) or {}

    def carries_the_dashboard(docs: Docs) -> list[tuple[bool, str]]:
        return [
            (len(dashboards(docs)) == 1, f"one dashboard ConfigMap, got {len(dashboards(docs))}"),
            (
                (one(docs).get("data") or {}).get(DASHBOARD_KEY) == text,
                f"the ConfigMap's {DASHBOARD_KEY} must be files/{DASHBOARD_KEY} byte for byte",
            ),
            (
                list((one(docs).get("data") or {})) == [DASHBOARD_KEY],
                f"the ConfigMap must hold only {DASHBOARD_KEY}",
            ),
        ]

    return {
        "defaults": lambda d: [(not dashboards(d), "no dashboard ConfigMap by default")],
        full_values: lambda d: [
            *carries_the_dashboard(d),
            (one(d).get("metadata", {}).get("namespace") == "monitoring", "the full values put the dashboard in monitoring"),
            (meta(d, "annotations").get("k8s-sidecar-target-directory") == "Mail", "the full values set a folder"),
        ],
        DASHBOARD_DEFAULTS: lambda d: [
            *carries_the_dashboard(d),
            (one(d).get("metadata", {}).get("name") == "mail-imapgate-dashboard", "the ConfigMap is <fullname>-dashboard"),
            (one(d).get("metadata", {}).get("namespace") == "mail", "the ConfigMap defaults to the release's namespace"),
            (meta(d, "labels").get("grafana_dashboard") == "1", 'the sidecar label must default to grafana_dashboard: "1"'),
            (meta(d, "labels").get("app.kubernetes.io/instance") == "mail", "the chart's labels must render"),
            (not meta(d, "annotations"), f"no folder, no annotations: no annotations, not {meta(d, 'annotations')!r}"),
        ],
        DASHBOARD_TUNED: lambda d: [
            *carries_the_dashboard(d),
            (one(d).get("metadata", {}).get("namespace") == "monitoring", "grafanaDashboard.namespace must render"),
            (meta(d, "labels").get("example.org/dashboard") == "imapgate", "label and labelValue must render, over labels"),
            ("grafana_dashboard" not in meta(d, "labels"), "another label key replaces grafana_dashboard"),
            (meta(d, "labels").get("team") == "mail", "grafanaDashboard.labels must render"),
            (
                meta(d, "labels").get("app.kubernetes.io/component") == DASHBOARD_COMPONENT,
                "grafanaDashboard.labels must not replace the chart's own labels",
            ),
            (
                meta(d, "annotations") == {"grafana_folder": "Mail/imapgate", "example.org/owner": "mail-team"},
                f"the folder annotation and annotations must render, not {meta(d, 'annotations')!r}",
            ),
        ],
    }
