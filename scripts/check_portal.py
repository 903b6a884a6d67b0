"""Checks of the chart's self-service portal (portal.*, networkPolicy.portal; docs/portal.md). Used
by scripts/check_chart.py, which adds these value sets to its own: BAD_VALUES (the schema must
refuse each), variants() (rendered, or refused with FAILURE_MESSAGES), pairs() (what every render
must hold about the portal, and what particular variants must render), notes_pairs() (the install
notes) and secret_commands() (the Secrets the notes must tell how to create).

Every render, portal on or off:
  * off: no portal Service, no Ingress, no container port or volume of the portal, no `portal:`
    section in the config;
  * on: the `portal:` section listens on all pod interfaces on the container port `portal`, in
    plain HTTP (tls: false) with trusted_proxies, at an https:// public_url without a path; the
    OIDC client secret is a file (client_secret_file) from a Secret volume of that one key,
    mounted read-only and not world-readable, and never an environment variable of the pod (env
    or envFrom) nor a value in the ConfigMap; a ClusterIP Service "<fullname>-portal" has exactly
    the port `portal` and selects the pods, and no other Service carries that port; the Ingress
    (portal.ingress.enabled) serves public_url's host on / (Prefix) to that Service and port,
    with TLS for that host; the NetworkPolicy (networkPolicy.enabled) admits the portal's port
    only in rules of its own, each from selected peers with a namespace selector (the ingress
    controller's), never from anywhere, and with egress rules lets the pods reach the identity
    provider's port.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import yaml

Docs = list[dict[str, Any]]
Pairs = list[tuple[bool, str]]

COMPONENT = "portal"
SERVICE = "mail-imapgate-portal"
TLS_SECRET = "mail-imapgate-portal-tls"
SECRET_FILE = "/etc/imapgate/portal/oidc/client-secret"
CA_FILE = "/etc/imapgate/portal/oidc-ca/ca.pem"
PUBLIC_URL = re.compile(r"^https://([a-z0-9.-]+)(:\d{1,5})?$")


def is_portal_service(doc: dict[str, Any]) -> bool:
    """The portal's ClusterIP Service (not the client-facing one)."""
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    return doc.get("kind") == "Service" and labels.get("app.kubernetes.io/component") == COMPONENT


# The portal's smallest working values: everything else is the chart's default.
MINIMAL: dict[str, Any] = {
    "enabled": True,
    "trustedProxies": ["10.244.0.0/16"],
    "publicUrl": "https://mail.example.org",
    "oidc": {
        "issuer": "https://sso.example.org/realms/corp",
        "clientId": "imapgate-portal",
        "clientSecret": {"existingSecret": "imapgate-portal-oidc", "key": "client-secret"},
    },
}
POSTGRES = {"backend": "postgres", "postgres": {"url": {"existingSecret": "imapgate-db-app", "key": "uri"}}}


def _portal(**changes: Any) -> dict[str, Any]:
    """Values with MINIMAL portal values (changed: a value of None drops the key), on postgres."""
    portal = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            portal.pop(key, None)
        elif isinstance(value, dict) and isinstance(portal.get(key), dict):
            portal[key] = {**portal[key], **value}
        else:
            portal[key] = value
    return {"auth": {"store": POSTGRES}, "portal": portal}


