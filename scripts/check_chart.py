#!/usr/bin/env python3
"""Static and rendered checks for the imapgate Helm chart.

Run by scripts/check-chart.sh, which provides PyYAML and jsonschema in a venv. Exits 1 when any
check fails and prints every problem found, not just the first.

Static checks (always):
  * Chart.yaml has the fields Helm 3 needs (apiVersion v2, name = directory, SemVer version,
    appVersion, type application).
  * Every YAML file of the chart that is not a template parses; values.schema.json is a valid
    JSON Schema (draft-07) and values.yaml satisfies it.
  * The schema's constraints are real: a set of bad values (typos, weakened security settings,
    malformed durations) must each be rejected.
  * Templates: `{{`/`}}` and block/`end` pairs balance, every `include`/`template` name is
    defined, and every `.Values.a.b` path used exists in values.yaml.

Rendered checks (when a renderer is available: `helm` on PATH, or the helm-python-sdk module
when the caller asks for it): the chart renders with the default values and several variants;
the manifests carry the security settings the project promises; the rendered imapgate config
uses only keys that config/imapgate.example.yaml documents (or, for an option that is off by
default, documents in a commented-out entry); every file the config names (TLS, users file, TOTP
key ring, master passwords, CAs, admin token) is mounted into the container, read-only, and
Secret volumes other than CA certificates are not world-readable; variants render what they promise (MFA defaults, key ring
rotation, an unquoted `off`, the guard's defaults, PROXY protocol with trusted proxies); and
values that must be refused are refused, with the expected message where one is named.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
INCLUDE_REF = re.compile(r"\b(?:include|template)\s+\"([^\"]+)\"")
DEFINE = re.compile(r"^define\s+\"([^\"]+)\"")
BLOCK_OPENERS = ("if", "range", "with", "define", "block")
DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")


class Report:
    """Collects problems so one run shows all of them."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.passed = 0

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def check(self, ok: bool, where: str, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.fail(where, message)
        return ok


# --- static checks -------------------------------------------------------------------------


_PARSE_FAILED = object()
_parsed: dict[Path, Any] = {}


def load_yaml(path: Path, report: Report) -> Any:
    """Parses a YAML file once; a parse error is reported once and yields None."""
    if path not in _parsed:
        try:
            with path.open(encoding="utf-8") as handle:
                _parsed[path] = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError) as err:
            report.fail(str(path), f"does not parse as YAML: {err}")
            _parsed[path] = _PARSE_FAILED
    value = _parsed[path]
    return None if value is _PARSE_FAILED else value


def check_chart_yaml(chart_dir: Path, report: Report) -> None:
    where = str(chart_dir / "Chart.yaml")
    meta = load_yaml(chart_dir / "Chart.yaml", report)
    if not isinstance(meta, dict):
        report.fail(where, "is not a mapping")
        return
    report.check(meta.get("apiVersion") == "v2", where, "apiVersion must be v2 (Helm 3)")
    report.check(
        meta.get("name") == chart_dir.name,
        where,
        f"name {meta.get('name')!r} must equal the chart directory {chart_dir.name!r}",
    )
    version = str(meta.get("version", ""))
    report.check(bool(SEMVER.match(version)), where, f"version {version!r} is not SemVer 2")
    report.check(bool(meta.get("appVersion")), where, "appVersion is missing")
    report.check(
        isinstance(meta.get("appVersion"), str),
        where,
        "appVersion must be a quoted string (an unquoted 1.10 would become 1.1)",
    )
    report.check(meta.get("type", "application") == "application", where, "type must be application")
    report.check(bool(meta.get("description")), where, "description is missing")


def check_plain_yaml_files(chart_dir: Path, report: Report) -> None:
    templates = chart_dir / "templates"
    for path in sorted(chart_dir.rglob("*")):
        if not path.is_file() or templates in path.parents or path.suffix not in (".yaml", ".yml"):
            continue
        data = load_yaml(path, report)
        if _parsed.get(path) is not _PARSE_FAILED:
            report.check(data is not None, str(path), "is empty")


