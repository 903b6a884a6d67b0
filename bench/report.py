#!/usr/bin/env python3
"""Aggregates bench/run.sh's raw results (one JSON object per line) into a table with ratios
to direct Dovecot and to nginx, and writes everything to a JSON file. SMTP submission runs
(`loadgen smtp`: labels `postfix`, direct, and `imapgate-smtp`, through the gateway) get a table
of their own, with issue 21's two targets: messages/s at least 0.9 × direct, and the gateway's
CPU per message at most 0.5 × Postfix's own.

    report.py RAW.jsonl OUT.json key=value...   (the key=value pairs describe the machine)
"""
import json
import statistics
import sys


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


SMTP_CONCURRENCY = (8, 32)


def smtp_report(rows, fmt):
    """The SMTP table (printed) and its figures, ratios and target verdicts (returned)."""
    if not rows:
        return None
    by = {}
    for r in rows:
        by.setdefault((r["label"], r["concurrency"]), []).append(r)

    def med(label, c, f):
        return median([f(r) for r in by.get((label, c), [])])

    def field(name):
        return lambda r: r.get(name)

    def total(r):  # the gateway's CPU and Postfix's behind it, per message
        a, b = r.get("cpu_ms_per_message"), r.get("backend_cpu_ms_per_message")
        return a + b if a is not None and b is not None else None

    def ratio(a, b):
        return a / b if a is not None and b is not None and abs(b) > 1e-9 else None

    figures = []  # (name, unit, direct, through the gateway, ratio, what the ratio is)
    verdicts = {}
    for c in SMTP_CONCURRENCY:
        if not by.get(("postfix", c)) and not by.get(("imapgate-smtp", c)):
            continue
        rate_d, rate_g = med("postfix", c, field("per_second")), med("imapgate-smtp", c, field("per_second"))
        pf_d = med("postfix", c, field("cpu_ms_per_message"))
        pf_g = med("imapgate-smtp", c, field("backend_cpu_ms_per_message"))
        gw = med("imapgate-smtp", c, field("cpu_ms_per_message"))
        tot = med("imapgate-smtp", c, total)
        figures += [
            (f"messages/s, {c} clients", "1/s", rate_d, rate_g, ratio(rate_g, rate_d), "÷ direct"),
            (f"MB/s, {c} clients", "MB/s", med("postfix", c, field("mb_per_s")),
             med("imapgate-smtp", c, field("mb_per_s")), None, ""),
            (f"message p50, {c} clients", "ms", med("postfix", c, field("p50_ms")),
             med("imapgate-smtp", c, field("p50_ms")), None, ""),
            (f"message p99, {c} clients", "ms", med("postfix", c, field("p99_ms")),
             med("imapgate-smtp", c, field("p99_ms")), None, ""),
            (f"session setup p50, {c} clients", "ms", med("postfix", c, field("session_setup_p50_ms")),
             med("imapgate-smtp", c, field("session_setup_p50_ms")), None, ""),
            (f"TLS sessions resumed, {c} clients", "", med("postfix", c, field("tls_resumed_fraction")),
             med("imapgate-smtp", c, field("tls_resumed_fraction")), None, ""),
            (f"Postfix CPU per message, {c} clients", "ms", pf_d, pf_g, ratio(pf_g, pf_d), "÷ direct"),
            (f"gateway CPU per message, {c} clients", "ms", None, gw, ratio(gw, pf_d),
             "÷ Postfix direct"),
            (f"gateway ÷ Postfix behind it, {c} clients", "", None, ratio(gw, pf_g), None, ""),
            (f"gateway + Postfix CPU per message, {c} clients", "ms", pf_d, tot, ratio(tot, pf_d),
             "÷ direct"),
            (f"client (loadgen) CPU per message, {c} clients", "ms",
             med("postfix", c, field("client_cpu_ms_per_message")),
             med("imapgate-smtp", c, field("client_cpu_ms_per_message")), None, ""),
        ]
        # Ratios of the rounds paired in order (round r of one target with round r of the
        # other), to show the spread behind the ratio of medians.
        d_rows, g_rows = by.get(("postfix", c), []), by.get(("imapgate-smtp", c), [])
        paired_rate = [ratio(g.get("per_second"), d.get("per_second")) for d, g in zip(d_rows, g_rows)]
        paired_cpu = [ratio(g.get("cpu_ms_per_message"), d.get("cpu_ms_per_message"))
                      for d, g in zip(d_rows, g_rows)]
        verdicts[str(c)] = {
            "messages_per_s_ratio": ratio(rate_g, rate_d),
            "messages_per_s_target_met": (ratio(rate_g, rate_d) or 0) >= 0.9,
            "gateway_cpu_to_postfix_direct": ratio(gw, pf_d),
            "gateway_cpu_to_postfix_behind_gateway": ratio(gw, pf_g),
            "cpu_target_met": ratio(gw, pf_d) is not None and ratio(gw, pf_d) <= 0.5,
            "rounds_messages_per_s_ratio": paired_rate,
            "rounds_gateway_cpu_to_postfix_direct": paired_cpu,
            "median_of_rounds_messages_per_s_ratio": median(paired_rate),
            "median_of_rounds_gateway_cpu_to_postfix_direct": median(paired_cpu),
            "errors": sum(r.get("errors", 0) for r in d_rows + g_rows),
        }

    def cell(name, v):
        if v is None:
            return "—"
        if name.startswith("TLS sessions resumed"):
            return f"{v:.0%}"
        if name.startswith("gateway ÷"):
            return f"{v:.2f}×"
        return fmt(v)

    lines = ["| figure | unit | direct to Postfix | through imapgate | ratio | ratio of |",
             "|---|---|---|---|---|---|"]
    for name, unit, d, g, q, what in figures:
        lines.append(f"| {name} | {unit} | {cell(name, d)} | {cell(name, g)} | "
                     f"{f'{q:.2f}×' if q is not None else '—'} | {what} |")
    table = "\n".join(lines)
    print("\nSMTP submission, 50 KB messages, 10 per session (medians):\n")
    print(table)
    for c, v in verdicts.items():
        rate, cpu, behind = (v["messages_per_s_ratio"], v["gateway_cpu_to_postfix_direct"],
                             v["gateway_cpu_to_postfix_behind_gateway"])
        show = lambda x: f"{x:.2f}×" if x is not None else "—"
        rounds = v["rounds_messages_per_s_ratio"]
        spread = (f"; round by round {min(rounds):.2f}× to {max(rounds):.2f}×, median "
                  f"{show(v['median_of_rounds_messages_per_s_ratio'])}" if len(rounds) > 1 and None not in rounds else "")
        print(f"\n{c} clients: messages/s {show(rate)} direct (target ≥ 0.9×: "
              f"{'met' if v['messages_per_s_target_met'] else 'NOT met'}{spread}); gateway CPU per message "
              f"{show(cpu)} Postfix's own (target ≤ 0.5×: {'met' if v['cpu_target_met'] else 'NOT met'}; "
              f"{show(behind)} of Postfix's behind the gateway); errors {v['errors']}")
    return {
        "figures": [{"figure": n, "unit": u, "direct": d, "through_gateway": g, "ratio": q,
                     "ratio_of": w} for n, u, d, g, q, w in figures],
        "targets": verdicts,
        "table_markdown": table,
    }