# Values the schema must refuse: typos, an inline secret, an http:// or pathed public URL.
BAD_VALUES: list[tuple[str, Any]] = [
    ("portal.enable", True),
    ("portal.enabled", "true"),
    ("portal.port", 80),
    ("portal.port", "8080"),
    ("portal.tls", True),
    ("portal.address", "0.0.0.0:8080"),
    ("portal.trustedProxies", "10.244.0.0/16"),
    ("portal.trustedProxies", ["10.244.0.0/16 "]),
    ("portal.trustedProxies", ["ingress-nginx"]),
    ("portal.publicUrl", "http://mail.example.org"),
    ("portal.publicUrl", "https://mail.example.org/"),
    ("portal.publicUrl", "https://mail.example.org/portal"),
    ("portal.publicUrl", "https://user@mail.example.org"),
    ("portal.publicUrl", "mail.example.org"),
    ("portal.publicUrl", "https://Mail.Example.org"),
    ("portal.ingress.host", "Mail.example.org"),
    ("portal.autoprovision", "yes"),
    ("portal.reauthAfter", "10 minutes"),
    ("portal.sessionIdle", 1800),
    ("portal.sessionMax", "8 hours"),
    ("portal.rateLimit", {"per_ip": 60}),
    ("portal.rateLimit.perIp", 0),
    ("portal.mail.imap_host", "imap.example.org"),
    ("portal.mail.imapHost", "imap.example.org:993"),
    ("portal.mail.imapPort", 0),
    ("portal.mail.imapPort", "993"),
    ("portal.mail.imapStarttlsPort", -1),
    ("portal.oidc.issuer", "http://sso.example.org/realms/corp"),
    ("portal.oidc.issuer", "sso.example.org"),
    ("portal.oidc.client_id", "imapgate-portal"),
    ("portal.oidc.clientId", "imapgate portal"),
    ("portal.oidc.clientSecret", "inline-secrets-are-refused"),
    ("portal.oidc.clientSecret.value", "inline-secrets-are-refused"),
    ("portal.oidc.clientSecret.existingSecret", "Portal_OIDC"),
    ("portal.oidc.clientSecret.key", "client secret"),
    ("portal.oidc.clientSecretFile", "/run/secrets/portal-oidc"),
    ("portal.oidc.clientSecretEnv", "PORTAL_OIDC_SECRET"),
    ("portal.oidc.ca", {"name": "corp-ca", "key": "ca.crt"}),
    ("portal.oidc.scopes", "openid email"),
    ("portal.oidc.scopes", ["openid email"]),
    ("portal.oidc.scopes", []),
    ("portal.oidc.userClaim", "name"),
    ("portal.oidc.userDomain", "@example.org"),
    ("portal.oidc.domains", "example.org"),
    ("portal.oidc.requireAmr", "mfa"),
    ("portal.oidc.admin.values", "mail-admins"),
    ("portal.oidc.admin.claim", ""),
    ("portal.ingress.enabled", "true"),
    ("portal.ingress.host", "Mail Example"),
    ("portal.ingress.host", "https://mail.example.org"),
    ("portal.ingress.className", "Nginx"),
    ("portal.ingress.clusterIssuer", "Lets Encrypt"),
    ("portal.ingress.annotations", {"nginx.ingress.kubernetes.io/proxy-body-size": 64}),
    ("portal.ingress.tls", False),
    ("portal.ingress.tls.secretName", "Portal TLS"),
    ("portal.ingress.paths", ["/"]),
    ("networkPolicy.portal.namespaceSelector", {"matchLabels": {"name": 1}}),
    ("networkPolicy.portal.idp.cidrs", "0.0.0.0/0"),
    ("networkPolicy.portal.idp.cidrs", ["sso.example.org"]),
    ("networkPolicy.portal.idp.port", 0),
    ("networkPolicy.portal.allowedCidrs", ["10.0.0.0/8"]),
]


PORTAL_VALUES = "portal values (ci/portal-values.yaml)"
PORTAL_DEFAULTS = "portal with its defaults (postgres store, the chart's Ingress)"
PORTAL_SQLITE_NO_INGRESS = "portal on sqlite, IPv6, own ingress, helpdesk, NetworkPolicy defaults"
PORTAL_PORT_ANNOTATIONS = "portal at a public URL with a port, own annotations, no egress rules"

# The IMAP listeners of PORTAL_SQLITE_NO_INGRESS: STARTTLS first, then implicit TLS on 10993.
_LISTENERS = [
    {"name": "imap", "containerPort": 1143, "tls": "starttls", "servicePort": 143},
    {"name": "imaps", "containerPort": 1993, "tls": "implicit", "servicePort": 10993},
]


