"""Build deploy/grafana/bccguard.json, the bccguard Grafana dashboard.

Why generated: ~20 panels share one datasource reference, one instance
filter and one layout rule; writing them as plain dicts keeps every PromQL
expression readable in one place, and a test proves the committed JSON is
what this script produces and that each expression works against a real
Prometheus. No dependency beyond the standard library.

    python deploy/grafana/build_dashboard.py          # rewrite bccguard.json
    python deploy/grafana/build_dashboard.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("bccguard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'  # every expression is filtered by the instance variable
RI = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", **extra: Any) -> dict[str, Any]:
    """One PromQL query; refIds are assigned by `panel`."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", **extra}


def panel(kind: str, title: str, description: str, targets: list[dict[str, Any]], *,
          unit: str = "short", w: int = 12, h: int = 8, stack: bool = False,
          options: dict[str, Any] | None = None,
          overrides: list[dict[str, Any]] | None = None) -> Panel:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    custom: dict[str, Any] = {}
    if kind == "timeseries":
        custom = {"fillOpacity": 20 if stack else 0, "lineWidth": 1, "showPoints": "never",
                  "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom},
                        "overrides": overrides or []},
        "options": options or {},
        "gridPos": {"w": w, "h": h},
    }


def quantiles(metric: str, by: str = "") -> list[dict[str, Any]]:
    grouping = f"{by}, le" if by else "le"
    return [
        target(
            f"histogram_quantile({q}, sum by ({grouping}) "
            f"(rate({metric}_bucket{{{SEL}}}[{RI}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def stat(title: str, description: str, expr: str, unit: str = "short") -> Panel:
    return panel("stat", title, description, [target(expr, title)], unit=unit, w=6, h=4,
                 options={"reduceOptions": {"calcs": ["lastNotNull"]}, "graphMode": "area"})


def panels() -> list[Panel]:
    prevented = 'action!~"pass|audit"'
    return [
        # --- at a glance
        stat("Relays up", "Scraped bccguard processes that answer (Prometheus `up`).",
             f"sum(up{{{SEL}}})"),
        stat("Messages (range)", "Messages processed in the selected time range.",
             f"sum(increase(bccguard_messages_total{{{SEL}}}[$__range]))"),
        stat("Exposures prevented (range)",
             "Messages that would have shown external recipients to each other and were "
             "rewritten, split, quarantined, rejected or deferred instead.",
             f"sum(increase(bccguard_exposures_total{{{SEL},{prevented}}}[$__range]))"),
        stat("Addresses hidden (range)", "Recipient addresses removed from To/Cc headers.",
             f"sum(increase(bccguard_addresses_hidden_total{{{SEL}}}[$__range]))"),
        # --- traffic
        panel("timeseries", "Throughput by action",
              "Messages per second by what bccguard did with them.",
              [target(f"sum by (action) (rate(bccguard_messages_total{{{SEL}}}[{RI}]))",
                      "{{action}}")], unit="reqps", stack=True),
        panel("timeseries", "Exposures prevented and addresses hidden",
              "Exposures prevented per second; exposures let through (pass, or audit mode) "
              "per second; addresses hidden per second.",
              [target(f"sum(rate(bccguard_exposures_total{{{SEL},{prevented}}}[{RI}]))",
                      "exposures prevented"),
               target(f'sum(rate(bccguard_exposures_total{{{SEL},action=~"pass|audit"}}[{RI}]))',
                      "exposures let through"),
               target(f"sum(rate(bccguard_addresses_hidden_total{{{SEL}}}[{RI}]))",
                      "addresses hidden")], unit="ops"),
        panel("heatmap", "Visible recipients per message",
              "Distribution of distinct To/Cc addresses per message.",
              [target(f"sum by (le) (increase(bccguard_visible_recipients_bucket{{{SEL}}}[{RI}]))",
                      "{{le}}", format="heatmap")],
              options={"calculate": False, "yAxis": {"unit": "short"},
                       "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}),
        panel("timeseries", "Visible external recipients per message (quantiles)",
              "External addresses a recipient could see, per message: the number the policy "
              "limits.", quantiles("bccguard_visible_external_recipients")),
        panel("timeseries", "Envelope recipients per message (quantiles)",
              "RCPT TO count per message.", quantiles("bccguard_envelope_recipients")),
        panel("timeseries", "Message size (quantiles)", "Size of messages as received.",
              quantiles("bccguard_message_size_bytes"), unit="bytes"),
        panel("timeseries", "Inspection time (quantiles)",
              "CPU time to parse headers and decide, per message; it runs on the SMTP loop.",
              quantiles("bccguard_inspection_seconds"), unit="s"),
        # --- upstream
        panel("timeseries", "Upstream delivery latency",
              "Time for an upstream SMTP transaction that got an answer.",
              quantiles("bccguard_upstream_delivery_seconds"), unit="s"),
        panel("timeseries", "Upstream failures by kind",
              "Failed upstream transactions per second: no answer (connect, timeout, tls, "
              "protocol) or a 4xx/5xx reply.",
              [target(f"sum by (kind) (rate(bccguard_upstream_failures_total{{{SEL}}}[{RI}]))",
                      "{{kind}}")], unit="ops", stack=True),
        panel("timeseries", "Seconds since last upstream success",
              "Grows when the upstream MTA accepts nothing.",
              [target(f"time() - max by (instance) "
                      f"(bccguard_upstream_last_success_timestamp_seconds{{{SEL}}} > 0)",
                      "{{instance}}")], unit="s"),
        # --- SMTP front end
        panel("timeseries", "Active SMTP sessions", "Open client sessions per relay.",
              [target(f"sum by (instance) (bccguard_smtp_sessions_active{{{SEL}}})",
                      "{{instance}}")]),
        panel("timeseries", "SMTP connections by result",
              "Inbound connections per second, accepted or refused and why.",
              [target(f"sum by (result) (rate(bccguard_smtp_connections_total{{{SEL}}}[{RI}]))",
                      "{{result}}")], unit="ops", stack=True),
        panel("timeseries", "SMTP reply classes",
              "Replies sent to clients per second by class; 4xx means clients retry later.",
              [target(f"sum by (class) (rate(bccguard_smtp_replies_total{{{SEL}}}[{RI}]))",
                      "{{class}}")], unit="ops", stack=True),
        # --- milter front end (the MTA asks bccguard inside its own transaction)
        panel("timeseries", "Milter sessions",
              "Open MTA connections per relay, and new ones per second.",
              [target(f"sum by (instance) (bccguard_milter_sessions_active{{{SEL}}})",
                      "open {{instance}}"),
               target(f"sum by (instance) (rate(bccguard_milter_sessions_total{{{SEL}}}[{RI}]))",
                      "new/s {{instance}}")]),
        panel("timeseries", "Milter answers",
              "Final answers to the MTA per second: continue, edit (rewritten), discard (held or "
              "split by bccguard), quarantine (MTA hold queue), reject, tempfail (the client retries).",
              [target(f"sum by (response) (rate(bccguard_milter_responses_total{{{SEL}}}[{RI}]))",
                      "{{response}}")], unit="ops", stack=True),
        panel("timeseries", "Milter errors",
              "Sessions or messages cut short: protocol errors, timeouts, MTA disconnects "
              "mid-message, messages over max_message_size.",
              [target(f"sum by (kind) (rate(bccguard_milter_errors_total{{{SEL}}}[{RI}]))",
                      "{{kind}}")], unit="ops", stack=True),
        panel("timeseries", "Quarantine depth", "Messages and bytes held for review.",
              [target(f"sum by (instance) (bccguard_quarantine_messages{{{SEL}}})",
                      "messages {{instance}}"),
               target(f"sum by (instance) (bccguard_quarantine_bytes{{{SEL}}})",
                      "bytes {{instance}}")],
              overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                          "properties": [{"id": "unit", "value": "bytes"},
                                         {"id": "custom.axisPlacement", "value": "right"}]}]),
        # --- spool, split delivery, releases, notices
        panel("timeseries", "Spool depth",
              "Entries and copies answered 250 but not yet accepted upstream; should drain to 0.",
              [target(f"sum by (instance) (bccguard_spool_entries{{{SEL}}})", "entries {{instance}}"),
               target(f"sum by (instance) (bccguard_spool_copies{{{SEL}}})", "copies {{instance}}")]),
        panel("timeseries", "Spool retries by kind",
              "Spooled copies rescheduled after a failed attempt (retry, split, dsn, notice).",
              [target(f"sum by (kind) (rate(bccguard_spool_retries_total{{{SEL}}}[{RI}]))", "{{kind}}")],
              unit="ops"),
        panel("timeseries", "Split copies",
              "Per-recipient copies of split messages: created, delivered, failed (DSN sent).",
              [target(f"sum by (event) (rate(bccguard_split_copies_total{{{SEL}}}[{RI}]))", "{{event}}")],
              unit="ops"),
        panel("timeseries", "Quarantine releases and sender notices",
              "Admin releases by result (from the audit log) and notices to senders by result.",
              [target(f"sum by (result) (increase(bccguard_quarantine_releases_total{{{SEL}}}[{RI}]))",
                      "release {{result}}"),
               target(f"sum by (result) (increase(bccguard_notices_total{{{SEL}}}[{RI}]))",
                      "notice {{result}}")]),
        # --- rules
        panel("bargauge", "Top rules by messages (range)",
              "Which rules decide the most mail in the selected range.",
              [target(f"topk(10, sum by (rule) "
                      f"(increase(bccguard_messages_total{{{SEL}}}[$__range])))",
                      "{{rule}}", instant=True)],
              options={"orientation": "horizontal", "displayMode": "gradient",
                       "reduceOptions": {"calcs": ["lastNotNull"]}}),
        panel("bargauge", "Top rules by exposures (range)",
              "Rules whose senders most often address many external recipients openly.",
              [target(f"topk(10, sum by (rule) "
                      f"(increase(bccguard_exposures_total{{{SEL}}}[$__range])))",
                      "{{rule}}", instant=True)],
              options={"orientation": "horizontal", "displayMode": "gradient",
                       "reduceOptions": {"calcs": ["lastNotNull"]}}),
        # --- process
        panel("timeseries", "Config reloads",
              "Reloads (SIGHUP) by result; after a failure the previous config stays in force.",
              [target(f"sum by (result) (increase(bccguard_config_reloads_total{{{SEL}}}[{RI}]))",
                      "{{result}}")]),
        panel("table", "Versions", "bccguard version per relay.",
              [target(f"max by (instance, version) (bccguard_build_info{{{SEL}}})",
                      "", instant=True, format="table")]),
    ]


def layout(items: list[Panel]) -> list[Panel]:
    """Left to right, top to bottom on Grafana's 24-column grid; ids in order."""
    x = y = row_h = 0
    for i, p in enumerate(items, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        p["id"] = i
        x += w
        row_h = max(row_h, h)
    return items


def dashboard() -> dict[str, Any]:
    return {
        "title": "bccguard",
        "uid": "bccguard",
        "description": "bccguard SMTP relay: traffic, exposures prevented, upstream health.",
        "tags": ["bccguard", "smtp"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "version": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(bccguard_build_info, instance)",
                    "query": {
                        "query": "label_values(bccguard_build_info, instance)",
                        "refId": "instance",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text("utf-8") != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
