"""`sftctl`: validate, render, explain and run SFTJobs; read live ones; start the dev cluster.

``run``, ``example-assets`` and the data check of ``validate --data`` come from the trainer, and
``dev-cluster`` from the development tools (tools/, sft-devtools): other packages, found through entry
points (``PLUGIN_GROUP``, ``DATA_CHECK_GROUP``), so this CLI imports neither.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from sft_operator import __version__
from sft_operator.api.crd import crd_manifest, crd_yaml
from sft_operator.cli.model_shapes import find_shapes
from sft_operator.core.advice import advise, memory_plan
from sft_operator.core.render import RenderOptions, render_children
from sft_operator.core.validation import load_documents, parse_sftjob, problems_in

PLUGIN_GROUP = "sftctl.commands"  # name: the command; value: register(subparsers), which adds it
DATA_CHECK_GROUP = "sftctl.data_check"  # value: check(where, spec, world_size) -> bool, for validate --data
TRAINER = "the trainer: pip install 'sft-operator[trainer]'"
DEV_TOOLS = ("the dev cluster, a development tool that is not installed here: in a source checkout run "
             "`bash scripts/setup.sh` (it installs tools/ as sft-devtools)")
# The commands other packages contribute: listed in --help whether or not their package is installed.
PLUGIN_COMMANDS = {
    "run": ("run the trainer on this machine on an SFTJob manifest (no cluster)", TRAINER),
    "example-assets": ("generate the tiny offline model, tokenizer and datasets", TRAINER),
    "dev-cluster": ("local dev/test cluster (needs the tools/ package of a source checkout)", DEV_TOOLS),
}

EPILOG = """examples:
  sftctl validate examples/*.yaml           check manifests offline (exit 1 lists every bad field)
  sftctl validate --data examples/local-tiny.yaml   and their data: bad rows by file and row, lengths, steps
  sftctl render examples/multi-node-lora.yaml   the ConfigMap, Service and Job the operator creates
  sftctl explain spec.hyperparameters       field docs, like kubectl explain
  sftctl example-assets && sftctl run examples/local-tiny.yaml   fine-tune a tiny model on this machine
  sftctl dev-cluster up                     a local control plane with simulated GPU nodes
  sftctl status -n team-a my-job            phase, progress and loss of a live SFTJob
"""


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        path = Path(name)
        try:
            documents = load_documents(path)
        except (OSError, yaml.YAMLError) as err:
            print(f"{path}: cannot read: {err}", file=sys.stderr)
            failed = True
            continue
        if not documents:
            print(f"{path}: no YAML documents", file=sys.stderr)
            failed = True
        for index, document in enumerate(documents):
            where = f"{path}" if len(documents) == 1 else f"{path}[{index}]"
            problems = problems_in(document)
            for problem in problems:
                print(f"{where}: {problem}", file=sys.stderr)
            failed = failed or bool(problems)
            if problems:
                continue
            spec = parse_sftjob(document).spec
            plan, why = None, ""
            if not args.no_advice:
                shapes, why = find_shapes(spec.model.source, spec.model.revision, network=True)
                plan, why = memory_plan(spec, shapes, why)
            if plan is not None and plan.fits:
                print(f"{where}: {plan.report()}")
            elif why:
                print(f"{where}: {why}")
            warnings = [] if args.no_advice else advise(spec, plan=plan)
            for warning in warnings:
                print(f"{where}: warning: {warning}")
            if args.data and not check_data(where, document):
                failed = True
                continue
            if not args.quiet:
                print(f"{where}: valid" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 1 if failed else 0


def check_data(where: str, document: dict[str, Any]) -> bool:
    """``validate --data``: the data check the trainer contributes (``DATA_CHECK_GROUP``); True when the data
    is fit to train on."""
    checks = entry_points(group=DATA_CHECK_GROUP)
    try:
        check = next(iter(checks)).load() if checks else None
    except ImportError as err:
        print(f"{where}: --data needs {TRAINER} ({err})", file=sys.stderr)
        return False
    if check is None:
        print(f"{where}: --data needs {TRAINER}", file=sys.stderr)
        return False
    spec = parse_sftjob(document).spec
    return check(where, spec, spec.world_size)


def _single_document(path: str) -> dict[str, Any]:
    documents = load_documents(Path(path))
    if len(documents) != 1:
        raise SystemExit(f"{path}: expected exactly one SFTJob, found {len(documents)} documents")
    problems = problems_in(documents[0])
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        raise SystemExit(1)
    return documents[0]


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (the trainer config) as literal blocks, so rendered YAML reads like a file."""


_ReadableDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def cmd_render(args: argparse.Namespace) -> int:
    document = _single_document(args.file)
    if args.namespace:
        document.setdefault("metadata", {})["namespace"] = args.namespace
    options = RenderOptions(
        default_image=args.image or RenderOptions.default_image,
        progress_base_url=args.progress_url,
    )
    children = render_children(document, options)
    sys.stdout.write(yaml.dump_all(children, Dumper=_ReadableDumper, sort_keys=False, width=120))
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    if args.output:
        Path(args.output).write_text(crd_yaml())
    else:
        sys.stdout.write(crd_yaml())
    return 0


def _schema_at(path: str) -> tuple[dict[str, Any], str]:
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walked = []
    for part in [p for p in path.split(".") if p and p.lower() != "sftjob"]:
        node = schema.get("items", schema) if schema.get("type") == "array" else schema
        props = node.get("properties", {})
        if part not in props:
            known = ", ".join(sorted(props)) or "none"
            raise SystemExit(f"field {'.'.join(walked + [part])!r} does not exist; fields here: {known}")
        schema = props[part]
        walked.append(part)
    return schema, ".".join(walked) or "SFTJob"


def _type_name(node: dict[str, Any]) -> str:
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type_name(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return "map[string]string"
    if "enum" in node:
        return f"{kind} ({' | '.join(map(str, node['enum']))})"
    return kind


def cmd_explain(args: argparse.Namespace) -> int:
    node, where = _schema_at(args.field or "")
    print(f"FIELD: {where} <{_type_name(node)}>")
    if node.get("description"):
        print(f"\nDESCRIPTION:\n  {node['description']}")
    if "default" in node:
        print(f"\nDEFAULT: {json.dumps(node['default'])}")
    bounds = {k: node[k] for k in ("minimum", "maximum", "maxLength", "maxItems", "pattern") if k in node}
    if bounds:
        print(f"\nBOUNDS: {', '.join(f'{k}={v}' for k, v in bounds.items())}")
    body = node.get("items", node) if node.get("type") == "array" else node
    props = body.get("properties", {})
    if props:
        print("\nFIELDS:")
        required = set(body.get("required", []))
        for name, sub in props.items():
            flag = " -required-" if name in required else ""
            line = f"  {name}\t<{_type_name(sub)}>{flag}"
            desc = sub.get("description", "")
            print(line + (f"\n    {desc}" if desc else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sft_operator.cli.status_view import show_status

    return show_status(args.name, args.namespace, watch=False, kubeconfig=args.kubeconfig)


def cmd_watch(args: argparse.Namespace) -> int:
    from sft_operator.cli.status_view import show_status

    return show_status(args.name, args.namespace, watch=True, kubeconfig=args.kubeconfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftctl",
        description="Work with SFTJobs (sft.dev/v1alpha1): supervised fine-tuning as a Kubernetes resource.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sftctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check SFTJob manifests offline; exit 1 names every bad field")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--no-advice", action="store_true", help="skip fine-tuning advice warnings")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems and warnings")
    p.add_argument("--data", action="store_true",
                   help="also check the data as the trainer reads it: invalid rows, duplicates, token lengths, "
                   "estimated steps (needs the trainer extra; pvc:// under $SFT_PVC_ROOT)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the children (ConfigMap, Service, Job) the operator would create")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-n", "--namespace", help="namespace to render into (default: the manifest's)")
    p.add_argument("--image", help="default trainer image (the operator's --trainer-image)")
    p.add_argument("--progress-url", help="operator progress endpoint base URL")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("crd", help="print the SFTJob CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("explain", help="document a field, like kubectl explain (e.g. spec.hyperparameters)")
    p.add_argument("field", nargs="?", default="", metavar="FIELD")
    p.set_defaults(func=cmd_explain)

    plugins = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}
    _add_plugin(sub, "run", plugins)
    _add_plugin(sub, "example-assets", plugins)

    for name, func, text in (
        ("status", cmd_status, "show phase, progress, loss and conditions of a live SFTJob"),
        ("watch", cmd_watch, "follow a live SFTJob until it finishes"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        p.add_argument("-n", "--namespace", default=None, help="namespace (default: the kubeconfig's)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        p.set_defaults(func=func)

    p = sub.add_parser("operator", help="run the operator (see `sftctl operator run --help`)")
    op_sub = p.add_subparsers(dest="operator_command", required=True, metavar="COMMAND")
    op_sub.add_parser("run", help="run the Kopf operator (flags: `sftctl operator run --help`)")

    _add_plugin(sub, "dev-cluster", plugins)  # a development tool: a checkout has it (tools/), the images don't
    for name in sorted(plugins.keys() - PLUGIN_COMMANDS.keys()):
        _add_plugin(sub, name, plugins)
    return parser


def _add_plugin(sub: Any, name: str, plugins: dict[str, Any]) -> None:
    """The command ``name`` as its package registers it; without the package, one that says what to install."""
    help_text, needs = PLUGIN_COMMANDS.get(name, ("", "its package"))
    why = ""
    if name in plugins:
        try:
            plugins[name].load()(sub)
            return
        except ImportError as err:
            why = f" ({err})"
    p = sub.add_parser(name, help=help_text)
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda _args: _missing(f"sftctl {name} needs {needs}{why}"))


def _missing(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["operator", "run"]:
        # Everything after `operator run` (including --help) belongs to the operator's own parser.
        from sft_operator.runtime.main import run_from_cli

        return run_from_cli(argv[2:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