def variants() -> list[tuple[str, dict[str, Any], bool]]:
    """(name, overrides, must_render); check_chart adds ci/portal-values.yaml as PORTAL_VALUES."""
    return [
        (PORTAL_DEFAULTS, _portal(), True),
        (
            PORTAL_SQLITE_NO_INGRESS,
            {
                **_portal(
                    port=8443,
                    autoprovision=False,
                    mail={"imapHost": "imap.example.org", "imapPort": None, "imapStarttlsPort": 0},
                    oidc={
                        "userClaim": "upn",
                        "userDomain": "example.org",
                        "requireAmr": ["mfa"],
                        "scopes": ["openid", "email", "profile", "groups"],
                        "admin": {"claim": "roles", "values": ["Mail.Helpdesk", "Mail.Admin"]},
                    },
                    ingress={"enabled": False},
                ),
                "auth": {"store": {"backend": "sqlite"}},
                "bindAddress": "[::]",
                "listeners": _LISTENERS,
                "networkPolicy": {"enabled": True},
            },
            True,
        ),
        (
            PORTAL_PORT_ANNOTATIONS,
            {
                **_portal(
                    publicUrl="https://portal.example.org:8443",
                    ingress={
                        "className": "traefik",
                        "host": "portal.example.org",
                        "clusterIssuer": "corp-ca",
                        "annotations": {"traefik.ingress.kubernetes.io/router.entrypoints": "websecure"},
                        "tls": {"secretName": "portal-cert"},
                    },
                ),
                "networkPolicy": {"enabled": True, "egress": {"enabled": False}},
            },
            True,
        ),
        ("portal without publicUrl", _portal(publicUrl=""), False),
        ("portal without an issuer", _portal(oidc={"issuer": ""}), False),
        ("portal without a client id", _portal(oidc={"clientId": ""}), False),
        ("portal without its client secret", _portal(oidc={"clientSecret": {"existingSecret": "", "key": "secret"}}), False),
        ("portal without trustedProxies", _portal(trustedProxies=[]), False),
        ("portal on the users file", {**_portal(), "auth": {"store": {"backend": "file"}}}, False),
        (
            "portal without a key ring",
            {**_portal(), "auth": {"store": POSTGRES, "secretKeys": [], "activeKey": "", "mfa": {"default": "off"}}},
            False,
        ),
        ("portal on the admin port", _portal(port=9190), False),
        ("portal on a listener's port", _portal(port=1993), False),
        ("portal Ingress for another host", _portal(ingress={"host": "webmail.example.org"}), False),
        ("portal re-authentication after 30s", _portal(reauthAfter="30s"), False),
        ("portal session idle beyond its maximum", _portal(sessionIdle="9h"), False),
        ("portal sessions of 30 days", _portal(sessionMax="30d"), False),
        (
            "portal without an implicit TLS listener or imapPort",
            {**_portal(), "listeners": [_LISTENERS[0]]},
            False,
        ),
        ("an extra volume named like the portal's", {"extraVolumes": [{"name": "portal-oidc-secret", "emptyDir": {}}]}, False),
    ]


FAILURE_MESSAGES: dict[str, str | tuple[str, ...]] = {
    "portal without publicUrl": "portal.publicUrl is required with the portal",
    "portal without an issuer": "portal.oidc.issuer is required with the portal",
    "portal without a client id": "portal.oidc.clientId is required with the portal",
    "portal without its client secret": (
        "portal.oidc.clientSecret.existingSecret is empty",
        "kubectl create secret generic imapgate-portal-oidc --from-file=secret=",
    ),
    "portal without trustedProxies": ("portal.trustedProxies is empty", "the per-address rate limits"),
    "portal on the users file": ("portal.enabled needs a credential store the portal can write to", "auth.store.backend postgres"),
    "portal without a key ring": "portal.enabled needs auth.secretKeys",
    "portal on the admin port": "portal.port 9190 is a listener's containerPort or admin.port",
    "portal on a listener's port": "portal.port 1993 is a listener's containerPort or admin.port",
    "portal Ingress for another host": (
        "portal.ingress.host webmail.example.org is not publicUrl's host mail.example.org",
        "https://mail.example.org/auth/callback",
    ),
    "portal re-authentication after 30s": "portal.reauthAfter 30s is below 1m",
    "portal session idle beyond its maximum": "portal.sessionIdle 9h is out of range: 1m to portal.sessionMax (8h)",
    "portal sessions of 30 days": "portal.sessionMax 30d is above 7d",
    "portal without an implicit TLS listener or imapPort": "portal.mail.imapPort: no tls: implicit listener is on the main Service",
    "an extra volume named like the portal's": 'extraVolumes[0]: the name "portal-oidc-secret" is taken',
}


