"""Checks of the chart's SMTP submission and POP3 fronts (smtp.*, pop3.*, backends[].protocol,
login: xclient, routes.smtp and routes.pop3, networkPolicy.smtp and networkPolicy.pop3; issue 21,
docs/backends.md). Used by scripts/check_chart.py like check_portal.py: BAD_VALUES (the schema must
refuse each), variants() (rendered, or refused with FAILURE_MESSAGES), pairs() (what every render
must hold, and what particular variants must render), notes_pairs() (the install notes) and
secret_commands() (the Secrets the notes must tell how to create).

Every render, fronts on or off:
  * the rendered listeners are `listeners` (IMAP, no `protocol` key: the gateway's default), then
    with smtp.enabled `smtp.listeners` and with pop3.enabled `pop3.listeners`, in that order, each
    with its protocol; nothing of a front that is off (no listener, container port or Service
    port); `hostname` only on SMTP listeners, the same on each;
  * every listener's protocol has a backend of that protocol, and the routes of each protocol name
    backends of that protocol;
  * a `login: xclient` backend is an SMTP backend without master_user, master password file or
    separator, and nothing mounts a master password for it; `send_id` only on IMAP backends;
  * with the NetworkPolicy, each protocol's container ports are admitted in rules of their own
    (never mixed with another protocol's or the admin port), from that protocol's allowedCidrs
    (smtp's and pop3's null: imap's); with egress rules, every backend's port is reachable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import yaml

Docs = list[dict[str, Any]]
Pairs = list[tuple[bool, str]]

MAIL_VALUES = "SMTP and POP3 values (ci/mail-values.yaml)"
SMTP_STARTTLS_ONLY = "SMTP submission on 587 only, hostname from cert-manager, one Postfix backend"
POP3_INTERNAL = "POP3 only, on the internal Service, its own client networks"
FRONTS_PROXY_NODE_PORTS = "SMTP and POP3 behind the PROXY protocol with node ports"

# Backends of each protocol, as values.
DOVECOT: dict[str, Any] = {
    "name": "dovecot",
    "address": "dovecot.mail.svc.cluster.local:993",
    "tls": "implicit",
    "login": "master_user",
    "masterUser": "gateway",
    "masterPassword": {"existingSecret": "", "key": "password"},
}
POSTFIX: dict[str, Any] = {
    "name": "postfix",
    "protocol": "smtp",
    "address": "postfix.mail.svc.cluster.local:10587",
    "tls": "starttls",
    "login": "xclient",
}
SUBMISSION: dict[str, Any] = {
    "name": "dovecot-submission",
    "protocol": "smtp",
    "address": "dovecot.mail.svc.cluster.local:465",
    "tls": "implicit",
    "login": "sasl_authzid",
    "masterUser": "gateway",
    "masterPassword": {"existingSecret": "", "key": "password"},
}
POP3: dict[str, Any] = {
    "name": "dovecot-pop3",
    "protocol": "pop3",
    "address": "dovecot.mail.svc.cluster.local:995",
    "tls": "implicit",
    "login": "master_user",
    "masterUser": "gateway",
    "masterPassword": {"existingSecret": "", "key": "password"},
}
SUBMISSIONS_LISTENER = {"name": "submissions", "containerPort": 1465, "tls": "implicit", "servicePort": 465}
SUBMISSION_LISTENER = {"name": "submission", "containerPort": 1587, "tls": "starttls", "servicePort": 587}
POP3S_LISTENER = {"name": "pop3s", "containerPort": 1995, "tls": "implicit", "servicePort": 995}


def _with(backend: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(backend)
    out.update(changes)
    return out


# Values the schema must refuse: typos, wrong types, and the combinations the gateway refuses.
BAD_VALUES: list[tuple[str, Any]] = [
    ("smtp.enable", True),
    ("smtp.enabled", "true"),
    ("pop3.enabled", "yes"),
    ("smtp.hostname", "Mail.Example.org"),
    ("smtp.hostname", "mail example org"),
    ("smtp.hostname", "mail.example.org."),
    ("smtp.listeners", []),
    ("smtp.listeners", {"submissions": 465}),
    ("smtp.listeners.0.containerPort", 465),
    ("smtp.listeners.0.tls", "ssl"),
    ("smtp.listeners.0.protocol", "smtp"),
    ("pop3.listeners.0.name", "POP3S"),
    ("pop3.listeners.0.service", "public"),
    ("pop3.hostname", "mail.example.org"),
    ("backends.0.protocol", "smtps"),
    ("backends.0.protocol", "lmtp"),
    ("backends", [_with(DOVECOT, login="xclient")]),
    ("backends", [DOVECOT, _with(POSTFIX, masterUser="gateway")]),
    ("backends", [DOVECOT, _with(POSTFIX, masterPassword={"existingSecret": "", "key": "password"})]),
    ("backends", [DOVECOT, {k: v for k, v in POSTFIX.items() if k != "protocol"}]),
    ("backends", [DOVECOT, {**{k: v for k, v in POP3.items() if not k.startswith("master")}, "login": "xclient"}]),
    ("backends", [DOVECOT, {k: v for k, v in SUBMISSION.items() if k != "masterPassword"}]),
    ("backends", [DOVECOT, _with(POP3, sendId=True)]),
    ("routes.smtp", "postfix"),
    ("routes.smtp.default", "Postfix"),
    ("routes.smtp.backend", "postfix"),
    ("routes.pop3.domains", ["example.org"]),
    ("networkPolicy.smtp.allowedCidrs", "0.0.0.0/0"),
    ("networkPolicy.pop3.allowedCidrs", ["mail.example.org"]),
    ("networkPolicy.smtp.ports", [587]),
]


def _on(**extra: Any) -> dict[str, Any]:
    """SMTP and POP3 on with the default listeners, and a backend of each kind."""
    return {
        "smtp": {"enabled": True, "hostname": "mail.example.org"},
        "pop3": {"enabled": True},
        "backends": [DOVECOT, POSTFIX, POP3],
        **extra,
    }


def variants() -> list[tuple[str, dict[str, Any], bool]]:
    """(name, overrides, must_render); check_chart adds ci/mail-values.yaml as MAIL_VALUES."""
    return [
        (
            SMTP_STARTTLS_ONLY,
            {
                "smtp": {"enabled": True, "listeners": [SUBMISSION_LISTENER]},
                "backends": [DOVECOT, POSTFIX],
                "tls": {
                    "certManager": {
                        "enabled": True,
                        "issuerRef": {"name": "letsencrypt"},
                        "dnsNames": ["*.example.org", "smtp.example.org"],
                    }
                },
            },
            True,
        ),
        (
            POP3_INTERNAL,
            {
                "pop3": {"enabled": True, "listeners": [dict(POP3S_LISTENER, service="internal")]},
                "backends": [DOVECOT, POP3],
                "networkPolicy": {
                    "enabled": True,
                    "imap": {"allowedCidrs": ["192.0.2.0/24"]},
                    "pop3": {"allowedCidrs": []},
                },
            },
            True,
        ),
        (
            FRONTS_PROXY_NODE_PORTS,
            {
                **_on(),
                "guard": {"trustedProxies": ["10.0.0.0/16"]},
                "smtp": {
                    "enabled": True,
                    "hostname": "mail.example.org",
                    "listeners": [dict(SUBMISSIONS_LISTENER, proxyProtocol=True, nodePort=30465)],
                },
                "pop3": {"enabled": True, "listeners": [dict(POP3S_LISTENER, proxyProtocol=True, nodePort=30995)]},
                "service": {"type": "NodePort"},
            },
            True,
        ),
        ("SMTP without an SMTP backend", {"smtp": {"enabled": True}}, False),
        ("POP3 without a POP3 backend", {"pop3": {"enabled": True}, "backends": [DOVECOT, POSTFIX]}, False),
        ("two SMTP backends without routes.smtp", _on(backends=[DOVECOT, POSTFIX, SUBMISSION, POP3]), False),
        ("routes.smtp naming the IMAP backend", _on(routes={"smtp": {"default": "dovecot"}}), False),
        (
            "routes.smtp.domains naming a POP3 backend",
            _on(backends=[DOVECOT, POSTFIX, POP3], routes={"smtp": {"default": "postfix", "domains": {"example.net": "dovecot-pop3"}}}),
            False,
        ),
        ("routes.default naming an SMTP backend", _on(routes={"default": "postfix"}), False),
        (
            "an SMTP listener on an IMAP listener's port",
            {**_on(), "smtp": {"enabled": True, "listeners": [dict(SUBMISSIONS_LISTENER, containerPort=1993)]}},
            False,
        ),
        (
            "a POP3 listener named like an IMAP one",
            {**_on(), "pop3": {"enabled": True, "listeners": [dict(POP3S_LISTENER, name="imaps")]}},
            False,
        ),
        (
            "an SMTP listener on the IMAP Service port",
            {**_on(), "smtp": {"enabled": True, "listeners": [dict(SUBMISSIONS_LISTENER, servicePort=993)]}},
            False,
        ),
        (
            "an SMTP PROXY listener without trusted proxies",
            {**_on(), "smtp": {"enabled": True, "listeners": [dict(SUBMISSIONS_LISTENER, proxyProtocol=True)]}},
            False,
        ),
    ]


FAILURE_MESSAGES: dict[str, str | tuple[str, ...]] = {
    "SMTP without an SMTP backend": "smtp.enabled needs a backend with protocol: smtp",
    "POP3 without a POP3 backend": "pop3.enabled needs a backend with protocol: pop3",
    "two SMTP backends without routes.smtp": ("routes.smtp.default is required", "postfix, dovecot-submission"),
    "routes.smtp naming the IMAP backend": 'routes.smtp.default: no smtp backend is named "dovecot"',
    "routes.smtp.domains naming a POP3 backend": 'routes.smtp.domains.example.net: no smtp backend is named "dovecot-pop3"',
    "routes.default naming an SMTP backend": 'routes.default: no IMAP backend is named "postfix"',
    "an SMTP listener on an IMAP listener's port": "smtp.listeners[0] (submissions): containerPort 1993 is used twice",
    "a POP3 listener named like an IMAP one": 'pop3.listeners[0]: the name "imaps" is used twice',
    "an SMTP listener on the IMAP Service port": "smtp.listeners[0] (submissions): servicePort 993 is used twice on the main Service",
    "an SMTP PROXY listener without trusted proxies": "smtp.listeners[0] (submissions): proxyProtocol needs guard.trustedProxies",
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
    for doc in _of_kind(docs, "ConfigMap"):
        text = _get(doc, "data", "imapgate.yaml")
        if text:
            return yaml.safe_load(text) or {}
    return {}


def _container(docs: Docs) -> dict[str, Any]:
    found = _of_kind(docs, "Deployment")
    return (_get(found[0], "spec", "template", "spec", "containers", 0) or {}) if len(found) == 1 else {}


def _volumes(docs: Docs) -> list[dict[str, Any]]:
    found = _of_kind(docs, "Deployment")
    return (_get(found[0], "spec", "template", "spec", "volumes") or []) if len(found) == 1 else []


def _rule_ports(rule: dict[str, Any]) -> set[Any]:
    return {p.get("port") for p in rule.get("ports", [])}


def _protocol(item: dict[str, Any]) -> str:
    return item.get("protocol", "imap")


def pairs(name: str, docs: Docs, values: dict[str, Any]) -> Pairs:
    """What the render holds about the fronts: the invariants, and EXPECTATIONS[name]. values: the
    values it was rendered with (values.yaml and the overrides merged)."""
    return invariants(docs, values) + EXPECTATIONS.get(name, lambda _d: [])(docs)


def invariants(docs: Docs, values: dict[str, Any]) -> Pairs:
    config = _config(docs)
    if not config:
        return []
    listeners = config.get("listeners") or []
    backends = config.get("backends") or []
    out: Pairs = []

    # Listeners: IMAP's, then SMTP's and POP3's when on, in that order, each with its protocol.
    wanted = [(l["name"], "imap") for l in values.get("listeners") or []]
    for protocol in ("smtp", "pop3"):
        front = values.get(protocol) or {}
        if front.get("enabled"):
            wanted += [(l["name"], protocol) for l in front.get("listeners") or []]
    got = [(l.get("name"), _protocol(l)) for l in listeners]
    out.append((got == wanted, f"the rendered listeners must be {wanted}, not {got}"))
    out.append((all("protocol" not in l for l in listeners if _protocol(l) == "imap"), "IMAP listeners carry no protocol key (the default)"))
    hostnames = {l.get("hostname") for l in listeners if _protocol(l) == "smtp"}
    out += [
        (all("hostname" not in l for l in listeners if _protocol(l) != "smtp"), "hostname is for SMTP listeners only"),
        (len(hostnames) <= 1, f"every SMTP listener has the same hostname, not {hostnames}"),
    ]
    ports = {p.get("name"): p.get("containerPort") for p in _container(docs).get("ports", [])}
    service_targets = {p.get("targetPort") for s in _of_kind(docs, "Service") for p in _get(s, "spec", "ports") or []}
    for protocol in ("smtp", "pop3"):
        if not (values.get(protocol) or {}).get("enabled"):
            names = [l["name"] for l in (values.get(protocol) or {}).get("listeners") or []]
            out.append(
                (
                    not any(n in ports or n in service_targets for n in names),
                    f"{protocol} is off: none of {names} may be a container or Service port",
                )
            )

    # Backends and routes by protocol.
    of: dict[str, list[str]] = {}
    for b in backends:
        of.setdefault(_protocol(b), []).append(b["name"])
    for protocol in {_protocol(l) for l in listeners}:
        out.append((bool(of.get(protocol)), f"the {protocol} listeners need a backend with protocol {protocol}"))
    routes = config.get("routes") or {}
    out.append((routes.get("default") in of.get("imap", []), f"routes.default {routes.get('default')!r} must be an IMAP backend"))
    for protocol in ("smtp", "pop3"):
        r = routes.get(protocol)
        if r is None:
            out.append((len(of.get(protocol, [])) <= 1, f"routes.{protocol} is needed with {of.get(protocol)}"))
            continue
        named = [r.get("default"), *(r.get("domains") or {}).values()]
        out.append((all(n in of.get(protocol, []) for n in named), f"routes.{protocol} must name {protocol} backends, not {named}"))
    mounts = {m.get("mountPath") for m in _container(docs).get("volumeMounts", [])}
    volumes = {v.get("name") for v in _volumes(docs)}
    for b in backends:
        where = f"backend {b['name']}"
        if b.get("login") == "xclient":
            out += [
                (_protocol(b) == "smtp", f"{where}: login xclient only for SMTP backends"),
                (
                    not {"master_user", "master_password_file", "master_password_env", "master_separator"} & set(b),
                    f"{where}: login xclient renders no master credential, not {sorted(b)}",
                ),
                (
                    f"master-{b['name']}"[:63].rstrip("-") not in volumes
                    and not any(str(m).startswith(f"/etc/imapgate/backends/{b['name']}/master") for m in mounts),
                    f"{where}: nothing mounts a master password for an XCLIENT backend",
                ),
            ]
        else:
            out.append(("master_password_file" in b and bool(b.get("master_user")), f"{where}: needs its master credential"))
        if _protocol(b) != "imap":
            out.append(("send_id" not in b, f"{where}: send_id is for IMAP backends only"))

    # The NetworkPolicy: each protocol's ports in rules of their own, from its own networks.
    np = values.get("networkPolicy") or {}
    for policy in _of_kind(docs, "NetworkPolicy"):
        spec = policy.get("spec", {})
        rules = spec.get("ingress", [])
        by_protocol: dict[str, set[Any]] = {}
        for l in listeners:
            by_protocol.setdefault(_protocol(l), set()).add(ports.get(l["name"]))
        for protocol, mine in by_protocol.items():
            others = set().union(*(p for k, p in by_protocol.items() if k != protocol)) | {ports.get("admin")}
            touching = [r for r in rules if mine & _rule_ports(r)]
            cidrs = (np.get(protocol) or {}).get("allowedCidrs")
            if protocol != "imap" and cidrs is None:
                cidrs = (np.get("imap") or {}).get("allowedCidrs")
            wanted_from = [{"ipBlock": {"cidr": c}} for c in cidrs or []]
            client_rules = [r for r in touching if not any("podSelector" in peer for peer in r.get("from", []))]
            out += [
                (bool(touching) and all(mine <= _rule_ports(r) for r in touching), f"the NetworkPolicy must admit every {protocol} port {sorted(mine)}"),
                (all(not (others & _rule_ports(r)) for r in touching), f"the {protocol} ports must have rules of their own"),
                (
                    len(client_rules) == 1 and client_rules[0].get("from", []) == wanted_from,
                    f"the {protocol} ports must be open to {wanted_from or 'anywhere'}, not {[r.get('from') for r in client_rules]}",
                ),
            ]
        if "Egress" in spec.get("policyTypes", []):
            egress_ports = {p.get("port") for r in spec.get("egress", []) for p in r.get("ports", [])}
            for b in backends:
                port = int(b["address"].rsplit(":", 1)[1])
                out.append((port in egress_ports, f"the NetworkPolicy must let the pods reach {b['name']}'s port {port}"))
    return out


# --- what particular variants must render ----------------------------------------------------


def _listener(docs: Docs, name: str) -> dict[str, Any]:
    return next((l for l in _config(docs).get("listeners") or [] if l.get("name") == name), {})


def _backend(docs: Docs, name: str) -> dict[str, Any]:
    return next((b for b in _config(docs).get("backends") or [] if b.get("name") == name), {})


def _service_ports(docs: Docs, internal: bool = False) -> list[tuple[Any, ...]]:
    services = [
        s
        for s in _of_kind(docs, "Service")
        if (_get(s, "metadata", "labels", "app.kubernetes.io/component") == "internal") == internal
        and not str(_get(s, "metadata", "name")).endswith(("-metrics", "-portal"))
    ]
    return [(p.get("name"), p.get("port"), p.get("nodePort")) for s in services for p in _get(s, "spec", "ports") or []]


def mail_values_pairs(docs: Docs) -> Pairs:
    """ci/mail-values.yaml: every key as given."""
    config = _config(docs)
    return [
        (
            _listener(docs, "submissions")
            == {"name": "submissions", "protocol": "smtp", "address": "0.0.0.0:1465", "tls": "implicit", "hostname": "mail.example.org", "proxy_protocol": False},
            f"the implicit-TLS submission listener must render as given, not {_listener(docs, 'submissions')!r}",
        ),
        (
            _listener(docs, "pop3") == {"name": "pop3", "protocol": "pop3", "address": "0.0.0.0:1110", "tls": "starttls", "proxy_protocol": False},
            f"the STLS POP3 listener must render as given, not {_listener(docs, 'pop3')!r}",
        ),
        (
            _backend(docs, "postfix")
            == {
                "name": "postfix",
                "protocol": "smtp",
                "address": "postfix.mail.svc.cluster.local:10587",
                "tls": "starttls",
                "ca_file": "/etc/imapgate/backends/postfix/ca.pem",
                "server_name": "smtp.mail.internal",
                "login": "xclient",
                "connect_timeout": "5s",
                "login_timeout": "10s",
            },
            f"the XCLIENT backend must render as given, with no master credential, not {_backend(docs, 'postfix')!r}",
        ),
        (
            _backend(docs, "dovecot-submission").get("login") == "sasl_authzid"
            and "master_separator" not in _backend(docs, "dovecot-submission")
            and "send_id" not in _backend(docs, "dovecot-submission"),
            f"Dovecot's submission backend: sasl_authzid without separator or send_id, not {_backend(docs, 'dovecot-submission')!r}",
        ),
        (
            _backend(docs, "dovecot-pop3").get("master_separator") == "*" and _backend(docs, "dovecot").get("send_id") is True,
            "the POP3 backend keeps its separator, the IMAP one its send_id",
        ),
        (
            config.get("routes") == {"default": "dovecot", "domains": {}, "smtp": {"default": "postfix", "domains": {"example.net": "dovecot-submission"}}},
            f"routes.smtp must render, routes.pop3 ({{}}) not, not {config.get('routes')!r}",
        ),
        (
            _service_ports(docs)
            == [("imaps", 993, None), ("imap", 143, None), ("submissions", 465, None), ("submission", 587, None), ("pop3s", 995, None), ("pop3", 110, None)],
            f"the client-facing Service must carry the six ports, not {_service_ports(docs)}",
        ),
        (
            [(p.get("name"), p.get("containerPort")) for p in _container(docs).get("ports", [])]
            == [("imaps", 1993), ("imap", 1143), ("submissions", 1465), ("submission", 1587), ("pop3s", 1995), ("pop3", 1110), ("admin", 9190)],
            "the container ports: IMAP's, SMTP's, POP3's, then admin",
        ),
        (
            sorted(v["name"] for v in _volumes(docs) if v.get("name", "").startswith("master-"))
            == ["master-dovecot", "master-dovecot-pop3", "master-dovecot-submission"],
            "a master password volume for each backend but the XCLIENT one",
        ),
    ]


EXPECTATIONS: dict[str, Callable[[Docs], Pairs]] = {
    MAIL_VALUES: mail_values_pairs,
    SMTP_STARTTLS_ONLY: lambda d: [
        (
            _listener(d, "submission").get("hostname") == "smtp.example.org",
            f"no smtp.hostname: the first certManager dnsName that is no wildcard, not {_listener(d, 'submission')!r}",
        ),
        ("smtp" not in (_config(d).get("routes") or {}), "one SMTP backend: no routes.smtp"),
        (not _listener(d, "pop3s") and not _listener(d, "submissions"), "only the listeners given"),
    ],
    POP3_INTERNAL: lambda d: [
        (("pop3s", 995, None) in _service_ports(d, internal=True), "the POP3 listener on the internal Service"),
        (all(p[0] != "pop3s" for p in _service_ports(d)), "and not on the client-facing one"),
        ("hostname" not in _listener(d, "pop3s"), "no hostname on a POP3 listener"),
    ],
    FRONTS_PROXY_NODE_PORTS: lambda d: [
        (
            _listener(d, "submissions").get("proxy_protocol") is True and _listener(d, "pop3s").get("proxy_protocol") is True,
            "proxyProtocol renders for SMTP and POP3 listeners",
        ),
        (
            ("submissions", 465, 30465) in _service_ports(d) and ("pop3s", 995, 30995) in _service_ports(d),
            f"each front's nodePort on its Service port, not {_service_ports(d)}",
        ),
    ],
}


# --- the install notes, and the Secrets they name ----------------------------------------------

WORDS = {"imap": "IMAP", "smtp": "SMTP submission", "pop3": "POP3"}


def notes_pairs(values: dict[str, Any], notes: str) -> Pairs:
    """The install notes: each front's ports, and the XCLIENT backends' trust."""
    out: Pairs = []
    for protocol in ("smtp", "pop3"):
        front = values.get(protocol) or {}
        for l in front.get("listeners") or []:
            line = f"port {l['servicePort']} ({l['name']}): {WORDS[protocol]}"
            if front.get("enabled"):
                out.append((line in notes, f"must list {line!r}"))
            else:
                out.append((f"({l['name']}): {WORDS[protocol]}" not in notes, f"must not list {l['name']}"))
    for b in values.get("backends") or []:
        if b.get("login") == "xclient":
            out.append(
                (
                    f'Backend "{b["name"]}" takes the login by XCLIENT' in notes and "smtpd_authorized_xclient_hosts" in notes,
                    f"must tell that {b['name']}'s smtpd_authorized_xclient_hosts lists these pods only",
                )
            )
            out.append((f"master password for backend \"{b['name']}\"" not in notes, f"no master password Secret for {b['name']}"))
    return out


def secret_commands(values: dict[str, Any]) -> list[str]:
    """The fronts add no Secret of their own (a backend's master password is check_chart's)."""
    return []