def main():
    raw_path, out_path, *meta = sys.argv[1:]
    rows = [json.loads(line) for line in open(raw_path) if line.strip()]
    groups = {}
    for r in rows:
        key = (r["mode"], r.get("concurrency"), r["label"])
        groups.setdefault(key, []).append(r)

    def agg(mode, label, field, concurrency=None):
        return median([r.get(field) for r in groups.get((mode, concurrency, label), [])])

    figures = []  # (name, unit, higher_is_better, {label: value})
    labels = ["dovecot", "nginx", "imapgate", "imapgate-cold", "imapgate-oauth", "imapgate-tls-upstream",
              "imapgate-sqlite", "imapgate-sqlite-cold", "imapgate-postgres", "imapgate-postgres-cold"]
    for c in (8, 64):
        figures.append((f"logins/s, {c} clients", "1/s", True,
                        {l: agg("logins", l, "per_second", c) for l in labels}))
        figures.append((f"login p50, {c} clients", "ms", False,
                        {l: agg("logins", l, "p50_ms", c) for l in labels}))
        figures.append((f"login p99, {c} clients", "ms", False,
                        {l: agg("logins", l, "p99_ms", c) for l in labels}))
        figures.append((f"proxy CPU per login, {c} clients", "ms", False,
                        {l: agg("logins", l, "cpu_ms_per_login", c) for l in labels}))
    figures.append(("FETCH 1:* BODY.PEEK[]", "MB/s", True,
                    {l: agg("fetch", l, "mb_per_s") for l in labels}))
    figures.append(("proxy CPU per MB fetched", "ms", False,
                    {l: agg("fetch", l, "cpu_ms_per_mb") for l in labels}))
    figures.append(("NOOP round trip p50", "µs", False,
                    {l: agg("noop", l, "p50_us") for l in labels}))
    figures.append(("NOOP round trip p99", "µs", False,
                    {l: agg("noop", l, "p99_us") for l in labels}))
    figures.append(("idle sessions held", "", True,
                    {l: agg("idle", l, "held") for l in labels}))
    figures.append(("memory per idle session", "KiB", False,
                    {l: (lambda v: v / 1024 if v is not None else None)(agg("idle", l, "bytes_per_session"))
                     for l in labels}))
    figures.append(("CPU while idle", "%", False,
                    {l: agg("idle", l, "idle_cpu_percent") for l in labels}))

    def fmt(v):
        if v is None:
            return "—"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}"

    def ratio(a, b):
        # A zero (or a float residue of one, e.g. 1e-14 % idle CPU) has no meaningful ratio.
        return f"{a / b:.2f}×" if a is not None and b is not None and abs(b) > 1e-9 else "—"

    # The credential stores against the file store (imapgate, imapgate-cold), warm with warm
    # and cold with cold.
    stores = [("sqlite ÷ file", "imapgate-sqlite", "imapgate"),
              ("postgres ÷ file", "imapgate-postgres", "imapgate"),
              ("sqlite-cold ÷ cold", "imapgate-sqlite-cold", "imapgate-cold"),
              ("postgres-cold ÷ cold", "imapgate-postgres-cold", "imapgate-cold")]
    head = ["figure", "unit"] + labels + ["imapgate ÷ dovecot", "imapgate ÷ nginx",
                                          "oauth ÷ dovecot"] + [s[0] for s in stores]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, unit, _, vals in figures:
        cells = [name, unit] + [fmt(vals.get(l)) for l in labels]
        cells += [ratio(vals.get("imapgate"), vals.get("dovecot")),
                  ratio(vals.get("imapgate"), vals.get("nginx")),
                  ratio(vals.get("imapgate-oauth"), vals.get("dovecot"))]
        cells += [ratio(vals.get(a), vals.get(b)) for _, a, b in stores]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    imap_rows = any(r["mode"] != "smtp" for r in rows)
    if imap_rows:
        print(table)
    # Issue 18's target: warm logins/s of each database store within 10 % of the file store's,
    # at 8 and 64 clients, in the same run.
    verdicts = {}
    for store in ("imapgate-sqlite", "imapgate-postgres"):
        got = []
        for name, _, _, vals in figures:
            if name.startswith("logins/s,") and vals.get(store) is not None and vals.get("imapgate"):
                got.append((name, vals[store] / vals["imapgate"]))
        if got:
            verdicts[store] = {"ratios": dict(got), "within_10_percent": all(r >= 0.9 for _, r in got)}
            print(f"\n{store}: warm logins/s against the file store: "
                  + ", ".join(f"{n.split(', ')[1]} {r:.2f}×" for n, r in got)
                  + ("; within 10 %" if verdicts[store]["within_10_percent"] else "; NOT within 10 %"))
    smtp = smtp_report([r for r in rows if r["mode"] == "smtp"], fmt)
    machine = dict(kv.split("=", 1) for kv in meta)
    # Replicas in the idle run (bench/run.sh starts them when one process may not hold the
    # sessions under the open-files limit): the idle figures above are their sums and averages.
    for r in groups.get(("idle", None, "imapgate"), []):
        n = len(r.get("addr", "").split(","))
        if n > 1:
            print(f"\nimapgate's idle sessions were spread over {n} processes (open-files limit "
                  f"{machine.get('fd_hard_limit', '?')}); memory per session is their growth added "
                  f"up, divided by the sessions held.")
    out = {
        "machine": machine,
        "figures": [{"figure": n, "unit": u, "higher_is_better": h, "values": v}
                    for n, u, h, v in figures],
        "raw": rows,
        "table_markdown": table,
        "stores_against_file": verdicts,
    }
    if smtp:
        out["smtp"] = smtp
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwritten: {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