# --- what every render must hold -------------------------------------------------------------


def _get(node: Any, *path: Any) -> Any:
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _of_kind(docs: Docs, kind: str) -> Docs:
    return [d for d in docs if d.get("kind") == kind and "helm.sh/hook" not in (_get(d, "metadata", "annotations") or {})]


def _config(docs: Docs) -> dict[str, Any]:
    """The gateway's rendered configuration (the ConfigMap that holds imapgate.yaml)."""
    for doc in _of_kind(docs, "ConfigMap"):
        text = _get(doc, "data", "imapgate.yaml")
        if text:
            return yaml.safe_load(text) or {}
    return {}


def _deployment(docs: Docs) -> dict[str, Any]:
    found = _of_kind(docs, "Deployment")
    return found[0] if len(found) == 1 else {}


def _container(docs: Docs) -> dict[str, Any]:
    return _get(_deployment(docs), "spec", "template", "spec", "containers", 0) or {}


def _volumes(docs: Docs) -> list[dict[str, Any]]:
    return _get(_deployment(docs), "spec", "template", "spec", "volumes") or []


def _rule_ports(rule: dict[str, Any]) -> set[Any]:
    return {p.get("port") for p in rule.get("ports", [])}


def pairs(name: str, docs: Docs, values: dict[str, Any]) -> Pairs:
    """What the render holds about the portal: the invariants, and EXPECTATIONS[name]. values:
    the values it was rendered with (values.yaml and the overrides merged)."""
    return invariants(docs, values) + EXPECTATIONS.get(name, lambda _d: [])(docs)