def load_schema(chart_dir: Path, report: Report) -> dict[str, Any] | None:
    path = chart_dir / "values.schema.json"
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        report.fail(str(path), f"does not parse as JSON: {err}")
        return None
    report.check(
        schema.get("$schema") == "http://json-schema.org/draft-07/schema#",
        str(path),
        "must declare $schema draft-07",
    )
    try:
        jsonschema.Draft7Validator.check_schema(schema)
        report.passed += 1
    except jsonschema.SchemaError as err:
        report.fail(str(path), f"is not a valid draft-07 schema: {err.message}")
        return None
    return schema


def schema_errors(schema: dict[str, Any], values: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    found = []
    for err in sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path) or "(top)"
        found.append(f"{path}: {err.message}")
    return found


def check_values_against_schema(chart_dir: Path, schema: dict[str, Any], values: Any, report: Report) -> None:
    where = str(chart_dir / "values.yaml")
    errors = schema_errors(schema, values)
    for error in errors:
        report.fail(where, f"violates values.schema.json at {error}")
    if not errors:
        report.passed += 1


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of data with the dotted path (list indexes as numbers) set to value."""
    out = copy.deepcopy(data)
    node: Any = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


# Values the schema must refuse: a typo, weakened security settings, malformed durations.
BAD_VALUES: list[tuple[str, Any]] = [
    ("replicaCoutn", 1),
    ("replicaCount", 0),
    ("containerSecurityContext.readOnlyRootFilesystem", False),
    ("containerSecurityContext.allowPrivilegeEscalation", True),
    ("containerSecurityContext.capabilities.drop", ["NET_RAW"]),
    ("containerSecurityContext.capabilities.add", ["NET_BIND_SERVICE"]),
    ("podSecurityContext.runAsNonRoot", False),
    ("listeners.imaps.containerPort", 993),
    ("tls.minVersion", "1.1"),
    ("limits.preauthIdleTimeout", "30 seconds"),
    ("limits.lineBytes", "8 KB"),
    ("backends.0.tls", "ssl"),
    ("backends.0.login", "plain"),
    ("backends.0.name", "Dovecot_1"),
    ("backends.0.masterPassword", "inline-secrets-are-refused"),
    ("backends.0.masterSeparator", '"'),
    ("backends.0.masterSeparator", "**"),
    ("auth.mfa.default", "yes"),
    ("auth.mfa.default", True),
    ("auth.mfa.codeDigits", 4),
    ("auth.mfa.unlockTtl", "12 hours"),
    ("auth.mfa.issuer", "Example:Mail"),
    ("auth.mfa.issuer", ""),
    ("auth.verifiedCacheTtl", "5 minutes"),
    ("auth.secretKeys.0.id", "key one"),
    ("auth.secretKeys.0.value", "inline-keys-are-refused"),
    ("auth.keysSecretName", "Bad_Name"),
    ("logging.level", "verbose"),
    ("shutdown.extraSeconds", 0),
    ("logging.audit", "/var/log/imapgate/audit.log"),
    ("listeners.imaps.proxyProtocol", "yes"),
    ("admin.tokenSecret", "Admin_Token"),
    ("admin.token", "inline-tokens-are-refused"),
    ("state.maxEntries", 10),
    ("guard.enfore", True),
    ("guard.enforce", "false"),
    ("guard.subnetV4", 33),
    ("guard.subnetV6", 16),
    ("guard.allow", "10.0.0.0/8"),
    ("guard.deny", ["bad.example.org"]),
    ("guard.trustedProxies", ["10.0.0.0/8 "]),
    ("guard.perIp.failures", 0),
    ("guard.perSubnet.per", "15 minutes"),
    ("guard.perAccount.failures", "10"),
    ("guard.perTokenIp.enforce", "no"),
    ("guard.spray.failures", 5),
    ("guard.knownGoodTtl", "30"),
    ("guard.tarpit.max", "15sec"),
    ("guard.maxDelayedPerIp", 0),
    ("guard.blockFor", "forever"),
]


def check_schema_rejects(schema: dict[str, Any], values: Any, report: Report) -> None:
    for dotted, bad in BAD_VALUES:
        candidate = set_path(values, dotted, bad)
        report.check(
            bool(schema_errors(schema, candidate)),
            "values.schema.json",
            f"accepts {dotted}={bad!r}, which it must refuse",
        )


def value_path_exists(values: Any, parts: list[str]) -> bool:
    node = values
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_templates(chart_dir: Path, values: Any, report: Report) -> None:
    templates = chart_dir / "templates"
    files = sorted(p for p in templates.rglob("*") if p.is_file())
    if not report.check(bool(files), str(templates), "has no templates"):
        return
    defined: set[str] = set()
    used: list[tuple[str, str]] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        where = str(path)
        opens, closes = text.count("{{"), text.count("}}")
        report.check(opens == closes, where, f"{opens} '{{{{' but {closes} '}}}}'")
        stack: list[str] = []
        for match in ACTION.finditer(text):
            action = match.group(1).strip()
            if action.startswith("/*"):
                report.check(action.endswith("*/"), where, f"unterminated comment: {action[:40]!r}")
                continue
            word = action.split(None, 1)[0] if action else ""
            line = text.count("\n", 0, match.start()) + 1
            if word in BLOCK_OPENERS:
                stack.append(f"{word} (line {line})")
            elif word == "end":
                if not stack:
                    report.fail(where, f"line {line}: 'end' without an open block")
                else:
                    stack.pop()
            define = DEFINE.match(action)
            if define:
                defined.add(define.group(1))
            for name in INCLUDE_REF.findall(action):
                used.append((where, name))
            for ref in VALUES_REF.findall(action):
                parts = ref.strip(".").split(".")
                report.check(
                    value_path_exists(values, parts),
                    where,
                    f"line {line}: .Values.{'.'.join(parts)} does not exist in values.yaml",
                )
        for block in stack:
            report.fail(where, f"block {block} has no 'end'")
    for where, name in used:
        report.check(name in defined, where, f"includes {name!r}, which no template defines")


# --- rendering -----------------------------------------------------------------------------


Renderer = Callable[[dict[str, Any]], "dict[str, str]"]


def helm_binary_renderer(chart_dir: Path, report: Report) -> Renderer | None:
    helm = shutil.which("helm")
    if helm is None:
        return None
    lint = subprocess.run(
        [helm, "lint", "--strict", str(chart_dir)], capture_output=True, text=True, check=False
    )
    report.check(lint.returncode == 0, "helm lint --strict", lint.stdout + lint.stderr)

    def render(overrides: dict[str, Any]) -> dict[str, str]:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(overrides, handle)
            overrides_file = handle.name
        try:
            done = subprocess.run(
                [helm, "template", "mail", str(chart_dir), "--namespace", "mail", "-f", overrides_file],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            os.unlink(overrides_file)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or "helm template failed")
        return {"rendered.yaml": done.stdout}

    return render


def helm_sdk_renderer(chart_dir: Path, report: Report) -> Renderer | None:
    try:
        import helm_python  # type: ignore[import-not-found]
    except ImportError:
        return None
    lint = helm_python.lint(str(chart_dir), strict=True)
    for message in lint.get("messages", []):
        report.check(
            int(message.get("severity", 0)) < 2,
            "helm lint --strict",
            f"{message.get('path')}: {message.get('error')}",
        )
    for error in lint.get("errors", []):
        report.fail("helm lint --strict", str(error))

    def render(overrides: dict[str, Any]) -> dict[str, str]:
        with helm_python.Chart.load(str(chart_dir)) as chart:
            try:
                rendered = chart.render(overrides, name="mail", namespace="mail", is_install=True)
            except helm_python.HelmError as err:
                raise RuntimeError(str(err)) from err
        return {k: v for k, v in rendered.items() if not k.endswith(".txt")}

    return render


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for text in rendered.values():
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def key_paths(node: Any, prefix: str = "") -> set[str]:
    """Key paths of a YAML tree; list items share the path `key[]`."""
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, sub in node.items():
            here = f"{prefix}.{key}" if prefix else str(key)
            paths.add(here)
            if prefix == "routes" and key == "domains":
                continue  # free-form map: domain -> backend
            paths |= key_paths(sub, here)
    elif isinstance(node, list):
        for item in node:
            paths |= key_paths(item, f"{prefix}[]")
    return paths


def seconds(duration: str) -> float:
    match = DURATION.match(str(duration))
    if not match:
        raise ValueError(f"not a duration: {duration!r}")
    number, unit = int(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def check_rendered(name: str, docs: list[dict[str, Any]], example_paths: set[str], report: Report) -> None:
    where = f"render[{name}]"
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", "?"), []).append(doc)
    for kind in ("ConfigMap", "Deployment", "Service"):
        report.check(len(by_kind.get(kind, [])) == 1, where, f"expected one {kind}")
    if any(len(by_kind.get(k, [])) != 1 for k in ("ConfigMap", "Deployment", "Service")):
        return
    config_map, deployment, service = (by_kind[k][0] for k in ("ConfigMap", "Deployment", "Service"))

    config = yaml.safe_load(config_map["data"]["imapgate.yaml"])
    for path in sorted(key_paths(config) - example_paths):
        report.fail(
            where, f"the rendered config uses {path}, which config/imapgate.example.yaml does not document"
        )
    admin_host = config["admin"]["address"].rsplit(":", 1)[0]
    report.check(
        admin_host in ("0.0.0.0", "[::]"),
        where,
        f"admin must listen on all pod interfaces for the probes, not {admin_host}",
    )

    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    report.check(pod_sc.get("runAsNonRoot") is True, where, "pod must set runAsNonRoot")
    report.check(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem must be true")
    report.check(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation must be false")
    report.check("ALL" in sc.get("capabilities", {}).get("drop", []), where, "capabilities must drop ALL")
    report.check(not sc.get("capabilities", {}).get("add"), where, "no capability may be added")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    report.check(seccomp.get("type") == "RuntimeDefault", where, "seccompProfile must be RuntimeDefault")
    report.check(
        spec.get("automountServiceAccountToken") is False, where, "the API token must not be mounted"
    )
    annotation = pod["metadata"].get("annotations", {}).get("checksum/config", "")
    report.check(bool(re.fullmatch(r"[0-9a-f]{64}", annotation)), where, "checksum/config annotation missing")

    drain = seconds(config["limits"]["shutdown_delay"]) + seconds(config["limits"]["shutdown_grace"])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    report.check(
        grace > drain, where, f"terminationGracePeriodSeconds {grace} must exceed delay + grace {drain:g}"
    )

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    admin_port = int(config["admin"]["address"].rsplit(":", 1)[1])
    report.check(ports.get("admin") == admin_port, where, "container port 'admin' must match admin.address")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container.get(probe, {}).get("httpGet", {})
        report.check(
            http.get("path") == path and http.get("port") in ("admin", admin_port),
            where,
            f"{probe} must GET {path} on the admin port",
        )
    for listener in config["listeners"]:
        port = int(listener["address"].rsplit(":", 1)[1])
        report.check(
            ports.get(listener["name"]) == port,
            where,
            f"listener {listener['name']} listens on {port} but the container port says {ports.get(listener['name'])}",
        )

    volumes = {v["name"] for v in spec.get("volumes", [])}
    mounts = container.get("volumeMounts", [])
    for mount in mounts:
        report.check(mount["name"] in volumes, where, f"mount {mount['name']} has no volume")
    mount_paths = [m["mountPath"] for m in mounts]

    def mounted(path: str) -> bool:
        return any(path == mp or path.startswith(mp.rstrip("/") + "/") for mp in mount_paths)

    files = [config["auth"]["users_file"]]
    files += [key["file"] for key in config["auth"].get("secret_keys", []) if "file" in key]
    for cert in config["tls"].get("certificates", []):
        files += [cert["cert_file"], cert["key_file"]]
    for backend in config["backends"]:
        files += [backend[k] for k in ("master_password_file", "ca_file") if k in backend]
    if config.get("admin", {}).get("token_file"):
        files.append(config["admin"]["token_file"])
    for path in files:
        report.check(mounted(path), where, f"the config names {path}, which nothing mounts")
    for mount in mounts:
        if mount["name"] != "tmp":
            report.check(mount.get("readOnly") is True, where, f"mount {mount['name']} must be read-only")
    secret_volumes = [v for v in spec.get("volumes", []) if "secret" in v]
    for volume in secret_volumes:
        mode = volume["secret"].get("defaultMode", 0o644)
        report.check(
            mode & 0o007 == 0 or volume["name"].startswith("ca-"),
            where,
            f"Secret volume {volume['name']} must not be world-readable (defaultMode {mode:o})",
        )
    report.check(
        mounted("/etc/imapgate/imapgate.yaml") and "/etc/imapgate/imapgate.yaml" in container.get("args", []),
        where,
        "the config file must be mounted and passed with -c",
    )

    service_ports = service["spec"].get("ports", [])
    for port in service_ports:
        report.check(
            port["targetPort"] in ports, where, f"service port {port['name']} targets an unknown port"
        )
    report.check(
        all(p["targetPort"] != "admin" for p in service_ports),
        where,
        "the Service must not expose the admin port",
    )


def render_variants(values: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, overrides, must_render). Overrides are merged over values.yaml by Helm."""
    backend = copy.deepcopy(values["backends"][0])
    second = dict(
        backend,
        name="cyrus",
        address="cyrus.mail.svc:143",
        tls="starttls",
        login="sasl_authzid",
        serverName="imap.example.org",
        caSecret={"name": "mail-ca", "key": "ca.crt"},
        masterPasswordSecret={"name": "cyrus-proxy", "key": "secret"},
        sendId=True,
    )
    plain = dict(backend, name="legacy", address="10.0.0.5:143", tls="none")
    return [
        ("defaults", {}, True),
        (
            "self-signed, imaps only, TLS 1.3",
            {"tls": {"selfSigned": True, "minVersion": "1.3"}, "listeners": {"imap": {"enabled": False}}},
            True,
        ),
        (
            "three backends, routes, IPv6, two replicas",
            {
                "replicaCount": 2,
                "bindAddress": "[::]",
                "backends": [backend, second, plain],
                "routes": {
                    "default": "dovecot",
                    "domains": {"example.org": "cyrus", "old.example.org": "legacy"},
                },
                "service": {"externalTrafficPolicy": "Cluster", "loadBalancerSourceRanges": ["192.0.2.0/24"]},
                "limits": {"maxConnections": 2000000},
            },
            True,
        ),
        ("MFA off, no key ring", {"auth": {"mfa": {"default": "off"}, "secretKeys": [], "activeKey": ""}}, True),
        (
            "unquoted off in a values file (false)",
            {"auth": {"mfa": {"default": False}, "secretKeys": [], "activeKey": ""}},
            True,
        ),
        (
            "two keys during a rotation",
            {
                "auth": {
                    "keysSecretName": "mail-totp-keys",
                    "secretKeys": [{"id": "k1", "key": "k1.key"}, {"id": "k2", "key": "2026.key"}],
                    "activeKey": "k2",
                    "mfa": {"unlockTtl": "0s", "unlockBindSubnet": False, "codeDigits": 8},
                    "revokeClosesSessions": True,
                }
            },
            True,
        ),
        (
            "PROXY protocol behind a load balancer, guard tuned, admin token",
            {
                "listeners": {"imaps": {"proxyProtocol": True}},
                "service": {"externalTrafficPolicy": "Cluster"},
                "admin": {"tokenSecret": "mail-admin-token"},
                "state": {"maxEntries": 200000},
                "guard": {
                    "enforce": False,
                    "subnetV4": 22,
                    "subnetV6": 56,
                    "allow": ["192.0.2.10", "2001:db8:1::/48"],
                    "deny": ["203.0.113.0/24"],
                    "trustedProxies": ["10.0.0.0/16", "fd00::/64"],
                    "perIp": {"failures": 5, "per": "10m", "enforce": True},
                    "perAccount": {"failures": 20, "per": "1h", "enforce": False},
                    "spray": {"distinctAccounts": 8, "per": "2h", "enforce": True},
                    "knownGoodTtl": "90d",
                    "tarpit": {"start": "500ms", "max": "10s", "enforce": True},
                    "maxDelayedPerIp": 4000000000,
                    "blockFor": "1h",
                },
            },
            True,
        ),
        ("PROXY protocol without trusted proxies", {"listeners": {"imap": {"proxyProtocol": True}}}, False),
        (
            "PROXY protocol on a disabled listener only",
            {"listeners": {"imap": {"enabled": False, "proxyProtocol": True}}},
            True,
        ),
        ("MFA required without a key ring", {"auth": {"secretKeys": [], "activeKey": ""}}, False),
        ("active key not in the ring", {"auth": {"activeKey": "k9"}}, False),
        (
            "two keys, no active key",
            {"auth": {"secretKeys": [{"id": "k1", "key": "a"}, {"id": "k2", "key": "b"}], "activeKey": ""}},
            False,
        ),
        (
            "a key id used twice",
            {"auth": {"secretKeys": [{"id": "k1", "key": "a"}, {"id": "k1", "key": "b"}]}},
            False,
        ),
        ("route to an unknown backend", {"routes": {"default": "nope"}}, False),
        ("no listener", {"listeners": {"imaps": {"enabled": False}, "imap": {"enabled": False}}}, False),
        ("duplicate backend names", {"backends": [backend, backend]}, False),
        ("schema violation", {"limits": {"lineBytes": "lots"}}, False),
    ]


