"""Two CEL libraries on every rule of the generated CRD (issue #22): compile, verdicts, import and evaluation time.

For each library: compile every distinct rule of ``sftctl crd`` (transition rules included), then evaluate the
rules ``sft_contract.cel`` finds on each manifest (defaults applied): examples/*.yaml must pass every rule, and
it counts the manifests of tests/invalid/*.yaml refused by a rule at the field their first line names (the others
break a pattern, bound or type, which pydantic checks). The verdicts of the two libraries are compared rule by rule. Each library is installed into its own folder, so the environment stays clean:

    pip install --target /tmp/celtry-celpy cel-python
    pip install --target /tmp/celtry-cel common-expression-language
    python bench/cel_libraries.py --celpy /tmp/celtry-celpy --cel /tmp/celtry-cel
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def import_seconds(folder: str, module: str, runs: int = 9) -> float:
    code = (f"import sys, time; sys.path.append({folder!r}); t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t)")
    return min(float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(runs))  # least noise


def celpy_compiler():
    import celpy

    def compile_rule(rule: str):
        env = celpy.Environment()
        program = env.program(env.compile(rule))

        def run(value: Any) -> Any:
            out = program.evaluate({"self": celpy.json_to_cel(value)})
            if isinstance(out, Exception):
                raise out
            return bool(out)
        return run
    return compile_rule


def cel_compiler():
    import cel

    def compile_rule(rule: str):
        program = cel.compile(rule)
        return lambda value: bool(program.execute({"self": value}))
    return compile_rule


def all_rules() -> list[str]:
    from sft_operator.api.crd import crd_manifest

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(crd_manifest())
    return sorted(set(found))


def measure(name: str, compile_rule) -> dict[str, Any]:
    from sft_contract import cel as offline
    from sft_operator.api.types import SFTJob

    rules = all_rules()
    programs, broken = {}, []
    t = time.perf_counter()
    for rule in rules:
        try:
            programs[rule] = compile_rule(rule)
        except Exception as err:  # noqa: BLE001 - a rule the library cannot parse
            broken.append(f"compile {rule[:60]}: {err}")
    compile_s = time.perf_counter() - t

    verdicts: dict[tuple[str, str, str], bool] = {}
    wrong: list[str] = []
    per_manifest: list[float] = []
    refused = 0  # invalid manifests a rule refuses at their named field (the others break a pattern, bound or type)
    manifests = [(p, False) for p in sorted((ROOT / "examples").glob("*.yaml"))]
    manifests += [(p, True) for p in sorted((ROOT / "tests" / "invalid").glob("*.yaml"))]
    for path, invalid in manifests:
        doc = yaml.safe_load(path.read_text())
        field = path.read_text().splitlines()[0].partition(":")[2].strip() if invalid else ""
        sites = list(offline.rule_sites(SFTJob, doc))
        failed_at: list[str] = []
        for _ in range(3):  # warm, then the best of the rest
            t = time.perf_counter()
            for where, value, rule in sites:
                if rule["rule"] not in programs:
                    continue
                try:
                    ok = programs[rule["rule"]](value)
                except Exception as err:  # noqa: BLE001
                    broken.append(f"{path.name} {rule['rule'][:60]}: {err}")
                    ok = None
                dotted = ".".join(str(p) for p in where + tuple(x for x in rule.get("fieldPath", "").split(".") if x))
                verdicts[(path.name, dotted, rule["rule"])] = ok
                if ok is False:
                    failed_at.append(dotted)
            per_manifest.append(time.perf_counter() - t)
        if not invalid and failed_at:
            wrong.append(f"{path.name}: valid example fails {sorted(set(failed_at))}")
        if invalid and any(f == field or f.startswith(field + ".") for f in failed_at):
            refused += 1
    return {"name": name, "rules": len(rules), "compiled": len(programs), "compile_s": compile_s,
            "sites": len(verdicts), "per_manifest_ms": 1000 * statistics.median(per_manifest),
            "broken": broken, "wrong": wrong, "refused": refused, "verdicts": verdicts, "manifests": len(manifests)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--celpy", required=True, help="folder cel-python was installed into (--target)")
    p.add_argument("--cel", required=True, help="folder common-expression-language was installed into (--target)")
    args = p.parse_args()
    results = []
    for name, folder, module, compiler in (("cel-python", args.celpy, "celpy", celpy_compiler),
                                           ("common-expression-language", args.cel, "cel", cel_compiler)):
        imported = import_seconds(folder, module)
        sys.path.append(folder)
        result = measure(name, compiler())
        result["import_s"] = imported
        results.append(result)
        print(f"{name}: import {imported * 1000:.0f} ms; {result['compiled']}/{result['rules']} distinct rules compile "
              f"({result['compile_s'] * 1000:.0f} ms); {result['sites']} evaluations over {result['manifests']} "
              f"manifests; {result['per_manifest_ms']:.2f} ms per manifest (median); "
              f"{len(result['broken'])} errors; valid examples failing a rule: {len(result['wrong'])}; "
              f"invalid manifests refused by a rule at their field: {result['refused']}")
        for line in result["broken"][:10] + result["wrong"][:10]:
            print("   ", line)
    a, b = results[0]["verdicts"], results[1]["verdicts"]
    differ = [k for k in a.keys() & b.keys() if a[k] != b[k]]
    print(f"verdicts compared: {len(a.keys() & b.keys())}, differing: {len(differ)}")
    for k in differ[:10]:
        print("   ", k[0], k[1], k[2][:60], a[k], b[k])


if __name__ == "__main__":
    main()