def invariants(docs: Docs, values: dict[str, Any]) -> Pairs:
    config = _config(docs)
    portal = config.get("portal")
    container = _container(docs)
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    services = _of_kind(docs, "Service")
    portal_services = [s for s in services if is_portal_service(s)]
    ingresses = _of_kind(docs, "Ingress")
    portal_volumes = [v["name"] for v in _volumes(docs) if v.get("name", "").startswith("portal-")]
    if portal is None:
        return [
            (not portal_services, "no portal Service without portal.enabled"),
            (not ingresses, "no Ingress without portal.enabled"),
            ("portal" not in ports, "no portal container port without portal.enabled"),
            (not portal_volumes, f"no portal volume without portal.enabled, not {portal_volumes}"),
        ]
    out: Pairs = []
    host, _, port_text = str(portal.get("address", "")).rpartition(":")
    port = int(port_text) if port_text.isdigit() else None
    out += [
        (host in ("0.0.0.0", "[::]"), f"the portal must listen on all pod interfaces (the Service reaches it there), not {host}"),
        (ports.get("portal") == port, f"the container port portal must be the portal's {port}, not {ports.get('portal')}"),
        (portal.get("tls") is False, "the portal speaks plain HTTP in the pod (tls: false): TLS ends at the ingress"),
        (bool(portal.get("trusted_proxies")), "the portal behind an ingress needs trusted_proxies"),
    ]
    url = PUBLIC_URL.match(str(portal.get("public_url", "")))
    out.append((url is not None, f"public_url must be https://host[:port] without a path, not {portal.get('public_url')!r}"))
    public_host = url.group(1) if url else None

    # The client secret: a file from a Secret, never an environment variable or a value.
    oidc = portal.get("oidc") or {}
    secret_file = oidc.get("client_secret_file")
    secret_paths = sorted(p for p in _key_paths(portal) if "secret" in p.rsplit(".", 1)[-1])
    out += [
        (secret_file == SECRET_FILE, f"oidc.client_secret_file must be {SECRET_FILE}, not {secret_file!r}"),
        (secret_paths == ["oidc.client_secret_file"], f"the client secret must be a file, not a value: {secret_paths}"),
    ]
    mount = next((m for m in container.get("volumeMounts", []) if m.get("mountPath") == SECRET_FILE.rsplit("/", 1)[0]), {})
    volume = next((v for v in _volumes(docs) if v.get("name") == mount.get("name")), {})
    secret = volume.get("secret") or {}
    secret_name = secret.get("secretName")
    out += [
        (mount.get("readOnly") is True, f"the client secret's directory must be mounted read-only, not {mount!r}"),
        (
            bool(secret_name) and [i.get("path") for i in secret.get("items", [])] == ["client-secret"],
            f"the client secret must come from one key of a Secret, as the file client-secret, not {volume!r}",
        ),
        (secret.get("defaultMode") == 0o440, "the client secret must not be world-readable (defaultMode 0440)"),
    ]
    env_secrets = [_get(e, "valueFrom", "secretKeyRef", "name") for e in container.get("env", [])]
    env_secrets += [_get(e, "secretRef", "name") for e in container.get("envFrom", [])]
    out.append((secret_name not in env_secrets, f"Secret {secret_name} must not be in the pod's environment"))
    if "ca_file" in oidc:
        out.append((oidc["ca_file"] == CA_FILE, f"oidc.ca_file must be {CA_FILE}, not {oidc['ca_file']!r}"))

    # The Service: ClusterIP, the portal port only, and no other Service carries it.
    selector = _get(_deployment(docs), "spec", "selector", "matchLabels")
    out.append((len(portal_services) == 1, f"one portal Service, not {len(portal_services)}"))
    for svc in portal_services:
        spec = svc.get("spec", {})
        out += [
            (svc["metadata"]["name"] == SERVICE, f"the portal Service must be {SERVICE}"),
            (spec.get("type", "ClusterIP") == "ClusterIP", "the portal Service must be ClusterIP (the ingress controller reaches it)"),
            (spec.get("selector") == selector, "the portal Service must select the pods"),
            (
                [(p.get("name"), p.get("targetPort")) for p in spec.get("ports", [])] == [("portal", "portal")],
                f"the portal Service must carry the port portal only, not {spec.get('ports')}",
            ),
        ]
    for svc in services:
        if not is_portal_service(svc):
            out.append(
                (
                    all(p.get("targetPort") not in ("portal", port) for p in _get(svc, "spec", "ports") or []),
                    f"Service {svc['metadata']['name']} must not expose the portal (plain HTTP)",
                )
            )

    # The Ingress: TLS for public_url's host, / to the portal Service.
    out.append((len(ingresses) <= 1, "at most one Ingress"))
    for ingress in ingresses:
        spec = ingress.get("spec", {})
        tls_hosts = {h for t in spec.get("tls", []) if t.get("secretName") for h in t.get("hosts", [])}
        rules = spec.get("rules", [])
        out += [
            (bool(spec.get("tls")) and all(t.get("secretName") for t in spec["tls"]), "the Ingress must have TLS with a Secret"),
            (
                [r.get("host") for r in rules] == [public_host],
                f"the Ingress must serve public_url's host {public_host}, not {[r.get('host') for r in rules]}",
            ),
            (all(r.get("host") in tls_hosts for r in rules), f"every host of the Ingress must be in its TLS section {sorted(tls_hosts)}"),
        ]
        paths = [p for r in rules for p in _get(r, "http", "paths") or []]
        out.append(
            (
                [(p.get("path"), p.get("pathType"), _get(p, "backend", "service")) for p in paths]
                == [("/", "Prefix", {"name": SERVICE, "port": {"name": "portal"}})],
                f"the Ingress must send / (Prefix) to {SERVICE} port portal, not {paths}",
            )
        )

    # The NetworkPolicy: the portal port only from selected peers, the IdP's port open.
    for policy in _of_kind(docs, "NetworkPolicy"):
        spec = policy.get("spec", {})
        rules = [r for r in spec.get("ingress", []) if port in _rule_ports(r)]
        out += [
            (bool(rules), f"the NetworkPolicy must admit the portal's port {port} (from the ingress controller)"),
            (all(_rule_ports(r) == {port} for r in rules), "the portal's port must have rules of its own"),
            (
                all(r.get("from") and all(peer for peer in r["from"]) for r in rules),
                "the NetworkPolicy must admit the portal only from selected peers, never from anywhere",
            ),
            (
                all(any("namespaceSelector" in peer for peer in r.get("from", [])) for r in rules),
                "the portal's peers must include the ingress controller's namespace (a namespace selector)",
            ),
        ]
        if "Egress" in spec.get("policyTypes", []):
            idp = _get(values, "networkPolicy", "portal", "idp") or {}
            wanted = [{"ipBlock": {"cidr": c}} for c in idp.get("cidrs") or []]
            out.append(
                (
                    any(
                        {"port": idp.get("port"), "protocol": "TCP"} in r.get("ports", []) and r.get("to", []) == wanted
                        for r in spec.get("egress", [])
                    ),
                    f"the NetworkPolicy must let the portal reach its identity provider on port {idp.get('port')} at {wanted or 'any address'}",
                )
            )
    return out


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, sub in node.items():
            here = f"{prefix}.{key}" if prefix else str(key)
            paths.add(here)
            paths |= _key_paths(sub, here)
    elif isinstance(node, list):
        for item in node:
            paths |= _key_paths(item, f"{prefix}[]")
    return paths