# Keys that config/imapgate.example.yaml documents only in a commented-out entry (an option that
# is off by default), with the commented line that must stay there to document them.
COMMENTED_EXAMPLE_KEYS: dict[str, re.Pattern[str]] = {
    "listeners[].proxy_protocol": re.compile(r"^\s*#\s+proxy_protocol:\s", re.MULTILINE),
}


def documented_paths(example: Any, example_path: Path, report: Report) -> set[str]:
    """The key paths the example config documents: its keys, and those in COMMENTED_EXAMPLE_KEYS."""
    paths = key_paths(example)
    text = example_path.read_text(encoding="utf-8")
    for path, line in COMMENTED_EXAMPLE_KEYS.items():
        if path in paths or report.check(
            bool(line.search(text)), str(example_path), f"no longer documents {path} (not even in a comment)"
        ):
            paths.add(path)
    return paths


def check_rendering(renderer: Renderer, values: dict[str, Any], example_paths: set[str], report: Report) -> None:
    for name, overrides, must_render in render_variants(values):
        try:
            rendered = renderer(overrides)
        except RuntimeError as err:
            if report.check(not must_render, f"render[{name}]", f"failed: {err}") and name in FAILURE_MESSAGES:
                report.check(
                    FAILURE_MESSAGES[name] in str(err),
                    f"render[{name}]",
                    f"refused, but without {FAILURE_MESSAGES[name]!r}: {err}",
                )
            continue
        if not report.check(must_render, f"render[{name}]", "rendered, but these values must be refused"):
            continue
        try:
            docs = manifests(rendered)
        except yaml.YAMLError as err:
            report.fail(f"render[{name}]", f"output is not YAML: {err}")
            continue
        check_rendered(name, docs, example_paths, report)
        config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["imapgate.yaml"])
        for ok, message in RENDER_EXPECTATIONS.get(name, lambda _c: [])(config):
            report.check(ok, f"render[{name}]", message)


