#!/usr/bin/env python3
"""Structural check of the OpenTelemetry Collector configurations.

No collector binary installs offline here, so CI checks what the collector
itself refuses at start: every component a pipeline (or the service) names
is defined, of a type this kit relies on, each pipeline receives OTLP and
exports somewhere, and memory_limiter comes first among the processors (the
collector's documented order). Usage: check.py FILE...
"""
import re
import sys

import yaml

KNOWN = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch"},
    "exporters": {"azuremonitor", "otlp", "debug"},
    "extensions": {"health_check"},
}


def kind(name: str) -> str:
    return name.split("/", 1)[0]


def check(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    problems = []
    for section, kinds in KNOWN.items():
        for name in config.get(section) or {}:
            if kind(name) not in kinds:
                problems.append(f"{section}.{name}: unknown component type")
    service = config.get("service") or {}
    for name in service.get("extensions") or []:
        if name not in (config.get("extensions") or {}):
            problems.append(f"service.extensions: {name} is not defined")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        problems.append("service.pipelines: none")
    for pipeline, spec in pipelines.items():
        if kind(pipeline) != "traces":
            problems.append(f"{pipeline}: only trace pipelines are expected")
        for section in ("receivers", "processors", "exporters"):
            for name in spec.get(section) or []:
                if name not in (config.get(section) or {}):
                    problems.append(f"{pipeline}.{section}: {name} is not defined")
        if "otlp" not in (spec.get("receivers") or []):
            problems.append(f"{pipeline}: does not receive OTLP")
        if not spec.get("exporters"):
            problems.append(f"{pipeline}: exports nowhere")
        processors = spec.get("processors") or []
        if processors and kind(processors[0]) != "memory_limiter":
            problems.append(f"{pipeline}: memory_limiter must be the first processor")
    grpc = (((config.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}).get("grpc")
    if not grpc or not str(grpc.get("endpoint", "")).endswith(":4317"):
        problems.append("receivers.otlp: gRPC must listen on :4317 (what the servers export to)")
    for name, exporter in (config.get("exporters") or {}).items():
        if kind(name) == "azuremonitor":
            secret = str((exporter or {}).get("connection_string", ""))
            if not re.fullmatch(r"\$\{env:[A-Z_]+\}", secret):
                problems.append(f"exporters.{name}: the connection string must come from the environment")
    return problems


def main() -> int:
    failed = False
    for path in sys.argv[1:]:
        for problem in check(path):
            print(f"{path}: {problem}")
            failed = True
        if not failed:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