# --- what particular variants must render ----------------------------------------------------


def _portal_config(docs: Docs) -> Any:
    return _config(docs).get("portal")


def _one(docs: Docs, kind: str) -> dict[str, Any]:
    found = [d for d in _of_kind(docs, kind) if kind != "Service" or is_portal_service(d)]
    return found[0] if len(found) == 1 else {}


def _portal_rules(docs: Docs, port: int) -> list[dict[str, Any]]:
    return [r for r in _get(_one(docs, "NetworkPolicy"), "spec", "ingress") or [] if port in _rule_ports(r)]


def _secret_volume(docs: Docs, name: str) -> Any:
    return next((v.get("secret") for v in _volumes(docs) if v.get("name") == name), None)


DEFAULT_OIDC = {
    "issuer": "https://sso.example.org/realms/corp",
    "client_id": "imapgate-portal",
    "client_secret_file": SECRET_FILE,
    "scopes": ["openid", "email", "profile"],
    "user_claim": "email",
    "domains": [],
    "require_amr": [],
    "require_acr": [],
}

# What ci/portal-values.yaml (PORTAL_VALUES, rendered by check_chart) must put into the config.
PORTAL_VALUES_CONFIG = {
    "address": "0.0.0.0:8080",
    "tls": False,
    "trusted_proxies": ["10.244.0.0/16"],
    "public_url": "https://mail.example.org",
    "autoprovision": True,
    "reauth_after": "5m",
    "session_idle": "20m",
    "session_max": "4h",
    "rate_limit": {"per_ip": 120, "burst": 30},
    "mail": {"imap_host": "imap.example.org", "imap_port": 993},
    "oidc": {
        **DEFAULT_OIDC,
        "ca_file": CA_FILE,
        "domains": ["example.org"],
        "require_acr": ["gold"],
        "admin": {"claim": "groups", "values": ["mail-admins"]},
    },
}