def _auth(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("auth", {})


def _guard(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("guard", {})


def _listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next((l for l in config.get("listeners", []) if l.get("name") == name), {})


# The gateway's own defaults (src/config/mod.rs), which values.yaml must render unchanged.
GUARD_DEFAULTS: dict[str, Any] = {
    "enforce": True,
    "subnet_v4": 24,
    "subnet_v6": 64,
    "allow": [],
    "deny": [],
    "trusted_proxies": [],
    "per_ip": {"failures": 10, "per": "15m", "enforce": True},
    "per_subnet": {"failures": 30, "per": "15m", "enforce": True},
    "per_account": {"failures": 10, "per": "15m", "enforce": True},
    "per_token_ip": {"failures": 20, "per": "15m", "enforce": True},
    "spray": {"distinct_accounts": 5, "per": "1h", "enforce": True},
    "known_good_ttl": "30d",
    "tarpit": {"start": "1s", "max": "15s", "enforce": True},
    "max_delayed_per_ip": 16,
    "block_for": "15m",
}

# What particular refusals must say (a substring of Helm's error).
FAILURE_MESSAGES: dict[str, str] = {
    "PROXY protocol without trusted proxies": "listeners.imap.proxyProtocol needs guard.trustedProxies",
}


# What particular variants must put into the rendered imapgate config: (holds, message) pairs.
RENDER_EXPECTATIONS: dict[str, Callable[[dict[str, Any]], list[tuple[bool, str]]]] = {
    "defaults": lambda c: [
        (_auth(c).get("mfa", {}).get("default") == "required", "auth.mfa.default must default to required"),
        (
            [k.get("id") for k in _auth(c).get("secret_keys", [])] == ["k1"] and _auth(c).get("active_key") == "k1",
            "the default key ring must be k1, active",
        ),
        (_auth(c).get("mfa", {}).get("unlock_ttl") == "12h", "auth.mfa.unlock_ttl must default to 12h"),
        (_auth(c).get("revoke_closes_sessions") is False, "auth.revoke_closes_sessions must render as a boolean"),
        (_guard(c) == GUARD_DEFAULTS, f"guard must render the gateway's defaults, not {_guard(c)!r}"),
        (c.get("state", {}).get("max_entries") == 500000, "state.max_entries must default to 500000"),
        (
            all(l.get("proxy_protocol") is False for l in c.get("listeners", [])),
            "proxy_protocol must render as false on every listener by default",
        ),
        ("token_file" not in c.get("admin", {}), "no admin.token_file without admin.tokenSecret"),
    ],
    "PROXY protocol behind a load balancer, guard tuned, admin token": lambda c: [
        (_listener(c, "imaps").get("proxy_protocol") is True, "listener imaps must render proxy_protocol: true"),
        (_listener(c, "imap").get("proxy_protocol") is False, "listener imap must render proxy_protocol: false"),
        (_guard(c).get("trusted_proxies") == ["10.0.0.0/16", "fd00::/64"], "guard.trusted_proxies must render as given"),
        (_guard(c).get("allow") == ["192.0.2.10", "2001:db8:1::/48"], "guard.allow must render as given"),
        (_guard(c).get("deny") == ["203.0.113.0/24"], "guard.deny must render as given"),
        (_guard(c).get("enforce") is False, "guard.enforce must render as a boolean"),
        ((_guard(c).get("subnet_v4"), _guard(c).get("subnet_v6")) == (22, 56), "guard subnets must render as integers"),
        (
            _guard(c).get("per_ip") == {"failures": 5, "per": "10m", "enforce": True}
            and _guard(c).get("per_account") == {"failures": 20, "per": "1h", "enforce": False}
            and _guard(c).get("per_subnet") == GUARD_DEFAULTS["per_subnet"]
            and _guard(c).get("per_token_ip") == GUARD_DEFAULTS["per_token_ip"],
            "guard budgets must render as given, the others as defaults",
        ),
        (_guard(c).get("spray") == {"distinct_accounts": 8, "per": "2h", "enforce": True}, "guard.spray must render"),
        (_guard(c).get("tarpit") == {"start": "500ms", "max": "10s", "enforce": True}, "guard.tarpit must render"),
        (
            (_guard(c).get("known_good_ttl"), _guard(c).get("block_for")) == ("90d", "1h"),
            "guard durations must render as given",
        ),
        (_guard(c).get("max_delayed_per_ip") == 4000000000, "large integers must render as integers"),
        (set(_guard(c)) == set(GUARD_DEFAULTS), "every guard key must render"),
        (c.get("state", {}).get("max_entries") == 200000, "state.max_entries must render"),
        (c.get("admin", {}).get("token_file") == "/etc/imapgate/admin/token", "admin.token_file must render"),
    ],
    "PROXY protocol on a disabled listener only": lambda c: [
        ([l.get("name") for l in c.get("listeners", [])] == ["imaps"], "only the imaps listener must render"),
    ],
    "MFA off, no key ring": lambda c: [
        ("secret_keys" not in _auth(c) and "active_key" not in _auth(c), "no key ring must render no secret_keys"),
        (_auth(c).get("mfa", {}).get("default") == "off", "auth.mfa.default must render as off"),
    ],
    "unquoted off in a values file (false)": lambda c: [
        (_auth(c).get("mfa", {}).get("default") == "off", "a false auth.mfa.default must render as \"off\""),
    ],
    "two keys during a rotation": lambda c: [
        (
            [k.get("id") for k in _auth(c).get("secret_keys", [])] == ["k1", "k2"] and _auth(c).get("active_key") == "k2",
            "both keys must render, k2 active",
        ),
        (_auth(c).get("mfa", {}).get("code_digits") == 8, "auth.mfa.code_digits must render as an integer"),
        (_auth(c).get("mfa", {}).get("unlock_bind_subnet") is False, "unlock_bind_subnet must render as a boolean"),
    ],
    "three backends, routes, IPv6, two replicas": lambda c: [
        (c["limits"]["max_connections"] == 2000000, "large integers must render as integers, not 2e+06"),
    ],
}


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chart", type=Path, default=repo / "helm" / "imapgate")
    parser.add_argument("--example-config", type=Path, default=repo / "config" / "imapgate.example.yaml")
    parser.add_argument(
        "--render",
        choices=("auto", "helm", "sdk", "off"),
        default="auto",
        help="auto: the helm binary if on PATH, else the helm_python module if importable, else skip",
    )
    args = parser.parse_args()
    report = Report()
    chart_dir: Path = args.chart.resolve()

    check_chart_yaml(chart_dir, report)
    check_plain_yaml_files(chart_dir, report)
    values = load_yaml(chart_dir / "values.yaml", report)
    schema = load_schema(chart_dir, report)
    if isinstance(values, dict) and schema is not None:
        check_values_against_schema(chart_dir, schema, values, report)
        check_schema_rejects(schema, values, report)
    if isinstance(values, dict):
        check_templates(chart_dir, values, report)
        report.check(
            values.get("replicaCount") == 1, "values.yaml", "replicaCount must default to 1 (in-memory state)"
        )

    renderer: Renderer | None = None
    how = "skipped"
    if args.render in ("auto", "helm"):
        renderer = helm_binary_renderer(chart_dir, report)
        how = "helm binary" if renderer else how
    if renderer is None and args.render in ("auto", "sdk"):
        renderer = helm_sdk_renderer(chart_dir, report)
        how = "helm-python-sdk" if renderer else how
    if renderer is None and args.render in ("helm", "sdk"):
        report.fail("render", f"--render {args.render} was asked for but is not available")
    if renderer is not None and isinstance(values, dict):
        example = load_yaml(args.example_config, report)
        if example is not None:
            check_rendering(renderer, values, documented_paths(example, args.example_config, report), report)

    for problem in report.problems:
        print(f"FAIL {problem}")
    verdict = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
    print(f"check_chart: {verdict}; {report.passed} checks held; rendering: {how}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