def portal_values_pairs(docs: Docs) -> Pairs:
    """ci/portal-values.yaml: every key as given, the ingress-nginx peers, the IdP's address."""
    ingress = _one(docs, "Ingress")
    return [
        (_portal_config(docs) == PORTAL_VALUES_CONFIG, f"the portal values must render key for key, not {_portal_config(docs)!r}"),
        (
            _get(ingress, "metadata", "annotations")
            == {"cert-manager.io/cluster-issuer": "letsencrypt", "nginx.ingress.kubernetes.io/proxy-body-size": "64k"},
            f"the Ingress must carry the ClusterIssuer and the given annotations, not {_get(ingress, 'metadata', 'annotations')!r}",
        ),
        (_get(ingress, "spec", "ingressClassName") == "nginx", "portal.ingress.className must render"),
        (
            _get(ingress, "spec", "tls") == [{"hosts": ["mail.example.org"], "secretName": TLS_SECRET}],
            f"the Ingress's TLS must default to Secret {TLS_SECRET} for mail.example.org",
        ),
        (
            _secret_volume(docs, "portal-oidc-secret")
            == {"secretName": "imapgate-portal-oidc", "defaultMode": 0o440, "items": [{"key": "client-secret", "path": "client-secret"}]},
            "the client secret volume must map imapgate-portal-oidc's key client-secret",
        ),
        (
            _secret_volume(docs, "portal-oidc-ca")
            == {"secretName": "mail-sso-ca", "defaultMode": 0o440, "items": [{"key": "ca.crt", "path": "ca.pem"}]},
            "the IdP CA volume must map mail-sso-ca's key ca.crt",
        ),
        (
            [r.get("from") for r in _portal_rules(docs, 8080)]
            == [
                [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"}},
                    }
                ]
            ],
            f"the portal only from ingress-nginx's controller pods, not {[r.get('from') for r in _portal_rules(docs, 8080)]}",
        ),
        (
            {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
            in (_get(_one(docs, "NetworkPolicy"), "spec", "egress") or []),
            "egress to the identity provider's address on 443",
        ),
        (
            [(p.get("name"), p.get("containerPort")) for p in _container(docs).get("ports", [])]
            == [("imaps", 1993), ("imap", 1143), ("admin", 9190), ("portal", 8080)],
            "the portal's container port after the others",
        ),
    ]


EXPECTATIONS: dict[str, Callable[[Docs], Pairs]] = {
    PORTAL_VALUES: portal_values_pairs,
    PORTAL_DEFAULTS: lambda d: [
        (
            _portal_config(d)
            == {
                "address": "0.0.0.0:8080",
                "tls": False,
                "trusted_proxies": ["10.244.0.0/16"],
                "public_url": "https://mail.example.org",
                "autoprovision": True,
                "reauth_after": "10m",
                "session_idle": "30m",
                "session_max": "8h",
                "mail": {"imap_host": "mail.example.org", "imap_port": 993, "imap_starttls_port": 143},
                "oidc": DEFAULT_OIDC,
            },
            f"the portal must render the spec's defaults (no admin, no CA, no rate_limit), not {_portal_config(d)!r}",
        ),
        (
            "annotations" not in (_get(_one(d, "Ingress"), "metadata") or {}) and "ingressClassName" not in (_get(_one(d, "Ingress"), "spec") or {}),
            "no ClusterIssuer, annotations or class by default",
        ),
        (_get(_one(d, "Ingress"), "spec", "tls", 0, "secretName") == TLS_SECRET, f"the TLS Secret defaults to {TLS_SECRET}"),
        (_get(_one(d, "Service"), "spec", "ports", 0, "port") == 8080, "the portal Service's port is portal.port"),
        (not _one(d, "NetworkPolicy"), "no NetworkPolicy by default"),
        (_secret_volume(d, "portal-oidc-ca") is None, "no CA Secret: no portal-oidc-ca volume"),
    ],
    PORTAL_SQLITE_NO_INGRESS: lambda d: [
        (not _one(d, "Ingress"), "portal.ingress.enabled false: no Ingress"),
        (
            (_portal_config(d) or {}).get("address") == "[::]:8443" and (_portal_config(d) or {}).get("autoprovision") is False,
            "the portal listens on bindAddress and portal.port; autoprovision false renders",
        ),
        (
            (_portal_config(d) or {}).get("mail") == {"imap_host": "imap.example.org", "imap_port": 10993},
            f"imap_port from the implicit TLS listener's servicePort, no STARTTLS port (0), not {(_portal_config(d) or {}).get('mail')!r}",
        ),
        (
            (_portal_config(d) or {}).get("oidc")
            == {
                **DEFAULT_OIDC,
                "scopes": ["openid", "email", "profile", "groups"],
                "user_claim": "upn",
                "user_domain": "example.org",
                "require_amr": ["mfa"],
                "admin": {"claim": "roles", "values": ["Mail.Helpdesk", "Mail.Admin"]},
            },
            f"the OIDC keys must render as given, not {(_portal_config(d) or {}).get('oidc')!r}",
        ),
        (
            [r.get("from") for r in _portal_rules(d, 8443)]
            == [[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}, "podSelector": {}}]],
            "networkPolicy.portal defaults: the ingress-nginx namespace",
        ),
        (
            {"ports": [{"port": 443, "protocol": "TCP"}]} in (_get(_one(d, "NetworkPolicy"), "spec", "egress") or []),
            "no idp.cidrs: egress on 443 to any address",
        ),
    ],
    PORTAL_PORT_ANNOTATIONS: lambda d: [
        (
            _get(_one(d, "Ingress"), "metadata", "annotations")
            == {"cert-manager.io/cluster-issuer": "corp-ca", "traefik.ingress.kubernetes.io/router.entrypoints": "websecure"},
            "the ClusterIssuer's annotation beside the given ones",
        ),
        (
            _get(_one(d, "Ingress"), "spec", "tls") == [{"hosts": ["portal.example.org"], "secretName": "portal-cert"}]
            and _get(_one(d, "Ingress"), "spec", "ingressClassName") == "traefik",
            "the Ingress takes the host of a public URL with a port, the TLS Secret and class given",
        ),
        ("egress" not in (_get(_one(d, "NetworkPolicy"), "spec") or {}), "egress.enabled false: no egress rules"),
    ],
}


# --- the install notes, and the Secrets they name ----------------------------------------------


def secret_commands(values: dict[str, Any]) -> list[str]:
    """What the install notes must say to create the portal's Secrets (release mail)."""
    portal = values.get("portal") or {}
    if not portal.get("enabled"):
        return []
    oidc = portal["oidc"]
    wanted = [f"create secret generic {oidc['clientSecret']['existingSecret']} ", f"--from-file={oidc['clientSecret']['key']}="]
    ca = oidc.get("ca") or {}
    if ca.get("existingSecret"):
        wanted += [f"create secret generic {ca['existingSecret']} ", f"--from-file={ca['key']}="]
    return wanted


def notes_pairs(values: dict[str, Any], notes: str) -> Pairs:
    """The install notes: the portal's address, the redirect URI to register, its TLS Secret."""
    portal = values.get("portal") or {}
    if not portal.get("enabled"):
        return [("self-service portal" not in notes and "/auth/callback" not in notes, "must not mention the portal when it is off")]
    url = portal["publicUrl"]
    ingress = portal.get("ingress") or {}
    out = [
        (f"The self-service portal (docs/portal.md) is at {url}" in notes, "must say where the portal is"),
        (f"Register the redirect URI {url}/auth/callback for client \"{portal['oidc']['clientId']}\"" in notes, "must give the redirect URI"),
    ]
    if ingress.get("enabled", True):
        secret = (ingress.get("tls") or {}).get("secretName") or TLS_SECRET
        if ingress.get("clusterIssuer"):
            out.append((f"from ClusterIssuer {ingress['clusterIssuer']}" in notes and secret in notes, "must name the ClusterIssuer and the TLS Secret"))
        else:
            out.append((f"create secret tls {secret} " in notes, f"must tell how to create the portal's TLS Secret {secret}"))
    else:
        out.append((f"to Service\n    {SERVICE} port" in notes, "without the chart's Ingress, must name the Service to route to"))
    return out


def stand_in_files(config: dict[str, Any], pem: str) -> dict[str, str]:
    """The files the portal section names, with stand-ins for imapgate check-config."""
    oidc = (config.get("portal") or {}).get("oidc") or {}
    files = {}
    if "client_secret_file" in oidc:
        files[oidc["client_secret_file"]] = "stand-in client secret"
    if "ca_file" in oidc:
        files[oidc["ca_file"]] = pem
    return files


def config_files(config: dict[str, Any]) -> list[str]:
    """The files the portal section names (check_chart checks that each is mounted)."""
    oidc = (config.get("portal") or {}).get("oidc") or {}
    return [oidc[k] for k in ("client_secret_file", "ca_file") if k in oidc]
